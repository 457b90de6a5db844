"""Command line: ``python -m ffviz {generate,eval,ablate,train,bench,showcase,heads}``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ffviz.generate import DEFAULT_BUDGET, DEFAULT_POLICY, MAX_FRAMES

DEFAULT_PROMPT = "a red circle and a blue square on a green background"


MODEL_HELP = ("tiny (the embedded model, default; its weights: --weights) | tiny:PATH (the embedded "
              "model with the weights at PATH) | wan:PATH (a Self-Forcing-family Wan2.1 "
              "checkpoint; needs a CUDA GPU, see README, 'Real checkpoints') | wan:BASE+LORA (a base "
              "checkpoint and a LoRA merged into it, e.g. LongLive) | wan:tiny-random (CPU demo) | "
              "wan:full-random (the 1.3B architecture with random weights, for speed on a GPU)")


def _model_name(args) -> str:
    """--model, with --weights for the embedded model (eval and showcase take only that)."""
    name = getattr(args, "model", "tiny")
    return f"tiny:{args.weights}" if name == "tiny" else name


def _load_model(args):
    from ffviz.models import load_model
    return load_model(_model_name(args))


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ffviz.export import check_output_dir
    from ffviz.generate import Controls, PromptSwitch, RunSettings
    from ffviz.models import has_scenes
    from ffviz.policies import make_policy, parse_policy_args
    from ffviz.run import run
    policy = make_policy(args.policy, **parse_policy_args(args.policy, args.policy_arg))
    controls = Controls(policy, args.budget)
    switches = tuple(PromptSwitch.parse(text, args.recache) for text in args.switch_prompt)
    settings = RunSettings(args.prompt, frames=args.frames, seed=args.seed, steps=args.steps,
                           context_noise=args.context_noise, record=not args.no_record,
                           snap=args.snap, one_motion=args.one_motion, switches=switches)
    settings.validate(scenes=has_scenes(args.model))  # bad prompt or settings fail before the model loads
    check_output_dir(args.out)
    model = _load_model(args)
    with tqdm(total=args.frames, unit="frame", desc="generating", file=sys.stderr) as bar:
        summary = run(model, settings, controls, Path(args.out), progress=bar)
    if summary["prompt_notes"]:
        print(f"prompt: not understood or assumed: {'; '.join(summary['prompt_notes'])}",
              file=sys.stderr)
    m = summary["metrics"]
    quality = (f", consistency {m['consistency']:.3f}" if "consistency" in m
               else " (no scene metrics for this model)")
    print(f"wrote {args.out}: {summary['frames']} frames at {summary['fps']} frames/s, "
          f"peak cache {summary['peak_cache_tokens']} tokens{quality}")
    return 0


def _eval_model_name(args) -> str:
    """The model as each worker loads it: the embedded model's default weights by
    their name, so that a worker finds its own copy (on a cluster, a path of this
    machine may not exist there)."""
    from ffviz.weights import DEFAULT_WEIGHTS
    if args.model == "tiny" and Path(args.weights).resolve() == DEFAULT_WEIGHTS.resolve():
        return "tiny"
    return _model_name(args)


def _sweep_settings(args, suite) -> dict:
    """The ``EvalConfig`` settings eval and ablate share, the suite's where not given."""
    from ffviz.evaluate import parse_list, parse_prompts, parse_seeds
    return {"budgets": parse_list(args.budgets, int, "budget"),
            "seeds": parse_seeds(args.seeds) if args.seeds else list(suite.seeds),
            "frames": suite.frames if args.frames is None else args.frames,
            "prompts": parse_prompts(args.prompts) if args.prompts else list(suite.prompts),
            "horizon": args.horizon, "query_steps": args.query_steps,
            "fidelity_reference": args.fidelity_reference}


def _run_sweep(args, config, report=None) -> int:
    """Check, run and report a sweep of ``config`` (eval and ablate)."""
    import torch

    from ffviz.eval_report import write_results
    from ffviz.evaluate import EvalError
    from ffviz.models import has_scenes
    from ffviz.sweep import check_backend, run_sweep
    config.validate(scenes=has_scenes(args.model))  # bad settings fail before the model loads
    check_backend(args.backend, args.address, args.ray_cpus)
    from ffviz.export import check_output_dir
    check_output_dir(args.out)
    if args.threads < 0:
        raise EvalError(f"threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = run_sweep(_eval_model_name(args), config, Path(args.out), backend=args.backend,
                            address=args.address, ray_cpus=args.ray_cpus, threads=args.threads,
                            report=report or write_results)
    except KeyboardInterrupt:
        print(f"interrupted: the finished runs are kept in {args.out}/runs; the same command "
              "resumes the sweep", file=sys.stderr)
        return 130
    resumed = f", {summary['runs_resumed']} of them from an earlier sweep" if summary["runs_resumed"] else ""
    print(f"wrote {args.out}: {summary['runs']} runs{resumed} in {summary['seconds']:.0f} s "
          f"({', '.join(f for f in summary['files'] if not f.startswith('plot_'))}, plots; "
          "each run under runs/)")
    if summary["failed_runs"]:
        print(f"error: {summary['failed_runs']} runs failed; see runs.csv", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    from ffviz.evaluate import EvalConfig, parse_list, parse_policy_arg_list, parse_variant_list
    from ffviz.policies import POLICIES
    from ffviz.suites import get_suite
    policies = parse_list(args.policies, str, "policy") if args.policies else list(POLICIES)
    variants = parse_variant_list(args.variant)
    policies += [label for label in variants if label not in policies]
    config = EvalConfig(policies=policies, policy_args=parse_policy_arg_list(args.policy_arg),
                        variants=variants, **_sweep_settings(args, get_suite(args.suite)))
    return _run_sweep(args, config)


def cmd_ablate(args) -> int:
    from ffviz.ablation import ablation_config, ablation_report
    from ffviz.evaluate import parse_list
    from ffviz.suites import get_suite, held_out_parts
    baselines = parse_list(args.baselines, str, "baseline") if args.baselines else []
    config = ablation_config(args.policy, baselines, **_sweep_settings(args, get_suite(args.suite)))
    held_out = held_out_parts(config)
    if held_out:
        print(f"warning: ablate runs on held-out {held_out}: what is tuned on them is not held "
              "out any more (docs/evaluation.md)", file=sys.stderr)
    command = "python -m ffviz " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["ablate"] \
        else f"python -m ffviz ablate --policy {args.policy}"
    return _run_sweep(args, config, ablation_report(command))


def cmd_bench(args) -> int:
    if args.out:
        from ffviz.export import check_output_dir
        check_output_dir(Path(args.out).parent)
    if args.kernels:
        from ffviz.kernels.bench import bench_kernels
        result = bench_kernels(repeats=args.repeats)
    elif args.recache:
        from ffviz.bench import bench_recache
        model = _load_model(args)
        result = bench_recache(model, budget=args.budget, frames=args.frames, repeats=args.repeats)
    elif args.policies:
        from ffviz.bench import bench_policies
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        model = _load_model(args)
        result = bench_policies(model, policies, args.budget, frames=args.frames, repeats=args.repeats)
    else:
        from ffviz.bench import bench_generation, bench_latency
        from ffviz.scenes import EXAMPLE_PROMPTS
        args.weights = Path(args.weights).resolve()  # the cold start runs from the repository root
        model = _load_model(args)
        result = bench_generation(model, frames=args.frames, repeats=args.repeats)
        result["latency"] = bench_latency(model, _model_name(args), EXAMPLE_PROMPTS[0], args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_showcase(args) -> int:
    from tqdm import tqdm

    from ffviz.showcase import parse_setting, showcase
    also = [parse_setting(spec) for spec in args.also]  # a bad setting fails before loading
    if args.steps is not None and not 1 <= args.steps <= 50:
        raise SystemExit(f"--steps must be in [1, 50], got {args.steps}")
    from ffviz.export import check_output_dir
    check_output_dir(args.out)
    from ffviz.evaluate import parse_seeds
    seeds = parse_seeds(args.seeds)  # before the model loads: a bad list fails at once
    model = _load_model(args)
    with tqdm(total=(3 + len(also)) * len(seeds), unit="run", desc="showcase", file=sys.stderr) as bar:
        summary = showcase(model, seeds, args.frames, Path(args.out), budget=args.budget,
                           progress=bar, also=also, steps=args.steps,
                           snap=args.snap, one_motion=args.one_motion)
    print((Path(args.out) / "showcase.md").read_text(encoding="utf-8"))
    if args.card:  # the weights' card reports the free-running quality it was measured at
        card_file = Path(args.weights).with_suffix(".json")
        card = json.loads(card_file.read_text(encoding="utf-8"))
        card["free_running"] = {"command": "python -m ffviz showcase " + " ".join(sys.argv[2:]),
                                "frames": args.frames, "seeds": seeds, "summary": summary}
        card_file.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return 0


def _add_sweep_args(p, out: str, suite: str) -> None:
    """The options of a sweep (eval, ablate)."""
    from ffviz.evaluate import DEFAULT_BUDGETS
    from ffviz.suites import SUITES
    from ffviz.weights import DEFAULT_WEIGHTS
    p.add_argument("--suite", default=suite, choices=list(SUITES),
                   help=f"the built-in scenario suite (default {suite}): its prompts, seeds and "
                        "frames unless given (docs/evaluation.md)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="comma-separated cache budgets in frames")
    p.add_argument("--seeds", default=None,
                   help="user seeds (< 2**20), e.g. 1000-1015 or 0,3,5 (default: the suite's)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per run, at most 256 for eval (default: the suite's)")
    p.add_argument("--prompts", default=None,
                   help="a file with one prompt a line, or prompts separated by ';' "
                        "(default: the suite's)")
    p.add_argument("--horizon", type=int, default=4,
                   help="future frames of the true future attention (and of the oracle's queries)")
    p.add_argument("--query-steps", choices=("all", "last"), default="all",
                   help="denoising steps whose queries the reference run records")
    p.add_argument("--fidelity-reference", default="auto", metavar="POLICY|auto|none",
                   help="the policy whose caches every scored policy rates (shared-cache "
                        "fidelity; auto: window when evaluated)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of each run, and the CPUs each ray task asks for "
                        "(default 1: the tiny model's ops are too small to gain from more, and more "
                        "slows down badly on a busy machine; 0 = torch's default)")
    p.add_argument("--out", default=out,
                   help="the tables, and each finished run under OUT/runs/: a rerun with the same "
                        "--out runs only what is missing")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: every run in this process, one after the other; ray: each "
                        "(prompt, seed) a Ray task, a GPU each for Wan checkpoints (docs/ray.md)")
    p.add_argument("--address", default=None,
                   help="--backend ray: the Ray cluster to join (auto, or HOST:PORT); "
                        "without it a local Ray starts")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="--backend ray without --address: CPUs of the local Ray (default: all)")


def cmd_heads(args) -> int:
    from tqdm import tqdm

    from ffviz.evaluate import DEFAULT_SUITE, parse_prompts, parse_seeds
    from ffviz.export import check_output_dir
    from ffviz.heads import check_settings, measure_heads, write_heads
    prompts = parse_prompts(args.prompts) if args.prompts else list(DEFAULT_SUITE)
    seeds = parse_seeds(args.seeds)
    check_settings(prompts, seeds, args.frames, args.sink, args.recent or 1, args.threshold)
    check_output_dir(args.out)
    model = _load_model(args)
    with tqdm(total=len(prompts) * len(seeds), unit="run", desc="heads", file=sys.stderr) as bar:
        result = measure_heads(model, prompts, seeds, frames=args.frames, steps=args.steps,
                               sink=args.sink, recent=args.recent or None,
                               threshold=args.threshold, progress=bar)
    paths = write_heads(result, Path(args.out))
    s = result["summary"]
    print(f"wrote {', '.join(map(str, paths))}: {s['static_heads']} of "
          f"{result['layers'] * result['heads_per_layer']} heads static (threshold {result['threshold']}); "
          f"score std {s['score_std_mean']} on average, {100 * s['role_agreement_mean']:.0f}% of "
          f"samples agree with their head's role")
    return 0


SNAP_HELP = ("snap each generated frame to the scene's palette before it enters the cache "
             "(--no-snap: keep it as the model made it; default: the model card's setting)")
ONE_MOTION_HELP = ("each patch moves with the scene's motion (measured from the given frames), "
                   "stands still or is recalled: the only moves of this world (--no-one-motion: "
                   "any displacement the model picks; default: the model card's setting)")
THREADS_HELP = ("torch CPU threads (default 1: the tiny model's ops are too small to gain from "
                "more, and on a busy machine extra threads stall each other)")


def main(argv=None) -> int:
    from ffviz.ablation import ABLATED
    from ffviz.recache import RECACHE_MODES
    from ffviz.suites import DEFAULT_SUITE_NAME
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
    p.add_argument("--snap", action=argparse.BooleanOptionalAction, default=None, help=SNAP_HELP)
    p.add_argument("--one-motion", action=argparse.BooleanOptionalAction, default=None, help=ONE_MOTION_HELP)
    p.add_argument("--switch-prompt", action="append", default=[], metavar="FRAME:PROMPT",
                   help="follow PROMPT from frame FRAME on (repeatable)")
    p.add_argument("--recache", choices=RECACHE_MODES, default="none",
                   help="at a prompt switch, re-write the cached keys and values under the new "
                        "prompt: none, recent (all but the given frames) or all")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("eval", help="policy x budget grid over a scenario suite")
    p.add_argument("--policies", default=None,
                   help="comma-separated policy names (default: every registered policy)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="POLICY:KEY=VALUE",
                   help="a parameter of one policy or variant (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=POLICY",
                   help="also evaluate POLICY under LABEL, with the --policy-arg LABEL:... "
                        "given (repeatable), e.g. --variant ff_adaptive=future_forcing "
                        "--policy-arg ff_adaptive:head_budget=adaptive")
    _add_sweep_args(p, "runs/eval", DEFAULT_SUITE_NAME)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("ablate", help="one factor at a time from a scored policy's defaults: score "
                                      "/ merge, horizon, rank, stride, statistics (ablation.md)")
    p.add_argument("--policy", required=True, choices=ABLATED)
    p.add_argument("--baselines", default="full,window,sink",
                   help="comma-separated policies run beside the variants ('' for none)")
    _add_sweep_args(p, "runs/ablate", "memory-tuning")
    p.set_defaults(run=cmd_ablate)

    from ffviz import train
    p = sub.add_parser("train", help="train the embedded model (resumable)")
    train.add_args(p)
    p.set_defaults(run=train.main)

    p = sub.add_parser("bench", help="frames per second, recorder overhead and the first frame's latency")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--policies", default=None, metavar="A,B,...",
                   help="instead: each policy's compression time as a share of a generation "
                        "step; a policy may carry parameters, e.g. future_forcing:rank=2")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="cache budget in frames (--policies)")
    p.add_argument("--recache", action="store_true",
                   help="instead: what a prompt switch halfway costs under each re-cache mode "
                        "(none, recent, all), as a ratio to a step")
    p.add_argument("--kernels", action="store_true",
                   help="time the Triton kernels against their PyTorch references instead "
                        "(real-model size on CUDA; the reference at a reduced size on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("showcase", help="free-running quality over seeds: default vs full vs 1-frame window")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,2,5")
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    p.add_argument("--out", default="docs/showcase")
    p.add_argument("--also", action="append", default=[], metavar="POLICY:BUDGET[:KEY=VALUE...]",
                   help="one more setting to compare, e.g. sink:2:n_sink=2 (repeatable); "
                        "teacher-forced:4 generates every frame from the 4 TRUE previous frames")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per frame for every setting (default: the card's)")
    p.add_argument("--snap", action=argparse.BooleanOptionalAction, default=None, help=SNAP_HELP)
    p.add_argument("--one-motion", action=argparse.BooleanOptionalAction, default=None, help=ONE_MOTION_HELP)
    p.add_argument("--card", action="store_true",
                   help="also write the summary into the weights' card (the .json next to them)")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(run=cmd_showcase)

    p = sub.add_parser("heads", help="measure every layer and head: Forcing-KV roles, attention "
                                     "entropy and where attention goes (heads.json, heads.png)")
    p.add_argument("--prompts", default=None,
                   help="a file with one prompt a line, or prompts separated by ';' "
                        "(default: eval's suite of scenes where objects leave and return)")
    p.add_argument("--seeds", default="0,1", help="e.g. 0-2 or 0,3,5")
    p.add_argument("--frames", type=int, default=24, help="frames per run (full cache)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the card's)")
    p.add_argument("--sink", type=int, default=1, help="sink frames (as forcing_kv's n_sink)")
    p.add_argument("--recent", type=int, default=0,
                   help="newest key frames of the score (0: the chunk and the frame before it)")
    p.add_argument("--threshold", type=float, default=0.8, help="score at or above which a head is static")
    p.add_argument("--out", default="runs/heads")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(run=cmd_heads)

    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # tables carry "±" and "≈"; an ASCII terminal gets escapes, not a crash
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    from ffviz.export import OutputError
    from ffviz.generate import GenerationError
    from ffviz.models import ModelError
    from ffviz.policies import PolicyError
    from ffviz.scenes import PromptError
    errors = (GenerationError, PolicyError, PromptError, ModelError, OutputError)
    if args.command in ("generate", "bench", "showcase", "heads"):
        if args.threads < 1:
            print(f"error: threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
