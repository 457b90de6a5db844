"""tools/train_step_time.py times the teacher-forcing pass in bands against one band."""
import json
import subprocess
import sys
from pathlib import Path

from ffviz.weights import save_weights
from tests.conftest import random_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_step_time.py"


def test_the_tool_times_both_and_checks_the_losses_agree(tmp_path):
    model = random_model(predict_change=True, motion_reach=2, motion_pick=True, wrap=True)
    save_weights(model, tmp_path / "w.safetensors", {"steps": 0})
    out = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "w.safetensors"), "--repeats", "1",
                          "--bands", "3", "--step", "0"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["one_band_s"] > 0 and result["3_bands_s"] > 0
    assert result["ratio"] > 0 and result["clip_frames"] == 6
    bad = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "w.safetensors"), "--bands", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--bands" in bad.stderr
