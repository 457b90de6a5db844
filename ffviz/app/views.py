"""What the app shows for a session, as plain data: images, figures, a status
line, drawn by ``ffviz.viz``. app.py maps these onto widgets; tests call them directly.
Every figure of a run carries the run's label (``RunTag.text``)."""
from __future__ import annotations

import json

import numpy as np

from ffviz.app.cache_history import CacheStep, capture
from ffviz.app.provenance import budget_text, holds_budget, plural
from ffviz.app.quality import QualityLog, curves
from ffviz.app.session import RunSession, query_arrays
from ffviz.export import json_safe
from ffviz.viz import figures as F
from ffviz.viz.cacheview import cache_figure, filmstrip, upscale
from ffviz.viz.projections import projection_figure
from ffviz.viz.quality import quality_figure

PLOT_NAMES = ("quality", "cache", "drift", "projections", "scores", "timeline", "heads", "metrics")


def current_frame(session: RunSession):
    """The newest frame, shown big; None before the first chunk."""
    newest = session.frames.newest()
    return upscale(newest[-1]) if len(newest) else None


def frame_caption(session: RunSession) -> str:
    """The big frame's label: which frame, and whether the model made it."""
    n, g = len(session.frames), session.cfg.given_frames
    if not n:
        return "current frame"
    return f"frame {n - 1}: " + ("given" if n - 1 < g else "generated")


def live_views(session: RunSession) -> dict:
    """The big frame and the filmstrip (cheap: every chunk)."""
    newest = session.frames.newest()
    return {"frame": current_frame(session),
            "strip": filmstrip(newest, last=6, first=len(session.frames) - len(newest),
                               given=session.cfg.given_frames)}


def cache_step(session: RunSession, index: int | None = None) -> CacheStep | None:
    """Compression step ``index`` of the run's history, or (None) the newest chunk."""
    if index is not None and 0 <= index < len(session.cache_history):
        return session.cache_history[index]
    return None if session.snapshot is None else capture(session.snapshot)


def cache_view(session: RunSession | None, step: CacheStep | None = None, merges: bool = False):
    """The cache view of the session's layer/head at ``step`` (default: the step the
    user picked with the scrubber, else the newest)."""
    if session is None:
        return cache_figure(None, None, (1, 1), 0, 0)
    layer, head = session.view["layer"], session.view["head"]
    step = step or cache_step(session, session.view.get("cache_step"))
    tokens = None if step is None else step.tokens(layer, head)
    return cache_figure(tokens, session.frames.all(), session.cfg.grid, layer, head,
                        given=session.cfg.given_frames, merges=merges or session.view.get("merges", False),
                        label=session.tag.text(), steps_kept=len(session.cache_history))


def quality_view(session: RunSession | None, log: QualityLog | None = None):
    """The headline plot: this run's per-frame quality (with the same scene's earlier
    runs of this user, to compare policies), where objects hide, and quality against
    cache size over the user's finished runs."""
    if session is None:
        return quality_figure([])
    own = curves(session, f"{session.tag.run_id} {session.tag.policy}")
    earlier = log.same_scene(session, exclude=session.tag.text()) if log else []
    points = log.as_dicts() if log and log.points else ()
    return quality_figure([*earlier, own] if own else [], session.hides, session.switches, points,
                          session.tag.text())


def plot_views(session: RunSession | None, metric: str = "frechet", reference: str = "first",
               projection: str = "pca", log: QualityLog | None = None) -> dict:
    """All live plots for the session's chosen layer/head (throttled by the app)."""
    if session is None:
        return {"quality": quality_figure([]), "cache": cache_view(None),
                "drift": F.empty("Query drift", "no run yet"),
                "projections": F.empty("Query projections", "no run yet"),
                "scores": F.empty("Proxy scores", "no run yet"),
                "timeline": F.timeline_figure([]), "metrics": F.metrics_figure([]),
                "heads": F.heads_figure({}, 0, 0), "heads_table": []}
    layer, head, label = session.view["layer"], session.view["head"], session.tag.text()
    heads = session.head_measures()
    q = query_arrays(session)
    drift = (F.drift_figure(*q, layer, head, session.switches, metric, reference, label) if q else
             F.drift_figure(None, None, None, None, None, layer, head, label=label))
    policy = session.steps[-1].policy if session.steps else ""
    newest = cache_step(session)
    return {"quality": quality_view(session, log),
            "cache": cache_view(session, step=cache_step(session, session.view.get("cache_step"))
                                if session.view.get("cache_step") is not None else newest),
            "drift": drift,
            "projections": projection_figure(session.recorder, layer, head, projection, label),
            "scores": F.scores_figure(None if newest is None else newest.tokens(layer, head),
                                      layer, head, policy, label),
            "timeline": F.timeline_figure(session.timeline, session.switches, label),
            "metrics": F.metrics_figure(session.steps, session.switches, label),
            "heads": F.heads_figure(heads, layer, head, label=label),
            "heads_table": heads_table(heads)}


def heads_table(measures: dict) -> list[list]:
    """Rows of the Heads tab's table: layer, then per head its role and score (and
    budget share); a click on a cell picks that layer and head."""
    score = measures.get("score")
    if score is None:
        return []
    share = measures.get("share")
    rows = []
    for l in range(score.shape[0]):
        cells = []
        for h in range(score.shape[1]):
            if np.isnan(score[l, h]):
                cells.append("-")
                continue
            role = "static" if measures["static"][l, h] else "dynamic"
            cells.append(f"{role} {score[l, h]:.2f}" + (f", {share[l, h]:.2f}x" if share is not None else ""))
        rows.append([f"L{l}", *cells])
    return rows


def status_line(session: RunSession) -> str:
    """State, progress, policy, budget, cache and speed, under the run's label and prompt."""
    s = session.steps[-1] if session.steps else None
    head = f"{session.tag.text()} - \"{session.settings.prompt}\", seed {session.settings.seed}"
    if s is None:
        return f"**starting...** - {head}"
    n = session.cfg.tokens_per_frame
    fps = len(session.frames) / max(s.elapsed, 1e-9)
    state = ("running" if session.running else "failed" if session.error else
             "stopped" if session.summary and session.summary["stopped_early"] else "done")
    tokens = f" ({s.budget_frames * n} tokens)" if holds_budget(s.policy) else ""
    return (f"**{state}** - frame {s.frame + 1}/{session.settings.frames} - policy `{s.policy}` "
            f"- budget {budget_text(s.policy, s.budget_frames)}{tokens} - cache {s.tokens} tokens "
            f"- {fps:.1f} frames/s - {plural(len(session.switches), 'switch')}  \n{head}")


def summary_table(summary: dict) -> list[list]:
    """Rows (metric, value) of a run summary, for a table."""
    m = summary.get("metrics", {})
    rows = [["policy", summary["policy"]], ["budget", budget_text(summary["policy"], summary["budget_frames"])],
            ["frames", summary["frames"]], ["fps", summary["fps"]],
            ["peak cache tokens", summary["peak_cache_tokens"]],
            ["policy ms / chunk", summary["policy_ms_per_step"]]]
    for k in ("consistency", "tracking", "background", "color_presence", "shape", "returns"):
        if m.get(k) is not None and m[k] == m[k]:  # skip undefined (None, NaN)
            rows.append([k, round(float(m[k]), 4)])
    if m.get("computed") is False:  # a model without scenes (Wan): no scene metrics
        rows.append(["scene metrics", "not computed (this model has no scenes)"])
    return rows


def oracle_summary(result: dict, tag) -> dict:
    """oracle.json: which run, and its fidelity per compression step (means over layers
    and heads), strict JSON."""
    if not result.get("steps"):
        return json_safe({"run": tag.as_dict(), "steps": 0, "message": result.get("message")})
    return json_safe({
        "run": tag.as_dict(), "horizon": result["horizon"], "steps": result["steps"],
        "recency_stood_in": result["recency"], "frames": result["frames"].tolist(),
        "spearman": result["spearman"].mean((1, 2)).round(4).tolist(),
        "recall": result["recall"].mean((1, 2)).round(4).tolist(),
        "mean_spearman": float(result["spearman"].mean()), "mean_recall": float(result["recall"].mean())})


def write_json(path, data: dict) -> str:
    """Strict JSON (NaN becomes null; a NaN that slipped through fails here, not in a reader)."""
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return str(path)


def write_plots_html(session: RunSession, path, extra: dict | None = None,
                     log: QualityLog | None = None) -> str:
    figs = {k.capitalize(): v for k, v in plot_views(session, log=log).items() if k in PLOT_NAMES}
    figs.update(extra or {})
    path.write_text(F.plots_html(figs), encoding="utf-8")
    return str(path)
