"""The scene's own torus (TinyConfig.scene_torus): in scenes whose objects leave the view,
the moves do not wrap sideways and recall looks along the scene's longer torus."""
import numpy as np
import pytest
import torch

from ffviz.models.tiny import TinyConfig, TinyVideoModel
from ffviz.scenes import EXITS_ID, Scene, exit_torus, parse_prompt
from ffviz.train import TrainConfig, draw
from tests.conftest import random_model
from tests.test_recall import MOTION, PILLAR, drawn_batch_loss, full_cache_frames, grafted, recall_model, tokens
LEAVING = "a big red square and a small blue circle on a black background, leaving the view, fast"


def striped(model):
    """One frame (1, n, d) whose every column has its own value (channel 0), rows their own
    (channel 1): where a displaced pixel came from can be read off it."""
    S = model.cfg.frame_size
    img = torch.zeros(1, 1, S, S, 3)
    img[..., 0] = torch.linspace(-1, 1, S).view(1, S)
    img[..., 1] = torch.linspace(-1, 1, S).view(S, 1)
    return model.patchify(img)


def test_an_open_scene_repeats_its_side_edges_and_still_wraps_rows():
    model = random_model(**MOTION, prev_reach=1, scene_torus=True)
    frame, r = striped(model), model.cfg.motion_reach
    at = lambda dy, dx: (dy + r) * (2 * r + 1) + dx + r
    shut = model.unpatchify(model.displaced(frame)[:, :, at(1, 2)])[0, 0]
    opened = model.unpatchify(model.displaced(frame, torch.tensor([True]))[:, :, at(1, 2)])[0, 0]
    image = model.unpatchify(frame)[0, 0]
    assert torch.equal(shut[:, :2, 0], image[:, -2:, 0])  # wrapped: the right edge comes in at the left
    assert torch.equal(opened[:, :2, 0], image[:, :1, 0].expand(-1, 2))  # open: the left edge repeats
    assert torch.equal(opened[:, 2:], shut[:, 2:])  # inside the view nothing changes
    assert torch.equal(opened[:1, :, 1], image[-1:, :, 1])  # rows still wrap: the bottom comes in at the top
    assert torch.equal(model.displaced(frame, torch.tensor([False])), model.displaced(frame))
    leftward = model.unpatchify(model.displaced(frame, torch.tensor([True]))[:, :, at(0, -2)])[0, 0]
    assert torch.equal(leftward[:, -2:, 0], image[:, -1:, 0].expand(-1, 2))  # the right edge repeats
    # the previous-frame neighbourhood likewise
    shut_n, open_n = model.neighbourhood(frame), model.neighbourhood(frame, torch.tensor([True]))
    d, side = model.cfg.patch_dim, model.cfg.side
    left = open_n.view(side, side, 9, d)[:, 0, 3]  # each left-edge patch's left neighbour
    assert torch.equal(left, frame.view(side, side, d)[:, 0])
    assert torch.equal(shut_n.view(side, side, 9, d)[:, 0, 3], frame.view(side, side, d)[:, -1])


def test_the_condition_says_whether_the_scene_leaves_the_view():
    model = recall_model(scene_torus=True)
    ids = torch.stack([torch.from_numpy(parse_prompt(p)[0].condition_ids()) for p in (PILLAR, LEAVING)])
    assert ids[:, EXITS_ID].tolist() == [0, 1]
    cond = model.embed_condition(ids, torch.tensor([[0, 1], [1, -2]]))
    assert cond.shape[-1] == model.cfg.width + 4
    _, motion, one, open_sides = model.split_condition(cond)
    assert motion.tolist() == [[0, 1], [1, -2]] and open_sides.tolist() == [False, True]
    per_frame = model.embed_condition(ids[:, None].expand(-1, 5, -1), torch.tensor([[0, 1], [1, -2]]))
    assert per_frame.shape == (2, 5, model.cfg.width + 4)
    assert model.split_condition(per_frame)[3].tolist() == [False, True]
    plain = recall_model()
    assert plain.split_condition(plain.embed_condition(ids, torch.zeros(2, 2)))[3] is None


def clip_read(model, prompt, seed, frames, open_sides):
    """What recall gathers over a true clip of ``frames`` frames of ``prompt`` (trust 0.5
    everywhere) and the clip's tokens."""
    scene = Scene(parse_prompt(prompt, seed)[0], seed)
    return clip_read_of(model, scene, frames, open_sides)


def clip_read_of(model, scene, frames, open_sides):
    x = tokens(model, scene.render(range(frames)))
    frame_idx = torch.arange(frames)
    meta = model.token_positions(frame_idx)
    motion = torch.tensor([[int(scene.vel[0, 1]), int(scene.vel[0, 0])]])
    values = model.recall.values(x, torch.full((1, x.shape[1], 1), 0.5))
    read = model.recall.gather(meta, motion, values, model.block_causal_mask(frame_idx),
                               torch.tensor([open_sides]))
    return read, x, meta, motion, values


def test_recall_reads_a_leaving_scene_along_its_own_torus():
    model = recall_model(scene_torus=True)
    (pixels, found, *_), x, meta, motion, values = clip_read(model, LEAVING, 3, 30, True)
    assert abs(int(motion[0, 1])) == 2  # fast: the torus comes round in 30 frames
    seen = found > 0
    assert seen.float().mean() > 0.3
    assert (pixels - x.float()).abs().amax(-1)[seen].max() < 1e-5  # every read is the truth
    # places off the view were never cached: a token whose lags all look off it finds nothing
    in_view = model.recall.places(*meta, motion, torch.tensor([True]))[3]
    frame = meta[0]
    reachable = (in_view & (frame.view(1, 1, -1) >= torch.tensor([4, 8, 12, 16, 20, 24]).view(1, -1, 1))).any(1)
    assert torch.equal(seen, reachable)
    assert exit_torus() % model.cfg.patch == 0
    # on the view's torus the same reads are wrong where an object crossed the edge
    (wrong, found_view, *_), *_ = clip_read(model, LEAVING, 3, 30, False)
    assert (wrong - x.float()).abs().amax(-1)[found_view > 0].max() > 0.5


def test_generation_reads_the_longer_torus_as_training_gathers_it():
    """Attention over the cache (zero queries where the place is off the view) reads what
    whole-clip training gathers."""
    model = recall_model(scene_torus=True)
    (gathered, found, *_), x, meta, motion, values = clip_read(model, LEAVING, 3, 30, True)
    from ffviz.models.rope import apply_rotation
    cos, sin = model.rope.cos_sin(*meta)
    keys = apply_rotation(model.recall.key.expand(x.shape[1], -1), cos, sin).expand(1, 2, -1, -1)
    frame = meta[0]
    dense = model.recall.read(model.recall.queries(*meta, motion, torch.tensor([True])), keys, values,
                              allowed=frame[None] < frame[:, None])
    assert torch.allclose(found, dense[1], atol=1e-4)
    seen = found > 0.05
    assert (gathered - dense[0]).abs().amax(-1)[seen].max() < 0.02


def test_the_graft_generates_scenes_in_view_as_before_and_leaving_ones_apart(tmp_path):
    old = recall_model(one_motion=True, recall_bias=4.0)
    new, card = grafted(tmp_path, old, "--pick", "--scene-torus", "--round-trip")
    assert new.cfg.scene_torus and new.cfg.recall_round_trip
    assert card["grafts"][-1] == {"step": 7, "added": ["pick", "scene-torus", "round-trip"], "parameters": []}
    assert np.array_equal(full_cache_frames(old, frames=16), full_cache_frames(new, frames=16))
    assert not np.array_equal(full_cache_frames(old, LEAVING, 16), full_cache_frames(new, LEAVING, 16))


SLOW_LEAVING = "a big red square on a black background, leaving the view, slow"


def test_a_round_trip_recalls_what_comes_back_at_one_pixel_a_frame():
    """At 1 px a frame an object is back 28+ frames after it left: only the round trip's
    lags reach it, and only in scenes that leave the view."""
    scene = Scene(parse_prompt(SLOW_LEAVING, 0)[0], 0)
    assert abs(int(scene.vel[0, 0])) == 1
    far = recall_model(scene_torus=True, recall_round_trip=True)
    near = recall_model(scene_torus=True)
    (pixels, found, *_), x, meta, motion, values = clip_read_of(far, scene, 72, True)
    (_, found_near, *_), *_ = clip_read_of(near, scene, 72, True)
    assert bool((found >= found_near - 1e-6).all()) and float((found - found_near).max()) > 0.1
    seen = found > 0
    assert (pixels - x.float()).abs().amax(-1)[seen].max() < 1e-5
    # where only the round trip reaches, the object itself is read back
    only_far = seen & (found_near == 0)
    red = x.float()[only_far].view(-1, 16, 3)
    assert bool(((red[..., 0] > 0.5) & (red[..., 1] < -0.3)).any())
    # a scene that stays in the view, batched with one that leaves it, reads as alone
    shut = recall_model(scene_torus=True, recall_round_trip=True)
    values2 = torch.cat([values, values])
    frame_idx = torch.arange(72)
    mask = shut.block_causal_mask(frame_idx)
    both = shut.recall.gather(meta, torch.cat([motion, motion]), values2, mask, torch.tensor([False, True]))
    alone = shut.recall.gather(meta, motion, values, mask, torch.tensor([False]))
    assert torch.equal(both[1][:1], alone[1]) and torch.equal(both[0][:1], alone[0])
    assert torch.equal(both[1][1:], found)
    with pytest.raises(ValueError, match="scene_torus"):
        recall_model(recall_round_trip=True)


def test_a_scene_in_view_is_the_same_beside_one_that_leaves_it():
    """A batch gets the round trip's lags where any scene of it leaves the view; a scene
    that stays in view computes the same with or without such a neighbour."""
    model = recall_model(scene_torus=True, recall_round_trip=True)
    scenes = [Scene(parse_prompt(p, 1)[0], 1) for p in (PILLAR, LEAVING)]
    frames = torch.arange(6)
    x = torch.cat([tokens(model, s.render(range(6))) for s in scenes])
    prev = torch.cat([torch.zeros_like(x[:, :64]), x[:, :-64]], 1)
    motion = torch.tensor([[int(s.vel[0, 1]), int(s.vel[0, 0])] for s in scenes])
    ids = torch.stack([torch.from_numpy(s.spec.condition_ids()) for s in scenes])
    cond = model.embed_condition(ids, motion)
    run = lambda rows: model(x[rows], torch.zeros(len(rows), 6), frames, cond[rows], prev=prev[rows],
                             mask=model.block_causal_mask(frames))
    with torch.no_grad():
        assert torch.allclose(run([0, 1])[:1], run([0]), atol=1e-5)


def test_training_follows_the_scene_torus():
    """A drawn batch whose first clip leaves the view: its loss changes with the geometry
    (the same weights), and the recall parts learn from it."""
    torus, view = recall_model(scene_torus=True, recall_round_trip=True), recall_model()
    batch = draw(0, 6000, TrainConfig(batch=2, curriculum=((0, 16),)), torus.cfg)  # drawn_batch_loss's
    assert batch.cond_ids[0, :, EXITS_ID].all() and not batch.cond_ids[1, :, EXITS_ID].any()
    loss, _ = drawn_batch_loss(torus)
    assert torch.isfinite(loss) and abs(loss.item() - drawn_batch_loss(view)[0].item()) > 1e-6
    loss.backward()
    assert torus.recall_choice[2].weight.grad.abs().sum() > 0


def test_scene_torus_needs_a_wrapping_world_and_a_pick():
    with pytest.raises(ValueError, match="wrap"):
        TinyVideoModel(TinyConfig(**{**MOTION, "wrap": False}, scene_torus=True))
    with pytest.raises(ValueError, match="wrap"):
        TinyVideoModel(TinyConfig(predict_change=True, wrap=True, scene_torus=True))
