"""Training the embedded model (``python -m ffviz train``); docs/model.md tells why.

The recipe:

* **Teacher forcing on every frame at once.** A clip of T frames enters as T
  clean frames (the cache's view of the past, noise level 0 as at generation)
  followed by noisy copies of frames ``given..T-1``; a noisy frame sees the clean
  frames before it and itself, nothing else (``layout``). So every frame is a
  target in one pass, and each target sees exactly what generation shows it.
* **Clean-frame (x0) prediction**, loss on the noisy copies only, at levels
  drawn half from the sampler's own and half shifted-uniform.
* **A curriculum of clip lengths** (``TrainConfig.curriculum``): short clips
  first, then clips long enough to hold an exit or an occlusion.
* **Rollouts with the renderer as teacher.** After ``rollout_after`` steps, the
  clean frames of some clips are the model's own rollout, made exactly as
  generation makes frames (same sampler steps, palette snapping), and their
  targets are what follows from that rollout (``ffviz.teacher``): the model
  learns to continue from its own frames instead of fading back to the prompt.
* AdamW, warm-up, then the learning rate decays as 1/sqrt(step) (no horizon, so a
  mainline can go on across sessions), an EMA of the weights (what ships).
  Deterministic: batch ``s`` is drawn from ``seed`` and ``s`` alone.

Resumable exactly: ``--state`` holds the raw weights and the optimizer; the EMA
is the weights file itself (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ffviz.generate import scene_motion
from ffviz.models.tiny import TinyConfig, TinyVideoModel
from ffviz.sampling import (TRAIN_SEED_BASE, palette_tensor, previous_tokens, rollout, shifted,
                            sigma_schedule)
from ffviz.scenes import (COLORS, OBJECT_COLOUR_IDS, WORLD_VERSION, Scene, random_spec,
                          restyled_spec)
from ffviz.teacher import renderer_targets
from ffviz.weights import DEFAULT_WEIGHTS, WeightsError, load_tiny, save_weights

DATA_VERSION = WORLD_VERSION  # what a clip looks like: weights say which world they learnt
STATE_SUFFIX = ".state.pt"
MAX_GAP = 200  # frames between the given frames and a clip's recent block, at most


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100_000  # total optimizer steps (a resumed run stops here too)
    minutes: float = 0.0  # wall-clock budget of this invocation; 0 = none
    batch: int = 8
    # (from step, clip frames): 24 frames from 7,200, so recall's longer lags (16-20 frames
    # back, 24 without a gap) are trained, as a full cache offers them free-running
    curriculum: tuple = ((0, 6), (1500, 12), (5000, 16), (7200, 24))
    lr: float = 1e-3
    warmup: int = 200
    decay_from: int = 2000  # lr x sqrt(decay_from / step) from here on
    lr_floor: float = 0.05  # ... but never below this share of lr
    ema: float = 0.999
    rollout_after: int = 1500
    rollout_clips: int = 2  # clips per batch whose context is the model's own rollout
    targets: int = 6  # noisy target frames per clip (drawn from the clip's frames after the given)
    switch_share: float = 0.15  # clips (not rolled out) whose prompt switches mid-clip
    # clips whose prompt names no colour (condition colour 0): a hidden object's colour
    # then comes back only from the frames before, which is what the cache is for
    unnamed_share: float = 0.25
    object_weight: float = 2.0  # loss weight of patches showing an object or the pillar
    motion_weight: float = 0.5  # weight of the motion choice's cross-entropy (motion_pick)
    # loss weight of patches no displacement of the previous frame gives (motion_pick): an
    # object coming out from behind the pillar or back into view, rare and what memory is for
    paint_weight: float = 4.0
    # focus of the motion cross-entropy on the patches the head gets wrong (a focal loss's
    # gamma: each patch's term times (1 - p_right)^focus; 0 = plain). Most patches move
    # as they moved, which the motion memory already says; where it is wrong (a bounce in
    # the earlier world, a torn object) is what the focus weighs up.
    motion_focus: float = 0.0
    # patches no displacement gives are taught against the better of standing still and
    # the scene's motion, the moves sampling with one_motion makes (world_move_targets)
    world_moves: bool = False
    # weight of the motion cross-entropy on patches where staying put is wrong (an object
    # moves through them, or leaves them): few among the patches where the choice
    # matters, and a trailing edge chosen wrong is where free-running objects smear
    move_weight: float = 1.0
    # a rollout object the teacher cannot read (torn, smeared) is asked back whole where
    # it should be, instead of leaving the frames after it without a loss
    redraw_failed: bool = True
    seed: int = 0
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    workers: int = 0  # processes drawing batches ahead; 0 = in the training process
    save_every_s: float = 300.0
    bf16: bool = True  # the training pass in bfloat16 autocast where the hardware has it

    def autocast(self, device: str):
        """bfloat16 autocast for the training pass on CUDA or a CPU with bf16 instructions
        (about 30% faster on an AVX512-BF16 CPU); a no-op elsewhere or when off."""
        on = self.bf16 and (device == "cuda" or torch.cpu._is_avx512_bf16_supported())
        return torch.autocast(device, dtype=torch.bfloat16, enabled=on)

    def clip_frames(self, step: int) -> int:
        return [frames for start, frames in self.curriculum if step >= start][-1]

    def learning_rate(self, step: int, warm_from: int = 0) -> float:
        warm = min(1.0, (step - warm_from + 1) / self.warmup)
        decay = math.sqrt(self.decay_from / step) if step > self.decay_from else 1.0
        return self.lr * warm * max(decay, self.lr_floor)


def gap_start(rng: np.random.Generator, recent: int) -> int:
    """First frame of a clip's recent block: right after the given frames half the time,
    else log-uniform up to ``MAX_GAP`` frames later (the cache of a long run: the given
    frames, then a gap, then the newest frames)."""
    if rng.random() < 0.5:
        return 2
    return int(np.exp(rng.uniform(np.log(3), np.log(MAX_GAP))))


def make_batch(rng: np.random.Generator, batch: int, recent: int, start: int, given: int,
               switch_share: float = 0.0, first_switchable: int = 0):
    """A batch of clips: the given frames 0..given-1 and the recent block
    start..start+recent-1 of fresh scenes. Clips from ``first_switchable`` on switch
    their prompt at a recent frame with probability ``switch_share`` (the scene goes on
    under a restyled prompt, ``Scene.continued``). Returns scenes (each clip's first),
    frame indices (T,), frames (B, T, 32, 32, 3) uint8, the true frame before the
    recent block (B, 32, 32, 3) (None when the blocks touch), condition ids per frame
    (B, T, C) and the foreground (B, T, 32, 32): pixels that are not background."""
    frame_idx = np.concatenate([np.arange(given), np.arange(start, start + recent)])
    scenes = [Scene(random_spec(rng), int(rng.integers(TRAIN_SEED_BASE, 1 << 31)))
              for _ in range(batch)]
    clips, conds, fg = [], [], []
    for b, scene in enumerate(scenes):
        story = [scene]
        if b >= first_switchable and rng.random() < switch_share:
            at = int(frame_idx[rng.integers(given + 1, len(frame_idx))])
            story.append(scene.continued(restyled_spec(rng, scene.spec), at))
        per_frame = [story[-1] if f >= story[-1].t0 else story[0] for f in frame_idx]
        clip = np.concatenate([sc.render([f]) for sc, f in zip(per_frame, frame_idx)])
        clips.append(clip)
        conds.append(np.stack([sc.spec.condition_ids() for sc in per_frame]))
        bg = np.stack([COLORS[sc.spec.background] for sc in per_frame]).astype(np.uint8)
        fg.append((clip != bg[:, None, None]).any(-1))
    before = np.stack([s.render([start - 1])[0] for s in scenes]) if start > given else None
    return scenes, frame_idx, np.stack(clips), before, np.stack(conds), np.stack(fg)


def unname_colours(conds: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """Condition ids (B, T, C) with the object colours left out (0, as for a prompt that
    names none) in a ``share`` of the clips. Its own generator: the rest of a batch is
    the same whatever the share."""
    hide = rng.random(len(conds)) < share
    conds = conds.copy()
    conds[np.ix_(hide, np.arange(conds.shape[1]), OBJECT_COLOUR_IDS)] = 0
    return conds


def noise_levels(rng: np.random.Generator, batch: int, frames: int, steps: int, shift: float):
    """Levels (B, frames) of the noisy copies: half the sampler's own, half shifted-uniform."""
    own = np.asarray(sigma_schedule(steps, shift)[:-1])[rng.integers(steps, size=(batch, frames))]
    uniform = shifted(rng.random((batch, frames)), shift)
    levels = np.where(rng.random((batch, frames)) < 0.5, own, uniform)
    return torch.from_numpy(levels).float()


@dataclasses.dataclass
class Batch:
    """Everything random about one batch that lives on the host (``draw``)."""
    gen_seed: int
    scenes: list
    frame_idx: np.ndarray  # (T,) absolute frame of each clip slot
    clips: np.ndarray  # (B, T, S, S, 3) uint8
    before: np.ndarray | None  # (B, S, S, 3) the true frame before the recent block
    cond_ids: np.ndarray  # (B, T, C): each frame's prompt (a clip may switch)
    foreground: np.ndarray  # (B, T, S, S) bool: pixels that are not background
    targets: np.ndarray  # (K,) slots with a noisy copy
    levels: torch.Tensor  # (B, K)


def draw(seed: int, step: int, cfg: TrainConfig, model_cfg: TinyConfig) -> Batch:
    """Batch ``step``, from ``(seed, step)`` alone. Picklable both ways, so worker
    processes can prepare batches ahead."""
    rng = np.random.default_rng([seed, step])
    T, g = cfg.clip_frames(step), model_cfg.given_frames
    recent = T - g
    gen_seed = int(rng.integers(1 << 62))
    start = gap_start(rng, recent)
    scenes, frame_idx, clips, before, conds, fg = make_batch(
        rng, cfg.batch, recent, start, g, cfg.switch_share, cfg.rollout_clips)
    conds = unname_colours(conds, np.random.default_rng([seed, step, 1]), cfg.unnamed_share)
    # targets: recent slots whose previous frame is in the clip (the newest cached frame)
    candidates = np.arange(g + 1, T)
    K = min(cfg.targets, len(candidates))
    targets = np.sort(rng.choice(candidates, size=K, replace=False))
    levels = noise_levels(rng, cfg.batch, K, model_cfg.sample_steps, model_cfg.shift)
    return Batch(gen_seed, scenes, frame_idx, clips, before, conds, fg, targets, levels)


def prefetch(pool, jobs, depth: int):
    """``draw(*job)`` for each job in order; with a pool, at most ``depth`` run ahead
    (a bounded queue: memory stays flat however fast the workers are)."""
    if pool is None:
        yield from (draw(*job) for job in jobs)
        return
    import collections
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(draw, job))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def layout(frame_idx: torch.Tensor, given: int, tokens_per_frame: int, targets: torch.Tensor):
    """The teacher-forcing sequence: the clip's clean frames (absolute indices
    ``frame_idx`` (T,)), then noisy copies of the slots ``targets`` (K,). Returns (frame
    index of each slot (T + K,), attention mask over tokens (N, N), True = may attend).

    A clean frame sees the clean frames of its own chunk and before (the given frames
    are one chunk, as generation caches them together); a noisy copy of frame f sees
    the clean frames before f and its own tokens: exactly what generation shows it."""
    frame = torch.cat([frame_idx, frame_idx[targets]])
    T = len(frame_idx)
    is_noisy = torch.arange(len(frame)) >= T
    chunk = frame.clamp_min(given - 1)
    q_f, k_f = chunk[:, None], chunk[None, :]
    q_n, k_n = is_noisy[:, None], is_noisy[None, :]
    slot = torch.arange(len(frame))
    allowed = (~q_n & ~k_n & (k_f <= q_f)) | (q_n & ~k_n & (k_f < q_f)) | (slot[:, None] == slot[None, :])
    n = tokens_per_frame
    return frame, allowed.repeat_interleave(n, 0).repeat_interleave(n, 1)


def previous_of_slots(context, before, given: int, n: int):
    """Each slot's previous frame (tokens like ``context``): the slot before it, or
    ``before`` (B, n, d) for the first recent slot when the blocks do not touch."""
    prev = previous_tokens(None, context, n)
    if before is not None:
        prev = prev.clone()
        prev[:, given * n:(given + 1) * n] = before
    return prev


class MotionTargets(NamedTuple):
    """What ``motion_targets`` finds, patch by patch (B, M), or per pixel (B, M, P) with
    ``motion_per_pixel``."""
    index: torch.Tensor  # the shortest of the best displacements
    good: torch.Tensor  # (..., K) bool: every displacement as good as the best
    telling: torch.Tensor  # bool: patches where the choice matters at all
    exact: torch.Tensor  # bool: some displacement gives the patch exactly; the others hold
    # something new, such as an object coming back from behind the pillar
    best: torch.Tensor  # the best displacement's mean squared error


def motion_targets(model, prev, target, open_sides=None) -> MotionTargets:
    """Which displacements of ``prev`` give ``target`` (tokens (B, M, d)), patch by patch
    (or pixel by pixel with ``motion_per_pixel``); ``open_sides`` as ``displaced``."""
    moved = model.displaced(prev.float(), open_sides)
    B, M, K, _ = moved.shape
    P = model.choices_per_token
    err = (moved.view(B, M, K, P, -1) - target.float().view(B, M, 1, P, -1)).pow(2).mean(-1).transpose(2, 3)
    if not model.cfg.motion_per_pixel:
        err = err[:, :, 0]
    best = err.min(-1, keepdim=True).values
    good = err <= best + 1e-4
    index = (good * 1e3 - model.displacement_length).argmax(-1)
    return MotionTargets(index, good, ~good.all(-1), best[..., 0] < 1e-4, best[..., 0])


def world_move_targets(model, prev, target, motion, t: MotionTargets, open_sides=None) -> MotionTargets:
    """``t`` with the patches no displacement gives exactly taught as the better of the
    world's two moves: standing still or the scene's ``motion`` (B, 2) (with every
    displacement that gives the same patch as it). Elsewhere the best displacement of
    such a patch is most often one the world never makes (the pillar's edge moved one
    pixel), which sampling with ``one_motion`` does not pick; the patch's change is
    then learnt against a base the sampler never gives."""
    moved = model.displaced(prev.float(), open_sides)  # (B, M, K, d)
    B, M, K, d = moved.shape
    ways = model.world_move_patches(moved, motion)  # (B, M, 2, d): still, the scene's motion
    still_err, scene_err = (ways - target.float()[:, :, None]).pow(2).mean(-1).unbind(-1)
    by_scene = scene_err < still_err
    world = torch.where(by_scene, model.scene_index(motion).to(moved.device)[:, None], K // 2)  # (B, M)
    gives = ways.gather(2, by_scene.long()[..., None, None].expand(B, M, 1, d))
    same = (moved - gives).abs().amax(-1) < 1e-4  # (B, M, K): displacements giving that patch
    index = torch.where(t.exact, t.index, world)
    good = torch.where(t.exact[..., None], t.good, same)
    best = torch.where(t.exact, t.best, torch.minimum(still_err, scene_err))
    return MotionTargets(index, good, ~good.all(-1), t.exact, best)


@dataclasses.dataclass
class TrueSlots:
    """A drawn batch's TRUE frames laid out as training lays them out (``true_slots``),
    for probes that read the model on true frames: tokens (B, T*n, d) of the clip and
    of each slot's previous frame, the target slots' (B, K*n, d), the layout and the
    condition of every slot, noisy copies included (B, T + K, w)."""
    frames: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor
    prev: torch.Tensor
    target: torch.Tensor
    target_prev: torch.Tensor
    cond: torch.Tensor


def true_slots(model, b: Batch) -> TrueSlots:
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    T, targets = len(b.frame_idx), torch.from_numpy(b.targets)
    frames, mask = layout(torch.from_numpy(b.frame_idx), g, n, targets)
    tokens = lambda px: model.patchify(torch.from_numpy(px).float() / 127.5 - 1)
    truth = tokens(b.clips)
    B = truth.shape[0]
    prev = previous_of_slots(truth, None if b.before is None else tokens(b.before[:, None]), g, n)
    pick = lambda x: x.view(B, T, n, -1)[:, targets].reshape(B, len(targets) * n, -1)
    cond = model.embed_condition(torch.from_numpy(b.cond_ids), scene_motion(model, truth[:, :g * n]))
    return TrueSlots(frames, mask, truth, prev, pick(truth), pick(prev),
                     torch.cat([cond, cond[:, targets]], 1))


def teacher_forcing_loss(model, context, prev, target, valid, levels, cond, weight, gen, mask,
                         frames, targets, motion_weight: float = 0.0, paint_weight: float = 1.0,
                         motion_focus: float = 0.0, move_weight: float = 1.0,
                         recall_weight: float = 1.0, world_moves: bool = False):
    """x0 loss of the noisy copies. context/prev/target: tokens (B, T*n, d) (the clean
    frames, each one's previous frame, and what each frame should be); valid (B, T) bool;
    levels (B, K) of the target slots ``targets`` (K,); weight (B, T*n); frames, mask
    from ``layout``. Returns (loss, motion cross-entropy or None): with ``motion_pick``
    the x0 comes from the true displacement and the head's choice is taught by
    cross-entropy over the displacements that give the target (weight ``motion_weight``),
    and patches no displacement gives (what must be painted, not moved) weigh
    ``paint_weight`` times more: they are few, and they are where memory shows.
    ``motion_focus`` > 0 weighs each patch's cross-entropy by (1 - p_right)^focus;
    ``move_weight`` weighs it on patches where the zero displacement is wrong.
    ``world_moves``: patches no displacement gives are taught against the better of the
    world's moves (``world_move_targets``; the condition carries the scene's motion)."""
    n = model.cfg.tokens_per_frame
    B, T = valid.shape
    pick = lambda x: x.view(B, T, n, -1)[:, targets].reshape(B, len(targets) * n, -1)
    tgt = pick(target)
    noise = torch.randn(tgt.shape, generator=gen).to(tgt.device)
    lv = levels.repeat_interleave(n, 1)[..., None]
    noisy = (1 - lv) * tgt + lv * noise
    x = torch.cat([context, noisy], 1)
    t = torch.cat([torch.zeros(B, T, device=levels.device), levels], 1)
    prev_all = torch.cat([prev, pick(prev)], 1)
    valid_tok = valid[:, targets].repeat_interleave(n, 1)
    w = pick(weight[..., None])[..., 0] * valid_tok
    if not model.cfg.motion_pick:
        out = model(x, t, frames, cond, prev=prev_all, mask=mask)
        ce = None
    else:
        _, motion, _, open_sides = model.split_condition(cond)
        targets_found = motion_targets(model, pick(prev), tgt, open_sides)
        if world_moves:
            if motion is None:
                raise ValueError("world_moves teaches the scene's motion: the model must carry it "
                                 "on its condition (embed_condition with the motion)")
            targets_found = world_move_targets(model, pick(prev), tgt, motion, targets_found, open_sides)
        index, good, telling, exact, best = targets_found
        centre = torch.full((B, T * n, *index.shape[2:]), good.shape[-1] // 2, dtype=torch.long,
                            device=x.device)
        recall = model.cfg.recall
        out, logits = model(x, t, frames, cond, prev=prev_all, mask=mask,
                            motion_index=torch.cat([centre, index], 1), return_motion_logits=True,
                            recall_target=torch.cat([context, tgt], 1) if recall else None)
        logits = logits[:, T * n:].float()
        if recall:  # recall is the one good choice where it gives the patch better than any
            # displacement, one of the good ones where it gives it as well as the best; where it
            # gives it worse, the choice matters even on a plain patch (every displacement alike)
            used = model.recall_used[:, T * n:]
            rec_err = (model.recall_pixels[:, T * n:].float() - tgt).pow(2).mean(-1)
            good = torch.cat([good & ~used[..., None], (used | (rec_err <= best + 1e-4))[..., None]], -1)
            telling = ~good.all(-1)
        nll = logits.logsumexp(-1) - logits.masked_fill(~good, float("-inf")).logsumexp(-1)
        per_pixel = model.cfg.motion_per_pixel  # telling, exact: (B, K * n, P)
        w_ce = (telling & (valid_tok[..., None] if per_pixel else valid_tok)).float()
        ce = (nll * w_ce).sum() / w_ce.sum().clamp_min(1.0)  # what the log shows
        focal = (1 - torch.exp(-nll.detach())).pow(motion_focus) if motion_focus else 1.0
        moves = torch.where(good[..., model.displacement_length.numel() // 2], 1.0, move_weight)
        ce_term = (nll * w_ce * focal * moves).sum() / w_ce.sum().clamp_min(1.0)
        w = w * torch.where(exact.all(-1) if per_pixel else exact, 1.0, paint_weight)
        if recall:  # what recall reads, taught where no displacement gives the patch: its
            # mean over lags, which the trust weighs (a lag's own read does not depend on it)
            w_rec = (~exact & valid_tok).float()
            mean_err = (model.recall_mean[:, T * n:].float() - tgt).pow(2).mean(-1)
            ce_term = ce_term + recall_weight * (mean_err * w_rec).sum() / w_rec.sum().clamp_min(1.0)
        if model.cfg.pixel_moves:
            ce_term = ce_term + pixel_moves_loss(model, T * n, valid_tok, paint_weight)
        if model.cfg.recall_lag_pick:
            ce_term = ce_term + lag_pick_loss(model, T * n, valid_tok)
    err = (out[:, T * n:].float() - tgt).pow(2).mean(-1)  # (B, K * n), float32 under autocast too
    loss = (err * w).sum() / w.sum().clamp_min(1e-6)
    return (loss if ce is None else loss + motion_weight * ce_term), ce


def pixel_moves_loss(model, first: int, valid_tok, paint_weight: float) -> torch.Tensor:
    """Cross-entropy of each pixel's world move (``pixel_moves``) over the moves that give
    it, on the target slots (tokens from ``first``) whose pick was a world move, where the
    moves disagree; pixels whose first-ranked move does not give them (at the start: those
    the patch's pick does not give, the pillar's edges) weigh ``paint_weight``."""
    logits, gives = model.pixel_logits[:, first:], model.pixel_gives[:, first:]
    telling = gives.any(-1) & ~gives.all(-1) & (model.pixel_has[:, first:] & valid_tok)[..., None]
    some = gives | ~gives.any(-1, keepdim=True)  # a pixel no move gives: no target (nor NaN)
    nll = logits.logsumexp(-1) - logits.masked_fill(~some, float("-inf")).logsumexp(-1)
    right = gives.gather(-1, logits.argmax(-1, keepdim=True))[..., 0]
    w = telling.float() * torch.where(right, 1.0, paint_weight)
    return (torch.where(telling, nll, 0.0) * w).sum() / telling.sum().clamp_min(1)


def lag_pick_loss(model, first: int, valid_tok) -> torch.Tensor:
    """Cross-entropy of recall's pick among its reads (``recall_lag_pick``) over the reads
    that give the patch, on the target slots (tokens from ``first``) where some read gives
    it and another found one does not."""
    logits, gives = model.lag_pick_logits[:, first:], model.lag_pick_gives[:, first:]
    telling = model.lag_pick_telling[:, first:] & valid_tok
    nll = logits.logsumexp(-1) - logits.masked_fill(~gives, float("-inf")).logsumexp(-1)
    return torch.where(telling, nll, 0.0).sum() / telling.sum().clamp_min(1)


def _worker_init():
    torch.set_num_threads(1)  # a worker only renders clips; many workers x many threads thrash


def state_path_for(weights: Path) -> Path:
    return Path(weights).with_suffix(STATE_SUFFIX)


def train(cfg: TrainConfig, model_cfg: TinyConfig, out: Path, log=print, fresh: bool = False,
          new_world: bool = False) -> dict:
    """Train and save; returns the weights' card. ``new_world``: resume weights trained
    on an earlier world version (see ``_resume``). Worker processes and the TF32
    switch are undone however the run ends (an error or Ctrl-C included)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    pool = None
    try:
        if cfg.workers > 0:
            import multiprocessing as mp
            pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_worker_init)
        return _train(cfg, model_cfg, Path(out), log, pool, fresh, new_world)
    finally:
        if pool is not None:
            pool.terminate()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _resume(out: Path, model_cfg: TinyConfig, log, fresh: bool, new_world: bool = False):
    """(model, ema, optimizer state, progress, lineage) from ``out`` and its state
    file, or new; lineage is the card's ``world_changes`` and ``grafts`` (heads added by
    tools/add_motion_head.py), carried on. Weights of an earlier world version resume
    only with ``new_world``: they
    carry over whole (optimizer and progress too), their moves wrap from then on, the
    step is recorded in the card's ``world_changes``, and the EMA restarts from the
    optimizer's weights (an average across the change would ship the old world's)."""
    state_path = state_path_for(out)
    if fresh or not out.exists():
        model = TinyVideoModel(model_cfg)
        return model, copy.deepcopy(model), None, (0, 0, 0.0, []), {"world_changes": [], "grafts": []}
    try:
        ema, card = load_tiny(out)
    except WeightsError as e:
        raise SystemExit(f"cannot resume from {out}: {e} (or start anew with --fresh)")
    progress = (card.get("steps", 0), card.get("clips_seen", 0), card.get("train_seconds", 0.0),
                card.get("history", []))
    changes = list(card.get("world_changes", []))
    entering = card.get("data_version") != DATA_VERSION  # a new world
    if entering:
        if not new_world:
            raise SystemExit(f"{out} was trained on data version {card.get('data_version')}, this "
                             f"world is version {DATA_VERSION}: go on in this world with --new-world, "
                             f"or start anew with --fresh")
        ema.cfg = dataclasses.replace(ema.cfg, wrap=True)  # no weights of its own
        changes.append({"step": progress[0], "data_version": DATA_VERSION})
        log(f"{out}: world version {card.get('data_version')} -> {DATA_VERSION} at step {progress[0]}")
    model, opt_state = copy.deepcopy(ema), None
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("step") != progress[0]:
            raise SystemExit(f"{state_path} is at step {st.get('step')} but {out} at step "
                             f"{progress[0]}: they are not one checkpoint")
        model.load_state_dict(st["model"])
        opt_state = st["opt"]
        log(f"resumed exactly from {out} + {state_path.name} at step {progress[0]}")
        if entering:
            ema = copy.deepcopy(model)
            log("the EMA restarts from the optimizer's weights in the new world")
    else:
        log(f"starting from {out} (step {progress[0]}) without optimizer state")
    return model, ema, opt_state, progress, {"world_changes": changes, "grafts": card.get("grafts", [])}


def parameter_births(grafts: list) -> dict[str, int]:
    """The step each grafted parameter was born at (``tools/add_motion_head.py`` records a
    graft's new parameters in the card); parameters not named were born at step 0. The
    EMA warms up from a part's birth, so a part grafted at step 9,000 is not averaged with
    its zero start over the next thousand steps."""
    return {name: g["step"] for g in grafts for name in g.get("parameters", [])}


def _train(cfg: TrainConfig, model_cfg: TinyConfig, out: Path, log, pool, fresh: bool,
           new_world: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ample for this model
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model, ema, opt_state, (step, clips_seen, seconds, history), lineage = _resume(
        out, model_cfg, log, fresh, new_world)
    model_cfg = model.cfg
    model.to(device).train()
    ema.to(device).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    if opt_state:
        opt.load_state_dict(opt_state)
    warm_from = step if opt_state is None and step else 0  # a fresh optimizer warms up again
    births = parameter_births(lineage["grafts"])
    ema_groups = {}  # the step each part was born at -> (its EMA tensors, its raw ones)
    for (name, averaged), raw in zip(ema.named_parameters(), model.parameters()):
        group = ema_groups.setdefault(births.get(name, 0), ([], []))
        group[0].append(averaged)
        group[1].append(raw)
    n, g = model_cfg.tokens_per_frame, model_cfg.given_frames
    started, last_save, losses, valid_share, motion_ces = time.time(), time.time(), [], [], []

    def save():
        state_path = state_path_for(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        tmp.replace(state_path)
        return save_weights(copy.deepcopy(ema).cpu(), out, {
            "steps": step, "clips_seen": clips_seen, "train_seconds": round(seconds, 1),
            "data_version": DATA_VERSION, **lineage,
            "train_config": dataclasses.asdict(cfg),
            "device": device, "history": history,
            "command": "python -m ffviz train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        })

    # batches are drawn ahead by worker processes when asked (a GPU outruns one core)
    batches = prefetch(pool, ((cfg.seed, s, cfg, model_cfg) for s in range(step, cfg.steps)),
                       depth=2 * cfg.workers)
    card = None
    stop = _StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, stop (nothing lost)
    log(f"training from step {step} (Ctrl-C or SIGTERM: the step in flight finishes and saves)")
    while step < cfg.steps and not stop.asked:
        t0 = time.time()
        batch = next(batches)
        gen = torch.Generator().manual_seed(batch.gen_seed)
        T = len(batch.frame_idx)
        frame_idx, targets = torch.from_numpy(batch.frame_idx), torch.from_numpy(batch.targets)
        frames, mask = layout(frame_idx, g, n, targets)
        mask = mask.to(device)
        tokens = lambda pixels: model.patchify(torch.from_numpy(pixels).to(device).float() / 127.5 - 1)
        truth = tokens(batch.clips)
        before = None if batch.before is None else tokens(batch.before[:, None])
        cond_ids, levels = torch.from_numpy(batch.cond_ids).to(device), batch.levels.to(device)
        context, target = truth, truth
        valid = torch.ones(cfg.batch, T, dtype=torch.bool, device=device)
        if step >= cfg.rollout_after and cfg.rollout_clips:
            context, target, valid = _rollout_context(model, batch, truth, before, cond_ids,
                                                      frame_idx, gen, cfg.rollout_clips,
                                                      cfg.redraw_failed)
            valid_share.append(valid[:cfg.rollout_clips, g + 1:].float().mean().item())
        prev = previous_of_slots(context, before, g, n)
        fg = model.patchify(torch.from_numpy(batch.foreground)[..., None].float()).amax(-1).to(device)
        weight = 1 + (cfg.object_weight - 1) * fg
        lr = cfg.learning_rate(step, warm_from)
        for group in opt.param_groups:
            group["lr"] = lr
        with cfg.autocast(device):
            # (B, T, w): each frame's prompt, and the scene's motion from the given frames
            cond = model.embed_condition(cond_ids, scene_motion(model, truth[:, :g * n]))
            cond = torch.cat([cond, cond[:, targets]], 1)  # the noisy copies' too
            loss, motion_ce = teacher_forcing_loss(model, context, prev, target, valid, levels,
                                                   cond, weight, gen, mask, frames, targets,
                                                   cfg.motion_weight, cfg.paint_weight,
                                                   cfg.motion_focus, cfg.move_weight,
                                                   world_moves=cfg.world_moves)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for born, (averaged, raw) in ema_groups.items():  # EMA warm-up from each part's birth
                age = step - born
                torch._foreach_lerp_(averaged, raw, 1 - min(cfg.ema, (1 + age) / (10 + age)))
        step += 1
        clips_seen += cfg.batch
        seconds += time.time() - t0
        losses.append(loss.item())
        if motion_ce is not None:
            motion_ces.append(motion_ce.item())
        if step % 50 == 0:
            entry = {"step": step, "loss": round(float(np.mean(losses)), 5), "clip_frames": T,
                     "lr": round(lr, 6), "seconds": round(seconds, 1)}
            if valid_share:
                entry["rollout_valid"] = round(float(np.mean(valid_share)), 3)
            if motion_ces:
                entry["motion_ce"] = round(float(np.mean(motion_ces)), 4)
            history.append(entry)
            log(" ".join(f"{k} {v}" for k, v in entry.items()) + f" last {time.time() - t0:.2f}s")
            losses, valid_share, motion_ces = [], [], []
        out_of_time = cfg.minutes and time.time() - started > cfg.minutes * 60
        if time.time() - last_save > cfg.save_every_s or out_of_time or step == cfg.steps \
                or stop.asked:
            card = save()
            last_save = time.time()
            if out_of_time:
                break
    stop.release()
    if card is None:
        card = save()
    log(f"saved {out} at step {step} ({clips_seen} clips, {seconds / 60:.1f} min of training)")
    return card


class _StopRequest:
    """Turns SIGINT and SIGTERM into a request the training loop honours between steps
    (so a stop always leaves a checkpoint that resumes exactly); a second Ctrl-C, or a
    signal outside the main thread, acts as usual."""

    def __init__(self):
        self.asked, self._old = False, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._ask)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _ask(self, sig, frame):
        if self.asked:
            self.release()
            signal.raise_signal(sig)
        self.asked = True
        print("stopping after this step, then saving (again to stop at once)", file=sys.stderr)

    def release(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _rollout_context(model, batch: Batch, truth, before, cond_ids, frame_idx, gen, clips: int,
                     redraw_failed: bool = True):
    """Contexts, targets and valid masks with the first ``clips`` clips replaced by the
    model's own rollout and the renderer's targets for it (``ffviz.teacher``)."""
    n, g, device = model.cfg.tokens_per_frame, model.cfg.given_frames, truth.device
    model.eval()
    with torch.no_grad():
        pal = palette_tensor([s.spec for s in batch.scenes[:clips]], device)
        cond = model.embed_condition(cond_ids[:clips, 0], scene_motion(model, truth[:clips, :g * n]))
        rolled = rollout(model, truth[:clips], cond,
                         model.cfg.sample_steps, len(frame_idx), gen, palette=pal,
                         frame_idx=frame_idx, before=None if before is None else before[:clips])
    model.train()
    pixels = ((model.unpatchify(rolled) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
    # the renderer reads the rollout on from its last true slot (the first recent frame
    # after a gap, else the last given frame)
    k = g if before is not None else g - 1
    reads = [renderer_targets(s, p[k:], 1, int(frame_idx[k]), redraw_failed)
             for s, p in zip(batch.scenes, pixels)]
    target, context = truth.clone(), truth.clone()
    context[:clips] = rolled
    target[:clips, (k + 1) * n:] = model.patchify(
        torch.from_numpy(np.stack([r[0][1:] for r in reads])).to(device).float() / 127.5 - 1)
    ok = torch.ones(truth.shape[0], len(frame_idx), dtype=torch.bool, device=device)
    ok[:clips, k + 1:] = torch.from_numpy(np.stack([r[1][1:] for r in reads])).to(device)
    return context, target, ok


def add_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps to reach")
    p.add_argument("--minutes", type=float, default=0.0, help="stop (and save) after this many minutes")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rollout-after", type=int, default=d.rollout_after,
                   help="step from which some clips' context is the model's own rollout")
    p.add_argument("--rollout-clips", type=int, default=None,
                   help="clips per batch rolled out, their targets from the renderer "
                        "(default: a quarter of the batch)")
    p.add_argument("--object-weight", type=float, default=d.object_weight,
                   help="loss weight of patches that show an object or the pillar (1 = plain)")
    p.add_argument("--switch-share", type=float, default=d.switch_share,
                   help="share of (not rolled-out) clips whose prompt switches mid-clip")
    p.add_argument("--unnamed-share", type=float, default=d.unnamed_share,
                   help="share of clips whose prompt names no colour (the condition leaves "
                        "the object colours out)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw batches ahead (use several with a GPU)")
    p.add_argument("--save-every", type=float, default=d.save_every_s, help="seconds between checkpoints")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS,
                   help="weights file (safetensors + .json card + .state.pt to resume exactly)")
    p.add_argument("--fresh", action="store_true", help="a new model, even if --out exists")
    p.add_argument("--new-world", action="store_true",
                   help="go on training weights of an earlier world version in this one "
                        "(weights, optimizer and progress carry over; the card records the step)")
    p.add_argument("--wrap", action=argparse.BooleanOptionalAction, default=True,
                   help="a NEW model's moves wrap round the view's edges, as the world does "
                        "(TinyConfig.wrap)")
    p.add_argument("--no-bf16", action="store_true",
                   help="train in float32 (default: bfloat16 autocast where the hardware has it)")
    p.add_argument("--width", type=int, default=TinyConfig.width, help="width of a NEW model")
    p.add_argument("--layers", type=int, default=TinyConfig.layers, help="layers of a NEW model")
    p.add_argument("--prev-reach", type=int, default=1,
                   help="patches around each token's own that its previous-frame input spans "
                        "(a NEW model; default 1: the 3x3 neighbourhood; 0: its own patch)")
    p.add_argument("--predict-change", action=argparse.BooleanOptionalAction, default=True,
                   help="a NEW model's head predicts the change from the previous frame "
                        "(zero output = copy; default on)")
    p.add_argument("--motion-reach", type=int, default=0,
                   help="a NEW model's head also moves the previous frame, picking per patch a "
                        "displacement of up to this many pixels (0: none)")
    p.add_argument("--motion-pick", action="store_true",
                   help="a NEW model's motion head picks one displacement per patch (the most "
                        "likely at sampling; taught by cross-entropy) instead of blending them")
    p.add_argument("--motion-match", action="store_true",
                   help="a NEW model's tokens also see how well each displacement of their "
                        "previous frame explains them (TinyConfig.motion_match)")
    p.add_argument("--motion-memory", action="store_true",
                   help="a NEW model's head 0 of layer 0 reads how the cached frames moved and "
                        "adds it to the motion choice (TinyConfig.motion_memory)")
    p.add_argument("--patch-position", action="store_true",
                   help="a NEW model learns an embedding of each patch's place in the frame "
                        "(TinyConfig.patch_position: tokens can know the view's edge)")
    p.add_argument("--motion-refine", action="store_true",
                   help="a NEW model's motion choice gets a correction from an MLP over the "
                        "head's features and the memory's read (TinyConfig.motion_refine)")
    p.add_argument("--motion-weight", type=float, default=d.motion_weight,
                   help="weight of the motion choice's cross-entropy in the loss (--motion-pick)")
    p.add_argument("--paint-weight", type=float, default=d.paint_weight,
                   help="loss weight of patches no displacement of the previous frame gives, "
                        "such as an object coming back into view (--motion-pick)")
    p.add_argument("--motion-focus", type=float, default=d.motion_focus,
                   help="focal gamma of the motion cross-entropy: weigh each patch by "
                        "(1 - p_right)^focus, so the patches it gets wrong outweigh the rest (0: plain)")
    p.add_argument("--move-weight", type=float, default=d.move_weight,
                   help="weight of the motion cross-entropy on patches where staying put is wrong "
                        "(an object moves through them or leaves them; 1: as the others)")
    p.add_argument("--world-moves", action=argparse.BooleanOptionalAction, default=d.world_moves,
                   help="teach patches no displacement gives against the better of standing still "
                        "and the scene's motion, the moves sampling with one motion makes")
    p.add_argument("--redraw-failed", action=argparse.BooleanOptionalAction, default=d.redraw_failed,
                   help="rollouts: an object the teacher cannot read is asked back whole where it "
                        "should be (--no-redraw-failed: the frames after it get no loss)")
    p.add_argument("--rope-theta", type=float, default=TinyConfig.rope_theta,
                   help="spatial RoPE base of a NEW model: 10 gives every plane of the 8x8 grid a "
                        "turn that tells neighbouring patches apart (10000 leaves one)")
    p.add_argument("--rope-theta-time", type=float, default=TinyConfig.rope_theta_time,
                   help="temporal RoPE base of a NEW model (long runs: no wrap-around)")


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.steps < 1:
        raise SystemExit("--batch and --steps must be >= 1")
    if args.rollout_clips is None:
        args.rollout_clips = args.batch // 4
    if not 0 <= args.rollout_clips <= args.batch:
        raise SystemExit(f"--rollout-clips must be in [0, --batch], got {args.rollout_clips}")
    if not args.object_weight > 0:
        raise SystemExit(f"--object-weight must be > 0, got {args.object_weight}")
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr,
                      rollout_after=args.rollout_after, rollout_clips=args.rollout_clips,
                      object_weight=args.object_weight, motion_weight=args.motion_weight,
                      paint_weight=args.paint_weight, motion_focus=args.motion_focus,
                      move_weight=args.move_weight, redraw_failed=args.redraw_failed,
                      world_moves=args.world_moves,
                      switch_share=args.switch_share,
                      unnamed_share=args.unnamed_share,
                      seed=args.seed, threads=args.threads,
                      workers=args.workers, save_every_s=args.save_every, bf16=not args.no_bf16)
    for name in ("switch_share", "unnamed_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("rope_theta", "rope_theta_time"):
        if not getattr(args, name) > 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 1, got {getattr(args, name)}")
    if not 0 <= args.prev_reach <= 2:
        raise SystemExit(f"--prev-reach must be in [0, 2], got {args.prev_reach}")
    if not 0 <= args.motion_reach <= 4:
        raise SystemExit(f"--motion-reach must be in [0, 4], got {args.motion_reach}")
    if args.motion_reach and not args.predict_change:
        raise SystemExit("--motion-reach moves the previous frame: it needs --predict-change")
    for flag in ("motion_pick", "motion_match", "motion_memory"):
        if getattr(args, flag) and not args.motion_reach:
            raise SystemExit(f"--{flag.replace('_', '-')} works on displacements: it needs --motion-reach")
    if args.motion_refine and not args.motion_memory:
        raise SystemExit("--motion-refine corrects what the motion memory reads: it needs --motion-memory")
    if not args.motion_weight >= 0:
        raise SystemExit(f"--motion-weight must be >= 0, got {args.motion_weight}")
    if not args.paint_weight > 0:
        raise SystemExit(f"--paint-weight must be > 0, got {args.paint_weight}")
    if not args.motion_focus >= 0:
        raise SystemExit(f"--motion-focus must be >= 0, got {args.motion_focus}")
    if not args.move_weight > 0:
        raise SystemExit(f"--move-weight must be > 0, got {args.move_weight}")
    model_cfg = TinyConfig(width=args.width, layers=args.layers, rope_theta=args.rope_theta,
                           rope_theta_time=args.rope_theta_time, prev_reach=args.prev_reach,
                           predict_change=args.predict_change, motion_reach=args.motion_reach,
                           motion_pick=args.motion_pick, motion_match=args.motion_match,
                           motion_memory=args.motion_memory, motion_refine=args.motion_refine,
                           patch_position=args.patch_position, wrap=args.wrap)
    try:
        TinyVideoModel(model_cfg)  # a setting the model refuses, said before anything runs
    except ValueError as e:
        raise SystemExit(f"the model settings do not fit: {e}")
    card = train(cfg, model_cfg, args.out, log=lambda s: print(s, flush=True), fresh=args.fresh,
                 new_world=args.new_world)
    print(json.dumps({k: card[k] for k in ("steps", "clips_seen", "train_seconds", "sha256")}))
    return 0
