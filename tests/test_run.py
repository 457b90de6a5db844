"""The run driver (ffviz/run.py): what a run keeps, writes, and leaves behind when it
ends early or fails; and the house rules around it (viz only draws, importing the
app does nothing)."""
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffviz.export import FILES, FrameSpool
from ffviz.generate import Controls, RunSettings
from ffviz.policies import PolicyError
from ffviz.policies.window import Window
from ffviz.run import Run
from tests.conftest import random_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


@dataclasses.dataclass
class FailsLater(Window):
    """A window that fails at its third call."""
    calls: int = dataclasses.field(default=0, init=False)

    def compress(self, cache, budget_tokens, ctx):
        self.calls += 1
        if self.calls == 3:
            raise PolicyError("failing on purpose")
        return super().compress(cache, budget_tokens, ctx)


def test_a_run_writes_its_files_and_steps_once(tmp_path, tiny_random):
    controls = Controls("window", 2)
    run = Run(tiny_random, RunSettings(PROMPT, frames=6), controls, tmp_path / "r")
    for step in run:
        if step.index == 2:
            controls.set("sink", 3)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(FILES)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))
    assert summary == run.summary and summary["frames"] == 6 and not summary["stopped_early"]
    [switch] = summary["switches"]  # the same fields as the app's
    assert switch == {"frame": 4, "policy": "sink", "params": switch["params"], "budget_frames": 3}
    assert "n_sink" in switch["params"]
    frames = np.load(tmp_path / "r" / "frames.npz")["frames"]
    assert np.array_equal(frames, run.frames.all()) and frames.shape == (6, 32, 32, 3)
    assert run.stats.chunks == 5 and run.stats.compressions > 0
    with pytest.raises(RuntimeError, match="runs once"):
        next(iter(run))


def test_an_abandoned_run_is_written_as_stopped(tmp_path, tiny_random):
    run = Run(tiny_random, RunSettings(PROMPT, frames=8), Controls("window", 2), tmp_path / "r")
    steps = iter(run)
    next(steps), next(steps)
    steps.close()  # the consumer lets go (a cancelled app run)
    assert run.summary["stopped_early"] and run.summary["frames"] == 3
    assert (tmp_path / "r" / "summary.json").exists()


def test_a_failed_run_leaves_nothing(tmp_path, tiny_random):
    out = tmp_path / "r"
    with pytest.raises(PolicyError, match="on purpose"):
        Run(tiny_random, RunSettings(PROMPT, frames=8), Controls(FailsLater(), 2), out).finish()
    assert not out.exists()


def test_the_frame_spool_keeps_frames_once_and_the_newest_in_memory(tmp_path):
    spool = FrameSpool(tmp_path, ring=3)
    assert len(spool) == 0 and spool.newest().shape[0] == 0 and spool.all().shape[0] == 0
    chunks = [np.full((2, 4, 5, 3), i, np.uint8) for i in range(4)]
    for c in chunks:
        spool.add(c)
    assert np.array_equal(spool.all(), np.concatenate(chunks))
    assert np.array_equal(spool.newest(), np.concatenate(chunks)[-3:])
    assert not list(tmp_path.iterdir())  # the file has no name
    with pytest.raises(ValueError, match="shape"):
        spool.add(np.zeros((1, 4, 4, 3), np.uint8))


def test_bad_settings_fail_before_any_file(tmp_path):
    from ffviz.generate import GenerationError
    with pytest.raises(GenerationError):
        Run(random_model(), RunSettings(PROMPT, frames=0), Controls("window", 2), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_viz_only_draws():
    """ffviz/viz imports no part of the run machinery (only statistics, numpy, PIL, plotly)."""
    banned = {"generate", "hooks", "policies", "cache", "run", "train", "evaluate", "reference",
              "app", "models", "export"}
    for path in (ROOT / "ffviz" / "viz").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "ffviz" and len(parts) > 1 and parts[1] in banned), \
                    f"{path.name} imports {name}"


def test_importing_the_app_does_nothing():
    """No model, no warm-up, no torch settings: build() does all that."""
    code = ("import sys, torch; torch.set_num_threads(2); import app; "
            "assert torch.get_num_threads() == 2; assert 'ffviz.weights' not in sys.modules; "
            "assert not hasattr(app, 'MODEL') and not hasattr(app, 'demo'); print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]
