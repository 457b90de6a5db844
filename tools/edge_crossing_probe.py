"""From true frames, how often the model's next frame is exact where objects cross the
view's edges: frames split by what an object crosses (top or bottom, left or right,
both, none), counted in plain scenes (no pillar, not leaving the view) of the tuning
seeds. Each frame is made from the 4 true frames before it
(``showcase.teacher_forced_frames``).

    python tools/edge_crossing_probe.py [W] [--seeds 0-23] [--frames 40]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.scenes import VIEW, Scene, random_spec, scene_from_prompt  # noqa: E402
from ffviz.showcase import teacher_forced_frames  # noqa: E402
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.weights import DEFAULT_WEIGHTS, load_tiny  # noqa: E402

KINDS = ("top or bottom", "left or right", "both", "none")


def crossing(scene: Scene, frame: int) -> str:
    """What the objects of ``frame`` cross: the kind (``KINDS``)."""
    pos = scene.positions([frame])[0]
    across = pos + scene.side[:, None] > VIEW  # (n, 2): past the right / bottom edge
    x, y = bool(across[:, 0].any()), bool(across[:, 1].any())
    return "both" if x and y else "top or bottom" if y else "left or right" if x else "none"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path, nargs="?", default=DEFAULT_WEIGHTS)
    p.add_argument("--seeds", default="0-23")
    p.add_argument("--frames", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_tiny(args.weights)
    counts = {k: [0, 0] for k in KINDS}  # [exact, frames]
    for seed in parse_seeds(args.seeds):
        spec = random_spec(np.random.default_rng(seed))
        if spec.pillar or spec.exits:
            continue
        scene, _ = scene_from_prompt(spec.describe(), seed)  # the scene the frames are made of
        made = teacher_forced_frames(model, spec.describe(), seed, args.frames, 4, None, True)
        truth = scene.render(np.arange(args.frames))
        for f in range(model.cfg.given_frames, args.frames):
            c = counts[crossing(scene, f)]
            c[0] += int((made[f] == truth[f]).all())
            c[1] += 1
    print("| objects cross | exact frames |\n| --- | ---: |")
    for k, (right, n) in counts.items():
        print(f"| {k} | {right} of {n} |")


if __name__ == "__main__":
    main()
