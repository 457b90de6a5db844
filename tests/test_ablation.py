"""The ablation command: one factor at a time from a scored policy's defaults, run through
the eval sweep, one table (tiny grids on random weights: what is tested is the machinery)."""
import json

import pytest

from ffviz.ablation import ablation_config, ablation_report, variants
from ffviz.evaluate import EvalError
from ffviz.sweep import run_sweep
from tests.conftest import random_model

PROMPT = "a small red circle on a blue background with a wide gray pillar, leaving the view"


def test_variants_change_one_thing_from_the_defaults():
    ff = variants("future_forcing")
    assert list(ff) == [f"future_forcing:{v}" for v in (
        "defaults", "score only (tau=0)", "merge only (recency)", "horizon=2", "horizon=4",
        "rank=0", "rank=2", "stride=1")]
    assert ff["future_forcing:merge only (recency)"].recency
    ea = variants("expected_attention")
    assert list(ea) == [f"expected_attention:{v}" for v in (
        "defaults", "merge only (recency)", "score + merge (tau=4)", "horizon=2", "horizon=4",
        "stride=2", "statistics=historical")]
    assert ea["expected_attention:merge only (recency)"].args == ("tau=4",)
    with pytest.raises(EvalError, match="ablate takes"):
        variants("h2o")
    with pytest.raises(EvalError, match="unknown baseline"):
        ablation_config("future_forcing", ["lru"])


def test_ablation_sweep_writes_one_table(tmp_path):
    config = ablation_config("expected_attention", ["full", "window"], budgets=[3], seeds=[0, 1],
                             frames=6, prompts=[PROMPT], horizon=2)
    summary = run_sweep(random_model(), config, tmp_path, show_progress=False,
                        report=ablation_report("python -m ffviz ablate --policy expected_attention"))
    assert summary["failed_runs"] == 0 and "ablation.md" in summary["files"]
    md = (tmp_path / "ablation.md").read_text(encoding="utf-8")
    assert "    python -m ffviz ablate --policy expected_attention" in md
    rows = {l.split(" | ")[1]: l.split(" | ") for l in md.splitlines() if l.startswith("| 3 |")}
    assert set(rows) == {"full", "window", *variants("expected_attention")}
    merge_only = rows["expected_attention:merge only (recency)"]
    assert merge_only[2] == "tau=4 (kept by recency)" and merge_only[3] == "0"  # nothing chosen
    assert rows["expected_attention:defaults"][3] == "64"  # budget 3: one frame beyond sink, newest
    assert "returns − defaults |" in md  # paired on (prompt, seed); no return in 6 frames here
    stored = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "runs").glob("seed*.json")]
    assert len(stored) == 2 and all(len(u["rows"]) == len(config.policies) for u in stored)
    assert (tmp_path / "results.md").exists() and (tmp_path / "fidelity.csv").exists()


def test_cli_ablate_bad_input_exits_2_before_loading(tmp_path, capsys):
    from ffviz.__main__ import main
    out = tmp_path / "x"
    for args, msg in ((["--seeds", "a-b"], "seeds must"), (["--baselines", "lru"], "unknown baseline"),
                      (["--budgets", "0"], "budget must be in")):
        code = main(["ablate", "--policy", "future_forcing", "--out", str(out),
                     "--weights", "/nonexistent.safetensors", *args])
        assert code == 2 and msg in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["ablate", "--policy", "h2o"])
