"""The mainline's training curve from its weights card: a plot and a markdown table.

    python tools/training_curve.py assets/tiny.json docs/training_curve.png

Prints a table of the logged steps (every ``--every``-th entry) for docs/model.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("card", type=Path, help="the weights card (.json next to the safetensors)")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--every", type=int, default=20, help="table rows: every n-th logged entry")
    args = p.parse_args(argv)
    card = json.loads(args.card.read_text(encoding="utf-8"))
    hist = card.get("history", [])
    if not hist:
        raise SystemExit(f"{args.card} has no training history")
    steps = [h["step"] for h in hist]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.plot(steps, [h["loss"] for h in hist], lw=1, label="loss (x0, object-weighted)")
    valid = [(h["step"], h["rollout_valid"]) for h in hist if "rollout_valid" in h]
    if valid:
        ax2 = ax.twinx()
        ax2.plot(*zip(*valid), color="tab:orange", lw=1, label="rollout frames read")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("share of rollout frames with a loss")
    for start, frames in card["train_config"]["curriculum"]:
        if 0 < start <= steps[-1]:
            ax.axvline(start, color="gray", ls=":", lw=1)
            ax.text(start, ax.get_ylim()[1], f" {frames}-frame clips", fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch of 8 clips)")
    ax.set_ylabel("training loss")
    ax.set_title(f"mainline: {card['steps']} steps, {card['train_seconds'] / 3600:.1f} h on one CPU core",
                 fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print("| step | loss | clip frames | lr | rollout frames read | hours |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for h in hist[args.every - 1::args.every] + ([hist[-1]] if len(hist) % args.every else []):
        print(f"| {h['step']} | {h['loss']:.4f} | {h.get('clip_frames', '')} | {h.get('lr', '')} | "
              f"{h.get('rollout_valid', '')} | {h['seconds'] / 3600:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
