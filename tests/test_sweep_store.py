"""What a resumed sweep counts as the same stored runs."""
import json


def test_new_sampling_settings_on_the_card_run_anew(tmp_path):
    """Same weights, a card whose sampling settings changed: not the same stored runs."""
    from ffviz.sweep import weights_identity
    from ffviz.weights import read_card, save_weights
    from tests.conftest import random_model
    path = tmp_path / "tiny.safetensors"
    save_weights(random_model(), path, {"steps": 1})
    first = weights_identity(f"tiny:{path}")
    card = read_card(path)
    card["config"]["recall_bias"] = 4.0
    path.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    second = weights_identity(f"tiny:{path}")
    assert first != second and first.split(":")[0] == second.split(":")[0] == card["sha256"]
