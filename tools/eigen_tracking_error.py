"""How far Future Forcing's tracked eigenpairs stray from an exact decomposition, on real runs.

    python tools/eigen_tracking_error.py [--frames 64] [--budget 3] [--ranks 1 2] [--seed 1000]
                                         [--eig-every 64] [--prompts P1 P2] [--weights W]

The committed weights (``assets/tiny.safetensors`` unless ``--weights``) generate
``--frames`` frames under ``future_forcing`` at ``--budget`` frames, once per prompt
(default: the first two prompts of the ``memory`` suite, ``ffviz.suites``: the red
circle and yellow square behind a wide gray pillar, leaving the view; the white
triangle and green circle behind a wide purple pillar) and rank. At every
compression the policy's own tracker (``EigenTracker`` with its refresh rules, as
shipped; its eigenpairs are the ones the run uses) and a second tracker with the
refresh disabled (an exact decomposition only at the first call and every
``eig_every`` calls, one subspace step in between whatever the gap or the residual)
are compared with an exact decomposition of the same statistics (``QueryStats.top_eig``):
  * angle: the largest principal angle between the tracked and the exact top-r
    subspaces, over layers and heads (degrees);
  * score error: max |a - a_exact| / max a_exact over the cache's tokens, per layer and
    head, of the Future Forcing share a computed by the policy itself (its ``proxies``
    and ``future_share``) from each set of eigenpairs over the cache of that call;
  * decomposed: the calls at which the shipped tracker decomposed exactly (of them,
    those where a step's residual was too large; the others were due before the step:
    the first call, every ``eig_every`` calls, or close eigenvalues).
Prints the largest of each over the run, per prompt and rank, then one row per rank
over the prompts in the form of the table in docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.generate import Controls, RunSettings, generate  # noqa: E402
from ffviz.policies.eigen_tracking import EigenTracker  # noqa: E402
from ffviz.policies.future_forcing import FutureForcing  # noqa: E402
from ffviz.policies.scored import stack_layers  # noqa: E402
from ffviz.suites import HELD_OUT_SEED_BASE, SUITES  # noqa: E402
from ffviz.weights import DEFAULT_WEIGHTS, load_tiny  # noqa: E402

PROMPTS = SUITES["memory"].prompts[:2]
WORDS = {1: "one", 2: "two", 3: "three"}


class CountingTracker(EigenTracker):
    """The shipped tracker, counting its exact decompositions (and those a step's
    residual asked for) and keeping its last answer."""
    exact_calls: int = 0
    residual_calls: int = 0
    last: tuple | None = None  # (stats, frame, r, lam, u) of the last call

    def eigenpairs(self, stats, frame, r):
        due, before = self._exact_due(stats, frame, r), self.exact_calls
        lam, u = super().eigenpairs(stats, frame, r)
        self.residual_calls += int(not due and self.exact_calls > before)
        self.last = (stats, frame, r, lam, u)
        return lam, u

    def _exact(self, stats, frame, r):
        self.exact_calls += 1
        return super()._exact(stats, frame, r)


class Given:
    """A stand-in tracker answering with fixed eigenpairs (to score them through the policy)."""

    def __init__(self, lam, u):
        self.pair = (lam, u)

    def eigenpairs(self, stats, frame, r):
        return self.pair


def max_angle(u: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest principal angle (degrees) between the row spaces of u and exact
    (..., r, d), over all leading dimensions: arcsin of the largest singular value of
    u's part outside exact's span (accurate for small angles)."""
    u, exact = u.double(), exact.double()
    outside = u - (u @ exact.transpose(-1, -2)) @ exact
    sin = torch.linalg.matrix_norm(outside, ord=2).max().clamp(max=1).item()
    return math.degrees(math.asin(sin))


class MeasuredFutureForcing(FutureForcing):
    """Future Forcing as shipped (its decisions come from ``CountingTracker``, i.e. the
    real tracker), measuring both trackers against an exact decomposition at every
    compression, on the cache before the decision is applied."""

    def __post_init__(self):
        super().__post_init__()
        self._tracker = CountingTracker(self.eig_every)
        # the refresh disabled: exact only when due by count, one step at every other call
        self.stepping = CountingTracker(self.eig_every, close_gap=0.0, residual_limit=math.inf)
        self.calls, self.worst = 0, {"angle": 0.0, "error": 0.0, "step_angle": 0.0, "step_error": 0.0}

    def compress(self, cache, budget_tokens, ctx):
        tracker = self._tracker
        tracker.last = None
        decision = super().compress(cache, budget_tokens, ctx)
        if tracker.last is not None:  # the policy read the eigenpairs at this call
            self._measure(cache, ctx, *tracker.last)
        return decision

    def _measure(self, cache, ctx, stats, frame, r, lam, u):
        self.calls += 1
        lam_s, u_s = self.stepping.eigenpairs(stats, frame, r)
        lam_e, u_e = stats.top_eig(None, r)
        k, mass = stack_layers(cache, "k", "mass")
        exact = self._share(cache, ctx, k, mass, lam_e, u_e)
        for key, (lam_t, u_t) in (("", (lam, u)), ("step_", (lam_s, u_s))):
            error = (self._share(cache, ctx, k, mass, lam_t, u_t) - exact).abs() \
                / exact.amax(-1, keepdim=True).clamp_min(1e-30)
            self.worst[key + "angle"] = max(self.worst[key + "angle"], max_angle(u_t, u_e))
            self.worst[key + "error"] = max(self.worst[key + "error"], error.max().item())

    def _share(self, cache, ctx, k, mass, lam, u) -> torch.Tensor:
        """The policy's score (L, B, H, N) of the cache's tokens from the eigenpairs
        (lam, u) (``FutureForcing.scores``, as ``compress`` computes it)."""
        tracker, self._tracker = self._tracker, Given(lam, u)
        try:
            return self.scores(cache, ctx, k, mass)[0]
        finally:
            self._tracker = tracker


@torch.no_grad()
def measure(model, prompt: str, rank: int, frames: int = 64, budget: int = 3,
            seed: int = HELD_OUT_SEED_BASE, eig_every: int | None = None) -> dict:
    """One run; the largest angle (degrees) and score error (fraction) over its
    compressions, for the shipped tracker and for steps alone (``step_``), the calls
    that read eigenpairs, how many of them each tracker decomposed exactly and how
    many of the shipped tracker's exact ones a step's residual asked for."""
    params = {"rank": rank} if eig_every is None else {"rank": rank, "eig_every": eig_every}
    policy = MeasuredFutureForcing(**params)
    for _ in generate(model, RunSettings(prompt, frames=frames, seed=seed, record=False),
                      Controls(policy, budget)):
        pass
    tracker = policy._tracker
    return {**policy.worst, "calls": policy.calls, "exact_calls": tracker.exact_calls,
            "residual_calls": tracker.residual_calls, "step_exact_calls": policy.stepping.exact_calls}


def fmt(angle: float, error: float) -> str:
    return f"{angle:.2g} degrees, {100 * error:.2g}%"


def table(results: dict, frames: int, budget: int) -> str:
    """results {(rank, prompt index): measure(...)} -> markdown: one row per run, then
    one per rank over the prompts (the form of docs/evaluation.md's table)."""
    lines = ["| rank | prompt | with the refresh rules | decomposed | one step alone |",
             "| --- | --- | --- | --- | --- |"]
    for (rank, i), m in sorted(results.items()):
        lines.append(f"| {rank} | {i + 1} | {fmt(m['angle'], m['error'])} | "
                     f"{m['exact_calls']} of {m['calls']} ({m['residual_calls']} for a residual) | "
                     f"{fmt(m['step_angle'], m['step_error'])} |")
    lines += ["", "| where | with the refresh rules | one step alone |", "| --- | --- | --- |"]
    for rank in sorted({r for r, _ in results}):
        runs = [m for (r, _), m in sorted(results.items()) if r == rank]
        worst = {key: max(m[key] for m in runs) for key in ("angle", "error", "step_angle", "step_error")}
        counts = " and ".join(str(m["exact_calls"]) for m in runs)
        calls = " and ".join(sorted({str(m["calls"]) for m in runs}))
        shipped = ("exact (every call decomposes)" if all(m["exact_calls"] == m["calls"] for m in runs)
                   else f"{fmt(worst['angle'], worst['error'])} ({counts} of {calls} calls decomposed)")
        prompts = WORDS.get(len(runs), len(runs))
        lines.append(f"| default weights, rank {rank} ({frames} frames, {prompts} prompts, budget {budget}) "
                     f"| {shipped} | {fmt(worst['step_angle'], worst['step_error'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--budget", type=int, default=3, help="frames")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED_BASE)
    p.add_argument("--eig-every", type=int, default=None, help="default: the policy's")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    args = p.parse_args()
    if args.frames < 1 or args.budget < 1 or min(args.ranks) < 1:
        raise SystemExit("--frames, --budget and --ranks must be >= 1")
    torch.set_num_threads(1)
    model, _ = load_tiny(args.weights)
    results = {(rank, i): measure(model, prompt, rank, args.frames, args.budget, args.seed, args.eig_every)
               for rank in args.ranks for i, prompt in enumerate(args.prompts)}
    for i, prompt in enumerate(args.prompts):
        print(f"prompt {i + 1}: {prompt}")
    print(f"seed {args.seed}, eig_every {args.eig_every or FutureForcing.eig_every}\n")
    print(table(results, args.frames, args.budget))


if __name__ == "__main__":
    main()
