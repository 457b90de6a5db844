"""Training: the teacher-forcing layout is generation's computation, and a run is
deterministic and resumes exactly (tiny settings)."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ffviz.models.tiny import TinyConfig, TinyVideoModel, masked_attention
from ffviz.sampling import fill_cache
from ffviz.train import (DATA_VERSION, TrainConfig, _resume, _rollout_context, draw, layout, motion_targets,
                         previous_of_slots, rollout, state_path_for, teacher_forcing_loss, train,
                         world_move_targets)
from ffviz.weights import load_tiny, save_weights

SMALL = TinyConfig(width=32, layers=1, heads=2)
quiet = lambda s: None


def _cfg(steps, **kw):
    return TrainConfig(steps=steps, batch=2, curriculum=((0, 5), (2, 6)), warmup=2, rollout_after=1,
                       rollout_clips=1, save_every_s=1e9, **kw)


@pytest.mark.parametrize("motion", [{}, dict(predict_change=True, motion_reach=2, motion_match=True,
                                               motion_memory=True, motion_refine=True,
                                               patch_position=True)],
                         ids=["plain", "motion"])
def test_teacher_forcing_is_what_generation_computes(motion):
    """Each noisy copy's output equals the cached path: the clean frames before it
    written to a cache one chunk at a time (the given frames together), then the
    noisy frame denoised over that cache; with and without a gap before the recent block.
    With the motion inputs too: the motion memory reads the cache in generation and the
    clean frames in training."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(width=64, layers=2, heads=2, **motion)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    seen_gap = seen_touching = False
    switched = 0
    for seed in range(6):
        b = draw(seed, 0, TrainConfig(batch=2, curriculum=((0, 7),), rollout_clips=0,
                                      switch_share=0.5), model.cfg)
        switched += int((b.cond_ids[:, 1:] != b.cond_ids[:, :-1]).any(-1).any(-1).sum())
        seen_gap |= b.before is not None
        seen_touching |= b.before is None
        idx, targets = torch.from_numpy(b.frame_idx), torch.from_numpy(b.targets)
        frames, mask = layout(idx, g, n, targets)
        tok = lambda px: model.patchify(torch.from_numpy(px).float() / 127.5 - 1)
        ctx = tok(b.clips)
        prev = previous_of_slots(ctx, None if b.before is None else tok(b.before[:, None]), g, n)
        cond = model.embed_condition(torch.from_numpy(b.cond_ids))  # (B, T, w): a prompt per frame
        T, K = len(idx), len(targets)
        noisy = torch.randn(2, K * n, model.cfg.patch_dim)
        slot = lambda x, i: x[:, i * n:(i + 1) * n]
        with torch.no_grad():
            pick = torch.cat([slot(prev, int(i)) for i in targets], 1)
            out = model(torch.cat([ctx, noisy], 1), torch.cat([torch.zeros(2, T), b.levels], 1),
                        frames, torch.cat([cond, cond[:, targets]], 1), prev=torch.cat([prev, pick], 1),
                        mask=mask)
            for j, i in enumerate(targets.tolist()):
                cache = model.new_cache()
                fill_cache(model, cache, ctx[:, :g * n], idx[:g], cond[:, :g], 0.0, prev=prev[:, :g * n])
                for c in range(g, i):
                    fill_cache(model, cache, slot(ctx, c), idx[c:c + 1], cond[:, c], 0.0,
                               prev=slot(prev, c))
                cached = model(slot(noisy, j), b.levels[:, j:j + 1], idx[i:i + 1], cond[:, i],
                               prev=slot(prev, i), cache=cache)
                torch.testing.assert_close(cached, slot(out[:, T * n:], j), atol=2e-5, rtol=0)
    assert seen_gap and seen_touching and switched  # prompt switches inside a clip too


@pytest.mark.parametrize("bands", [1, 3, 4])
def test_masked_attention_in_bands_is_the_masked_attention(bands, monkeypatch):
    """The banded attention of whole-clip training gives SDPA's values and gradients,
    on a clip's layout (the bands skip keys) and on a mask with no prefix structure."""
    monkeypatch.setattr("ffviz.models.tiny.ATTENTION_BANDS", bands)
    g = torch.Generator().manual_seed(0)
    batch = draw(0, 6000, TrainConfig(batch=1, curriculum=((0, 8),)), TinyConfig())
    _, layout_mask = layout(torch.from_numpy(batch.frame_idx), 2, 4, torch.from_numpy(batch.targets))
    scattered = torch.rand(40, 40, generator=g) > 0.5
    scattered.fill_diagonal_(True)
    for mask in (layout_mask, scattered):
        N = mask.shape[0]
        q, k, v = (torch.randn(2, 3, N, 8, generator=g, requires_grad=True) for _ in range(3))
        ours = masked_attention(q, k, v, mask)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(ours, sdpa, atol=1e-6)
        weights = torch.randn(ours.shape, generator=g)
        grads = [torch.autograd.grad((y * weights).sum(), (q, k, v)) for y in (ours, sdpa)]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    a = train(_cfg(4), SMALL, tmp_path / "a.safetensors", log=quiet)
    b = train(_cfg(4), SMALL, tmp_path / "b.safetensors", log=quiet)
    assert a["sha256"] == b["sha256"] and a["steps"] == 4
    train(_cfg(2), SMALL, tmp_path / "c.safetensors", log=quiet)  # stops, saves, resumes
    assert state_path_for(tmp_path / "c.safetensors").exists()
    c = train(_cfg(4), SMALL, tmp_path / "c.safetensors", log=quiet)
    assert c["sha256"] == a["sha256"]
    model, card = load_tiny(tmp_path / "a.safetensors")
    assert card["clips_seen"] == 8 and model.cfg.width == 32
    assert [h["clip_frames"] for h in card["history"]] == [] or card["history"][0]["clip_frames"] in (5, 6)
    with pytest.raises(SystemExit, match="not one checkpoint"):  # weights and state of two steps
        state = torch.load(state_path_for(tmp_path / "b.safetensors"), weights_only=False)
        state["step"] = 3
        torch.save(state, state_path_for(tmp_path / "b.safetensors"))
        train(_cfg(5), SMALL, tmp_path / "b.safetensors", log=quiet)


def test_worker_processes_draw_the_same_batches(tmp_path):
    a = train(_cfg(3), SMALL, tmp_path / "a.safetensors", log=quiet)
    b = train(_cfg(3, workers=2), SMALL, tmp_path / "b.safetensors", log=quiet)
    assert a["sha256"] == b["sha256"]


def test_a_weights_file_of_another_world_is_refused(tmp_path):
    train(_cfg(1), SMALL, tmp_path / "a.safetensors", log=quiet)
    card_file = (tmp_path / "a.json")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    card["data_version"] = 1
    card_file.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(SystemExit, match="data version 1.*--new-world"):
        train(_cfg(2), SMALL, tmp_path / "a.safetensors", log=quiet)
    # going on in this world: weights, optimizer and progress carry over, moves wrap, and
    # the EMA restarts from the optimizer's weights
    _, ema, _, _, _ = _resume(tmp_path / "a.safetensors", SMALL, quiet, False, True)
    raw = torch.load(state_path_for(tmp_path / "a.safetensors"), weights_only=False)["model"]
    assert all(torch.equal(v, raw[k]) for k, v in ema.state_dict().items())
    shipped = load_tiny(tmp_path / "a.safetensors")[0].state_dict()
    assert not all(torch.equal(v, raw[k]) for k, v in shipped.items())
    lines = []
    card = train(_cfg(2), dataclasses.replace(SMALL, wrap=False), tmp_path / "a.safetensors",
                 log=lines.append, new_world=True)
    assert card["steps"] == 2 and card["world_changes"] == [{"step": 1, "data_version": DATA_VERSION}]
    assert card["config"]["wrap"] and any("resumed exactly" in line for line in lines)
    assert any("EMA restarts" in line for line in lines)
    assert train(_cfg(3), SMALL, tmp_path / "a.safetensors", log=quiet)["world_changes"] == \
        card["world_changes"]  # kept, not repeated
    assert train(_cfg(1), SMALL, tmp_path / "a.safetensors", log=quiet, fresh=True)["steps"] == 1


def test_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = TrainConfig(lr=1e-3, warmup=10, decay_from=100, lr_floor=0.1)
    lrs = [cfg.learning_rate(s) for s in (0, 9, 50, 100, 400, 10 ** 6)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] == lrs[2] == lrs[3] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(5e-4) and lrs[5] == pytest.approx(1e-4)
    assert cfg.clip_frames(0) == 6 and cfg.clip_frames(10 ** 6) == cfg.curriculum[-1][1]


def test_rollout_context_replaces_the_first_clips_with_the_models_own():
    torch.manual_seed(0)
    model = TinyVideoModel(SMALL).eval()
    n, g = SMALL.tokens_per_frame, SMALL.given_frames
    for seed in range(4):
        b = draw(seed, 0, TrainConfig(batch=3, curriculum=((0, 6),)), SMALL)
        idx = torch.from_numpy(b.frame_idx)
        truth = model.patchify(torch.from_numpy(b.clips).float() / 127.5 - 1)
        before = None if b.before is None else \
            model.patchify(torch.from_numpy(b.before[:, None]).float() / 127.5 - 1)
        context, target, valid = _rollout_context(model, b, truth, before, torch.from_numpy(b.cond_ids),
                                                  idx, torch.Generator().manual_seed(0), 2)
        first = (g + 1 if before is not None else g) * n
        assert torch.equal(context[:, :first], truth[:, :first])  # the true frames stay
        assert torch.equal(context[2:], truth[2:]) and torch.equal(target[2:], truth[2:])
        assert not torch.equal(context[:2, first:], truth[:2, first:])  # the rollout's own
        pixels = (model.unpatchify(target[:2, first:]) + 1) * 127.5
        assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # rendered targets
        assert valid.shape == (3, len(idx)) and valid[2:].all()


def test_rollout_horizon_puts_true_frames_into_the_rollout_cache():
    """horizon 0 free-runs (true frames after the given ones are never read); horizon 1
    caches every true frame, so changing true frame f changes the rollout's frame f + 1."""
    from tests.conftest import random_model
    model = random_model(width=32, layers=1)
    n, T, g = model.cfg.tokens_per_frame, 5, model.cfg.given_frames
    x0 = torch.rand(1, T * n, model.cfg.patch_dim) * 2 - 1
    other = x0.clone()
    other[:, g * n:(g + 1) * n] = -x0[:, g * n:(g + 1) * n]  # true frame g differs
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long))
    run = lambda x, h: rollout(model, x, cond, 2, 3, torch.Generator().manual_seed(0), horizon=h)
    after = slice((g + 1) * n, None)
    assert torch.equal(run(x0, 0)[:, after], run(other, 0)[:, after])
    assert not torch.allclose(run(x0, 1)[:, after], run(other, 1)[:, after])
    assert torch.equal(run(x0, 2)[:, (g + 1) * n:(g + 2) * n], run(other, 2)[:, (g + 1) * n:(g + 2) * n])


def test_cli_checks_its_arguments(tmp_path):
    from ffviz.__main__ import main
    out = tmp_path / "t.safetensors"
    args = ["train", "--steps", "1", "--batch", "1", "--width", "32", "--layers", "1",
            "--out", str(out)]
    assert main([*args, "--rope-theta", "10", "--rope-theta-time", "5000"]) == 0
    cfg = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["config"]
    assert cfg["rope_theta"] == 10 and cfg["rope_theta_time"] == 5000
    for bad, msg in ((["--rope-theta", "1"], "--rope-theta must be > 1"),
                     (["--rollout-clips", "2"], "--rollout-clips must be in \\[0, --batch\\], got 2"),
                     (["--object-weight", "0"], "--object-weight must be > 0"),
                     (["--switch-share", "1.5"], "--switch-share must be in \\[0, 1\\]"),
                     (["--fresh", "--motion-pick"], "--motion-pick works on displacements"),
                     (["--fresh", "--motion-match"], "--motion-match works on displacements"),
                     (["--fresh", "--motion-memory"], "--motion-memory works on displacements"),
                     (["--fresh", "--width", "32", "--motion-reach", "2", "--motion-memory"],
                      "head_dim 8 < 25"),
                     (["--motion-weight", "-1"], "--motion-weight must be >= 0"),
                     (["--paint-weight", "0"], "--paint-weight must be > 0"),
                     (["--motion-focus", "-1"], "--motion-focus must be >= 0"),
                     (["--move-weight", "0"], "--move-weight must be > 0"),
                     (["--fresh", "--motion-reach", "2", "--motion-refine"],
                      "--motion-refine corrects what the motion memory reads"),
                     (["--batch", "0"], "--batch and --steps")):
        with pytest.raises(SystemExit, match=msg):
            main([*args, *bad])


def test_draw_keeps_targets_after_their_previous_frame():
    for step in range(20):
        b = draw(0, step, TrainConfig(curriculum=((0, 9),)), TinyConfig())
        assert b.targets.min() >= 3 and len(set(b.targets)) == len(b.targets)
        assert (np.diff(b.frame_idx[2:]) == 1).all() and b.frame_idx[:2].tolist() == [0, 1]
        assert (b.before is None) == (b.frame_idx[2] == 2)


def test_switch_clips_follow_the_new_prompt_from_their_switch_on():
    """A clip whose prompt switches: frames before keep the old looks, frames after take
    the new ones with the same motion, and each frame's prompt ids say which."""
    from ffviz.scenes import COLOR_NAMES, COLORS
    cfg = TrainConfig(batch=6, curriculum=((0, 10),), rollout_clips=2, switch_share=1.0)
    seen = 0
    for step in range(4):
        b = draw(1, step, cfg, TinyConfig())
        changes = (b.cond_ids[:, 1:] != b.cond_ids[:, :-1]).any(-1)  # (B, T-1)
        assert not changes[:2].any()  # rolled-out clips never switch
        for clip, ids, ch in zip(b.clips[2:], b.cond_ids[2:], changes[2:]):
            at = 1 + int(np.argmax(ch))
            assert ch.sum() == 1 and at >= 3
            bg_after = COLORS[COLOR_NAMES[ids[at, 0] - 1]]
            assert (clip[at] == bg_after).all(-1).mean() > 0.3  # the new background shows
            seen += 1
    assert seen == 16


def test_previous_frame_neighbourhood_spans_the_patches_around():
    model = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2, prev_reach=1))
    n, d = model.cfg.tokens_per_frame, model.cfg.patch_dim
    x = torch.arange(2 * n, dtype=torch.float32)[None, :, None].expand(1, 2 * n, d)
    nb = model.neighbourhood(x).view(1, 2, 8, 8, 9, d)[..., 0]  # (B, T, rows, cols, 9)
    assert nb.shape[-1] == 9 and torch.equal(nb[0, 1, 3, 4, 4], x[0, n + 3 * 8 + 4, 0])
    assert nb[0, 0, 3, 4, 5] == x[0, 3 * 8 + 5, 0] and nb[0, 0, 3, 4, 1] == x[0, 2 * 8 + 4, 0]
    assert (nb[0, :, 0, :, :3] == 0).all() and (nb[0, :, :, 7, 2::3] == 0).all()  # past the edge
    assert model.prev_embed.in_features == 9 * d


def test_a_change_head_starts_as_a_copy_of_the_previous_frame():
    """predict_change: x0 = previous frame + head; the head starts at zero, so a new model
    copies the newest frame (frame 0, which has none, gets the head alone); an x0 head
    starts at a zero frame instead."""
    torch.manual_seed(0)
    n, d = 64, 48
    x, prev = torch.randn(1, 3 * n, d), torch.rand(1, 3 * n, d)
    cond = torch.zeros(1, 32)
    for change in (True, False):
        model = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2, predict_change=change))
        out = model(x, torch.ones(1, 3), torch.tensor([0, 1, 2]), cond, prev=prev)
        assert (out[:, :n] == 0).all()  # frame 0: nothing to change from
        assert torch.equal(out[:, n:], prev[:, n:] if change else torch.zeros_like(prev[:, n:]))


def test_a_share_of_clips_names_no_colour_and_the_rest_of_the_batch_stays():
    from ffviz.scenes import OBJECT_COLOUR_IDS
    cfg, model_cfg = TrainConfig(batch=16, unnamed_share=0.0), TinyConfig()
    plain = draw(0, 3, cfg, model_cfg)
    cfg.unnamed_share = 0.5
    hidden = draw(0, 3, cfg, model_cfg)
    assert np.array_equal(plain.clips, hidden.clips) and np.array_equal(plain.levels, hidden.levels)
    cols = list(OBJECT_COLOUR_IDS)
    unnamed = (hidden.cond_ids[:, :, cols] == 0).all((1, 2)) & (plain.cond_ids[:, :, cols] != 0).any((1, 2))
    assert 2 <= unnamed.sum() <= 14  # about half of 16
    others = [c for c in range(plain.cond_ids.shape[2]) if c not in cols]
    assert np.array_equal(plain.cond_ids[:, :, others], hidden.cond_ids[:, :, others])
    assert np.array_equal(plain.cond_ids[~unnamed], hidden.cond_ids[~unnamed])


def test_the_motion_head_moves_the_previous_frame_patch_by_patch():
    """motion_reach: displacement (dy, dx) moves content down/right with edges repeated
    (or, with wrap, brought round from the opposite edge); a new model starts as nearly a copy, and a head that picks one displacement moves
    the whole frame by it."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(predict_change=True, motion_reach=2))
    img = torch.rand(1, 2, 32, 32, 3) * 2 - 1
    moved = model.unpatchify(model.displaced(model.patchify(img))[:, :, (1 + 2) * 5 + (-2 + 2)])
    assert torch.equal(moved[:, :, 1:, :-2], img[:, :, :-1, 2:])  # dy = 1, dx = -2
    assert torch.equal(moved[:, :, 0], moved[:, :, 1]) and torch.equal(moved[:, :, :, -1], moved[:, :, :, -3])
    torus = TinyVideoModel(TinyConfig(predict_change=True, motion_reach=2, prev_reach=1, wrap=True))
    moved = torus.unpatchify(torus.displaced(torus.patchify(img))[:, :, (1 + 2) * 5 + (-2 + 2)])
    assert torch.equal(moved, torch.roll(img, (1, -2), (2, 3)))
    near = torus.neighbourhood(torus.patchify(img)).view(1, 2, 8, 8, 9, 48)
    assert torch.equal(near[:, :, 0, 0, 0], torus.patchify(img).view(1, 2, 8, 8, 48)[:, :, -1, -1])
    x, prev = torch.randn(1, 2 * 64, 48), model.patchify(img)
    cond, frames = torch.zeros(1, 128), torch.tensor([1, 2])
    out = model(x, torch.ones(1, 2), frames, cond, prev=prev)
    assert (out - prev).abs().mean() < 0.1 * prev.abs().mean()  # about a copy
    with torch.no_grad():
        model.motion.bias.zero_()[(0 + 2) * 5 + (1 + 2)] = 50.0  # every patch: dx = +1
    out = model.unpatchify(model(x, torch.ones(1, 2), frames, cond, prev=prev))
    assert torch.allclose(out[:, :, :, 1:], img[:, :, :, :-1], atol=1e-5)
    with pytest.raises(ValueError, match="predict_change"):
        TinyVideoModel(TinyConfig(predict_change=False, motion_reach=1))


def test_a_picking_motion_head_moves_by_one_displacement_and_learns_which():
    """motion_pick: the most likely displacement moves a patch exactly (no blend of
    futures); motion_targets reads the true one from a shifted frame; and the
    cross-entropy that teaches the choice falls when the head trains on it."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(predict_change=True, motion_reach=2, motion_pick=True))
    img = torch.zeros(1, 1, 32, 32, 3) - 1
    img[:, :, 8:16, 8:16] = 1  # a white square on black
    shifted = torch.roll(img, 1, 3)  # dx = +1
    prev, target = model.patchify(img), model.patchify(shifted)
    index, good, telling, exact, _ = motion_targets(model, prev, target)
    right = (0 + 2) * 5 + (1 + 2)
    assert telling.sum() > 0 and good[..., right].all() and (index == right).sum() == 4  # the two edges x two rows
    assert (index[~telling] == 12).all()  # where nothing tells, no displacement
    assert exact.all()  # a moved square: every patch is some displacement of the last frame
    appeared = target.clone()
    appeared[0, 63] = 0.5  # something new in the last patch: no displacement gives it
    assert motion_targets(model, prev, appeared).exact.tolist()[0] == [True] * 63 + [False]
    with torch.no_grad():
        model.motion.bias.zero_()[right] = 3.0  # most likely, not certain: still one pick
    x, cond, frames = torch.randn(1, 64, 48), torch.zeros(1, 128), torch.tensor([1])
    out = model(x, torch.ones(1, 1), frames, cond, prev=prev)
    assert torch.allclose(out, target, atol=1e-5)
    out, logits = model(x, torch.ones(1, 1), frames, cond, prev=prev,
                        motion_index=torch.full((1, 64), 12), return_motion_logits=True)
    assert torch.allclose(out, prev, atol=1e-5) and logits.shape == (1, 64, 25)
    # the cross-entropy falls as the motion head trains on it
    model = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2, predict_change=True,
                                      motion_reach=2, motion_pick=True))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    frames, mask = layout(torch.tensor([0, 1, 2]), 2, 64, torch.tensor([2]))
    clip = torch.cat([img, img, shifted], 1)
    context = model.patchify(clip)
    prev_tok = torch.cat([torch.zeros_like(context[:, :64]), context[:, :-64]], 1)
    ces = []
    for _ in range(30):
        loss, ce = teacher_forcing_loss(model, context, prev_tok, context, torch.ones(1, 3, dtype=torch.bool),
                                        torch.full((1, 1), 0.9), torch.zeros(1, 4, 32),
                                        torch.ones(1, 3 * 64), torch.Generator().manual_seed(0),
                                        mask, frames, torch.tensor([2]), motion_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ces.append(ce.item())
    assert ces[-1] < 0.3 * ces[0]


def _square_clip():
    """A picking model and a white 8-px square on black (1, 1, 32, 32, 3)."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2, predict_change=True,
                                      motion_reach=2, motion_pick=True))
    img = torch.zeros(1, 1, 32, 32, 3) - 1
    img[:, :, 8:16, 8:16] = 1
    return model, img


def _last_frame_loss(model, img, last, **weights) -> float:
    """teacher_forcing_loss of the clip (img, img, last) with ``last`` the one target."""
    frames, mask = layout(torch.tensor([0, 1, 2]), 2, 64, torch.tensor([2]))
    context = model.patchify(torch.cat([img, img, last], 1))
    prev_tok = torch.cat([torch.zeros_like(context[:, :64]), context[:, :-64]], 1)
    return teacher_forcing_loss(model, context, prev_tok, context, torch.ones(1, 3, dtype=torch.bool),
                                torch.full((1, 1), 0.9), torch.zeros(1, 4, 32), torch.ones(1, 3 * 64),
                                torch.Generator().manual_seed(0), mask, frames, torch.tensor([2]),
                                **weights)[0].item()


def test_paint_weight_weighs_only_what_no_displacement_gives():
    """paint_weight scales the loss of patches that hold something new (an object coming
    back into view) and leaves a clip where everything moved as it was."""
    model, img = _square_clip()
    appeared = torch.roll(img, 1, 3).clone()
    appeared[:, :, 24:28, 28:32] = 1  # a corner of an object coming in from the right
    loss = lambda last, w: _last_frame_loss(model, img, last, paint_weight=w)
    moved = torch.roll(img, 1, 3)
    assert loss(moved, 5.0) == pytest.approx(loss(moved, 1.0), rel=1e-6)
    assert loss(appeared, 5.0) > 1.5 * loss(appeared, 1.0)  # the new patch's error dominates


def _pillar_frame(model, obj_x, obj_y):
    """A blue frame with a gray pillar (columns 8-23) and a yellow 6x8 object."""
    img = torch.full((1, 1, 32, 32, 3), -1.0)
    img[..., 2] = 0.6
    img[:, :, :, 8:24] = 0.0
    img[:, :, obj_y:obj_y + 8, obj_x:obj_x + 6] = torch.tensor([0.9, 0.8, -0.8])
    return model.patchify(img)


def test_world_moves_teach_what_no_displacement_gives_against_standing_still_or_the_motion():
    """An object leaves the pillar's edge moving (1, 2): the patches it uncovers next to
    the pillar are given by no displacement. Their best displacement is one the world
    never makes; world_move_targets teaches the better of standing still and the scene's
    motion there instead (with its equals), and leaves every patch some displacement
    gives as it was."""
    from tests.test_one_motion import MOTION
    from tests.conftest import random_model
    model = random_model(**MOTION)
    prev, target = _pillar_frame(model, 24, 12), _pillar_frame(model, 26, 13)
    found = motion_targets(model, prev, target)
    world = world_move_targets(model, prev, target, torch.tensor([[1, 2]]), found)
    still, scene = 12, (1 + 2) * 5 + (2 + 2)
    new = ~found.exact
    assert new.sum() == 3 and not set(found.index[new].tolist()) <= {still, scene}
    assert set(world.index[new].tolist()) <= {still, scene}
    assert torch.equal(world.index[~new], found.index[~new]) and torch.equal(world.good[~new], found.good[~new])
    moved = model.displaced(prev)
    for b, m in new.nonzero().tolist():  # good: the displacements that give the taught patch
        gives = moved[b, m, world.index[b, m]]
        assert torch.equal(world.good[b, m], (moved[b, m] - gives).abs().amax(-1) < 1e-4)
    assert torch.equal(world.telling, ~world.good.all(-1))


def test_world_moves_need_the_motion_on_the_condition():
    model, img = _square_clip()
    with pytest.raises(ValueError, match="motion"):
        _last_frame_loss(model, img, torch.roll(img, 1, 3), world_moves=True)


def test_move_weight_weighs_the_choice_only_where_staying_put_is_wrong():
    """move_weight scales the motion cross-entropy of patches an object moved through or
    left; on a still clip (staying put is right everywhere) it changes nothing."""
    model, img = _square_clip()

    def ce_term(last, move_weight):
        without = _last_frame_loss(model, img, last, motion_weight=0.0)
        return _last_frame_loss(model, img, last, motion_weight=1.0, move_weight=move_weight) - without

    moved, still = torch.roll(img, 1, 3), img
    assert ce_term(moved, 4.0) > 2.0 * ce_term(moved, 1.0) > 0  # the edges the square moved through
    assert ce_term(still, 4.0) == pytest.approx(ce_term(still, 1.0), rel=1e-6)


def test_the_match_input_says_how_each_patch_moved():
    """motion_match: on a clean frame the match is one-hot on the displacements that give
    each patch exactly (a patch the square moved through picks dx = +1 alone); a match
    input added to trained weights starts at zero, so the model is unchanged."""
    torch.manual_seed(0)
    cfg = TinyConfig(predict_change=True, motion_reach=2, motion_pick=True)
    model = TinyVideoModel(cfg)
    img = torch.zeros(1, 1, 32, 32, 3) - 1
    img[:, :, 8:16, 8:16] = 1
    prev, now = model.patchify(img), model.patchify(torch.roll(img, 1, 3))
    match = model.match(model.displaced(prev), now).view(1, 64, 5, 5)
    edge = 2 * 8 + 4  # patch row 2, col 4: the square's new right edge
    assert match[0, edge, :, 1 + 2].sum() > 0.99  # dx = +1 (any dy that keeps the edge)
    assert torch.allclose(match[0, 0], torch.full((5, 5), 1 / 25))  # background: all alike
    with_match = TinyVideoModel(dataclasses.replace(cfg, motion_match=True))
    with_match.load_state_dict(model.state_dict(), strict=False)
    x, cond, frames = torch.randn(1, 64, 48), torch.randn(1, 128), torch.tensor([3])
    assert torch.equal(model(x, torch.ones(1, 1), frames, cond, prev=prev),
                       with_match(x, torch.ones(1, 1), frames, cond, prev=prev))
    with pytest.raises(ValueError, match="motion_reach"):
        TinyVideoModel(TinyConfig(predict_change=True, motion_match=True))


def test_the_motion_memory_reads_how_the_newest_frames_moved_from_the_cache():
    """motion_memory: a square moving right one pixel a frame, cached; a pure-noise next
    frame's memory head reads "dx = +1" at the square's edge from the cache alone, and
    nothing where nothing moved. Emptied of those frames, the cache tells nothing."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(predict_change=True, motion_reach=2, motion_pick=True,
                                      motion_memory=True)).eval()
    video = torch.zeros(1, 4, 32, 32, 3) - 1
    for f in range(4):
        video[:, f, 8:16, 8 + f:16 + f] = 1
    tok = model.patchify(video)  # (1, 4 * 64, 48)
    n, cond = 64, torch.zeros(1, 128)
    frame = lambda f: tok[:, f * n:(f + 1) * n]
    cache = model.new_cache()
    fill_cache(model, cache, tok[:, :2 * n], torch.tensor([0, 1]), cond, 0.0,
               prev=torch.cat([torch.zeros_like(frame(0)), frame(0)], 1))
    fill_cache(model, cache, frame(2), torch.tensor([2]), cond, 0.0, prev=frame(1))
    with torch.no_grad():
        model(torch.randn(1, n, 48), torch.ones(1, 1), torch.tensor([3]), cond, prev=frame(2),
              cache=cache)
    read = model.blocks[0].attn.memory_read[0, :, :25].view(8, 8, 5, 5)
    right = read[3, 4]  # patch row 3, col 4: where the square's right edge is
    assert right[:, 1 + 2].sum() > right[:, 2].sum() + 0.02  # dx = +1 over no shift
    assert right.sum(0).argmax() == 1 + 2
    assert read[0, 0].abs().max() < 0.2 * right.abs().max()  # far from the square: little
    with torch.no_grad():
        model(torch.randn(1, n, 48), torch.ones(1, 1), torch.tensor([3]), cond, prev=frame(2),
              cache=model.new_cache())
    assert model.blocks[0].attn.memory_read[0, :, :25].abs().max() < 1e-6  # t = 1: own match off


def test_new_models_predict_the_change_and_see_the_neighbourhood(tmp_path):
    from ffviz.__main__ import main
    out = tmp_path / "w.safetensors"
    assert main(["train", "--fresh", "--steps", "1", "--width", "32", "--layers", "1",
                 "--out", str(out)]) == 0
    cfg = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["config"]
    assert cfg["predict_change"] is True and cfg["prev_reach"] == 1


def test_a_stopped_training_saves_a_checkpoint_that_resumes(tmp_path):
    """SIGTERM (or Ctrl-C) mid-run: the step in flight finishes, weights and state are
    saved at the same step, and the run exits cleanly."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "w.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "ffviz", "train", "--fresh", "--threads", "1",
                             "--steps", "100000", "--width", "32", "--layers", "1", "--batch", "2",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = proc.stdout.readline()  # the loop has begun: its stop handler is in place
        assert "training from step 0" in started, started
        time.sleep(2)  # into the steps
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "saved" in stdout and "Traceback" not in stderr
    card = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    state = torch.load(out.with_name("w.state.pt"), weights_only=False)
    assert 0 < card["steps"] < 100000 and state["step"] == card["steps"]


def test_the_motion_tool_adds_a_picking_head_with_memory_to_trained_weights(tmp_path, monkeypatch):
    """tools/add_motion_head.py --pick --memory: the card gets the flags and keeps the
    steps, and the memory head's share of layer 0's output starts at zero."""
    import runpy
    import sys
    from ffviz.__main__ import main
    src, dst = tmp_path / "w.safetensors", tmp_path / "m" / "w.safetensors"
    assert main(["train", "--fresh", "--steps", "1", "--width", "32", "--layers", "1",
                 "--out", str(src)]) == 0
    tool = Path(__file__).resolve().parents[1] / "tools" / "add_motion_head.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(src), "--pick", "--memory", "--out", str(dst)])
    with pytest.raises(SystemExit, match="head_dim 8 < 25"):  # 4 heads of 8: no room for the memory
        runpy.run_path(str(tool), run_name="__main__")
    assert main(["train", "--fresh", "--steps", "1", "--width", "128", "--layers", "1",
                 "--out", str(src)]) == 0
    runpy.run_path(str(tool), run_name="__main__")
    model, card = load_tiny(dst)
    assert model.cfg.motion_pick and model.cfg.motion_memory and card["steps"] == 1
    assert model.blocks[0].attn.out.weight[:, :model.cfg.head_dim].abs().max() == 0
    monkeypatch.setattr(sys, "argv", [str(tool), str(dst), "--reach", "1", "--out", str(dst)])
    with pytest.raises(SystemExit, match="has a motion head already"):
        runpy.run_path(str(tool), run_name="__main__")


def test_the_motion_tool_carries_the_training_state_over(tmp_path, monkeypatch):
    """--refine --position on weights with a training state: the new model computes what
    the old one did (the correction and the positions start at zero), and its state holds the old raw weights and
    every old parameter's optimizer moments at that parameter's new index, so training
    resumes exactly; a state of another step is refused."""
    import runpy
    import sys
    from ffviz.__main__ import main
    from ffviz.train import state_path_for
    src, mid, dst = tmp_path / "w.safetensors", tmp_path / "m.safetensors", tmp_path / "r" / "w.safetensors"
    assert main(["train", "--fresh", "--steps", "2", "--width", "128", "--layers", "1", "--motion-reach",
                 "2", "--motion-pick", "--motion-memory", "--out", str(src)]) == 0
    tool = Path(__file__).resolve().parents[1] / "tools" / "add_motion_head.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(src), "--pick", "--out", str(mid)])
    runpy.run_path(str(tool), run_name="__main__")  # no new part: the state carries as it was
    monkeypatch.setattr(sys, "argv", [str(tool), str(mid), "--pick", "--refine", "--position",
                                      "--out", str(dst)])
    runpy.run_path(str(tool), run_name="__main__")
    old, _ = load_tiny(src)
    new, card = load_tiny(dst)
    assert new.cfg.motion_refine and new.cfg.patch_position and card["steps"] == 2
    # the card records each graft, in order, with the step it was made at
    assert [{k: g[k] for k in ("step", "added")} for g in card["grafts"]] == [
        {"step": 2, "added": ["pick"]}, {"step": 2, "added": ["pick", "refine", "position"]}]
    # and the parameters each graft added (the EMA warms up from there for them)
    assert card["grafts"][0]["parameters"] == []
    assert sorted(card["grafts"][1]["parameters"]) == sorted(
        n for n, _ in new.named_parameters() if n.startswith(("motion_refine.", "position_embed")))
    x, prev = torch.rand(1, 64, 48) * 2 - 1, torch.rand(1, 64, 48) * 2 - 1
    cond = torch.zeros(1, 128)
    with torch.no_grad():
        args = (x, torch.full((1, 1), 0.5), torch.tensor([3]), cond)
        assert torch.equal(old(*args, prev=prev), new(*args, prev=prev))
    before = torch.load(state_path_for(src), weights_only=False)
    after = torch.load(state_path_for(dst), weights_only=False)
    names = [n for n, _ in TinyVideoModel(new.cfg).named_parameters()]
    old_names = [n for n, _ in TinyVideoModel(old.cfg).named_parameters()]
    assert after["step"] == 2 and len(after["opt"]["param_groups"][0]["params"]) == len(names)
    for i, name in enumerate(old_names):
        j = names.index(name)
        assert torch.equal(after["opt"]["state"][j]["exp_avg"], before["opt"]["state"][i]["exp_avg"])
        assert torch.equal(after["model"][name], before["model"][name])
    lines = []
    from ffviz.train import TrainConfig as TC, train as run_train
    run_train(TC(steps=3, batch=2, curriculum=((0, 5),), warmup=2, rollout_after=1, rollout_clips=1,
                 save_every_s=1e9), new.cfg, dst, log=lines.append)
    assert any("resumed exactly" in line for line in lines)
    torch.save({**after, "step": 1}, state_path_for(dst))
    monkeypatch.setattr(sys, "argv", [str(tool), str(dst), "--pick", "--refine", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="not one checkpoint"):
        runpy.run_path(str(tool), run_name="__main__")


def test_a_grafted_parts_ema_warms_up_from_its_graft(tmp_path, monkeypatch):
    """Weights at step 5,000 given a new part: one training step moves the EMA of the new
    part most of the way to the raw weights (its warm-up starts at the graft) and the EMA
    of the old parts by 0.2% (theirs started at step 0)."""
    import runpy
    import sys
    from ffviz.__main__ import main
    from ffviz.train import TrainConfig as TC, state_path_for, train as run_train
    src, dst = tmp_path / "w.safetensors", tmp_path / "g" / "w.safetensors"
    assert main(["train", "--fresh", "--steps", "1", "--width", "128", "--layers", "1", "--motion-reach",
                 "2", "--motion-pick", "--motion-memory", "--out", str(src)]) == 0
    model, card = load_tiny(src)
    save_weights(model, src, {**card, "steps": 5000})
    state = torch.load(state_path_for(src), weights_only=False)
    torch.save({**state, "step": 5000}, state_path_for(src))
    tool = Path(__file__).resolve().parents[1] / "tools" / "add_motion_head.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(src), "--pick", "--refine", "--out", str(dst)])
    runpy.run_path(str(tool), run_name="__main__")
    before = load_tiny(dst)[0].state_dict()
    run_train(TC(steps=5001, batch=2, curriculum=((0, 5),), warmup=2, rollout_after=10 ** 6,
                 save_every_s=1e9), load_tiny(dst)[0].cfg, dst, log=lambda s: None)
    after, raw = load_tiny(dst)[0].state_dict(), torch.load(state_path_for(dst), weights_only=False)["model"]
    moved = lambda name: float(((after[name] - before[name]).norm() / (raw[name] - before[name]).norm()))
    assert moved("motion_refine.0.weight") == pytest.approx(0.9, abs=1e-3)  # 1 - (1 + 0) / (10 + 0)
    assert moved("patch_embed.weight") == pytest.approx(1 - 5001 / 5010, abs=1e-4)  # from step 0


def test_a_per_pixel_pick_moves_two_motions_in_one_patch():
    """A square moving right beside a still pillar inside the same patches: one
    displacement per patch cannot give the next frame, one per pixel gives it exactly."""
    torch.manual_seed(0)
    img = torch.zeros(1, 1, 32, 32, 3) - 1
    img[:, :, :, 14:16] = 0.5  # a still pillar: columns 14-15 (patch column 3)
    nxt = img.clone()
    img[:, :, 8:16, 4:13] = 1  # a square ending in patch column 3 ...
    nxt[:, :, 8:16, 5:14] = 1  # ... moved right by one: it now meets the pillar inside that column
    for per_pixel in (False, True):
        model = TinyVideoModel(TinyConfig(width=32, layers=1, heads=2, predict_change=True, motion_reach=2,
                                          motion_pick=True, motion_per_pixel=per_pixel))
        prev, target = model.patchify(img), model.patchify(nxt)
        index, good, telling, exact, _ = motion_targets(model, prev, target)
        assert index.shape == ((1, 64, 16) if per_pixel else (1, 64))
        out = model(torch.randn(1, 64, 48), torch.ones(1, 1), torch.tensor([1]), torch.zeros(1, 32), prev=prev,
                    motion_index=index)
        assert torch.allclose(out, target, atol=1e-5) == per_pixel
        assert bool(exact.all()) == per_pixel
    with pytest.raises(ValueError, match="needs motion_pick"):
        TinyVideoModel(TinyConfig(predict_change=True, motion_reach=2, motion_per_pixel=True))


def test_the_motion_tool_makes_a_picking_head_per_pixel_and_starts_where_it_was(tmp_path, monkeypatch):
    """--per-pixel on picking weights with a training state: every pixel starts with its
    patch's choice (same frames out), the optimizer moments are repeated with the rows, and
    the per-pixel model trains on (its cross-entropy is per pixel)."""
    import runpy
    import sys
    from ffviz.__main__ import main
    from ffviz.train import state_path_for
    src, dst = tmp_path / "w.safetensors", tmp_path / "p" / "w.safetensors"
    assert main(["train", "--fresh", "--steps", "2", "--width", "128", "--layers", "1", "--motion-reach",
                 "2", "--motion-pick", "--motion-memory", "--motion-weight", "0.5", "--out", str(src)]) == 0
    tool = Path(__file__).resolve().parents[1] / "tools" / "add_motion_head.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(src), "--refine", "--per-pixel", "--out", str(dst)])
    with pytest.raises(SystemExit, match="has a motion head already"):  # a picking head needs --pick again
        runpy.run_path(str(tool), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [str(tool), str(src), "--pick", "--refine", "--per-pixel", "--out", str(dst)])
    runpy.run_path(str(tool), run_name="__main__")
    old, _ = load_tiny(src)
    new, card = load_tiny(dst)
    assert new.cfg.motion_per_pixel and new.motion.out_features == 16 * 25 and card["steps"] == 2
    x, prev = torch.rand(2, 64, 48) * 2 - 1, torch.rand(2, 64, 48) * 2 - 1
    with torch.no_grad():
        args = (x, torch.full((2, 1), 0.5), torch.tensor([3]), torch.zeros(2, 128))
        assert torch.allclose(old(*args, prev=prev), new(*args, prev=prev), atol=1e-6)
    before = torch.load(state_path_for(src), weights_only=False)
    after = torch.load(state_path_for(dst), weights_only=False)
    names = [n for n, _ in TinyVideoModel(new.cfg).named_parameters()]
    old_names = [n for n, _ in TinyVideoModel(old.cfg).named_parameters()]
    i, j = old_names.index("motion.weight"), names.index("motion.weight")
    assert torch.equal(after["opt"]["state"][j]["exp_avg"], before["opt"]["state"][i]["exp_avg"].repeat(16, 1))
    lines = []
    from ffviz.train import TrainConfig as TC, train as run_train
    run_train(TC(steps=4, batch=2, curriculum=((0, 5),), warmup=2, rollout_after=3, rollout_clips=1,
                 motion_weight=0.5, save_every_s=1e9), new.cfg, dst, log=lines.append)
    assert any("resumed exactly" in line for line in lines)
    trained, card = load_tiny(dst)
    assert card["steps"] == 4 and not torch.equal(trained.motion.weight, new.motion.weight)
    assert [{k: g[k] for k in ("step", "added")} for g in card["grafts"]] == [
        {"step": 2, "added": ["pick", "per-pixel", "refine"]}]  # training keeps it
