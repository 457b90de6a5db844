"""Give trained change-head weights a motion head, keeping everything they learnt.

    python tools/add_motion_head.py assets/tiny.safetensors --reach 2 --out runs/m/tiny.safetensors

The new model is the old one plus ``TinyConfig.motion_reach``: per patch, weights over
the previous frame's displacements, starting at 94% on none, so it starts as nearly the
model it was. The card keeps the steps and history, so ``python -m ffviz train --out``
goes on from there (with a fresh optimizer, which warms up again).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.models.tiny import TinyVideoModel  # noqa: E402
from ffviz.weights import load_tiny, save_weights, training_progress  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--reach", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    old, card = load_tiny(args.weights)
    if old.cfg.motion_reach:
        raise SystemExit(f"{args.weights} has a motion head already")
    model = TinyVideoModel(dataclasses.replace(old.cfg, motion_reach=args.reach))
    missing, unexpected = model.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("motion.") for k in missing), (missing, unexpected)
    keep = training_progress(card)
    save_weights(model.eval(), args.out, {**keep, "motion_head_added_at": keep.get("steps")})
    print(f"wrote {args.out}: motion reach {args.reach} on {args.weights} (step {keep.get('steps')})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
