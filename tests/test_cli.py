"""The CLI end to end, in a subprocess, with the committed weights."""
import json
import subprocess
import sys

import numpy as np
import pytest


def ffviz(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ffviz", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_generate_writes_every_file(tmp_path):
    out = tmp_path / "run"
    r = ffviz("generate", "--prompt", "a red circle and a blue square on a green background",
              "--frames", "10", "--policy", "window", "--budget", "4", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "frame" in r.stderr  # the progress bar
    for name in ("video.mp4", "frames.npz", "record.npz", "decisions.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for key in ("frames", "seconds", "fps", "policy", "budget_frames", "tokens_per_frame",
                "peak_cache_tokens", "recorder_bytes", "metrics"):
        assert key in summary
    assert summary["frames"] == 10 and summary["policy"] == "window"
    assert summary["peak_cache_tokens"] <= 5 * summary["tokens_per_frame"]
    frames = np.load(out / "frames.npz")["frames"]
    assert frames.dtype == np.uint8 and frames.shape == (10, 32, 32, 3)
    record = np.load(out / "record.npz")
    assert record["mean_pre"].shape[0] == 8  # the 8 generated frames were recorded
    decisions = [json.loads(l) for l in (out / "decisions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(decisions) == 10 - 4 and all(d["tokens_after"] == 4 * 64 for d in decisions)
    assert 0 <= summary["metrics"]["consistency"] <= 1


@pytest.mark.parametrize("args,msg", [
    (["--policy", "lru"], "unknown policy"),
    (["--budget", "0"], "at least 1"),
    (["--frames", "0"], "frames must be in"),
    (["--frames", "5000"], "frames must be in"),
    (["--prompt", "colourless green ideas"], "no object"),
    (["--weights", "/nonexistent/w.safetensors"], "weights not found"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, msg):
    r = ffviz("generate", "--frames", "6", "--out", str(tmp_path / "x"), *args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = ffviz("bench", "--frames", "6", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    for config in ("full", "window4", "future_forcing4"):
        assert result[config]["fps"] > 0 and result[config]["fps_recording"] > 0
        assert "recorder_overhead" in result[config]
    latency = result["latency"]
    # a fresh process also starts Python, imports torch and reads the weights
    assert 0 < latency["first_frame_seconds"] < latency["cold_start_first_frame_seconds"]


def test_bench_policies_reports_each_policys_share_of_a_step(tmp_path):
    out = tmp_path / "policies.json"
    r = ffviz("bench", "--policies", "window,future_forcing,future_forcing:rank=2:tau=0",
              "--budget", "2", "--frames", "8", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text(encoding="utf-8"))["policies"]
    for name in ("window", "future_forcing", "future_forcing:rank=2:tau=0"):
        row = result[name]
        assert row["compressions"] == 8 - 2  # every generated frame (the 2 given ones fill the budget)
        assert 0 < row["policy_ms_per_compression"] < row["step_ms"]
        assert row["policy_share_of_step"] == pytest.approx(
            row["policy_ms_per_compression"] / row["step_ms"], abs=1e-3)
    r = ffviz("bench", "--policies", "window,lru", "--frames", "8")
    assert r.returncode == 2 and "unknown policy" in r.stderr
    r = ffviz("bench", "--policies", "future_forcing:rank=-1", "--frames", "8")
    assert r.returncode == 2 and "rank" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message without a GPU")
def test_full_size_wan_needs_a_gpu(tmp_path):
    r = ffviz("bench", "--model", "wan:full-random", "--policies", "window", "--frames", "6")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_bench_pairs_plain_and_recording_steps_on_separate_models(monkeypatch):
    """The lockstep pair: the recorder listens to the twin only, sees every frame of its
    run, and every hook (the recorder's, each run's query tap) is gone afterwards."""
    from ffviz import bench, run
    from ffviz.hooks import hook_points
    from tests.conftest import random_model
    model, twin = random_model(), random_model()
    seen = []
    real = run.QueryRecorder
    monkeypatch.setattr(run, "QueryRecorder", lambda *a: seen.append(real(*a)) or seen[-1])
    plain, rec = bench._paired_run(model, twin, 5, "window", 2)
    assert plain > 0 and rec > 0
    assert len(seen) == 1  # the twin's run records, the plain one does not
    assert list(seen[0].frames) == [2, 3, 4]  # each generated frame of the twin's run, once
    for m in (model, twin):
        assert all(not p.fns for p in hook_points(m).values())


def test_first_frame_latency_waits_for_a_generated_frame(monkeypatch):
    """The given frames are rendered from the scene; the latency ends at the first
    frame the model generates, and the run is closed there."""
    from ffviz import bench
    from tests.conftest import random_model
    model = random_model()
    taken, closed = [], []

    class FakeRun:
        def __init__(self, *a):
            pass

        def __iter__(self):
            def steps():
                try:
                    for frames in ([0, 1], [2], [3], [4]):
                        taken.append(frames)
                        yield type("Step", (), {"frame_indices": frames})
                finally:
                    closed.append(True)
            return steps()

    monkeypatch.setattr(bench, "Run", FakeRun)
    assert bench.first_frame_seconds(model, "a red circle on a black background", repeats=1) > 0
    assert model.cfg.given_frames == 2 and taken == [[0, 1], [2]] and closed == [True]
