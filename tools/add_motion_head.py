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
    p.add_argument("--pick", action="store_true",
                   help="one displacement per patch (TinyConfig.motion_pick) instead of the blend")
    p.add_argument("--memory", action="store_true",
                   help="head 0 of layer 0 becomes the motion memory (TinyConfig.motion_memory); "
                        "its part of the layer's output starts at zero")
    p.add_argument("--match", action="store_true",
                   help="each token also sees how well each displacement of its previous frame "
                        "explains it (TinyConfig.motion_match)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    old, card = load_tiny(args.weights)
    cfg = old.cfg
    if cfg.motion_reach and (cfg.motion_reach != args.reach or (cfg.motion_pick and not args.pick)):
        raise SystemExit(f"{args.weights} has a motion head already (reach {cfg.motion_reach}, "
                         f"pick {cfg.motion_pick}): only --pick and --match can be added to it")
    model = TinyVideoModel(dataclasses.replace(cfg, motion_reach=args.reach, motion_pick=args.pick,
                                               motion_match=args.match or cfg.motion_match,
                                               motion_memory=args.memory or cfg.motion_memory))
    missing, unexpected = model.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("motion", "match_embed", "memory_scale")
                                  for k in missing), (missing, unexpected)
    if args.memory and not cfg.motion_memory:  # the head's new values must not enter the stream
        with torch.no_grad():
            model.blocks[0].attn.out.weight[:, :model.cfg.head_dim] = 0.0
    keep = training_progress(card)
    save_weights(model.eval(), args.out, {**keep, "motion_head_added_at": card.get("motion_head_added_at", keep.get("steps"))})
    print(f"wrote {args.out}: motion reach {args.reach}, pick {args.pick}, match "
          f"{model.cfg.motion_match} on {args.weights} (step {keep.get('steps')})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
