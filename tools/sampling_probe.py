"""Free-running quality of one set of weights under several sampling settings of the
motion choice: one motion on or off, and recall's bias.

    python tools/sampling_probe.py assets/tiny.safetensors --seeds 0-11 --frames 96 \
        --settings off on on:2 on:3

A setting is ``on`` or ``off`` (``TinyConfig.one_motion``), optionally ``:B``, recall's
bias at sampling (``TinyConfig.recall_bias``; the card's when left out). ``--round-trip``
turns on ``TinyConfig.recall_round_trip`` (weights with ``scene_torus``). Each runs the
full cache on the showcase's scene of every seed and prints one JSON line: the means of
the showcase's measures and, per seed, background, colour presence and tracking. Tune
on seeds below 200; the showcase's held-out seeds are 200-207 (docs/model.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.metrics import consistency  # noqa: E402
from ffviz.scenes import Scene, parse_prompt  # noqa: E402
from ffviz.showcase import METRICS, pixel_mse, run_frames, showcase_prompt  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402


def parse_setting(text: str) -> tuple[bool, float | None]:
    one, _, bias = text.partition(":")
    if one not in ("on", "off"):
        raise ValueError(f"setting {text!r}: on or off, then optionally :BIAS (e.g. on:3)")
    try:
        return one == "on", (float(bias) if bias else None)
    except ValueError:
        raise ValueError(f"setting {text!r}: the recall bias must be a number") from None


def probe(model, seeds, frames: int, one_motion: bool, recall_bias: float | None) -> dict:
    card_bias = model.cfg.recall_bias
    if recall_bias is not None:
        model.cfg.recall_bias = recall_bias  # this process's own model: no one else reads it
    g = model.cfg.given_frames
    rows = []
    try:
        for seed in seeds:
            prompt = showcase_prompt(seed)
            scene = Scene(parse_prompt(prompt, seed)[0], seed)
            video = run_frames(model, prompt, seed, frames, "full", 1, one_motion=one_motion)
            m = consistency(video[g:], scene, start=g)
            m["mse"] = pixel_mse(video[g:], scene.render(np.arange(frames))[g:])
            rows.append(m)
    finally:
        model.cfg.recall_bias = card_bias
    mean = {k: round(float(np.nanmean([r[k] for r in rows])), 3) for k in METRICS}
    per_seed = {k: [round(float(r[k]), 2) for r in rows] for k in ("background", "color_presence", "tracking")}
    return {"one_motion": one_motion, "recall_bias": model.cfg.recall_bias if recall_bias is None
            else recall_bias, **mean, "per_seed": per_seed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--seeds", default="0-11")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--settings", nargs="+", default=["off", "on"])
    p.add_argument("--round-trip", action="store_true",
                   help="recall also looks a round trip back in scenes that leave the view "
                        "(TinyConfig.recall_round_trip)")
    args = p.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.settings]
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.frames < 3:
        raise SystemExit(f"error: --frames must be at least 3, got {args.frames}")
    model, _ = load_tiny(args.weights)
    if not model.carries_motion:
        raise SystemExit(f"error: {args.weights} picks no displacement per patch: nothing to keep")
    if args.round_trip:
        if not (model.cfg.scene_torus and model.cfg.recall):
            raise SystemExit(f"error: --round-trip: {args.weights} has no scene_torus with recall")
        model.cfg.recall_round_trip = True  # this process's own model
    for one_motion, bias in settings:
        t0 = time.time()
        result = probe(model, seeds, args.frames, one_motion, bias)
        print(json.dumps({**result, "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
