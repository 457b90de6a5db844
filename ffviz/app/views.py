"""What the app shows for a session, as plain data: images, figures, a status
line, drawn by ``ffviz.viz``. app.py maps these onto widgets; tests call them directly."""
from __future__ import annotations

from ffviz.app.session import RunSession, query_arrays
from ffviz.viz import figures as F
from ffviz.viz.cacheview import filmstrip, render_cache_view, upscale
from ffviz.viz.projections import projection_figure

PLOT_NAMES = ("drift", "projections", "scores", "timeline", "metrics")


def current_frame(session: RunSession):
    """The newest frame, shown big; None before the first chunk."""
    newest = session.frames.newest()
    return upscale(newest[-1]) if len(newest) else None


def live_views(session: RunSession) -> dict:
    """The big frame, the filmstrip and the cache view (cheap: every chunk; the
    cache view reads only the source frames it shows)."""
    v = session.view
    return {"frame": current_frame(session),
            "strip": filmstrip(session.frames.newest()),
            "cache": render_cache_view(session.snapshot, session.frames.all(), v["layer"], v["head"],
                                       session.cfg.grid)}


def plot_views(session: RunSession | None, metric: str = "frechet", reference: str = "first",
               projection: str = "pca") -> dict:
    """All live plots for the session's chosen layer/head (throttled by the app)."""
    if session is None:
        return {"drift": F.empty("Query drift", "no run yet"),
                "projections": F.empty("Query projections", "no run yet"),
                "scores": F.empty("Proxy scores", "no run yet"),
                "timeline": F.timeline_figure([]), "metrics": F.metrics_figure([])}
    layer, head = session.view["layer"], session.view["head"]
    q = query_arrays(session)
    drift = (F.drift_figure(*q, layer, head, session.switches, metric, reference) if q else
             F.drift_figure(None, None, None, None, None, layer, head))
    policy = session.steps[-1].policy if session.steps else ""
    return {"drift": drift,
            "projections": projection_figure(session.recorder, layer, head, projection),
            "scores": F.scores_figure(session.snapshot, layer, head, policy),
            "timeline": F.timeline_figure(session.timeline, session.switches),
            "metrics": F.metrics_figure(session.steps, session.switches)}


def status_line(session: RunSession) -> str:
    s = session.steps[-1] if session.steps else None
    if s is None:
        return "starting..."
    n = session.cfg.tokens_per_frame
    fps = len(session.frames) / max(s.elapsed, 1e-9)
    state = ("running" if session.running else "failed" if session.error else
             "stopped" if session.summary and session.summary["stopped_early"] else "done")
    return (f"**{state}** - frame {s.frame + 1}/{session.settings.frames} - policy `{s.policy}` "
            f"- budget {s.budget_frames} frames ({s.budget_frames * n} tokens) - cache "
            f"{s.tokens} tokens - {fps:.1f} frames/s - {len(session.switches)} switch(es)")


def summary_table(summary: dict) -> list[list]:
    """Rows (metric, value) of a run summary, for a table."""
    m = summary.get("metrics", {})
    rows = [["policy", summary["policy"]], ["budget (frames)", summary["budget_frames"]],
            ["frames", summary["frames"]], ["fps", summary["fps"]],
            ["peak cache tokens", summary["peak_cache_tokens"]],
            ["policy ms / chunk", summary["policy_ms_per_step"]]]
    for k in ("consistency", "background", "color_presence", "shape", "returns"):
        if m.get(k) is not None and m[k] == m[k]:  # skip undefined (None, NaN)
            rows.append([k, round(float(m[k]), 4)])
    if m.get("computed") is False:  # a model without scenes (Wan): no scene metrics
        rows.append(["scene metrics", "not computed (this model has no scenes)"])
    return rows


def write_plots_html(session: RunSession, path, extra: dict | None = None) -> str:
    figs = {k.capitalize(): v for k, v in plot_views(session).items()}
    figs.update(extra or {})
    path.write_text(F.plots_html(figs))
    return str(path)

