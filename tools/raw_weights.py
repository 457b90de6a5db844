"""Write a training run's raw weights (the optimizer's, not the EMA) as a weights file.

A run's weights file holds the EMA of its weights; right after a change (a new world,
a grafted head) the EMA still averages what came before, so a branch is judged on the
raw weights its ``.state.pt`` holds:

    python tools/raw_weights.py runs/pan/tiny.safetensors --out runs/pan-raw/tiny.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ffviz.train import state_path_for  # noqa: E402
from ffviz.weights import load_tiny, save_weights  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path, help="a run's weights file, with its .state.pt beside it")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    state_file = state_path_for(args.weights)
    if not state_file.exists():
        raise SystemExit(f"no training state beside {args.weights}: {state_file}")
    if args.out.resolve() == args.weights.resolve():
        raise SystemExit("--out must differ from the run's weights file (it would replace the EMA)")
    model, card = load_tiny(args.weights)
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    card = {**card, "weights": "raw (optimizer) weights at step %d" % state["step"]}
    save_weights(model, args.out, card)
    print(f"wrote {args.out}: raw weights at step {state['step']}")


if __name__ == "__main__":
    main()
