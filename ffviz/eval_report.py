"""The evaluation's tables: from the grid's rows to the files of ``ffviz eval``.

* ``runs.csv``: one row per prompt x seed x policy x budget (``RUN_COLUMNS``);
* ``results.csv``: one row per policy x budget x seed, means over the suite's prompts
  (``peak_cache_tokens`` their max);
* ``intervals.csv``: per policy, budget and metric, the mean over seeds and its 95%
  interval (``seed_intervals.t_interval``);
* ``comparisons.csv``: per budget, metric and pair of policies, the paired difference
  on the same (prompt, seed), its 95% interval over seeds, and whether the two can be
  told apart (``seed_intervals``);
* ``fidelity.csv``: shared-cache fidelity (``ffviz.shared_fidelity``), per budget,
  scorer, layer and head (``all``: their mean), with an interval over seeds;
* ``results.md``: the tables above for reading, each row with the tokens the score
  chose beyond the protected frames, and the memory bar (below);
* ``plot_<metric>.png``: each metric against budget, one line per policy;
* ``eval.json``: the settings, counts and times.

The memory bar (docs/evaluation.md) reads ``returns``, then ``returns_tracked``, where
``full``, ``window`` and other policies ran at one budget: the full cache should bring back at least
``BAR["full"]`` of the hidden objects, a window lose at least ``BAR["window_loss"]`` of
that, and a policy recover at least ``BAR["recovered"]`` of the window's loss.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ffviz.evaluate import METRICS, RESULT_COLUMNS, RUN_COLUMNS, EvalConfig
from ffviz.seed_intervals import APART, paired_by_seed, t_interval, verdict

PLOT_METRICS = [m for m in METRICS if m not in ("compressions", "returns_events")]
COMPARED_METRICS = ["consistency", "returns", "returns_tracked", "tracking", "attn_rel_err",
                    "rollout_psnr_vs_full"]
INTERVAL_COLUMNS = ["policy", "budget", "metric", "seeds", "mean", "ci95_low", "ci95_high"]
COMPARISON_COLUMNS = ["budget", "metric", "policy_a", "policy_b", "seeds", "mean_difference",
                      "ci95_low", "ci95_high", "verdict"]
FIDELITY_COLUMNS = ["reference", "budget", "scorer", "layer", "head", "units", "seeds",
                    "spearman", "spearman_ci95_low", "spearman_ci95_high", "topb_recall",
                    "topb_recall_ci95_low", "topb_recall_ci95_high"]
BAR = {"full": 0.70, "window_loss": 0.30, "recovered": 0.5}


# -- rows -------------------------------------------------------------------------

def with_shared_fidelity(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` whose ``shared_spearman``/``shared_topb_recall`` are filled from
    the fidelity reference's row of the same prompt, seed and budget (the mean over
    layers and heads of the row's policy as a scorer)."""
    shared = {(r["prompt"], r["seed"], r["budget"]): r["shared_fidelity"]["scorers"]
              for r in rows if r.get("shared_fidelity") and not r["error"]}
    out = []
    for r in rows:
        scorer = shared.get((r["prompt"], r["seed"], r["budget"]), {}).get(r["policy"])
        r = dict(r)
        if scorer is not None and not r["error"]:
            r["shared_spearman"] = float(np.mean(scorer["spearman"]))
            r["shared_topb_recall"] = float(np.mean(scorer["recall"]))
        out.append(r)
    return out


def _nanmean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


PSNR = "rollout_psnr_vs_full"


def _mean(metric: str, xs) -> float:
    """The mean of ``metric``'s values; for PSNR the PSNR of the mean squared error, so
    one identical run (infinite PSNR) does not make the mean infinite."""
    if metric != PSNR:
        return _nanmean(xs)
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if not xs:
        return math.nan
    mse = float(np.mean([0.0 if math.isinf(x) else 255.0 ** 2 * 10 ** (-x / 10) for x in xs]))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


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
        for m in METRICS:  # rows stored by an earlier version may lack a metric
            agg[m] = _mean(m, [r.get(m, math.nan) for r in ok])
        peaks = [r["peak_cache_tokens"] for r in ok]
        agg["peak_cache_tokens"] = max(peaks) if peaks else math.nan
        out.append(agg)
    return out


def over_seeds(results: list[dict]) -> list[dict]:
    """One row per policy x budget: per metric the mean over seeds (``metric``; PSNR:
    of the mean squared error) and its interval (``metric + "_ci"``: ``t_interval``'s
    dict; none where a seed's value is infinite, as ``full``'s PSNR)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    out = []
    for (p, b), rs in groups.items():
        row = {"policy": p, "budget": b, "seeds": len(rs)}
        for m in METRICS:
            values = [r[m] for r in rs]
            row[m] = _mean(m, values)
            infinite = any(v is not None and math.isinf(float(v)) for v in values)
            row[m + "_ci"] = t_interval([]) if infinite else t_interval(values)
        out.append(row)
    return out


def interval_rows(table: list[dict]) -> list[dict]:
    """``intervals.csv``: per policy, budget and metric."""
    return [{"policy": r["policy"], "budget": r["budget"], "metric": m, "seeds": r[m + "_ci"]["n"],
             "mean": r[m], "ci95_low": r[m + "_ci"]["low"], "ci95_high": r[m + "_ci"]["high"]}
            for r in table for m in METRICS]


def by_setting(rows: list[dict]) -> dict[tuple, dict]:
    """The finished rows by (policy, budget), then by (prompt, seed): what ``compare`` pairs."""
    values: dict[tuple, dict] = {}
    for r in rows:
        if not r["error"]:
            values.setdefault((r["policy"], r["budget"]), {})[(r["prompt"], r["seed"])] = r
    return values


def comparisons(rows: list[dict], config: EvalConfig, metrics=COMPARED_METRICS) -> list[dict]:
    """``comparisons.csv``: every pair of policies at each budget, paired on (prompt, seed)."""
    values = by_setting(rows)
    out = []
    for b in config.budgets:
        for i, a in enumerate(config.policies):
            for other in config.policies[i + 1:]:
                out += [compare(values, a, other, b, m) for m in metrics]
    return out


def compare(values: dict, a: str, b: str, budget: int, metric: str) -> dict:
    """The paired difference a - b of ``metric`` at ``budget`` (``values``: per (policy,
    budget), the rows by (prompt, seed))."""
    pick = lambda p: {k: r.get(metric, math.nan) for k, r in values.get((p, budget), {}).items()}
    ci = t_interval(paired_by_seed(pick(a), pick(b)))
    return {"budget": budget, "metric": metric, "policy_a": a, "policy_b": b, "seeds": ci["n"],
            "mean_difference": ci["mean"], "ci95_low": ci["low"], "ci95_high": ci["high"],
            "verdict": verdict(ci, a, b)}


def fidelity_rows(rows: list[dict], reference: str | None) -> list[dict]:
    """``fidelity.csv``: per budget and scorer the mean over units (prompt x seed), for
    every layer and head and for all of them (``layer``/``head`` = "all", with its
    interval over seeds: per seed, the mean over prompts)."""
    by: dict[tuple, list[tuple]] = {}
    for r in rows:
        fid = r.get("shared_fidelity")
        if not fid or r["error"]:
            continue
        for scorer, m in fid["scorers"].items():
            by.setdefault((r["budget"], scorer), []).append(
                (r["prompt"], r["seed"], np.array(m["spearman"]), np.array(m["recall"])))
    out = []
    for (budget, scorer), units in sorted(by.items(), key=lambda kv: kv[0][0]):
        base = {"reference": reference, "budget": budget, "scorer": scorer, "units": len(units)}
        rho, rec = np.stack([u[2] for u in units]), np.stack([u[3] for u in units])
        per_seed = lambda k: [float(np.mean([u[k].mean() for u in units if u[1] == s]))
                              for s in sorted({u[1] for u in units})]
        ci_rho, ci_rec = t_interval(per_seed(2)), t_interval(per_seed(3))
        out.append({**base, "layer": "all", "head": "all", "seeds": ci_rho["n"],
                    "spearman": float(rho.mean()), "spearman_ci95_low": ci_rho["low"],
                    "spearman_ci95_high": ci_rho["high"], "topb_recall": float(rec.mean()),
                    "topb_recall_ci95_low": ci_rec["low"], "topb_recall_ci95_high": ci_rec["high"]})
        for layer in range(rho.shape[1]):
            for head in range(rho.shape[2]):
                out.append({**base, "layer": layer, "head": head, "seeds": ci_rho["n"],
                            "spearman": float(rho[:, layer, head].mean()),
                            "topb_recall": float(rec[:, layer, head].mean())})
    return out


# -- files ------------------------------------------------------------------------

def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return ""
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.6g}"
    return str(x)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in columns])


def cell(x, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def with_interval(mean: float, ci: dict, digits: int) -> str:
    """``0.750 ± 0.080`` (the t-interval is symmetric), or the mean alone without one."""
    if not math.isfinite(ci["low"]):
        return cell(mean, digits)
    return f"{cell(mean, digits)} ± {(ci['high'] - ci['low']) / 2:.{digits}f}"


QUALITY_COLUMNS = [("returns", "returns", 3), ("returns_tracked", "returns tracked", 3),
                   ("tracking", "tracking", 3), ("consistency", "consistency", 3),
                   ("rollout_psnr_vs_full", "PSNR vs full (dB)", 1),
                   ("attn_rel_err", "attn rel err", 3)]
COST_COLUMNS = [("proxy_spearman", "own-cache Spearman", 3),
                ("proxy_topb_recall", "own-cache top-B recall", 3),
                ("returns_events", "returns per run", 1), ("policy_ms_per_compression", "policy ms", 2),
                ("step_ms", "step ms", 1), ("policy_share_of_step", "policy / step", 3),
                ("peak_cache_tokens", "peak tokens", 0)]
CHOSEN = ("score_chosen_tokens", "score-chosen tokens", 0)


def _table(rows: list[dict], columns: list[tuple], intervals: bool) -> list[str]:
    """A markdown table of ``over_seeds`` rows: policy, budget, the tokens the score
    chose, then ``columns`` (mean ± half the 95% interval when ``intervals``)."""
    lines = ["| policy | budget | " + " | ".join(h for _, h, _ in (CHOSEN, *columns)) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in (CHOSEN, *columns)) + " |"]
    for r in rows:
        cells = [cell(r[CHOSEN[0]], CHOSEN[2])]
        cells += [with_interval(r[k], r[k + "_ci"], d) if intervals else cell(r[k], d)
                  for k, _, d in columns]
        lines.append(f"| {r['policy']} | {r['budget']} | " + " | ".join(cells) + " |")
    return lines


def markdown_tables(table: list[dict], comparisons_: list[dict], fidelity: list[dict],
                    config: EvalConfig) -> list[str]:
    """results.md's tables (after its header): quality with intervals, fidelity and cost,
    shared-cache fidelity, the paired comparisons of returns, the memory bar."""
    rows = sorted(table, key=lambda r: (r["budget"], config.policies.index(r["policy"])))
    chosen = {(r["policy"], r["budget"]): r["score_chosen_tokens"] for r in table}
    lines = ["## Quality (mean ± half the 95% interval over seeds)", "",
             *_table(rows, QUALITY_COLUMNS, True), "",
             "## Own-cache fidelity and cost (means over seeds)", "",
             *_table(rows, COST_COLUMNS, False), ""]
    overall = [f for f in fidelity if f["layer"] == "all"]
    if overall:
        lines += [f"## Shared-cache fidelity: every scorer rates {config.shared_reference()}'s caches",
                  "", "Mean ± half the 95% interval over seeds; per layer and head in fidelity.csv.",
                  "", "| scorer | budget | score-chosen tokens | Spearman | top-B recall |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for f in overall:
            ci = lambda k: {"low": f[f"{k}_ci95_low"], "high": f[f"{k}_ci95_high"]}
            lines.append(f"| {f['scorer']} | {f['budget']} | "
                         f"{cell(chosen.get((f['scorer'], f['budget'])), 0)} | "
                         f"{with_interval(f['spearman'], ci('spearman'), 3)} | "
                         f"{with_interval(f['topb_recall'], ci('topb_recall'), 3)} |")
        lines.append("")
    lines += _paired_table(comparisons_, config.policies)
    for metric in ("returns", "returns_tracked"):  # returns alone a frozen object can pass
        lines += memory_bar(table, comparisons_, metric)
    return lines


BASELINES = ("full", "window", "sink")  # results.md pairs every policy with these past MD_ALL_PAIRS
MD_ALL_PAIRS = 5  # policies up to which results.md shows every pair (comparisons.csv always does)


def difference_cell(c: dict | None) -> str:
    """A ``compare`` result for a table: ``+0.120 [+0.050, +0.190]``, ``≈`` when the two
    cannot be told apart."""
    if c is None or c["seeds"] == 0:
        return "–"
    if c["seeds"] < 2:
        return f"{c['mean_difference']:+.3f} (one seed)"
    text = f"{c['mean_difference']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]"
    return text + (" ≈" if c["verdict"] == APART else "")


def _paired_table(comparisons_: list[dict], policies: list[str]) -> list[str]:
    by = {(c["budget"], c["policy_a"], c["policy_b"], c["metric"]): c for c in comparisons_}
    pairs = list(dict.fromkeys((c["budget"], c["policy_a"], c["policy_b"]) for c in comparisons_))
    if len(policies) > MD_ALL_PAIRS:
        pairs = [p for p in pairs if p[1] in BASELINES or p[2] in BASELINES]
    if not pairs:
        return []
    shown = "every pair" if len(policies) <= MD_ALL_PAIRS else \
        f"pairs with {', '.join(b for b in BASELINES if b in policies)}"
    lines = ["## Paired comparisons (A − B on the same prompt and seed, 95% interval over seeds)",
             "", f"≈: the interval covers 0, the two cannot be told apart. Here {shown}; every "
             "pair and metric in comparisons.csv.", "",
             "| budget | A | B | returns | returns tracked | tracking |",
             "| ---: | --- | --- | ---: | ---: | ---: |"]
    for b, pa, pb in pairs:
        lines.append(f"| {b} | {pa} | {pb} | " + " | ".join(
            difference_cell(by.get((b, pa, pb, m))) for m in ("returns", "returns_tracked", "tracking")) + " |")
    return lines + [""]


def memory_bar(table: list[dict], comparisons_: list[dict], metric: str = "returns") -> list[str]:
    """The bar's verdicts per budget where ``full`` and ``window`` ran (see the module
    docstring); [] where they did not."""
    means = {(r["policy"], r["budget"]): r[metric] for r in table}
    paired = {(c["policy_a"], c["policy_b"], c["budget"]): c for c in comparisons_
              if c["metric"] == metric}
    lines = []
    for b in sorted({r["budget"] for r in table}):
        full, window = means.get(("full", b)), means.get(("window", b))
        if full is None or window is None or not (math.isfinite(full) and math.isfinite(window)):
            continue
        loss = full - window
        ok = lambda x: "yes" if x else "**no**"
        lines += [f"- budget {b}: full {full:.3f} "
                  f"(bar {BAR['full']:.2f}: {ok(full >= BAR['full'])}); the window {window:.3f}, "
                  f"a loss of {loss:.3f} = {loss / full if full > 0 else math.nan:.2f} of full's "
                  f"(bar {BAR['window_loss']:.2f}: {ok(full > 0 and loss >= BAR['window_loss'] * full)})"]
        for p in sorted({r["policy"] for r in table if r["budget"] == b} - {"full", "window"}):
            x = means[(p, b)]
            c = paired.get((p, "window", b)) or paired.get(("window", p, b))
            gain = ""
            if c is not None and c["seeds"] >= 2:  # as p − window (+ 0.0: no "-0.000")
                sign = 1 if c["policy_a"] == p else -1
                lo, mid, hi = sorted(sign * c[k] + 0.0 for k in ("ci95_low", "mean_difference",
                                                                 "ci95_high"))
                gain = f", {p} − window {mid:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            share = (x - window) / loss if loss > 0 else math.nan
            lines.append(f"  - {p}: {x:.3f}, recovers {cell(share, 2)} of the window's loss "
                         f"(bar {BAR['recovered']:.1f}: {ok(loss > 0 and share >= BAR['recovered'])}){gain}")
    if not lines:
        return []
    return [f"## Memory bar ({metric})", "",
            f"Full ≥ {BAR['full']:.2f}; the window loses ≥ {BAR['window_loss']:.2f} of full's "
            f"{metric}; a policy recovers ≥ {BAR['recovered']:.1f} of the window's loss.", "",
            *lines, ""]


def write_markdown(path: Path, table: list[dict], comparisons_: list[dict],
                   fidelity: list[dict], results: list[dict], config: EvalConfig,
                   seconds: float) -> None:
    lines = [f"# ffviz eval: {len(config.policies)} policies x budgets {config.budgets} "
             f"x {len(config.seeds)} seeds",
             "",
             f"{config.frames} frames, horizon {config.horizon}, queries of {config.query_steps} "
             f"denoising steps; each seed's value is the mean over {len(config.prompts)} prompts; "
             f"intervals are Student's t over seeds ({', '.join(map(str, config.seeds))}); "
             f"{seconds:.0f} s. Budgets in frames; `full` keeps everything (its row repeats per "
             "budget); `–` = not defined (no token scores, or no compression). Score-chosen "
             "tokens: kept tokens per head beyond the protected frames (0: the score decides "
             "nothing).",
             "",
             *markdown_tables(table, comparisons_, fidelity, config),
             "Prompts:", ""] + [f"- {p}" for p in config.prompts]
    variants = {label: v for label, v in config.variants.items() if label in config.policies}
    if variants:
        lines += ["", "Variants:", ""] + [
            f"- {label}: {v.policy} {' '.join(v.args)}"
            + (" (kept by recency: n_recent = budget − n_sink)" if v.recency else "")
            for label, v in variants.items()]
    errors = [r for r in results if r["errors"]]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {r['policy']} budget {r['budget']} seed {r['seed']}: "
                                             f"{r['errors']}" for r in errors]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plots(out_dir: Path, table: list[dict], policies: list[str]) -> list[Path]:
    """``plot_<metric>.png``: the metric (mean over seeds) against budget, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    """Every file (module docstring) from the grid's rows; returns eval.json's content
    (``about`` merged into its settings and counts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = with_shared_fidelity(rows)
    results = aggregate(rows)
    table = over_seeds(results)
    pairs = comparisons(rows, config)
    fidelity = fidelity_rows(rows, config.shared_reference())
    write_csv(out_dir / "runs.csv", rows, RUN_COLUMNS)
    write_csv(out_dir / "results.csv", results, RESULT_COLUMNS)
    write_csv(out_dir / "intervals.csv", interval_rows(table), INTERVAL_COLUMNS)
    write_csv(out_dir / "comparisons.csv", pairs, COMPARISON_COLUMNS)
    write_csv(out_dir / "fidelity.csv", fidelity, FIDELITY_COLUMNS)
    write_markdown(out_dir / "results.md", table, pairs, fidelity, results, config, seconds)
    plots = write_plots(out_dir, table, config.policies)
    summary = {"config": dataclasses.asdict(config), "seconds": round(seconds, 2),
               "runs": len(rows), "failed_runs": sum(bool(r["error"]) for r in rows), **about,
               "files": ["results.csv", "runs.csv", "intervals.csv", "comparisons.csv",
                         "fidelity.csv", "results.md", *[p.name for p in plots]]}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
