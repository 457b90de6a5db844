"""Means over seeds with a 95% interval, and paired comparisons of two settings.

The seed is the unit of replication: it draws a scene's initial state and the
sampling noise, while a suite's prompts are a fixed set, averaged within each
seed. ``t_interval`` is Student's t over the per-seed values, mean +- t(0.975,
n - 1) s / sqrt(n), n = seeds with a defined value (no interval below 2 seeds).

Two settings (policies at one budget) are compared paired, on the same (prompt,
seed): per seed, the mean over prompts of their difference (prompts where both are
defined), then the t-interval of those differences. When it covers 0, the two
cannot be told apart on these seeds.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
APART = "cannot be told apart"


def t_interval(values) -> dict:
    """{"n", "mean", "low", "high"} of the finite ``values`` (NaN where undefined)."""
    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "low": math.nan, "high": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "low": math.nan, "high": math.nan}
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def paired_by_seed(a: dict, b: dict) -> list[float]:
    """a, b: {(prompt, seed): value} of two settings -> per seed, the mean over prompts
    of a - b where both are finite."""
    by_seed: dict[int, list[float]] = {}
    for (prompt, seed), x in a.items():
        y = b.get((prompt, seed))
        if y is not None and math.isfinite(float(x)) and math.isfinite(float(y)):
            by_seed.setdefault(seed, []).append(float(x) - float(y))
    return [float(np.mean(d)) for _, d in sorted(by_seed.items())]


def verdict(interval: dict, a: str, b: str) -> str:
    """How ``a`` compares with ``b`` from the interval of a - b."""
    if interval["n"] < 2:
        return "not defined" if interval["n"] == 0 else "too few seeds"
    if interval["low"] <= 0 <= interval["high"]:
        return APART
    return f"{a} higher" if interval["low"] > 0 else f"{b} higher"
