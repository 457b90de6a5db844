"""How well a picking motion head chooses, at each noise level, from true frames.

    python tools/motion_ce_probe.py W [--batches 10]

Draws training-like batches the training never draws (seed 7, steps 200000+), caches
the true frames, and reads each target frame at fixed noise levels t. For every patch
where the choice matters (some displacements of the previous frame give it and some
do not), it reports the cross-entropy of the head's choice and how often its most
likely displacement is one that gives the patch, split into patches some displacement
gives exactly and those none does (the pillar, an object entering the view). Beside it,
the same for the match input alone (``TinyVideoModel.match`` of the noisy frame): what
the noisy frame itself tells. A head that reads the noisy frame gets better as t falls.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.train import TrainConfig, draw, motion_targets, true_slots  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402

LEVELS = (1.0, 0.75, 0.5, 0.1)


@torch.no_grad()
def probe(model, batches: int) -> dict:
    cfg = TrainConfig(switch_share=0.0, unnamed_share=0.0)
    n = model.cfg.tokens_per_frame
    sums = {}
    for s in range(batches):
        b = draw(7, 200_000 + s, cfg, model.cfg)
        x = true_slots(model, b)
        B, T, K = x.truth.shape[0], len(b.frame_idx), len(b.targets)
        target, target_prev = x.target, x.target_prev
        open_sides = model.split_condition(x.cond)[3]  # scene_torus: where sides do not wrap
        _, good, telling, exact, _ = motion_targets(model, target_prev, target, open_sides)
        gen = torch.Generator().manual_seed(s)
        for t in LEVELS:
            noisy = (1 - t) * target + t * torch.randn(target.shape, generator=gen)
            levels = torch.cat([torch.zeros(B, T), torch.full((B, K), t)], 1)
            _, logits = model(torch.cat([x.truth, noisy], 1), levels, x.frames, x.cond,
                              prev=torch.cat([x.prev, target_prev], 1), mask=x.mask,
                              return_motion_logits=True)
            match = model.match(model.displaced(target_prev, open_sides), noisy).clamp_min(1e-9).log()
            for source, lg in (("head", logits[:, T * n:]), ("match", match)):
                nll = lg.logsumexp(-1) - lg.masked_fill(~good, float("-inf")).logsumexp(-1)
                hit = good.gather(-1, lg.argmax(-1, keepdim=True))[..., 0]
                for kind, where in (("exact", telling & exact), ("inexact", telling & ~exact)):
                    acc = sums.setdefault((source, kind, t), [0, 0.0, 0])
                    acc[0] += int(where.sum())
                    acc[1] += float(nll[where].sum())
                    acc[2] += int(hit[where].sum())
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, card = load_tiny(args.weights)
    if not model.cfg.motion_pick:
        raise SystemExit(f"{args.weights} has no picking motion head (TinyConfig.motion_pick)")
    if model.cfg.motion_per_pixel:
        raise SystemExit(f"{args.weights} picks per pixel (TinyConfig.motion_per_pixel); this probe reads "
                         "per-patch choices")
    sums = probe(model.eval(), args.batches)
    print(f"{args.weights} (step {card.get('steps')})")
    print("source  patches      t  patches  cross-entropy  most likely gives it")
    for (source, kind, t), (count, nll, hits) in sorted(sums.items()):
        print(f"{source:6s}  {kind:8s} {t:5.2f}  {count:7d}  {nll / max(count, 1):13.3f}  "
              f"{hits / max(count, 1):.3f}")


if __name__ == "__main__":
    main()
