import json

import numpy as np

import pytest

from ffviz.policies import PolicyError
from ffviz.showcase import parse_setting, showcase, showcase_prompt
from ffviz.scenes import parse_prompt
from ffviz.train import TRAIN_SEED_BASE
from tests.conftest import random_model


def test_showcase_writes_table_strip_and_json(tmp_path):
    summary = showcase(random_model(), [0, 1], frames=6, out=tmp_path, stride=2, strip_seeds=1)
    assert set(summary) == {"window 4 (default)", "full cache", "window 1"}
    data = json.loads((tmp_path / "showcase.json").read_text(encoding="utf-8"))
    assert len(data["runs"]["full cache"]) == 2
    assert "| window 1 |" in (tmp_path / "showcase.md").read_text(encoding="utf-8")
    from ffviz.scenes import Scene
    truths = [Scene(parse_prompt(showcase_prompt(s))[0], s).render(np.arange(6)) for s in (0, 1)]
    want = np.mean([np.mean(((t[2:].astype(float) - t[1:-1]) / 127.5) ** 2) for t in truths])
    assert data["copy_previous_mse"] == pytest.approx(want, rel=1e-5) and want > 0
    assert all(0 < r["mse"] <= 4 for r in data["runs"]["window 1"])
    from PIL import Image
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape[0] == 4 * 34 * 3  # truth + three settings, one seed


def test_showcase_prompts_parse_and_seeds_are_not_training_seeds():
    for seed in range(8):
        parse_prompt(showcase_prompt(seed))
        assert seed < TRAIN_SEED_BASE


def test_also_adds_a_setting_with_its_parameters(tmp_path):
    also = [parse_setting("sink:2:n_sink=2")]
    assert also == [("sink 2, n_sink=2", "sink", {"n_sink": 2}, 2)]
    summary = showcase(random_model(), [0], frames=5, out=tmp_path, stride=2, strip_seeds=0, also=also)
    assert "sink 2, n_sink=2" in summary and 0 <= summary["sink 2, n_sink=2"]["background"] <= 1
    assert "tracking" in summary["full cache"]
    for bad, msg in [("sink", "POLICY:BUDGET"), ("sink:0", "POLICY:BUDGET"),
                     ("nope:2", "unknown policy"), ("sink:2:depth=3", "no parameter"),
                     ("sink:2:n_sink=-1", "n_sink")]:
        with pytest.raises(PolicyError, match=msg):
            parse_setting(bad)


def test_teacher_forced_setting_runs_on_true_frames(tmp_path):
    """The diagnostic keeps the given frames and generates the rest from true context;
    with true frames in the cache it differs from the free-running run."""
    from ffviz.showcase import run_frames, teacher_forced_frames
    model = random_model()
    prompt = showcase_prompt(0)
    tf = teacher_forced_frames(model, prompt, 0, 6, 2)
    free = run_frames(model, prompt, 0, 6, "window", 2)
    assert tf.shape == free.shape == (6, 32, 32, 3) and tf.dtype == np.uint8
    assert np.array_equal(tf[:2], free[:2])  # the given frames, and the first generated frame
    assert np.array_equal(tf[2], free[2])  # sees the same (true) cache in both
    assert not np.array_equal(tf[3:], free[3:])
    from ffviz.showcase import pixel_mse
    assert pixel_mse(tf, tf) == 0 and pixel_mse(np.zeros((1, 2, 2, 3), np.uint8),
                                                np.full((1, 2, 2, 3), 255, np.uint8)) == pytest.approx(4)
    label = parse_setting("teacher-forced:4")
    assert label[1:] == ("teacher-forced", {}, 4)
    with pytest.raises(PolicyError, match="budget only"):
        parse_setting("teacher-forced:4:x=1")


def test_showcase_steps_reach_every_setting(tmp_path):
    """``--steps`` changes the sampler of free-running and teacher-forced runs alike; the
    default (None) is the card's step count; a bad count is refused before any run."""
    from ffviz.__main__ import main
    from ffviz.showcase import run_frames, teacher_forced_frames
    model = random_model()
    prompt = showcase_prompt(0)
    card = model.cfg.sample_steps
    assert np.array_equal(run_frames(model, prompt, 0, 4, "window", 2),
                          run_frames(model, prompt, 0, 4, "window", 2, steps=card))
    assert not np.array_equal(run_frames(model, prompt, 0, 4, "window", 2),
                              run_frames(model, prompt, 0, 4, "window", 2, steps=card + 2))
    assert np.array_equal(teacher_forced_frames(model, prompt, 0, 4, 2),
                          teacher_forced_frames(model, prompt, 0, 4, 2, steps=card))
    assert not np.array_equal(teacher_forced_frames(model, prompt, 0, 4, 2),
                              teacher_forced_frames(model, prompt, 0, 4, 2, steps=1))
    with pytest.raises(SystemExit, match="--steps must be in"):
        main(["showcase", "--steps", "0", "--out", str(tmp_path)])
