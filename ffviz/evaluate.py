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
   (``oracle``) are handed the reference queries. The run of the fidelity
   reference policy (``EvalConfig.fidelity_reference``) is also watched by
   ``shared_fidelity.SharedCacheFidelity``: every scored policy of the grid rates
   that run's caches (the row carries the result; other rows get theirs in
   ``shared_spearman`` and ``shared_topb_recall``).

A grid's "policies" are policy names, or labels of ``EvalConfig.variants`` (one
policy with other parameters, e.g. each setting of ``ffviz ablate``).

Metrics of one run (``RUN_COLUMNS``):

* ``consistency``, ``returns``, ``returns_tracked``, ``tracking``:
  ``ffviz.metrics.consistency`` of the generated frames (as ``ffviz.run`` does);
  ``returns_events``: how many returns ``returns`` counted.
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
* ``shared_spearman``, ``shared_topb_recall``: the same comparison on the
  fidelity reference policy's caches instead of the policy's own
  (``ffviz.shared_fidelity``), so every policy ranks identical caches.
* ``score_chosen_tokens``: per compression of a scored policy, the kept tokens
  that its score chose, beyond the protected ones (its sink and newest frames),
  per head, averaged over layers, heads and compressions. 0 means the budget holds
  only protected frames and the score decides nothing (e.g. n_sink = n_recent = 1
  at a budget of 2 frames); empty for policies without protected frames and score
  (full, window).
* ``policy_ms_per_compression``: ``Step.seconds["policy"]`` averaged over the
  steps where the policy returned a decision (empty when none did);
  ``step_ms``: mean ``Step.seconds["total"]`` less this module's own
  measurement overhead inside it (the probe's ``after_write`` and, for the
  reference run, the query recorder); ``policy_share_of_step`` their ratio.
* ``peak_cache_tokens``: the most tokens per head the cache held (after a
  write, before the policy); ``compressions``: decisions applied.

The grid's unit of work is one (prompt, seed): ``evaluate_unit``. ``evaluate`` runs
every unit here and returns the rows; ``ffviz.sweep`` runs them on a backend (this
process, or Ray tasks on a cluster), stores each run as it finishes, resumes, and
writes the files (``eval_report.write_results``: tables with intervals over seeds).

Memory is bounded: one reference's queries at a time (per process), at most
``frames x steps x layers x heads x tokens_per_frame x head_dim`` float16
(25 MB for 96 frames of the embedded model, 67 MB at the cap of
``MAX_EVAL_FRAMES`` = 256), plus one shadow cache of the run's length.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from ffviz.policies.scored import ScoredPolicy
from ffviz.reference import ReferenceQueries, agreement, true_share
from ffviz.run import Run
from ffviz.sampling import TRAIN_SEED_BASE
from ffviz.shared_fidelity import SharedCacheFidelity
from ffviz.suites import DEFAULT_SUITE_NAME, SUITES

MAX_EVAL_FRAMES = 256  # the reference queries of one run are held in memory
OFFLINE_POLICIES = ("oracle",)  # the only policies handed the reference run's future queries

# the default suite (``ffviz.suites``): held-out scenes whose objects hide for longer
# than a small window keeps
DEFAULT_SUITE = list(SUITES[DEFAULT_SUITE_NAME].prompts)
DEFAULT_BUDGETS = [3, 5]  # frames; with n_sink = n_recent = 1 the score chooses 1 and 3 frames

METRICS = ["consistency", "returns", "returns_tracked", "tracking", "returns_events",
           "attn_rel_err", "rollout_psnr_vs_full", "proxy_spearman", "proxy_topb_recall",
           "shared_spearman", "shared_topb_recall", "score_chosen_tokens",
           "policy_ms_per_compression", "step_ms", "policy_share_of_step",
           "peak_cache_tokens", "compressions"]
# measured times: they differ between two sweeps of the same grid, every other column is
# the same (same model, settings and seeds), whatever the backend and the order of runs
TIMING_COLUMNS = ["policy_ms_per_compression", "step_ms", "policy_share_of_step", "seconds"]
RUN_COLUMNS = ["prompt", "policy", "budget", "seed", *METRICS, "seconds", "policy_params", "error"]
RESULT_COLUMNS = ["policy", "budget", "seed", *METRICS, "prompts", "policy_params", "errors"]
RUN_IDENTITY = ("policy", "budget", "policy_params", "shared_key")  # what names a run (run_key)


class EvalError(GenerationError):
    """Evaluation settings that cannot run (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A policy under another label with its own parameters (``key=value``). ``recency``:
    the kept tokens are the sink and newest frames alone (n_recent fills the budget
    beyond n_sink, at each budget), so only what the policy does with the rest (a
    merge) differs from a sink."""
    policy: str
    args: tuple[str, ...] = ()
    recency: bool = False


FIDELITY_AUTO = "window"  # the fidelity reference when none is named and it is evaluated


@dataclasses.dataclass
class EvalConfig:
    """policies: names from ``POLICIES`` or labels of ``variants``; budgets: cache
    budgets in frames; seeds: user seeds in [0, 2**20); frames: run length in [4,
    MAX_EVAL_FRAMES]; prompts: the scenario suite; horizon: future frames of the truth
    (and of the oracle's queries); query_steps: "all" or "last" denoising steps
    recorded; policy_args: {policy: ["key=value", ...]}; fidelity_reference: the
    policy whose caches every scorer rates (``shared_fidelity``), "auto" (window when
    evaluated) or "none"; variants: {label: ``Variant``}."""
    policies: list[str] = dataclasses.field(default_factory=lambda: [p for p in POLICIES])
    budgets: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_BUDGETS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(SUITES[DEFAULT_SUITE_NAME].seeds))
    frames: int = SUITES[DEFAULT_SUITE_NAME].frames
    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SUITE))
    horizon: int = 4
    query_steps: str = "all"
    policy_args: dict = dataclasses.field(default_factory=dict)
    fidelity_reference: str = "auto"
    variants: dict = dataclasses.field(default_factory=dict)

    def policy_name(self, label: str) -> str:
        """The registered policy a label runs."""
        return self.variants[label].policy if label in self.variants else label

    def shared_reference(self) -> str | None:
        """The label whose runs every scorer rates, or None (no shared-cache fidelity)."""
        if self.fidelity_reference == "auto":
            return FIDELITY_AUTO if FIDELITY_AUTO in self.policies else None
        return None if self.fidelity_reference == "none" else self.fidelity_reference

    def validate(self, scenes: bool = True) -> dict[str, dict]:
        """Raise ``EvalError``/``PolicyError``/``PromptError``; return typed policy kwargs
        per label. ``scenes``: prompts are the tiny model's scene grammar (False: free
        text, Wan)."""
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
        for label in self.policies:
            variant = self.variants.get(label, Variant(label))
            pairs = [*variant.args, *self.policy_args.get(label, [])]
            kwargs[label] = parse_policy_args(variant.policy, pairs)
            if variant.recency and "n_recent" in kwargs[label]:
                raise EvalError(f"{label}: a recency variant sets n_recent itself")
            make_policy(variant.policy, **kwargs[label])  # bad values fail now, not mid-grid
        reference = self.shared_reference()
        if reference is not None and (reference not in self.policies
                                      or not POLICIES[self.policy_name(reference)].holds_budget):
            raise EvalError(f"fidelity reference {reference!r} must be one of the evaluated "
                            f"policies that hold a budget (or 'none'); evaluated: "
                            f"{', '.join(self.policies)}")
        return kwargs


def parse_list(text: str, kind=int, what: str = "value") -> list:
    """``"2,4"`` -> [2, 4]; a clear ``EvalError`` for anything else."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise EvalError(f"{what}s must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def parse_seeds(text: str) -> list[int]:
    """``"1000-1015"``, ``"0,3,5"`` or both (``"0-3,9"``) -> seeds in order."""
    seeds = []
    for item in parse_list(text, str, "seed"):
        lo, sep, hi = item.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(item)]
        except ValueError:
            raise EvalError(f"seeds must look like 0-15 or 0,3,5, got {text!r}") from None
    return seeds


def parse_prompts(text: str) -> list[str]:
    """A file (one prompt a line; blank and # lines skipped) or ``;``-separated prompts."""
    if "\n" not in text and len(text) < 4096 and _is_file(Path(text)):
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    else:
        lines = text.split(";")
    prompts = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
    if not prompts:
        raise EvalError(f"no prompt in {text!r}")
    return prompts


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. several prompts longer together than a file name may be
        return False


def parse_policy_arg_list(items: list[str]) -> dict[str, list[str]]:
    """``["oracle:n_sink=1", ...]`` -> {"oracle": ["n_sink=1"], ...}."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, pair = item.partition(":")
        if not sep or not name or "=" not in pair:
            raise EvalError(f"--policy-arg {item!r} must look like policy:key=value")
        out.setdefault(name.strip(), []).append(pair.strip())
    return out


def parse_variant_list(items: list[str]) -> dict[str, Variant]:
    """``["ff_adaptive=future_forcing", ...]`` -> {"ff_adaptive": Variant("future_forcing")}:
    a policy evaluated under another label; its parameters come with ``--policy-arg
    LABEL:key=value``, so one grid holds a policy at several settings."""
    out: dict[str, Variant] = {}
    for item in items:
        label, sep, policy = (part.strip() for part in item.partition("="))
        if not sep or not label or not policy:
            raise EvalError(f"--variant {item!r} must look like label=policy")
        if label in POLICIES:
            raise EvalError(f"--variant label {label!r} is a policy's name: choose another")
        if policy not in POLICIES:
            raise EvalError(f"--variant {item!r}: unknown policy {policy!r} "
                            f"(one of {', '.join(POLICIES)})")
        if label in out:
            raise EvalError(f"--variant label {label!r} given twice")
        out[label] = Variant(policy)
    return out


# -- what one run is measured by -----------------------------------------------------

class RunProbe(Observer):
    """Attention error against a shadow full cache, proxy fidelity and the tokens the
    score chose (see the module docstring for exactly which queries and cache states).
    ``policy``: the run's policy (for its protected frames)."""

    def __init__(self, budget_tokens: int, reference: ReferenceQueries | None = None,
                 policy=None):
        self.budget_tokens, self.reference = budget_tokens, reference
        self.scored = policy if isinstance(policy, ScoredPolicy) else None
        self.shadow: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.attn_err: list[float] = []
        self.spearman: list[float] = []
        self.recall: list[float] = []
        self.chosen: list[float] = []
        self.seconds_in_step = 0.0  # after_write time, inside Step.seconds["total"]
        self._before = None
        self._frames = None

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
        # source frames before the policy acts (applying a decision makes new tensors)
        self._frames = ([l.frame[0] for l in cache.layers]
                        if self.scored is not None and cache.size > self.budget_tokens else None)
        if self.reference is not None and cache.size > self.budget_tokens \
                and ctx.frame + 1 < self.reference.frames:
            # the cache as the policy sees it; cloned, so a policy may edit it in place
            self._before = (ctx.frame, [(l.k[0].clone(), l.mass[0].clone()) for l in cache.layers])
        self.seconds_in_step += time.perf_counter() - t0

    @torch.no_grad()
    def after_compress(self, cache, decision, ctx) -> None:
        frames, self._frames = self._frames, None
        if frames is not None and decision is not None:
            self.chosen.append(self._score_chosen(frames, decision, ctx))
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

    def _score_chosen(self, frames: list[torch.Tensor], decision, ctx) -> float:
        """Kept tokens outside the policy's protected ones (its own ``protected``: forcing_kv
        protects per head), per head, averaged over layers and heads (a slot the decision
        leaves dead keeps nothing; a dead slot's frame is DEAD, < 0)."""
        kept = torch.stack([frame.gather(-1, d.keep[0].to(frame.device))
                            for frame, d in zip(frames, decision.layers)])  # (L, H, K) frames
        chosen = ~self.scored.protected(kept[:, None], self.budget_tokens, ctx)[:, 0] & (kept >= 0)
        for i, d in enumerate(decision.layers):
            if d.live is not None:
                chosen[i] &= d.live[0].to(kept.device)
        return float(chosen.sum(-1).double().mean())


# -- the grid --------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames ``a`` against ``b`` (peak 255); inf when equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def _one_run(model, prompt: str, seed: int, frames: int, policy, budget: int, probe: RunProbe,
             future=None, progress=None, extra_overhead=None, label: str | None = None,
             observers=()) -> tuple[dict, np.ndarray]:
    """One run watched by ``probe`` (and ``observers``, whose ``seconds_in_step`` is
    measurement overhead too); its row under ``label`` (default: the policy's name)."""
    settings = RunSettings(prompt, frames=frames, seed=seed, record=False)
    run = Run(model, settings, Controls(policy, budget), observers=[probe, *observers],
              future_queries=future)
    for step in run:
        if progress is not None:
            progress.update(len(step.frame_indices))
    s, m = run.stats, run.metrics
    overhead = sum(o.seconds_in_step for o in (probe, *observers)) \
        + (extra_overhead() if extra_overhead else 0.0)
    step_ms = 1000 * (s.seconds - overhead) / max(s.chunks, 1)
    policy_ms = 1000 * s.compress_seconds / s.compressions if s.compressions else math.nan
    row = {"prompt": prompt, "policy": label or policy.name, "budget": budget, "seed": seed,
           **{k: m.get(k, math.nan) for k in ("consistency", "returns", "returns_tracked",
                                               "tracking")},
           "returns_events": m.get("returns_count", math.nan),
           "attn_rel_err": _mean(probe.attn_err), "rollout_psnr_vs_full": math.nan,
           "proxy_spearman": _mean(probe.spearman), "proxy_topb_recall": _mean(probe.recall),
           "shared_spearman": math.nan, "shared_topb_recall": math.nan,
           "score_chosen_tokens": _mean(probe.chosen),
           "policy_ms_per_compression": policy_ms, "step_ms": step_ms,
           "policy_share_of_step": policy_ms / step_ms if step_ms > 0 else math.nan,
           "peak_cache_tokens": s.peak_tokens, "compressions": s.compressions,
           "seconds": run.seconds, "policy_params": json.dumps(policy.params(), sort_keys=True),
           "shared_key": "", "error": ""}
    return row, np.array(run.frames.all())


def policy_kwargs(config: EvalConfig, kwargs: dict[str, dict], label: str, budget: int) -> dict:
    """The parameters of ``label``'s policy at ``budget`` (``kwargs``: ``validate``'s)."""
    variant = config.variants.get(label)
    if variant is None or not variant.recency:
        return kwargs[label]
    n_sink = make_policy(variant.policy, **kwargs[label]).n_sink
    return {**kwargs[label], "n_recent": max(budget - n_sink, 0)}


def build_policy(config: EvalConfig, kwargs: dict[str, dict], label: str, budget: int):
    return make_policy(config.policy_name(label), **policy_kwargs(config, kwargs, label, budget))


def shared_scorers(config: EvalConfig, kwargs: dict[str, dict]) -> list[str]:
    """The labels that rate the fidelity reference's caches: the scored policies (a
    recency variant's score chooses nothing, so it is left out)."""
    return [label for label in config.policies
            if issubclass(POLICIES[config.policy_name(label)], ScoredPolicy)
            and not getattr(config.variants.get(label), "recency", False)]


def grid_runs(config: EvalConfig, kwargs: dict[str, dict]) -> list[dict]:
    """The runs of one (prompt, seed), in table order: {policy (the label), budget,
    policy_params, shared_key}. ``shared_key`` names the scorers that rate the run's
    caches (the fidelity reference's runs; "" for the others), so that a rerun with
    other scorers measures those runs again."""
    reference = config.shared_reference()
    shared_key = ""
    if reference is not None:
        scorers = [(label, build_policy(config, kwargs, label, config.budgets[0]).params())
                   for label in shared_scorers(config, kwargs)]
        shared_key = hashlib.sha256(json.dumps(scorers, sort_keys=True).encode()).hexdigest()[:12]
    runs = []
    for label in config.policies:
        for b in config.budgets:
            params = json.dumps(build_policy(config, kwargs, label, b).params(), sort_keys=True)
            runs.append({"policy": label, "budget": b, "policy_params": params,
                         "shared_key": shared_key if label == reference else ""})
    return runs


def run_key(run: dict) -> str:
    """What names a run within its (prompt, seed): a row or a ``grid_runs`` entry."""
    key = f"{run['policy']}|{run['budget']}|{run['policy_params']}"
    return key + (f"|shared:{run['shared_key']}" if run.get("shared_key") else "")


def error_row(prompt: str, seed: int, run: dict, error: str) -> dict:
    """The row of a run that did not finish: no metric, ``error`` says why."""
    return {**{c: math.nan for c in METRICS}, "prompt": prompt, "seed": seed, "seconds": math.nan,
            **{k: run.get(k, "") for k in RUN_IDENTITY}, "error": error}


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
    The fidelity reference's rows also carry ``shared_fidelity``
    (``SharedCacheFidelity.results``).

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
    n = model.cfg.tokens_per_frame
    ref = ReferenceQueries(model, config.frames, model.cfg.sample_steps, config.horizon,
                           config.query_steps)
    ref.attach()
    try:
        full_row, ref_video = _one_run(
            model, prompt, seed, config.frames, make_policy("full"), config.frames,
            RunProbe(config.frames * n), progress=progress, extra_overhead=lambda: ref.seconds)
    finally:
        ref.detach()
    g = model.cfg.given_frames
    full_row["rollout_psnr_vs_full"] = psnr(ref_video[g:], ref_video[g:])
    for run in todo:
        label, budget = run["policy"], run["budget"]
        name = config.policy_name(label)
        if name == "full":  # measured on the reference run; budget is nominal
            yield {**full_row, "policy": label, "budget": budget}
            continue
        policy = build_policy(config, kwargs, label, budget)
        observers = []
        if run["shared_key"]:
            shadows = {s: build_policy(config, kwargs, s, budget)
                       for s in shared_scorers(config, kwargs)}
            observers.append(SharedCacheFidelity(shadows, budget * n, ref))
        try:
            row, video = _one_run(model, prompt, seed, config.frames, policy, budget,
                                  RunProbe(budget * n, ref, policy),
                                  ref.future if name in OFFLINE_POLICIES else None, progress,
                                  label=label, observers=observers)
        except PolicyError as e:
            yield error_row(prompt, seed, run, str(e))
            continue
        row["rollout_psnr_vs_full"] = psnr(video[g:], ref_video[g:])
        if observers:
            row["shared_key"] = run["shared_key"]
            row["shared_fidelity"] = observers[0].results()
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


def reference_query_bytes(cfg, config: EvalConfig) -> int:
    """Memory of one reference run's recorded queries (``ReferenceQueries.q``)."""
    S = 1 if config.query_steps == "last" else cfg.sample_steps
    return config.frames * S * cfg.layers * cfg.heads * cfg.tokens_per_frame * cfg.head_dim * 2
