"""Recall (TinyConfig.recall): the last block's fixed heads read each patch back from the
frames the scene's motion carried it from, through the KV cache."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ffviz.generate import Controls, RunSettings, scene_motion
from ffviz.models.recall import RECALL_LAGS
from ffviz.policies import make_policy
from ffviz.run import Run
from ffviz.sampling import fill_cache
from ffviz.scenes import Scene, parse_prompt
from ffviz.train import TrainConfig, draw, teacher_forcing_loss, true_slots
from ffviz.weights import load_tiny, save_weights
from tests.conftest import random_model

MOTION = dict(predict_change=True, motion_reach=2, motion_pick=True, motion_match=True,
              motion_memory=True, motion_refine=True, wrap=True)
PILLAR = "a red square and a blue circle on a black background with a gray pillar"


def recall_model(**cfg):
    """A random recall model that trusts every cached patch alike (0.5)."""
    model = random_model(**{**MOTION, "layers": 3, "recall": True, "width": 64, **cfg})
    with torch.no_grad():
        model.recall_trust.weight.zero_()
        model.recall_trust.bias.zero_()
    return model


TOOL = Path(__file__).resolve().parents[1] / "tools" / "add_motion_head.py"


def grafted(tmp_path, old, *flags):
    """``old`` saved at step 7 and grown by tools/add_motion_head.py with ``flags``:
    (the new model, its card)."""
    save_weights(old, tmp_path / "old.safetensors", {"steps": 7})
    out = tmp_path / "new.safetensors"
    subprocess.run([sys.executable, str(TOOL), str(tmp_path / "old.safetensors"), *flags, "--out", str(out)],
                   check=True, capture_output=True)
    return load_tiny(out)


def full_cache_frames(model, prompt=PILLAR, frames=12, seed=2):
    """The frames (T, S, S, 3) of a full-cache run of ``prompt``."""
    return np.array(Run(model, RunSettings(prompt, frames=frames, seed=seed, record=False),
                        Controls(make_policy("full"), frames)).finish().frames.all())


def tokens(model, pixels):
    return model.patchify(torch.from_numpy(pixels)[None].float() / 127.5 - 1)


def cached(model, frames_tokens, motion, frames):
    """A cache holding ``frames`` (indices) of a clip's tokens (1, T*n, d), written as
    generation writes them."""
    n = model.cfg.tokens_per_frame
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long), motion)
    cache = model.new_cache()
    for f in frames:
        prev = frames_tokens[:, (f - 1) * n:f * n] if f else None
        fill_cache(model, cache, frames_tokens[:, f * n:(f + 1) * n], torch.tensor([f]), cond, 0.0, prev=prev)
    return cache


def read_at(model, cache, frame, motion):
    meta = model.token_positions(torch.tensor([frame]))
    layer = cache.layers[-1]
    return model.recall.read(model.recall.queries(*meta, motion), layer.k[:, :2], layer.v[:, :2])


def drawn_batch_loss(model):
    """(teacher_forcing_loss of a drawn batch of 2 clips of 16 frames, in training mode;
    the clip's frame count T)."""
    model.train()
    batch = draw(0, 6000, TrainConfig(batch=2, curriculum=((0, 16),)), model.cfg)
    s = true_slots(model, batch)
    T = len(batch.frame_idx)
    loss, _ = teacher_forcing_loss(model, s.truth, s.prev, s.truth, torch.ones(2, T, dtype=torch.bool),
                                   batch.levels, s.cond, torch.ones(2, T * 64), torch.Generator().manual_seed(0),
                                   s.mask, s.frames, torch.from_numpy(batch.targets), 0.5, 4.0)
    return loss, T


def test_the_scene_motion_is_measured_from_the_given_frames():
    model = recall_model()
    for seed in range(12):
        scene = Scene(parse_prompt(PILLAR, seed)[0], seed)
        vx, vy = scene.vel[0]
        measured = model.measure_motion(tokens(model, scene.render([0, 1])))
        assert measured.tolist() == [[vy, vx]], seed
    still = tokens(model, Scene(parse_prompt(PILLAR, 0)[0], 0).render([0, 0]))
    assert model.measure_motion(still).tolist() == [[0, 0]]
    assert scene_motion(random_model(), None) is None  # a model without recall needs none


def test_recall_brings_back_what_the_pillar_hid():
    """From a cache of the true frames, recall at frame t gives exactly the patches the
    motion carried from a lag back, and so paints what came out from behind the pillar,
    which no displacement of the previous frame gives."""
    model = recall_model()
    emerged = 0
    for seed in range(16):
        spec = parse_prompt(PILLAR, seed)[0]
        scene = Scene(spec, seed)
        if scene.vel[0][0] == 0:
            continue
        t = 40
        truth = tokens(model, scene.render(np.arange(t + 1)))
        motion = model.measure_motion(truth[:, :128])
        lag = RECALL_LAGS[2]
        cache = cached(model, truth, motion, [t - lag])  # one frame: one lag can find anything
        pixels, found, *_ = read_at(model, cache, t, motion)
        dy, dx = motion[0].tolist()
        source = torch.from_numpy(np.roll(scene.render([t - lag])[0], (lag * dy, lag * dx), (0, 1)))
        expected = model.patchify(source[None, None].float() / 127.5 - 1)
        assert torch.allclose(pixels, expected, atol=1e-4), seed
        assert torch.allclose(found, torch.full_like(found, 0.5 / len(RECALL_LAGS)), atol=1e-3)
        # the patches no displacement of frame t-1 gives, and recall gives exactly
        now, before = truth[:, t * 64:(t + 1) * 64], truth[:, (t - 1) * 64:t * 64]
        err = (model.displaced(before) - now[:, :, None]).pow(2).mean(-1).amin(-1)
        new = err > 1e-4
        emerged += int((new & ((pixels - now).pow(2).mean(-1) < 1e-8)).sum())
    assert emerged > 0


def test_recall_finds_nothing_where_the_cache_was_evicted():
    model = recall_model()
    scene = Scene(parse_prompt(PILLAR, 3)[0], 3)
    truth = tokens(model, scene.render(np.arange(30)))
    motion = model.measure_motion(truth[:, :128])
    window = cached(model, truth, motion, range(29 - RECALL_LAGS[0] + 1, 29))  # the newest 3 frames
    assert read_at(model, window, 29, motion)[1].max() < 1e-3
    full = cached(model, truth, motion, range(29))
    assert read_at(model, full, 29, motion)[1].min() > 0.45  # every lag, trust 0.5


def test_the_read_is_kept_for_a_frames_steps_and_redone_when_the_cache_changes():
    """A frame's denoising steps read the same cache at the same places: the read is made
    once. A cache that changed (new tensors: a write, a compression) is read again."""
    model = recall_model()
    scene = Scene(parse_prompt(PILLAR, 3)[0], 3)
    truth = tokens(model, scene.render(np.arange(30)))
    motion = model.measure_motion(truth[:, :128])
    cache = cached(model, truth, motion, range(29))
    layer, meta = cache.layers[-1], model.token_positions(torch.tensor([29]))
    read = lambda meta: model.recall.read_cache(layer, model.recall.queries(*meta, motion), meta[0], motion)
    first = read(meta)
    assert read(meta) is first
    assert all(torch.equal(a, b) for a, b in zip(first, read_at(model, cache, 29, motion)))
    other = read(model.token_positions(torch.tensor([28])))
    assert other is not first  # another frame's places
    layer.v = torch.zeros_like(layer.v)  # a changed cache: nothing trusted is left
    again = read(meta)
    assert again is not first and again[1].max() < 1e-6 < first[1].min()


def gathered_and_dense(model, motion):
    """What whole-clip training gathers over a drawn batch of 24-frame clips (one per row
    of ``motion``, random trust) and what generation's attention reads over the same keys."""
    from ffviz.models.rope import apply_rotation
    B = len(motion)
    batch = draw(0, 6000, TrainConfig(batch=B, curriculum=((0, 24),)), model.cfg)
    x = true_slots(model, batch).truth
    frame_idx = torch.from_numpy(batch.frame_idx)
    meta = model.token_positions(frame_idx)
    mask = model.block_causal_mask(frame_idx)
    values = model.recall.values(x, torch.rand(B, x.shape[1], 1))
    gathered = model.recall.gather(meta, motion, values, mask)
    cos, sin = model.rope.cos_sin(*meta)
    keys = apply_rotation(model.recall.key.expand(x.shape[1], -1), cos, sin).expand(B, 2, -1, -1)
    frame = meta[0]
    dense = model.recall.read(model.recall.queries(*meta, motion), keys, values,
                              allowed=mask & (frame[None] < frame[:, None]))
    return gathered, dense


def test_training_gather_reads_as_the_cache_does():
    """Whole-clip training gathers what generation's attention over the cache reads."""
    gathered, dense = gathered_and_dense(recall_model(), torch.tensor([[1, -2], [0, 1]]))
    assert torch.allclose(gathered[1], dense[1], atol=1e-4)
    found = dense[1] > 0.05
    assert found.float().mean() > 0.5
    assert (gathered[0] - dense[0]).abs().amax(-1)[found].max() < 0.02


def test_a_recall_model_needs_the_motion_and_trains():
    model = recall_model()
    with pytest.raises(ValueError, match="motion"):
        model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long))
    loss, _ = drawn_batch_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.recall_trust.weight.grad.abs().sum() > 0
    assert model.recall_choice[2].weight.grad.abs().sum() > 0


def test_a_recall_model_runs_with_recording_and_a_policy():
    model = recall_model()
    for policy in ("future_forcing", "window"):
        run = Run(model, RunSettings(PILLAR, frames=10, seed=1, record=True),
                  Controls(make_policy(policy), 3)).finish()
        frames = np.array(run.frames.all())
        assert frames.shape == (10, 32, 32, 3)


def test_the_recall_graft_starts_as_the_model_it_grew_from(tmp_path):
    old = random_model(**MOTION, patch_position=True)
    new, card = grafted(tmp_path, old, "--pick", "--match", "--memory", "--refine", "--recall")
    assert new.cfg.recall and new.cfg.layers == old.cfg.layers + 1
    assert card["grafts"][-1]["added"][-1] == "recall"
    assert np.array_equal(full_cache_frames(old), full_cache_frames(new))


def test_recall_is_no_choice_where_it_found_nothing():
    """A window of 3 frames holds nothing 4 or more frames back: however much the model
    wants recall, the pick is a displacement."""
    model = recall_model()
    with torch.no_grad():
        model.recall_choice[2].bias.fill_(1e3)  # recall wanted everywhere
    scene = Scene(parse_prompt(PILLAR, 3)[0], 3)
    truth = tokens(model, scene.render(np.arange(30)))
    motion = model.measure_motion(truth[:, :128])
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long), motion)
    x, prev = truth[:, 29 * 64:], truth[:, 28 * 64:29 * 64]
    for frames, picked in ((range(26, 29), False), (range(29), True)):
        cache = cached(model, truth, motion, frames)
        _, logits = model(x, torch.full((1, 1), 0.5), torch.tensor([29]), cond, prev=prev, cache=cache,
                          return_motion_logits=True)
        assert bool((logits.argmax(-1) == logits.shape[-1] - 1).all()) == picked
