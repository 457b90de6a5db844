"""How often the model moves an object right from true frames, at bounces and elsewhere.

    python tools/bounce_probe.py W [--scenes 32] [--frames 40] [--batches 6]

Random scenes of the training grammar (seeds the training never draws), every frame
generated from a cache of the 4 TRUE frames before it (the showcase's teacher-forced
setting). For every object whole in view in a frame and the one before, the generated
frame counts as right where the object reads exactly at its true position
(``ffviz.teacher.read_positions``). Frames are split into bounces (the object's motion
into this frame differs from its motion into the one before: it hit a wall) and the
rest. A model that keeps moving as it moved is right elsewhere and wrong at bounces;
free-running, one missed bounce pushed an object out of the view for good. That was
the world of data version 2; in today's world nothing turns (it wraps round the view),
so every move is "plain" and the probe measures exact moves alone.

Then, pixel by pixel on the same frames (``pixel_score``): of each object's visible
pixels, those a move of the frame before can give ("held") and those it cannot
("emerging": coming out from behind the pillar, or into the view at an exit), and the
pixels an object leaves to the background ("left behind", its trailing edge): the
share the model gets right. Free-running, objects fail there first.

Then the same split for the motion choice itself (a picking motion head): on
training-like batches (seed 11, steps 300000+, 16-frame clips), every target frame
from pure noise (t = 1, where the choice is made), the cross-entropy of the head's
choice and how often its most likely displacement gives the patch, on patches where
the choice matters, split by whether a bouncing object covers the patch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.sampling import palette_tensor, rollout  # noqa: E402
from ffviz.scenes import SIZES, VIEW, Scene, random_spec  # noqa: E402
from ffviz.teacher import FOUND, read_positions  # noqa: E402
from ffviz.train import TrainConfig, draw, motion_targets, true_slots  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402

SEED_BASE = 900_000  # scene seeds far from the training's and the showcase's


@torch.no_grad()
def probe(model, scenes: int, frames: int, batch: int = 8) -> dict:
    rng = np.random.default_rng(SEED_BASE)
    counts = {"bounce": [0, 0], "plain": [0, 0]}  # [right, all]
    pixels_right = {kind: [0, 0] for kind in (*PIXEL_KINDS, *(k + OVERLAP for k in PIXEL_KINDS))}
    for start in range(0, scenes, batch):
        group = [Scene(random_spec(rng), SEED_BASE + start + i) for i in range(min(batch, scenes - start))]
        truth = np.stack([s.render(np.arange(frames)) for s in group])
        tokens = model.patchify(torch.from_numpy(truth).float() / 127.5 - 1)
        cond = model.embed_condition(torch.from_numpy(np.stack([s.spec.condition_ids() for s in group])))
        made = rollout(model, tokens, cond, model.cfg.sample_steps, 4,
                       torch.Generator().manual_seed(start), palette=palette_tensor([s.spec for s in group]),
                       horizon=1)
        pixels = ((model.unpatchify(made) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        for scene, video in zip(group, pixels):
            for kind, (right, total) in score(scene, video, max(2, model.cfg.given_frames)).items():
                counts[kind][0] += right
                counts[kind][1] += total
            for kind, (right, total) in pixel_score(scene, video, max(2, model.cfg.given_frames)).items():
                pixels_right[kind][0] += right
                pixels_right[kind][1] += total
    return {**counts, **pixels_right}


PIXEL_KINDS = ("held", "emerging", "left behind")
OVERLAP = ", objects overlap"  # the same kinds where the object overlaps another one


def shifted(mask: np.ndarray, move: np.ndarray, period: np.ndarray) -> np.ndarray:
    """``mask`` (V, V) moved by ``move`` (x, y): round the view on an axis whose torus
    is the view, off it (and lost) on a longer one."""
    out = mask
    for axis, (d, p) in ((1, (int(move[0]), int(period[0]))), (0, (int(move[1]), int(period[1])))):
        out = np.roll(out, d, axis)
        if p != out.shape[axis] and d:
            edge = [slice(None)] * 2
            edge[axis] = slice(0, d) if d > 0 else slice(d, None)
            out[tuple(edge)] = False
    return out


def pixel_kinds(scene: Scene, pos: np.ndarray) -> list[tuple[dict, bool]]:
    """For top-left positions ``pos`` (2, n, 2) of a frame before and the frame: per
    object, its pixels of each kind ``PIXEL_KINDS`` ((V, V) bool), and whether it
    overlaps another object in either frame."""
    visible = scene.visibleobject_masks(pos)
    objects, pillar = scene.object_masks(pos)
    background = ~objects[1].any(0) & ~pillar
    found = []
    for i in range(len(scene.spec.objects)):
        copyable = shifted(visible[0, i], moved(pos[1, i], pos[0, i], scene.period[i]), scene.period[i])
        overlaps = bool((objects[:, i] & np.delete(objects, i, 1).any(1)).any())
        found.append(({"held": visible[1, i] & copyable, "emerging": visible[1, i] & ~copyable,
                       "left behind": visible[0, i] & background}, overlaps))
    return found


def pixel_score(scene: Scene, video: np.ndarray, first: int) -> dict:
    """{kind: [right, all]} over pixels of frames ``first``.. of ``video`` (T, V, V, 3),
    kinds ``PIXEL_KINDS`` and the same again among them where the object overlaps
    another one in that frame or the one before (kind + ``OVERLAP``): what comes out
    from under another object, or is left where one was, needs that object's hidden
    shape; right = the generated pixel is the true one."""
    T = len(video)
    truth = scene.render(np.arange(T))
    pos = scene.positions(np.arange(T))
    counts = {kind: [0, 0] for kind in (*PIXEL_KINDS, *(k + OVERLAP for k in PIXEL_KINDS))}
    for f in range(max(first, 1), T):
        same = (video[f] == truth[f]).all(-1)
        for kinds, overlaps in pixel_kinds(scene, pos[f - 1:f + 1]):
            for kind, where in kinds.items():
                for name in (kind, kind + OVERLAP) if overlaps else (kind,):
                    counts[name][0] += int(same[where].sum())
                    counts[name][1] += int(where.sum())
    return counts


def score(scene: Scene, video: np.ndarray, first: int) -> dict:
    """{"bounce": [right, all], "plain": [right, all]} over the object-frames of
    ``video`` (T, V, V, 3) from frame ``first`` on where the object is whole in view in
    that frame and the one before."""
    counts = {"bounce": [0, 0], "plain": [0, 0]}
    T = len(video)
    pos = scene.positions(np.arange(T))
    whole = scene.visible_area(np.arange(T)) >= scene.full_area()[None]
    for f in range(max(first, 2), T):
        read, status = read_positions(scene, video[f], pos[f])
        for i in range(len(scene.spec.objects)):
            if not (whole[f, i] and whole[f - 1, i]):
                continue
            turned = (moved(pos[f, i], pos[f - 1, i], scene.period[i])
                      != moved(pos[f - 1, i], pos[f - 2, i], scene.period[i])).any()
            kind = "bounce" if turned else "plain"
            counts[kind][0] += int(status[i] == FOUND and (read[i] == pos[f, i]).all())
            counts[kind][1] += 1
    return counts


def moved(to: np.ndarray, frm: np.ndarray, period: np.ndarray) -> np.ndarray:
    """The move from top-left corner ``frm`` to ``to`` (round the torus: the shorter way)."""
    return (to - frm + period // 2) % period - period // 2


def bounce_patches(scene: Scene, frame: int, side: int, patch: int) -> np.ndarray:
    """(side * side,) int: for each patch of ``frame``, the size in pixels of an object
    covering it whose move into the frame differs from its move into the one before
    (0: none)."""
    pos = scene.positions([frame - 2, frame - 1, frame])
    masks, _ = scene.object_masks(pos[2:3])
    sizes = np.zeros(side * side, int)
    for i in range(len(scene.spec.objects)):
        period = scene.period[i]
        if (moved(pos[2, i], pos[1, i], period) != moved(pos[1, i], pos[0, i], period)).any():
            covered = masks[0, i].reshape(side, patch, side, patch).any((1, 3)).reshape(-1)
            sizes = np.where(covered & (sizes == 0), int(scene.side[i]), sizes)
    return sizes


def pixel_patches(scene: Scene, frame: int, side: int, patch: int) -> dict:
    """{"emerging" | "left behind": (side * side,) bool}: the patches of ``frame`` with
    a pixel of that kind (``pixel_kinds``)."""
    found = {"emerging": np.zeros((VIEW, VIEW), bool), "left behind": np.zeros((VIEW, VIEW), bool)}
    for kinds, _ in pixel_kinds(scene, scene.positions([frame - 1, frame])):
        for kind in found:
            found[kind] |= kinds[kind]
    return {k: v.reshape(side, patch, side, patch).any((1, 3)).reshape(-1) for k, v in found.items()}


@torch.no_grad()
def choice_by_kind(model, batches: int) -> dict:
    """{"bounce" | "bounce, N px" | "plain": [patches, summed cross-entropy, most likely
    right]} at t = 1 ("bounce, N px": patches a bouncing object of that size covers)."""
    cfg = TrainConfig(switch_share=0.0, unnamed_share=0.0, curriculum=((0, 16),))
    n = model.cfg.tokens_per_frame
    sums = {"bounce": [0, 0.0, 0], **{f"bounce, {px} px": [0, 0.0, 0] for px in SIZES.values()},
            "plain": [0, 0.0, 0], "emerging": [0, 0.0, 0], "left behind": [0, 0.0, 0]}
    for s in range(batches):
        b = draw(11, 300_000 + s, cfg, model.cfg)
        x = true_slots(model, b)
        B, T, K = x.truth.shape[0], len(b.frame_idx), len(b.targets)
        _, good, telling, _, _ = motion_targets(model, x.target_prev, x.target, model.split_condition(x.cond)[3])
        noise = torch.randn(x.target.shape, generator=torch.Generator().manual_seed(s))
        levels = torch.cat([torch.zeros(B, T), torch.ones(B, K)], 1)
        _, logits = model(torch.cat([x.truth, noise], 1), levels, x.frames, x.cond,
                          prev=torch.cat([x.prev, x.target_prev], 1), mask=x.mask,
                          return_motion_logits=True)
        logits = logits[:, T * n:]
        nll = logits.logsumexp(-1) - logits.masked_fill(~good, float("-inf")).logsumexp(-1)
        hit = good.gather(-1, logits.argmax(-1, keepdim=True))[..., 0]
        for c, scene in enumerate(b.scenes):
            for k, slot in enumerate(b.targets):
                sizes = torch.from_numpy(bounce_patches(scene, int(b.frame_idx[slot]),
                                                        model.cfg.side, model.cfg.patch))
                part = slice(k * n, (k + 1) * n)
                kinds = [("bounce", sizes > 0), ("plain", sizes == 0)]
                kinds += [(f"bounce, {px} px", sizes == px) for px in SIZES.values()]
                kinds += [(k, torch.from_numpy(m)) for k, m in pixel_patches(
                    scene, int(b.frame_idx[slot]), model.cfg.side, model.cfg.patch).items()]
                for kind, covered in kinds:
                    if telling.dim() == 3:  # a per-pixel pick: every pixel of a marked patch
                        covered = covered[:, None]
                    where = telling[c, part] & covered
                    acc = sums[kind]
                    acc[0] += int(where.sum())
                    acc[1] += float(nll[c, part][where].sum())
                    acc[2] += int(hit[c, part][where].sum())
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--batches", type=int, default=6,
                   help="training-like batches for the motion choice's split (0: skip it)")
    args = p.parse_args()
    if args.scenes < 1 or args.frames < 4 or args.batches < 0:
        raise SystemExit("--scenes must be >= 1, --frames >= 4 and --batches >= 0")
    torch.set_num_threads(1)
    model, card = load_tiny(args.weights)
    counts = probe(model.eval(), args.scenes, args.frames)
    print(f"{args.weights} (step {card.get('steps')}), {args.scenes} scenes x {args.frames} frames, "
          "each from the 4 true frames before it")
    for kind, (right, total) in counts.items():
        unit = "object-frames" if kind in ("bounce", "plain") else "pixels"
        print(f"{kind:33s} {unit:13s} {total:6d}  right {right / max(total, 1):.3f}")
    if args.batches and model.cfg.motion_pick:
        print(f"the motion choice at t = 1 ({args.batches} training-like batches), patches where it matters")
        for kind, (count, nll, hits) in choice_by_kind(model, args.batches).items():
            print(f"{kind:14s} patches {count:6d}  cross-entropy {nll / max(count, 1):.3f}  "
                  f"most likely gives it {hits / max(count, 1):.3f}")


if __name__ == "__main__":
    main()
