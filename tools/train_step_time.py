"""Time of a training step's teacher-forcing pass (forward and backward), with the
block-causal attention run in bands of query rows (``masked_attention``) against one
band (plain SDPA), as a ratio in the same run; the losses must be equal.

    python tools/train_step_time.py WEIGHTS [--repeats 4] [--bands N (default ATTENTION_BANDS)]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ffviz.models.tiny as tiny  # noqa: E402
from ffviz.generate import scene_motion  # noqa: E402
from ffviz.train import TrainConfig, draw, layout, previous_of_slots, teacher_forcing_loss  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402


def step_seconds(model, cfg: TrainConfig, step: int, bands: int) -> tuple[float, float]:
    """Seconds of one teacher-forcing forward and backward of batch ``step``, and its loss."""
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    b = draw(cfg.seed, step, cfg, model.cfg)
    frame_idx, targets = torch.from_numpy(b.frame_idx), torch.from_numpy(b.targets)
    frames, mask = layout(frame_idx, g, n, targets)
    truth = model.patchify(torch.from_numpy(b.clips).float() / 127.5 - 1)
    prev = previous_of_slots(truth, None, g, n)
    valid = torch.ones(truth.shape[0], len(frame_idx), dtype=torch.bool)
    shipped = tiny.ATTENTION_BANDS
    tiny.ATTENTION_BANDS = bands
    try:
        t0 = time.perf_counter()
        with cfg.autocast("cpu"):
            cond = model.embed_condition(torch.from_numpy(b.cond_ids), scene_motion(model, truth[:, :g * n]))
            loss, _ = teacher_forcing_loss(model, truth, prev, truth, valid, b.levels,
                                           torch.cat([cond, cond[:, targets]], 1), torch.ones(truth.shape[:2]),
                                           torch.Generator().manual_seed(0), mask, frames, targets,
                                           cfg.motion_weight, cfg.paint_weight, cfg.motion_focus, cfg.move_weight)
        loss.backward()
        seconds = time.perf_counter() - t0
    finally:
        tiny.ATTENTION_BANDS = shipped
    model.zero_grad(set_to_none=True)
    return seconds, float(loss.detach())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--bands", type=int, default=tiny.ATTENTION_BANDS)
    p.add_argument("--step", type=int, default=6000, help="the batch drawn (sets the clip length)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.bands < 1:
        raise SystemExit("--repeats and --bands must be >= 1")
    model, card = load_tiny(args.weights)
    model.train()
    known = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in card.get("train_config", {}).items() if k in known})
    times = {1: [], args.bands: []}
    losses = {}
    for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
        for bands in times:
            seconds, losses[bands] = step_seconds(model, cfg, args.step, bands)
            times[bands].append(seconds)
    if abs(losses[1] - losses[args.bands]) > 1e-5 * max(1.0, abs(losses[1])):
        raise SystemExit(f"the losses differ: {losses}")
    one, banded = statistics.median(times[1]), statistics.median(times[args.bands])
    print(json.dumps({"clip_frames": cfg.clip_frames(args.step), "batch": cfg.batch,
                      "one_band_s": round(one, 3), f"{args.bands}_bands_s": round(banded, 3),
                      "ratio": round(banded / one, 3), "loss": losses[1]}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
