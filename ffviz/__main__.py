"""Command line: ``python -m ffviz {generate,train,bench}``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ffviz.generate import DEFAULT_BUDGET, DEFAULT_POLICY, MAX_FRAMES

DEFAULT_PROMPT = "a red circle and a blue square on a green background"


def _load_model(args):
    from ffviz.weights import load_tiny
    model, _ = load_tiny(args.weights)
    return model


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ffviz.generate import Controls, RunSettings
    from ffviz.policies import make_policy, parse_policy_args
    from ffviz.run import run
    policy = make_policy(args.policy, **parse_policy_args(args.policy, args.policy_arg))
    controls = Controls(policy, args.budget)
    settings = RunSettings(args.prompt, frames=args.frames, seed=args.seed, steps=args.steps,
                           context_noise=args.context_noise, record=not args.no_record)
    settings.validate()  # bad prompt or settings fail before the model loads
    model = _load_model(args)
    with tqdm(total=args.frames, unit="frame", desc="generating", file=sys.stderr) as bar:
        summary = run(model, settings, controls, Path(args.out), progress=bar)
    if summary["unknown_words"]:
        print(f"not understood in the prompt: {', '.join(summary['unknown_words'])}", file=sys.stderr)
    m = summary["metrics"]
    print(f"wrote {args.out}: {summary['frames']} frames at {summary['fps']} frames/s, "
          f"peak cache {summary['peak_cache_tokens']} tokens, consistency {m['consistency']:.3f}")
    return 0


def cmd_bench(args) -> int:
    from ffviz.bench import bench_generation
    model = _load_model(args)
    result = bench_generation(model, frames=args.frames, repeats=args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _seeds(text: str) -> list[int]:
    """"0-7" or "0,3,5" -> list of ints."""
    if "-" in text:
        a, b = text.split("-", 1)
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_showcase(args) -> int:
    from tqdm import tqdm

    from ffviz.showcase import showcase
    model = _load_model(args)
    seeds = _seeds(args.seeds)
    with tqdm(total=3 * len(seeds), unit="run", desc="showcase", file=sys.stderr) as bar:
        summary = showcase(model, seeds, args.frames, Path(args.out), budget=args.budget,
                           progress=bar)
    print((Path(args.out) / "showcase.md").read_text())
    return 0


def main(argv=None) -> int:
    from ffviz.weights import DEFAULT_WEIGHTS
    parser = argparse.ArgumentParser(prog="python -m ffviz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a video and record its KV cache")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--frames", type=int, default=64, help=f"frames in the video, at most {MAX_FRAMES}")
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy parameter (repeatable)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="cache budget in frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk")
    p.add_argument("--context-noise", type=float, default=None,
                   help="noise level of the cache-filling pass (default: the model card's)")
    p.add_argument("--no-record", action="store_true", help="do not record query statistics")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.set_defaults(run=cmd_generate)

    from ffviz import train
    p = sub.add_parser("train", help="train the embedded model (resumable)")
    train.add_args(p)
    p.set_defaults(run=train.main)

    p = sub.add_parser("bench", help="frames per second and recorder overhead")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("showcase", help="free-running quality over seeds: default vs full vs 1-frame window")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,2,5")
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    p.add_argument("--out", default="docs/showcase")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.set_defaults(run=cmd_showcase)

    args = parser.parse_args(argv)
    from ffviz.generate import GenerationError
    from ffviz.policies import PolicyError
    from ffviz.scenes import PromptError
    from ffviz.weights import WeightsError
    try:
        return args.run(args)
    except (GenerationError, PolicyError, PromptError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
