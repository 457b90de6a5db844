"""One ablation command: what each part of a scored policy contributes (``python -m ffviz ablate``).

For ``future_forcing`` or ``expected_attention``, each variant changes one thing
from the policy's defaults (one factor at a time):

* score and merge: the defaults, the score only (``tau=0``), the merge only (the
  kept tokens by recency: n_recent fills the budget beyond the sink, evicted tokens
  still merge; ``evaluate.Variant.recency``), both (``tau`` of Future Forcing's
  default where the policy does not merge by default);
* ``horizon`` 1 / 2 / 4, ``rank`` 0 / 1 / 2, ``stride`` 1 / 2, ``statistics``
  current / historical: every value of ``AXES`` other than the default, for the
  parameters the policy has.

The variants, with baselines (full, window, sink by default), run through the eval
sweep (``sweep.run_sweep``: the same units, store, resuming and backends), on the
tuning suite and seeds (``suites``) by default, and every scored variant also rates
the fidelity reference's caches (shared-cache fidelity). Besides eval's files,
``ablation.md`` is one table: per budget and variant, what it changed, the tokens its
score chose, quality with intervals over seeds, fidelity on shared caches, cost, and
its paired difference in returns from the defaults.
"""
from __future__ import annotations

from pathlib import Path

from ffviz.eval_report import (aggregate, by_setting, cell, compare, difference_cell, over_seeds,
                               with_interval, with_shared_fidelity, write_results)
from ffviz.evaluate import EvalConfig, EvalError, Variant
from ffviz.policies import POLICIES, make_policy

ABLATED = ("future_forcing", "expected_attention")
AXES = {"horizon": (1, 2, 4), "rank": (0, 1, 2), "stride": (1, 2),
        "statistics": ("current", "historical")}
# merging for a policy that does not merge by default: Future Forcing's tau
MERGE_TAU = f"tau={POLICIES['future_forcing'].tau:g}"
DEFAULTS = "defaults"


def variants(policy: str) -> dict[str, Variant]:
    """Label -> variant of ``policy``, the defaults first."""
    if policy not in ABLATED:
        raise EvalError(f"ablate takes {' or '.join(ABLATED)}, got {policy!r}")
    defaults = make_policy(policy).params()
    label = lambda what: f"{policy}:{what}"
    out = {label(DEFAULTS): Variant(policy)}
    merges = defaults["tau"] > 0
    if merges:
        out[label("score only (tau=0)")] = Variant(policy, ("tau=0",))
        out[label("merge only (recency)")] = Variant(policy, recency=True)
    else:
        out[label("merge only (recency)")] = Variant(policy, (MERGE_TAU,), recency=True)
        out[label(f"score + merge ({MERGE_TAU})")] = Variant(policy, (MERGE_TAU,))
    for name, values in AXES.items():
        for value in values:
            if name in defaults and value != defaults[name]:
                out[label(f"{name}={value}")] = Variant(policy, (f"{name}={value}",))
    return out


def ablation_config(policy: str, baselines: list[str], **settings) -> EvalConfig:
    """The eval grid of ``policy``'s variants after ``baselines`` (``settings``: the
    rest of ``EvalConfig``)."""
    found = variants(policy)
    for b in baselines:
        if b not in POLICIES:
            raise EvalError(f"unknown baseline {b!r}; choose among: {', '.join(POLICIES)}")
    return EvalConfig(policies=[*baselines, *found], variants=found, **settings)


TABLE = [("returns", "returns", 3), ("returns_tracked", "returns tracked", 3),
         ("tracking", "tracking", 3), ("rollout_psnr_vs_full", "PSNR vs full", 1),
         ("attn_rel_err", "attn err", 3), ("shared_spearman", "shared Spearman", 3),
         ("shared_topb_recall", "shared top-B", 3)]


def ablation_table(rows: list[dict], config: EvalConfig) -> list[str]:
    """``ablation.md``'s lines (the module docstring says what is in it)."""
    rows = with_shared_fidelity(rows)
    table = {(r["policy"], r["budget"]): r for r in over_seeds(aggregate(rows))}
    values = by_setting(rows)
    defaults = next(label for label in config.policies if label.endswith(":" + DEFAULTS))
    head = ["budget", "variant", "changes", "score-chosen tokens", *(h for _, h, _ in TABLE),
            "policy ms", "returns − defaults"]
    lines = ["| " + " | ".join(head) + " |",
             "| ---: | --- | --- | " + " | ".join("---:" for _ in head[3:]) + " |"]
    for b in config.budgets:
        for label in config.policies:
            r = table.get((label, b))
            if r is None:
                continue
            v = config.variants.get(label)
            changes = "–" if v is None else (" ".join(v.args) or "–") + (
                " (kept by recency)" if v.recency else "")
            diff = difference_cell(compare(values, label, defaults, b, "returns")
                                   if label != defaults else None)
            cells = [with_interval(r[k], r[k + "_ci"], d) for k, _, d in TABLE]
            lines.append(f"| {b} | {label} | {changes} | {cell(r['score_chosen_tokens'], 0)} | "
                         + " | ".join(cells)
                         + f" | {cell(r['policy_ms_per_compression'], 2)} | {diff} |")
    return lines


def ablation_report(command: str):
    """A ``run_sweep`` report: eval's files, then ``ablation.md``."""
    def report(out_dir, rows, config, seconds, about):
        summary = write_results(out_dir, rows, config, seconds, about)
        write_ablation(out_dir, rows, config, command)
        summary["files"].append("ablation.md")
        return summary
    return report


def write_ablation(out_dir: Path, rows: list[dict], config: EvalConfig, command: str) -> Path:
    """``ablation.md``: the command and the table."""
    path = Path(out_dir) / "ablation.md"
    text = [f"# ffviz ablate: {config.policy_name(config.policies[-1])}", "",
            f"    {command}", "",
            f"{config.frames} frames, {len(config.prompts)} prompts x seeds "
            f"{', '.join(map(str, config.seeds))}; mean ± half the 95% interval over seeds "
            "(Student's t; each seed the mean over prompts). Score-chosen tokens: kept tokens "
            "per head beyond the protected frames. Shared Spearman / top-B: the variant's score "
            f"on {config.shared_reference()}'s caches against the true future attention "
            "(fidelity.csv per layer and head). Returns − defaults: paired on (prompt, seed), "
            "95% interval over seeds; ≈ = cannot be told apart.", "",
            *ablation_table(rows, config), "", "Prompts:", "", *[f"- {p}" for p in config.prompts]]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path
