"""Evaluation: policy x budget grids over a scenario suite (``python -m ffviz eval``).

For every prompt of the suite and every seed:

1. One **reference run** with the full cache. Its frames are kept (for
   ``rollout_psnr_vs_full``) and ``reference.ReferenceQueries`` records, at the hook
   ``blocks.{i}.attn.hook_q_post`` during the "denoise" phase, the post-RoPE
   queries of every generated frame, of **every denoising step** (each step
   reads the cache, so each is a query the cache must serve; ``query_steps=
   "last"`` keeps only the last one), in float16. The reference run is also the
   ``full`` policy's run: its rows are measured on it, repeated for each budget.
2. One run per policy (other than ``full``) and budget, same prompt and seed,
   watched by a ``RunProbe`` (an ``Observer``). Only the offline policies
   (``oracle``) are handed the reference queries.

Metrics of one run (``RUN_COLUMNS``):

* ``consistency``, ``returns``: ``ffviz.metrics.consistency`` of the generated
  frames (as ``ffviz.run`` does).
* ``attn_rel_err``: at every generated chunk, just after its keys were written
  and before the policy acts (``Observer.after_write``), the chunk's own
  queries (``ctx.chunk_queries``: post-RoPE, last denoising step) attend (a)
  over the policy's cache as it is then (every earlier compression applied,
  the new chunk's tokens appended, ``log(mass)`` bias) and (b) over a shadow
  full cache fed with the same written tokens of the same run. Per layer
  ``||o_c - o_f|| / ||o_f||`` (Frobenius over heads, queries, head dim); the
  value is the mean over layers and generated chunks (chunks before the first
  eviction count, with 0). It is the attention error the run's own queries see
  because of what was evicted or merged before; 0 exactly for ``full``.
* ``rollout_psnr_vs_full``: PSNR (dB, peak 255) of the run's generated frames
  against the reference run's, MSE over all generated frames; ``inf`` when
  identical (``full``), no cap.
* ``proxy_spearman``, ``proxy_topb_recall``: at every compression whose future
  exists in the run, the truth is the mean over the next ``horizon`` frames'
  recorded queries (clipped at the run's end) of the softmax over the tokens
  cached just before compression, with the ``log(mass)`` bias
  (``reference.true_share``); the policy's ``decision.layers[i].score``
  is compared with it per layer and head (``reference.agreement``: Spearman; recall
  of the true top-B, B = the budget in tokens), averaged over layers, heads and
  compressions.
  Empty for policies that do not score tokens (full, window, sink).
* ``policy_ms_per_compression``: ``Step.seconds["policy"]`` averaged over the
  steps where the policy returned a decision (empty when none did);
  ``step_ms``: mean ``Step.seconds["total"]`` less this module's own
  measurement overhead inside it (the probe's ``after_write`` and, for the
  reference run, the query recorder); ``policy_share_of_step`` their ratio.
* ``peak_cache_tokens``: the most tokens per head the cache held (after a
  write, before the policy); ``compressions``: decisions applied.

``results.csv`` has one row per policy x budget x seed (means over the suite's
prompts; ``peak_cache_tokens`` their max), ``runs.csv`` one per prompt too,
``results.md`` the table averaged over seeds, ``plot_<metric>.png`` each metric
against budget (one line per policy) and ``eval.json`` the settings and times.

The grid's unit of work is one (prompt, seed): ``evaluate_unit``. ``evaluate`` runs
every unit here and returns the rows; ``ffviz.sweep`` runs them on a backend (this
process, or Ray tasks on a cluster), stores each run as it finishes, resumes, and
writes the files (``write_results``).

Memory is bounded: one reference's queries at a time (per process), at most
``frames x steps x layers x heads x tokens_per_frame x head_dim`` float16
(25 MB for 96 frames of the embedded model, 67 MB at the cap of
``MAX_EVAL_FRAMES`` = 256), plus one shadow cache of the run's length.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ffviz.generate import Controls, GenerationError, Observer, RunSettings
from ffviz.policies import POLICIES, PolicyError, make_policy, parse_policy_args
from ffviz.reference import ReferenceQueries, agreement, true_share
from ffviz.run import Run
from ffviz.sampling import TRAIN_SEED_BASE

MAX_EVAL_FRAMES = 256  # the reference queries of one run are held in memory
OFFLINE_POLICIES = ("oracle",)  # the only policies handed the reference run's future queries

# Scenes whose objects leave the view and come back (the world box is wider than
# the view), some behind a pillar: long-range memory is exercised. Each has 2 to
# 5 returns in 96 frames for seeds 0 and 1.
DEFAULT_SUITE = [
    "a red circle and a blue square on a green background with a gray pillar, fast",
    "a small white circle, a cyan square and an orange triangle on a black background, fast",
    "two pink squares and a yellow circle on a blue background with a brown pillar",
]

METRICS = ["consistency", "returns", "attn_rel_err", "rollout_psnr_vs_full", "proxy_spearman",
           "proxy_topb_recall", "policy_ms_per_compression", "step_ms", "policy_share_of_step",
           "peak_cache_tokens", "compressions"]
# measured times: they differ between two sweeps of the same grid, every other column is
# the same (same model, settings and seeds), whatever the backend and the order of runs
TIMING_COLUMNS = ["policy_ms_per_compression", "step_ms", "policy_share_of_step", "seconds"]
RUN_COLUMNS = ["prompt", "policy", "budget", "seed", *METRICS, "seconds", "policy_params", "error"]
RESULT_COLUMNS = ["policy", "budget", "seed", *METRICS, "prompts", "policy_params", "errors"]
PLOT_METRICS = [m for m in METRICS if m != "compressions"]


class EvalError(GenerationError):
    """Evaluation settings that cannot run (the message says which and why)."""


@dataclasses.dataclass
class EvalConfig:
    """policies: names from ``POLICIES``; budgets: cache budgets in frames;
    seeds: user seeds in [0, 2**20); frames: run length in [4, MAX_EVAL_FRAMES];
    prompts: the scenario suite; horizon: future frames of the truth (and of the
    oracle's queries); query_steps: "all" or "last" denoising steps recorded;
    policy_args: {policy: ["key=value", ...]}."""
    policies: list[str] = dataclasses.field(default_factory=lambda: [p for p in POLICIES])
    budgets: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    frames: int = 96
    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SUITE))
    horizon: int = 4
    query_steps: str = "all"
    policy_args: dict = dataclasses.field(default_factory=dict)

    def validate(self, scenes: bool = True) -> dict[str, dict]:
        """Raise ``EvalError``/``PolicyError``/``PromptError``; return typed policy kwargs.
        ``scenes``: prompts are the tiny model's scene grammar (False: free text, Wan)."""
        def whole(name, x):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                raise EvalError(f"{name} must be a whole number, got {x!r}")
        for name in ("policies", "budgets", "seeds", "prompts"):
            if not getattr(self, name):
                raise EvalError(f"{name}: give at least one")
            vals = getattr(self, name)
            if len(set(vals)) != len(vals):
                raise EvalError(f"{name}: duplicates in {vals}")
        whole("frames", self.frames)
        if not 4 <= self.frames <= MAX_EVAL_FRAMES:
            raise EvalError(f"frames must be in [4, {MAX_EVAL_FRAMES}] for eval (the reference "
                            f"run's queries are kept in memory), got {self.frames}")
        for b in self.budgets:
            whole("budget", b)
            if not 1 <= b <= self.frames:
                raise EvalError(f"budget must be in [1, frames={self.frames}] frames, got {b}")
        for s in self.seeds:
            whole("seed", s)
            if not 0 <= s < TRAIN_SEED_BASE:
                raise EvalError(f"eval seeds must be user seeds in [0, {TRAIN_SEED_BASE}) "
                                f"(training uses seeds >= {TRAIN_SEED_BASE}), got {s}")
        whole("horizon", self.horizon)
        if not 1 <= self.horizon <= 64:
            raise EvalError(f"horizon must be in [1, 64] frames, got {self.horizon}")
        if self.query_steps not in ("all", "last"):
            raise EvalError(f"query_steps must be 'all' or 'last', got {self.query_steps!r}")
        for p in self.prompts:
            RunSettings(p).validate(scenes)
        for name in self.policy_args:
            if name not in self.policies:
                raise EvalError(f"--policy-arg for {name!r}, which is not among the evaluated "
                                f"policies ({', '.join(self.policies)})")
        kwargs = {}
        for name in self.policies:
            kwargs[name] = parse_policy_args(name, list(self.policy_args.get(name, [])))
            make_policy(name, **kwargs[name])  # bad values fail now, not mid-grid
        return kwargs


def parse_list(text: str, kind=int, what: str = "value") -> list:
    """``"2,4"`` -> [2, 4]; a clear ``EvalError`` for anything else."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise EvalError(f"{what}s must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def parse_prompts(text: str) -> list[str]:
    """A file (one prompt a line; blank and # lines skipped) or ``;``-separated prompts."""
    path = Path(text)
    if "\n" not in text and len(text) < 4096 and path.is_file():
        lines = path.read_text().splitlines()
    else:
        lines = text.split(";")
    prompts = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
    if not prompts:
        raise EvalError(f"no prompt in {text!r}")
    return prompts


def parse_policy_arg_list(items: list[str]) -> dict[str, list[str]]:
    """``["oracle:n_sink=1", ...]`` -> {"oracle": ["n_sink=1"], ...}."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, pair = item.partition(":")
        if not sep or not name or "=" not in pair:
            raise EvalError(f"--policy-arg {item!r} must look like policy:key=value")
        out.setdefault(name.strip(), []).append(pair.strip())
    return out


# -- what one run is measured by -----------------------------------------------------

class RunProbe(Observer):
    """Attention error against a shadow full cache, and proxy fidelity (see the
    module docstring for exactly which queries and cache states)."""

    def __init__(self, budget_tokens: int, reference: ReferenceQueries | None = None):
        self.budget_tokens, self.reference = budget_tokens, reference
        self.shadow: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.attn_err: list[float] = []
        self.spearman: list[float] = []
        self.recall: list[float] = []
        self.seconds_in_step = 0.0  # after_write time, inside Step.seconds["total"]
        self._before = None

    @torch.no_grad()
    def after_write(self, cache, frames, ctx) -> None:
        t0 = time.perf_counter()
        m = frames.numel() * cache.tokens_per_frame
        expect = frames.repeat_interleave(cache.tokens_per_frame)
        new = []
        for layer in cache.layers:
            if not torch.equal(layer.frame[0, 0, -m:], expect):
                raise RuntimeError("the newest cache tokens are not the chunk just written")
            new.append((layer.k[:, :, -m:], layer.v[:, :, -m:]))
        self.shadow = new if self.shadow is None else [
            (torch.cat([sk, k], 2), torch.cat([sv, v], 2)) for (sk, sv), (k, v) in zip(self.shadow, new)]
        if ctx.chunk_queries is not None:
            errs = []
            for q, layer, (sk, sv) in zip(ctx.chunk_queries, cache.layers, self.shadow):
                o_c = F.scaled_dot_product_attention(q, layer.k, layer.v, attn_mask=layer.bias())
                o_f = F.scaled_dot_product_attention(q, sk, sv)
                errs.append(float((o_c - o_f).norm() / o_f.norm().clamp_min(1e-30)))
            self.attn_err.append(float(np.mean(errs)))
        self._before = None
        if self.reference is not None and cache.size > self.budget_tokens \
                and ctx.frame + 1 < self.reference.frames:
            # the cache as the policy sees it; cloned, so a policy may edit it in place
            self._before = (ctx.frame, [(l.k[0].clone(), l.mass[0].clone()) for l in cache.layers])
        self.seconds_in_step += time.perf_counter() - t0

    @torch.no_grad()
    def after_compress(self, cache, decision, ctx) -> None:
        before, self._before = self._before, None
        if before is None or decision is None:
            return
        frame, layers = before
        sp, rc = [], []
        for i, (d, (keys, mass)) in enumerate(zip(decision.layers, layers)):
            if d.score is None:
                continue
            truth = true_share(self.reference.future(frame, i)[0], keys, mass).double().numpy()
            rho, recall = agreement(d.score[0].detach().double().numpy(), truth, self.budget_tokens)
            sp.append(np.mean(rho))
            rc.append(np.mean(recall))
        if sp:
            self.spearman.append(float(np.mean(sp)))
            self.recall.append(float(np.mean(rc)))


# -- the grid --------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames ``a`` against ``b`` (peak 255); inf when equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def _one_run(model, prompt: str, seed: int, frames: int, policy, budget: int, probe: RunProbe,
             future=None, progress=None, extra_overhead=None) -> tuple[dict, np.ndarray]:
    settings = RunSettings(prompt, frames=frames, seed=seed, record=False)
    run = Run(model, settings, Controls(policy, budget), observers=[probe], future_queries=future)
    for step in run:
        if progress is not None:
            progress.update(len(step.frame_indices))
    s, m = run.stats, run.metrics
    overhead = probe.seconds_in_step + (extra_overhead() if extra_overhead else 0.0)
    step_ms = 1000 * (s.seconds - overhead) / max(s.chunks, 1)
    policy_ms = 1000 * s.compress_seconds / s.compressions if s.compressions else math.nan
    row = {"prompt": prompt, "policy": policy.name, "budget": budget, "seed": seed,
           "consistency": m.get("consistency", math.nan), "returns": m.get("returns", math.nan),
           "attn_rel_err": _mean(probe.attn_err), "rollout_psnr_vs_full": math.nan,
           "proxy_spearman": _mean(probe.spearman), "proxy_topb_recall": _mean(probe.recall),
           "policy_ms_per_compression": policy_ms, "step_ms": step_ms,
           "policy_share_of_step": policy_ms / step_ms if step_ms > 0 else math.nan,
           "peak_cache_tokens": s.peak_tokens, "compressions": s.compressions,
           "seconds": run.seconds, "policy_params": json.dumps(policy.params(), sort_keys=True),
           "error": ""}
    return row, np.array(run.frames.all())


def grid_runs(config: EvalConfig, kwargs: dict[str, dict]) -> list[dict]:
    """The runs of one (prompt, seed), in table order: {policy, budget, policy_params}."""
    runs = []
    for name in config.policies:
        params = json.dumps(make_policy(name, **kwargs[name]).params(), sort_keys=True)
        runs += [{"policy": name, "budget": b, "policy_params": params} for b in config.budgets]
    return runs


def run_key(run: dict) -> str:
    """What names a run within its (prompt, seed): a row or a ``grid_runs`` entry."""
    return f"{run['policy']}|{run['budget']}|{run['policy_params']}"


def error_row(prompt: str, seed: int, run: dict, error: str) -> dict:
    """The row of a run that did not finish: no metric, ``error`` says why."""
    return {**{c: math.nan for c in METRICS}, "prompt": prompt, "seed": seed, "seconds": math.nan,
            **{k: run[k] for k in ("policy", "budget", "policy_params")}, "error": error}


def check_fits(model, config: EvalConfig) -> None:
    """Settings that only the model can judge (``EvalError``)."""
    if config.frames <= model.cfg.given_frames:
        raise EvalError(f"frames must exceed the model's {model.cfg.given_frames} given frames")


def evaluate_unit(model, config: EvalConfig, prompt: str, seed: int, skip=frozenset(),
                  progress=None) -> Iterator[dict]:
    """The grid's unit of work: one (prompt, seed). Its full-cache reference run, then
    each policy x budget run against it; each row (``RUN_COLUMNS``) is yielded as soon
    as it is measured, in table order. Runs whose ``run_key`` is in ``skip`` (already
    stored by a resumed sweep) are not run; the reference run is, unless nothing is left.

    A plain function of its arguments: the rows do not depend on what ran before in
    the process, so a sweep may run units anywhere, in any order. A policy that fails
    on a run (e.g. protected frames that do not fit a budget) gives a row with
    ``error`` set; any other exception ends the unit.
    """
    kwargs = config.validate(scenes=model.has_scenes)
    check_fits(model, config)
    todo = [r for r in grid_runs(config, kwargs) if run_key(r) not in skip]
    if not todo:
        return
    ref = ReferenceQueries(model, config.frames, model.cfg.sample_steps, config.horizon,
                           config.query_steps)
    ref.attach()
    try:
        full_row, ref_video = _one_run(
            model, prompt, seed, config.frames, make_policy("full"), config.frames,
            RunProbe(config.frames * model.cfg.tokens_per_frame), progress=progress,
            extra_overhead=lambda: ref.seconds)
    finally:
        ref.detach()
    g = model.cfg.given_frames
    full_row["rollout_psnr_vs_full"] = psnr(ref_video[g:], ref_video[g:])
    for run in todo:
        name, budget = run["policy"], run["budget"]
        if name == "full":  # measured on the reference run; budget is nominal
            yield {**full_row, "budget": budget}
            continue
        policy = make_policy(name, **kwargs[name])
        probe = RunProbe(budget * model.cfg.tokens_per_frame, ref)
        future = ref.future if name in OFFLINE_POLICIES else None
        try:
            row, video = _one_run(model, prompt, seed, config.frames, policy, budget, probe,
                                  future, progress)
        except PolicyError as e:
            yield error_row(prompt, seed, run, str(e))
            continue
        row["rollout_psnr_vs_full"] = psnr(video[g:], ref_video[g:])
        yield row


def describe_run(row: dict) -> str:
    return f"{row['policy']} at budget {row['budget']}, seed {row['seed']}, prompt {row['prompt']!r}"


def evaluate(model, config: EvalConfig, progress=None, log=None) -> list[dict]:
    """Every unit of the grid in this process, in order, nothing stored: one row per
    prompt x seed x policy x budget. ``log(msg)`` hears about failed runs."""
    rows = []
    for prompt in config.prompts:
        for seed in config.seeds:
            for row in evaluate_unit(model, config, prompt, seed, progress=progress):
                if row["error"] and log:
                    log(f"{describe_run(row)}: {row['error']}")
                rows.append(row)
    return rows


# -- aggregation and files ---------------------------------------------------------

def _nanmean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


def aggregate(rows: list[dict]) -> list[dict]:
    """One row (``RESULT_COLUMNS``) per policy x budget x seed: means over prompts
    (errors left out), ``peak_cache_tokens`` the max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["budget"], r["seed"]), []).append(r)
    out = []
    for (policy, budget, seed), rs in groups.items():
        ok = [r for r in rs if not r["error"]]
        agg = {"policy": policy, "budget": budget, "seed": seed, "prompts": len(ok),
               "policy_params": rs[0]["policy_params"],
               "errors": " | ".join(r["error"] for r in rs if r["error"])}
        for m in METRICS:
            agg[m] = _nanmean([r[m] for r in ok])
        peaks = [r["peak_cache_tokens"] for r in ok]
        agg["peak_cache_tokens"] = max(peaks) if peaks else math.nan
        out.append(agg)
    return out


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return ""
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.6g}"
    return str(x)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in columns])


def over_seeds(results: list[dict]) -> list[dict]:
    """Means of ``aggregate``'s rows over seeds: one per policy x budget."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    return [{"policy": p, "budget": b, "seeds": len(rs),
             **{m: _nanmean([r[m] for r in rs]) for m in METRICS}}
            for (p, b), rs in groups.items()]


MD_COLUMNS = [("consistency", "consistency", 3), ("returns", "returns", 3),
              ("attn_rel_err", "attn rel err", 3), ("rollout_psnr_vs_full", "PSNR vs full (dB)", 1),
              ("proxy_spearman", "proxy Spearman", 3), ("proxy_topb_recall", "proxy top-B recall", 3),
              ("policy_ms_per_compression", "policy ms", 2), ("step_ms", "step ms", 1),
              ("policy_share_of_step", "policy / step", 3), ("peak_cache_tokens", "peak tokens", 0)]


def write_markdown(path: Path, results: list[dict], config: EvalConfig, seconds: float) -> None:
    def cell(x, digits):
        if isinstance(x, float) and math.isnan(x):
            return "–"
        if isinstance(x, float) and math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    lines = [f"# ffviz eval: {len(config.policies)} policies x budgets {config.budgets} "
             f"x seeds {config.seeds}",
             "",
             f"{config.frames} frames, horizon {config.horizon}, queries of {config.query_steps} "
             f"denoising steps; mean over {len(config.prompts)} prompts, then over seeds; "
             f"{seconds:.0f} s. Budgets in frames; `full` keeps everything (its row repeats per "
             "budget); `–` = not defined (no token scores, or no compression).",
             "",
             "| policy | budget | " + " | ".join(h for _, h, _ in MD_COLUMNS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in MD_COLUMNS) + " |"]
    for r in sorted(over_seeds(results), key=lambda r: (r["budget"], config.policies.index(r["policy"]))):
        lines.append(f"| {r['policy']} | {r['budget']} | "
                     + " | ".join(cell(r[k], dg) for k, _, dg in MD_COLUMNS) + " |")
    lines += ["", "Prompts:", ""] + [f"- {p}" for p in config.prompts]
    errors = [r for r in results if r["errors"]]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {r['policy']} budget {r['budget']} seed {r['seed']}: "
                                             f"{r['errors']}" for r in errors]
    Path(path).write_text("\n".join(lines) + "\n")


def write_plots(out_dir: Path, results: list[dict], policies: list[str]) -> list[Path]:
    """``plot_<metric>.png``: the metric (mean over seeds) against budget, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = over_seeds(results)
    paths = []
    for metric in PLOT_METRICS:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        skipped = []
        for name in policies:
            pts = sorted((r["budget"], r[metric]) for r in table if r["policy"] == name)
            pts = [(b, v) for b, v in pts if math.isfinite(v)]
            if not pts:
                skipped.append(name)
                continue
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=name,
                    linestyle="--" if name == "full" else "-")
        ax.set_xlabel("budget (frames)")
        ax.set_ylabel(metric)
        ax.set_xticks(sorted({r["budget"] for r in table}))
        title = metric + (f"\nnot drawn (undefined or inf): {', '.join(skipped)}" if skipped else "")
        ax.set_title(title, fontsize=9)
        if len(ax.get_lines()):
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"plot_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(out_dir: Path, rows: list[dict], config: EvalConfig, seconds: float,
                  about: dict) -> dict:
    """runs.csv, results.csv, results.md, the plots and eval.json (``about`` merged into
    its settings and counts) from the grid's rows; returns eval.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = aggregate(rows)
    write_csv(out_dir / "runs.csv", rows, RUN_COLUMNS)
    write_csv(out_dir / "results.csv", results, RESULT_COLUMNS)
    write_markdown(out_dir / "results.md", results, config, seconds)
    plots = write_plots(out_dir, results, config.policies)
    summary = {"config": dataclasses.asdict(config), "seconds": round(seconds, 2),
               "runs": len(rows), "failed_runs": sum(bool(r["error"]) for r in rows), **about,
               "files": ["results.csv", "runs.csv", "results.md", *[p.name for p in plots]]}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def reference_query_bytes(cfg, config: EvalConfig) -> int:
    """Memory of one reference run's recorded queries (``ReferenceQueries.q``)."""
    S = 1 if config.query_steps == "last" else cfg.sample_steps
    return config.frames * S * cfg.layers * cfg.heads * cfg.tokens_per_frame * cfg.head_dim * 2
