"""Pixel moves (TinyConfig.pixel_moves): where a patch's pick is one of the world's moves,
each pixel may take another one (standing still, the scene's motion, recall)."""
import numpy as np
import pytest
import torch

from ffviz.models.tiny import PIXEL_DEFAULT, TinyConfig, TinyVideoModel
from ffviz.train import pixel_moves_loss
from tests.test_recall import MOTION, drawn_batch_loss, full_cache_frames, grafted, recall_model

STILL, SCENE, RECALL = 0, 1, 2


def sources(model, found=1.0):
    """One patch (B=1, N=1): its 25 displacements (the middle one still, index 13 the
    scene's motion (0, 1)), what recall read, and how much it found; each move a
    different colour."""
    K, d = 25, model.cfg.patch_dim
    moved = torch.full((1, 1, K, d), 0.5)
    moved[:, :, K // 2] = -1.0  # standing still gives black
    moved[:, :, 13] = 1.0  # the scene's motion gives white
    read = torch.full((1, 1, d), 0.0)  # recall reads gray
    return moved, (read, torch.tensor([[found]])), torch.tensor([[0, 1]])


def pixels(value_per_pixel, C=3):
    return torch.tensor(value_per_pixel, dtype=torch.float32).repeat_interleave(C)[None, None]


def test_training_takes_each_pixel_from_the_move_that_gives_it():
    model = recall_model(pixel_moves=True)
    moved, recalled, motion = sources(model)
    feat = torch.randn(1, 1, model.cfg.width)
    truth = pixels([-1.0] * 4 + [0.0] * 4 + [1.0] * 8)  # still, recall, then the scene's motion
    base = moved[:, :, 13]  # the taught pick: the scene's motion
    own = moved[:, :, 12]  # the pick sampling would make: standing still
    out = model.world_pixels(feat, moved, recalled, motion, own, None, truth=truth, taught=base)
    assert torch.equal(out, truth)
    # the loss corrects the pick sampling makes
    assert bool(model.pixel_has.all()) and int(model.pixel_pick) == STILL
    gives = model.pixel_gives[0, 0]
    assert gives[:4, STILL].all() and gives[4:8, RECALL].all() and gives[8:, SCENE].all()
    assert gives.sum() == 16  # the three moves differ on every pixel
    # where recall found nothing it gives nothing: those pixels keep the patch's pick
    moved, recalled, motion = sources(model, found=0.0)
    out = model.world_pixels(feat, moved, recalled, motion, base, None, truth=truth, taught=base)
    assert torch.equal(out[0, 0, :12], truth[0, 0, :12]) and torch.equal(out[0, 0, 12:24], base[0, 0, 12:24])
    assert not model.pixel_gives[..., RECALL].any()


def test_sampling_keeps_the_pick_until_a_correction_outweighs_it():
    model = recall_model(pixel_moves=True)
    with torch.no_grad():
        model.pixel_moves[2].weight.zero_()
        model.pixel_moves[2].bias.zero_()
    moved, recalled, motion = sources(model)
    feat = torch.randn(1, 1, model.cfg.width)
    base = moved[:, :, 13]
    on, off = torch.tensor([True]), torch.tensor([False])
    assert torch.equal(model.world_pixels(feat, moved, recalled, motion, base, on), base)
    with torch.no_grad():  # pixel 0 wants to stand still, by more than the pick's margin
        model.pixel_moves[2].bias[0 * 3 + STILL] = PIXEL_DEFAULT + 1
        model.pixel_moves[2].bias[1 * 3 + STILL] = PIXEL_DEFAULT - 1  # pixel 1: not by enough
    out = model.world_pixels(feat, moved, recalled, motion, base, on)
    assert torch.equal(out[0, 0, :3], torch.full((3,), -1.0)) and torch.equal(out[0, 0, 3:], base[0, 0, 3:])
    # without one motion, or where the pick is no world move, nothing changes
    assert torch.equal(model.world_pixels(feat, moved, recalled, motion, base, off), base)
    other = moved[:, :, 0]
    assert torch.equal(model.world_pixels(feat, moved, recalled, motion, other, on), other)


def test_the_pixel_loss_teaches_the_correction_and_weighs_the_picks_misses():
    model = recall_model(pixel_moves=True, one_motion=True)
    loss, T = drawn_batch_loss(model)
    loss.backward()
    assert torch.isfinite(loss) and model.pixel_moves[2].weight.grad.abs().sum() > 0
    n = T * 64
    valid = torch.ones(2, model.pixel_has.shape[1] - n, dtype=torch.bool)
    light, heavy = (float(pixel_moves_loss(model, n, valid, w).detach()) for w in (1.0, 8.0))
    assert heavy > light > 0  # some pixels' first-ranked move is wrong, and they weigh more


def test_the_graft_starts_as_the_model_it_grew_from(tmp_path):
    old = recall_model(one_motion=True, recall_bias=4.0)
    new, card = grafted(tmp_path, old, "--pick", "--pixel-moves")
    assert new.cfg.pixel_moves and card["grafts"][-1]["added"] == ["pick", "pixel-moves"]
    assert np.array_equal(full_cache_frames(old), full_cache_frames(new))


def test_pixel_moves_need_recall():
    with pytest.raises(ValueError, match="recall"):
        TinyVideoModel(TinyConfig(**MOTION, pixel_moves=True))
