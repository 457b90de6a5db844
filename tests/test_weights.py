import json

import pytest

from ffviz.weights import DEFAULT_WEIGHTS, WeightsError, load_tiny, save_weights
from tests.conftest import random_model


def test_committed_weights_load_and_match_their_card():
    model, card = load_tiny(DEFAULT_WEIGHTS)
    assert card["steps"] > 0 and card["data_version"] >= 1
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2 ** 20
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_corrupt_missing_and_cardless_weights_are_clear_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(random_model(), path, {"steps": 1})
    load_tiny(path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt or altered"):
        load_tiny(path)
    with pytest.raises(WeightsError, match="not found"):
        load_tiny(tmp_path / "missing.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="card not found"):
        load_tiny(path)


def test_truncated_file_with_matching_card_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    card = save_weights(random_model(), path, {"steps": 1})
    path.write_bytes(path.read_bytes()[:100])
    card_file = path.with_suffix(".json")
    card["sha256"] = __import__("ffviz.weights", fromlist=["sha256"]).sha256(path)
    card_file.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_tiny(path)
