"""tools/occluder_edge_probe.py: which patches one move cannot give, and the model's
error on them from true frames."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from ffviz.weights import save_weights
from tests.conftest import random_model
from tests.test_one_motion import MOTION, PROMPT

TOOL = Path(__file__).resolve().parents[1] / "tools" / "occluder_edge_probe.py"
GRAY, YELLOW, BLUE = (128, 128, 128), (240, 220, 40), (40, 60, 220)


def two_frames() -> np.ndarray:
    """8x8 frames, 4x4 patches: a 2-px pillar at columns 0-1 and a 2x2 object right of
    it, which moves 2 px right: it leaves background where it was, next to the pillar."""
    truth = np.zeros((2, 8, 8, 3), np.uint8)
    truth[:] = BLUE
    truth[:, :, 0:2] = GRAY
    truth[0, 0:2, 2:4] = YELLOW
    truth[1, 0:2, 4:6] = YELLOW
    return truth


def test_each_patch_is_classed_by_the_move_that_gives_it():
    probe = runpy.run_path(str(TOOL))
    classes = probe["patch_classes"](two_frames(), (0, 2), (0, 2), 4)
    names = [[probe["CLASSES"][i] for i in row] for row in classes[0]]
    # top left: the object left background behind it, next to the pillar: moving brings
    # the pillar in, standing still keeps the object; top right: the object moved there
    assert names == [["pillar edge", "moved"], ["still", "still"]]
    no_pillar = probe["patch_classes"](two_frames(), (0, 2), None, 4)
    assert probe["CLASSES"][no_pillar[0, 0, 0]] == "view edge"


def test_wrong_pixels_is_the_share_off_per_patch():
    probe = runpy.run_path(str(TOOL))
    truth = two_frames()
    assert probe["wrong_pixels"](truth[1:], truth[1:], 4).sum() == 0
    share = probe["wrong_pixels"](truth[:1], truth[1:], 4)[0]  # copying the previous frame
    assert share[0, 0] == pytest.approx(4 / 16) and share[0, 1] == pytest.approx(4 / 16)
    assert share[1].sum() == 0


def test_the_best_lag_reads_find_the_past_along_the_motion_and_in_place():
    probe = runpy.run_path(str(TOOL))
    rng = np.random.default_rng(0)
    truth = np.zeros((12, 8, 8, 3), np.uint8)
    truth[0] = rng.integers(0, 255, (8, 8, 3))
    for t in range(1, 12):  # the whole view moves 1 px right a frame (it wraps)
        truth[t] = np.roll(truth[t - 1], (0, 1), axis=(0, 1))
    along, same = probe["best_lag_reads"](truth, 2, (0, 1), 4, lags=(4, 8))
    assert along.shape == same.shape == (10, 2, 2)
    assert np.all(along[:2] == 1) and np.all(along[2:] == 0)  # frames 2, 3 reach before frame 0
    assert np.all(same[6:] == 0) and same[2:6].min() > 0  # 8 px along an 8-px view: in place
    still = np.repeat(truth[:1], 12, 0)
    along, same = probe["best_lag_reads"](still, 4, (0, 1), 4, lags=(4,))
    assert np.all(same == 0) and along.min() > 0  # nothing moved: only the same place gives it


def test_the_tool_reports_every_class_and_refuses_what_it_cannot_measure(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_weights(random_model(**MOTION), path, {"steps": 3})
    main = runpy.run_path(str(TOOL))["main"]
    main([str(path), "--seeds", "0", "--frames", "5", "--prompt", PROMPT, "--budget", "5"])
    line = json.loads(capsys.readouterr().out)
    assert line["steps"] == 3 and line["budget"] == 5 and set(line["classes"]) == {"still", "moved", "pillar edge", "view edge"}
    counted = sum(c["patches"] for c in line["classes"].values())
    assert counted == 3 * 64  # 3 generated frames of 8x8 patches, each in one class
    for c in line["classes"].values():
        for key in ("wrong", "copy_wrong", "best_world_move_wrong", "same_place_8_back_wrong",
                    "best_move_or_recall_wrong", "best_move_recall_or_same_place_wrong"):
            assert c[key] is None or 0 <= c[key] <= 1
    still = line["classes"]["still"]  # copying gives a still patch, so the better move does
    assert still["patches"] == 0 or still["copy_wrong"] == still["best_world_move_wrong"] == 0
    for c in line["classes"].values():  # more reads to pick from are never worse
        if c["patches"]:
            assert c["best_move_recall_or_same_place_wrong"] <= c["best_move_or_recall_wrong"] \
                <= c["best_world_move_wrong"]
    with pytest.raises(SystemExit):
        main([str(path), "--frames", "2"])
    with pytest.raises(SystemExit):
        main([str(path), "--seeds", "x"])
    with pytest.raises(SystemExit):
        main([str(path), "--budget", "0"])
    plain = tmp_path / "plain" / "tiny.safetensors"
    save_weights(random_model(), plain, {"steps": 1})
    with pytest.raises(SystemExit):
        main([str(plain), "--frames", "4"])


def test_a_recall_model_reports_what_its_read_gets_wrong(tmp_path, capsys):
    """With the whole true past cached, recall of a random model that trusts every patch
    alike finds something once its lags reach the cache, and the tool scores that read."""
    from tests.test_recall import PILLAR, recall_model
    model = recall_model()
    path = tmp_path / "recall.safetensors"
    save_weights(model, path, {"steps": 1})
    probe = runpy.run_path(str(TOOL))
    with probe["RecallReads"](model) as reads:
        probe["teacher_forced_frames"](model, PILLAR, 0, 8, 8)
    assert sorted(reads.by_frame) == list(range(2, 8))  # a read at every generated frame
    assert "read_cache" not in vars(model.recall)  # unwrapped after
    probe["main"]([str(path), "--seeds", "0", "--frames", "8", "--prompt", PILLAR, "--budget", "8"])
    classes = json.loads(capsys.readouterr().out)["classes"]
    assert sum(c["recall_found"] * c["patches"] for c in classes.values() if c["patches"]) > 0
    for c in classes.values():
        for key in ("recall_found", "recall_read_wrong", "best_lag_wrong_where_found"):
            assert c[key] is None or 0 <= c[key] <= 1


def test_a_lag_pick_model_reports_what_its_pick_gets_wrong(tmp_path, capsys):
    """The pick's read is kept for every generated frame: on the mean while the pick is
    as grafted (the same as the read), another read once it prefers a lag."""
    from tests.test_recall import PILLAR
    from tests.test_recall_lag_pick import lag_pick_model, rank_longest_lag_first
    model = lag_pick_model()
    path = tmp_path / "pick.safetensors"
    save_weights(model, path, {"steps": 1})
    probe = runpy.run_path(str(TOOL))
    with probe["RecallReads"](model) as reads:
        probe["teacher_forced_frames"](model, PILLAR, 0, 24, 24)
    assert sorted(reads.picked) == list(range(2, 24))
    assert all(torch.equal(reads.picked[f], reads.by_frame[f][0]) for f in reads.picked)
    assert "pick_recall_lag" not in vars(model)  # unwrapped after
    probe["main"]([str(path), "--seeds", "0", "--frames", "12", "--prompt", PILLAR, "--budget", "12"])
    classes = json.loads(capsys.readouterr().out)["classes"]
    assert all(c["recall_pick_wrong"] == c["recall_read_wrong"] for c in classes.values())
    rank_longest_lag_first(model)
    with probe["RecallReads"](model) as reads:
        probe["teacher_forced_frames"](model, PILLAR, 0, 24, 24)
    assert any(not torch.equal(reads.picked[f], reads.by_frame[f][0]) for f in reads.picked)
