"""tools/raw_weights.py: a run's raw (optimizer) weights written as a weights file."""
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffviz.models.tiny import TinyConfig, TinyVideoModel
from ffviz.weights import load_tiny, save_weights

TOOL = Path(__file__).resolve().parents[1] / "tools" / "raw_weights.py"


def test_writes_the_state_weights_not_the_ema(tmp_path):
    torch.manual_seed(0)
    ema = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2))
    save_weights(ema, tmp_path / "run" / "tiny.safetensors", {"steps": 7})
    raw = {k: v + 1.0 for k, v in ema.state_dict().items()}
    torch.save({"model": raw, "opt": {}, "step": 7}, tmp_path / "run" / "tiny.state.pt")
    main = runpy.run_path(str(TOOL))["main"]
    main([str(tmp_path / "run" / "tiny.safetensors"), "--out", str(tmp_path / "raw" / "tiny.safetensors")])
    got, card = load_tiny(tmp_path / "raw" / "tiny.safetensors")
    assert all(torch.equal(got.state_dict()[k], raw[k]) for k in raw)
    assert "step 7" in card["weights"]
    with pytest.raises(SystemExit, match="must differ"):
        main([str(tmp_path / "run" / "tiny.safetensors"), "--out", str(tmp_path / "run" / "tiny.safetensors")])
    with pytest.raises(SystemExit, match="no training state"):
        main([str(tmp_path / "raw" / "tiny.safetensors"), "--out", str(tmp_path / "x.safetensors")])


def test_runs_as_a_script_from_another_folder(tmp_path):
    """As docs/README.md calls it (``python tools/raw_weights.py W --out W2``), where the
    script's folder, not the repository, is first on the import path."""
    done = subprocess.run([sys.executable, str(TOOL), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "--out" in done.stdout, done.stderr
