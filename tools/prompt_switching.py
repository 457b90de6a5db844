"""Measure a prompt switch: how each re-cache mode and each statistics rule at a switch
grade the frames after it, against the prompt in force (docs/prompt_switching.md).

    python tools/prompt_switching.py --seeds 0-7 --out docs/prompt_switching.json

Every run is one ``python -m ffviz generate`` (the CLI's own driver): the prompt, the
switch, the policy and its parameters as given; the table is the mean over seeds of
the metrics of the segment after the switch (``summary.metrics.segments[-1]``). The
cost of a re-cache is ``python -m ffviz bench --recache``'s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.__main__ import main as ffviz  # noqa: E402
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.stats import drift  # noqa: E402

PROMPT = "a red circle and a blue square on a black background"
SWITCHED = "a red circle and a blue square on a white background"
METRICS = ("background", "color_presence", "shape", "tracking", "consistency")
DRIFTS = ("pre_drift_before", "pre_drift_after", "post_drift_before", "post_drift_after")
SETTINGS = {  # label: (policy, its parameters, re-cache mode)
    "window, recache none": ("window", [], "none"),
    "window, recache recent": ("window", [], "recent"),
    "window, recache all": ("window", [], "all"),
    "future_forcing, statistics carried": ("future_forcing", ["on_switch=carry"], "none"),
    "future_forcing, statistics reset": ("future_forcing", ["on_switch=reset"], "none"),
    "future_forcing, statistics decayed": ("future_forcing", ["on_switch=decay"], "none"),
}


def after_switch(setting, seed: int, args, scratch: Path) -> dict:
    policy, params, recache = SETTINGS[setting]
    out = scratch / f"{policy}-{recache}-{'-'.join(params)}-{seed}"
    argv = ["generate", "--prompt", args.prompt, "--frames", str(args.frames),
            "--switch-prompt", f"{args.switch_frame}:{args.switched}", "--recache", recache,
            "--policy", policy, "--budget", str(args.budget), "--seed", str(seed),
            "--out", str(out), "--weights", str(args.weights)]
    for p in params:
        argv += ["--policy-arg", p]
    if ffviz(argv) != 0:
        raise SystemExit(f"generate failed: {' '.join(argv)}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {**summary["metrics"]["segments"][-1], **drift_at_switch(out, args.switch_frame)}


def drift_at_switch(run: Path, frame: int, span: int = 4) -> dict:
    """Pre- and post-RoPE drift (Frechet, from the first generated frame's statistics;
    mean over layers and heads) over the ``span`` frames before the switch and after it."""
    rec = np.load(run / "record.npz")
    frames = rec["frames"]
    before = (frames >= frame - span) & (frames < frame)
    after = (frames >= frame) & (frames < frame + span)
    out = {}
    for kind in ("pre", "post"):
        d = drift(rec[f"mean_{kind}"], rec[f"var_{kind}"]).mean(axis=(1, 2))
        out[f"{kind}_drift_before"], out[f"{kind}_drift_after"] = d[before].mean(), d[after].mean()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--switch-frame", type=int, default=16)
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--switched", default=SWITCHED)
    p.add_argument("--weights", type=Path, default=Path("assets/tiny.safetensors"))
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = p.parse_args()
    seeds = parse_seeds(args.seeds)
    table = {}
    with tempfile.TemporaryDirectory() as scratch:
        for setting in SETTINGS:
            rows = [after_switch(setting, s, args, Path(scratch)) for s in seeds]
            # summary.json writes an undefined metric as null
            table[setting] = {k: round(float(np.nanmean([np.nan if r[k] is None else r[k]
                                                         for r in rows])), 3)
                              for k in METRICS + DRIFTS}
    print(f"| after the switch at frame {args.switch_frame} (mean of {len(seeds)} seeds) | "
          + " | ".join(METRICS) + " |")
    print("| --- |" + " --- |" * len(METRICS))
    for setting, row in table.items():
        print(f"| {setting} | " + " | ".join(f"{row[k]:.3f}" for k in METRICS) + " |")
    print("\n| query drift, 4 frames before / after the switch | " + " | ".join(DRIFTS) + " |")
    print("| --- |" + " --- |" * len(DRIFTS))
    for setting, row in table.items():
        print(f"| {setting} | " + " | ".join(f"{row[k]:.3f}" for k in DRIFTS) + " |")
    if args.out:
        args.out.write_text(json.dumps({"command": "python tools/prompt_switching.py "
                                        + " ".join(sys.argv[1:]), "table": table}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
