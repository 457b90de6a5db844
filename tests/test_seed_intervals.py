"""Intervals over seeds, paired comparisons and the memory bar, on numbers made by hand."""
import math

import pytest
from scipy import stats

from ffviz.eval_report import memory_bar
from ffviz.seed_intervals import APART, paired_by_seed, t_interval, verdict


def test_t_interval_is_students():
    ci = t_interval([1.0, 2.0, 3.0, 4.0, float("nan")])  # NaN: undefined, left out
    half = stats.t.ppf(0.975, 3) * stats.tstd([1, 2, 3, 4]) / 2
    assert ci["n"] == 4 and ci["mean"] == 2.5
    assert (ci["low"], ci["high"]) == pytest.approx((2.5 - half, 2.5 + half))
    one = t_interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["low"])
    assert t_interval([])["n"] == 0


def test_paired_differences_average_prompts_within_a_seed():
    a = {("p", 0): 1.0, ("q", 0): 0.0, ("p", 1): 1.0, ("q", 1): float("nan")}
    b = {("p", 0): 0.0, ("q", 0): 0.0, ("p", 1): 0.5, ("q", 1): 0.0}
    assert paired_by_seed(a, b) == [0.5, 0.5]  # seed 1: only p is defined for both


def test_verdicts():
    assert verdict(t_interval([0.1, -0.1, 0.05]), "a", "b") == APART
    assert verdict(t_interval([0.3, 0.2, 0.25]), "a", "b") == "a higher"
    assert verdict(t_interval([-0.3, -0.2, -0.25]), "a", "b") == "b higher"
    assert verdict(t_interval([0.3]), "a", "b") == "too few seeds"


def row(policy, returns):
    return {"policy": policy, "budget": 3, "returns": returns}


def test_memory_bar_reads_full_window_and_recovery():
    table = [row("full", 0.8), row("window", 0.4), row("future_forcing", 0.7), row("sink", 0.5)]
    pair = {"budget": 3, "metric": "returns", "policy_a": "window", "policy_b": "future_forcing",
            "seeds": 4, "mean_difference": -0.3, "ci95_low": -0.4, "ci95_high": -0.2}
    text = "\n".join(memory_bar(table, [pair]))
    assert "full 0.800" in text and "(bar 0.70: yes)" in text
    assert "a loss of 0.400 = 0.50 of full's (bar 0.30: yes)" in text
    assert "future_forcing: 0.700, recovers 0.75" in text and "+0.300 [+0.200, +0.400]" in text
    assert "sink: 0.500, recovers 0.25 of the window's loss (bar 0.5: **no**)" in text
    assert memory_bar([row("sink", 0.5)], []) == []  # no full or window: no bar
