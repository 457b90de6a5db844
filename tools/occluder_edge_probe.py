"""Where one move per patch cannot give the next frame, and how often the model gets
those patches wrong from true frames.

    python tools/occluder_edge_probe.py assets/tiny.safetensors --seeds 0-7 --frames 48 [--budget 4]

Every frame after the given ones is generated teacher-forced (from a cache of the
``--budget`` newest true frames, ``showcase.teacher_forced_frames``) on the tuning suite's scenes
(``memory-tuning``; ``--prompt`` for one of your own). Each 4x4 patch of the truth is
put in one class by what gives it from the true previous frame:

- ``still``: the previous frame's patch (background, the pillar, a resting object);
- ``moved``: the previous frame moved by the scene's motion (an object in the open);
- ``pillar edge``: neither, within a patch of the pillar: an object going behind the
  pillar or coming out from behind it, or the background it leaves behind;
- ``view edge``: neither, elsewhere: an object leaving or entering the view.

Prints one JSON line: per class the number of patches and the share of their pixels the
model got wrong, next to five predictors that read the truth: copying the previous
frame, the better of standing still and moving with the scene for each patch (what a
perfect pick between the world's two moves gives), the same place 8 frames back
(what a read of the cache there gives: the background an object uncovers, from before
it came), the best per patch of the two moves and recall's read at each of its lags
(the place the motion carried the patch from, on the view's torus: what a perfect pick
of a lag gives), and that with the same place at each lag too. With a recall model, also
where its read of the cache found something (``recall_found``), the share of pixels
that read gets wrong there (``recall_read_wrong``: a trust-weighted mean over the lags)
and the best single lag's on the same patches; with ``recall_lag_pick``, also what the
pick's read gets wrong there (``recall_pick_wrong``). Tune on seeds below 200 (docs/model.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.models.recall import RECALL_FOUND, RECALL_LAGS  # noqa: E402
from ffviz.scenes import Scene, parse_prompt  # noqa: E402
from ffviz.showcase import teacher_forced_frames  # noqa: E402
from ffviz.suites import SUITES  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402

CLASSES = ("still", "moved", "pillar edge", "view edge")
WRONG = 24  # a pixel is wrong where a channel is off by more than this (of 255)
BACK = 8  # frames back of the same-place predictor
PREDICTORS = ("copy", "best_world_move", f"same_place_{BACK}_back", "best_move_or_recall",
              "best_move_recall_or_same_place")


def patch_classes(truth: np.ndarray, motion: tuple[int, int], pillar: tuple[int, int] | None,
                  patch: int) -> np.ndarray:
    """(T-1, g, g) class index (``CLASSES``) of every patch of frames 1.. of ``truth``
    (T, S, S, 3) uint8; ``motion`` (dy, dx) pixels a frame (the view wraps, as the
    model's displacements do); ``pillar`` its columns [x0, x1) or None."""
    T, S = truth.shape[:2]
    g = S // patch
    prev, now = truth[:-1].astype(int), truth[1:].astype(int)
    moved = np.roll(prev, motion, axis=(1, 2))
    per_patch = lambda same: same.all(-1).reshape(T - 1, g, patch, g, patch).all((2, 4))
    still, by_move = per_patch(prev == now), per_patch(moved == now)
    near = np.zeros((g, g), bool)
    if pillar is not None:  # a patch that holds pillar columns, or touches them
        x0, x1 = pillar
        cols = np.arange(g)
        near[:, (cols * patch < x1 + patch) & ((cols + 1) * patch > x0 - patch)] = True
    out = np.full((T - 1, g, g), 3)
    out[near[None] & ~still & ~by_move] = 2
    out[by_move & ~still] = 1
    out[still] = 0
    return out


def wrong_pixels(frames: np.ndarray, truth: np.ndarray, patch: int) -> np.ndarray:
    """(T, g, g) share of each patch's pixels off by more than ``WRONG``."""
    T, S = truth.shape[:2]
    g = S // patch
    off = (np.abs(frames.astype(int) - truth.astype(int)) > WRONG).any(-1)
    return off.reshape(T, g, patch, g, patch).mean((2, 4))


def best_lag_reads(truth: np.ndarray, first: int, motion: tuple[int, int], patch: int,
                   lags=RECALL_LAGS) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of frames ``first``.. of ``truth`` (T, S, S, 3) the share of pixels wrong
    (T - first, g, g) of the best of ``lags`` for two reads of the past: along the scene's
    ``motion`` (recall's place, on the view's torus) and at the same place. A lag that
    reaches before frame 0 reads nothing (all wrong)."""
    now = truth[first:]
    t = np.arange(first, len(truth))
    g = truth.shape[1] // patch
    along = same = np.ones((len(now), g, g))
    for lag in lags:
        reached = (t - lag >= 0)[:, None, None]
        past = truth[np.maximum(t - lag, 0)]
        moved = np.roll(past, (lag * motion[0], lag * motion[1]), axis=(1, 2))
        along = np.minimum(along, np.where(reached, wrong_pixels(moved, now, patch), 1.0))
        same = np.minimum(same, np.where(reached, wrong_pixels(past, now, patch), 1.0))
    return along, same


class RecallReads:
    """While in use, keeps what a recall model's read of the cache gave at each frame
    ({frame: (pixels (N, patch_dim), found (N,))} of batch element 0), by wrapping the
    model's ``RecallLookup.read_cache`` (a frame's read is made once, for all its steps),
    and with ``recall_lag_pick`` the pixels the pick gave at the frame's last denoising
    step (``picked``: {frame: pixels}; the pick follows each read of the cache)."""

    def __init__(self, model):
        self.model, self.by_frame, self.picked = model, {}, {}
        self._frame = None  # the frame whose read the next pick picks from

    def __enter__(self):
        lookup = self.model.recall
        inner = lookup.read_cache

        def read_cache(layer, queries, frame, motion, open_sides=None):
            out = inner(layer, queries, frame, motion, open_sides)
            self._frame = int(frame[0])
            self.by_frame[self._frame] = (out[0][0].float(), out[1][0].float())
            return out
        lookup.read_cache = read_cache
        if self.model.cfg.recall_lag_pick:
            pick = self.model.pick_recall_lag

            def pick_recall_lag(*args, **kw):
                out = pick(*args, **kw)
                if self._frame is not None:  # not the cache-filling pass, which reads nothing
                    self.picked[self._frame] = out.pixels[0].float()
                    self._frame = None
                return out
            self.model.pick_recall_lag = pick_recall_lag
        return self

    def __exit__(self, *exc):
        del self.model.recall.read_cache  # the class's own method again
        vars(self.model).pop("pick_recall_lag", None)


def recall_read_wrong(model, reads: dict, truth: np.ndarray, first: int,
                      picked: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of frames ``first``.. of ``truth``: the share of pixels the model's recall
    read gets wrong (T - first, g, g), and where it found something (bool, same shape);
    a frame with no read found nothing. With ``picked`` ({frame: pixels}), the share of
    the picked pixels instead, where the read found something."""
    g = model.cfg.side
    shape = (len(truth) - first, g, g)
    wrong, found = np.ones(shape), np.zeros(shape, bool)
    for i, f in enumerate(range(first, len(truth))):
        if f in reads:
            pixels, mass = reads[f]
            pixels = picked.get(f, pixels) if picked is not None else pixels
            image = model.decode(pixels[None])[0]
            wrong[i] = wrong_pixels(image[None], truth[f:f + 1], model.cfg.patch)[0]
            found[i] = (mass >= RECALL_FOUND).view(g, g).numpy()
    return wrong, found


def measure(model, prompts, seeds, frames: int, budget: int = 4) -> dict:
    cfg, p = model.cfg, model.cfg.patch
    given = cfg.given_frames
    sums = {c: {"patches": 0, "model": 0.0, "found": 0, "read": 0.0, "picked": 0.0, "best_lag": 0.0,
                **{k: 0.0 for k in PREDICTORS}} for c in CLASSES}
    for prompt in prompts:
        for seed in seeds:
            spec = parse_prompt(prompt, seed)[0]
            scene = Scene(spec, seed)
            truth = scene.render(np.arange(frames))
            reads = RecallReads(model) if cfg.recall else contextlib.nullcontext()
            with reads:
                video = teacher_forced_frames(model, prompt, seed, frames, budget)
            tokens = model.patchify(torch.from_numpy(truth[:given])[None].float() / 127.5 - 1)
            motion = tuple(int(v) for v in model.measure_motion(tokens)[0])
            pillar = scene.pillar_x
            cls = patch_classes(truth, motion, pillar, p)[given - 1:]  # the generated frames
            err = wrong_pixels(video[given:], truth[given:], p)
            now, before = truth[given:], truth[given - 1:-1]
            copy = wrong_pixels(before, now, p)
            moved = wrong_pixels(np.roll(before, motion, axis=(1, 2)), now, p)
            back = wrong_pixels(truth[np.maximum(np.arange(given, frames) - BACK, 0)], now, p)
            recall, same = best_lag_reads(truth, given, motion, p)
            moves = np.minimum(copy, moved)
            if cfg.recall:
                read, found = recall_read_wrong(model, reads.by_frame, truth, given)
                if cfg.recall_lag_pick:
                    picked, _ = recall_read_wrong(model, reads.by_frame, truth, given, reads.picked)
            for i, name in enumerate(CLASSES):
                at = cls == i
                sums[name]["patches"] += int(at.sum())
                sums[name]["model"] += float(err[at].sum())
                if cfg.recall:
                    sums[name]["found"] += int((at & found).sum())
                    sums[name]["read"] += float(read[at & found].sum())
                    if cfg.recall_lag_pick:
                        sums[name]["picked"] += float(picked[at & found].sum())
                    sums[name]["best_lag"] += float(recall[at & found].sum())
                for key, wrong in zip(PREDICTORS, (copy, moves, back, np.minimum(moves, recall),
                                                   np.minimum(np.minimum(moves, recall), same))):
                    sums[name][key] += float(wrong[at].sum())
    share = lambda s, key, of="patches": round(s[key] / s[of], 4) if s[of] else None
    read_keys = lambda s: ({"recall_found": share(s, "found"), "recall_read_wrong": share(s, "read", "found"),
                          "best_lag_wrong_where_found": share(s, "best_lag", "found"),
                          **({"recall_pick_wrong": share(s, "picked", "found")} if cfg.recall_lag_pick else {})}
                         if cfg.recall else {})
    return {name: {"patches": s["patches"], "wrong": share(s, "model"),
                   **{f"{key}_wrong": share(s, key) for key in PREDICTORS}, **read_keys(s)}
            for name, s in sums.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--prompt", default=None, help="one prompt instead of the tuning suite's")
    ap.add_argument("--budget", type=int, default=4, help="true frames cached (as many as --frames: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        ap.error(f"seeds: {e}")
    model, card = load_tiny(args.weights)
    if args.frames <= model.cfg.given_frames:
        ap.error(f"frames must be more than the {model.cfg.given_frames} given ones")
    if args.budget < 1:
        ap.error(f"--budget must be at least 1, got {args.budget}")
    if not model.cfg.motion_reach:
        ap.error("these weights move no patches (motion_reach 0): there is no move to classify by")
    prompts = [args.prompt] if args.prompt else list(SUITES["memory-tuning"].prompts)
    torch.set_num_threads(args.threads)
    result = measure(model, prompts, seeds, args.frames, args.budget)
    print(json.dumps({"weights": str(args.weights), "steps": card.get("steps"), "seeds": args.seeds,
                      "frames": args.frames, "budget": args.budget, "prompts": len(prompts),
                      "classes": result}))


if __name__ == "__main__":
    main()
