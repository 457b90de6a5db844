"""Quality over time: per-frame consistency and tracking of one or more runs, where
the scene hides an object and whether each run brings it back; and quality
against cache size across runs and budgets. Plain data in, figures out.

A run is a dict: label, policy, frames, consistency, tracking (per frame, None
where undefined), returns (``metrics`` return events: name, left, back,
recovered). Hides are the scene's truth: name, left, back.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ffviz.viz.colors import DROPPED, KEPT, policy_color
from ffviz.viz.figures import _layout, empty, mark_switches, stamp

MISSED = "#c0392b"


def mark_hides(fig: go.Figure, hides: list[dict], **where) -> go.Figure:
    """A grey band where an object is hidden and a dashed line where it returns."""
    for k, h in enumerate(hides):  # labels alternate top / bottom: overlapping spans stay legible
        fig.add_vrect(x0=h["left"] - 0.5, x1=h["back"] - 0.5, fillcolor=DROPPED, opacity=0.15,
                      line_width=0, annotation_text=f"{h['name']} hidden",
                      annotation_position="inside top left" if k % 2 == 0 else "inside bottom left",
                      annotation_font={"size": 10, "color": "#555"}, **where)
        fig.add_vline(x=h["back"] - 0.5, line={"dash": "dash", "color": "#555", "width": 1},
                      **where)
    return fig


def _per_frame(fig: go.Figure, runs: list[dict], row: int, col: int) -> None:
    for k, r in enumerate(runs):
        colour = policy_color(r["policy"])
        fig.add_trace(go.Scatter(x=r["frames"], y=r["consistency"], name=f"{r['label']} consistency",
                                 legendgroup=r["label"], line={"color": colour, "width": 2},
                                 connectgaps=False), row, col)
        fig.add_trace(go.Scatter(x=r["frames"], y=r["tracking"], name=f"{r['label']} tracking",
                                 legendgroup=r["label"], line={"color": colour, "width": 1.5,
                                                               "dash": "dot"}), row, col)
        # did it bring the object back? one mark per return, one row of marks per run
        ev = r.get("returns") or []
        if ev:
            fig.add_trace(go.Scatter(
                x=[e["back"] for e in ev], y=[1.06 + 0.08 * k] * len(ev), mode="markers+text",
                text=["back" if e["recovered"] else "lost" for e in ev], textposition="middle right",
                textfont={"size": 10, "color": colour},
                marker={"symbol": ["circle" if e["recovered"] else "x" for e in ev], "size": 9,
                        "color": [KEPT if e["recovered"] else MISSED for e in ev]},
                name=f"{r['label']}: returns", legendgroup=r["label"], showlegend=False,
                hovertemplate=[f"{r['label']}: {e['name']} back at frame {e['back']} - "
                               f"{'its colour shows again' if e['recovered'] else 'not brought back'}"
                               "<extra></extra>" for e in ev]), row, col)
    top = 1.1 + 0.08 * len(runs)
    fig.update_yaxes(range=[-0.02, top], title_text="share (1 = as the scene)", row=row, col=col)
    fig.update_xaxes(title_text="frame", row=row, col=col)


def quality_figure(runs: list[dict], hides=(), switches=(), points=(), label: str = "",
                   title: str = "Quality over time") -> go.Figure:
    """Left: per-frame consistency (solid) and tracking (dotted) of each run, hidden
    spans shaded, each return marked back / lost per run. Right (with ``points``):
    quality against cache size (``quality_vs_cache``)."""
    runs = [r for r in runs if r and r.get("frames")]
    if not runs:
        return empty(title, "press Generate (or the memory test): quality appears after "
                            "the first generated frame")
    fig = make_subplots(rows=1, cols=2 if points else 1,
                        column_widths=[0.64, 0.36] if points else None,
                        subplot_titles=("per frame", "against cache size") if points else None)
    _per_frame(fig, runs, 1, 1)
    mark_hides(fig, list(hides), row=1, col=1)
    mark_switches(fig, list(switches), row=1, col=1)
    if points:
        _against_cache(fig, list(points), 1, 2)
    hint = ("consistency: background and colours as the scene has them; tracking: objects "
            "where the scene has them. Grey: an object is hidden; back / lost: did the run "
            "bring it back")
    fig = _layout(fig, title, hint, height=400)
    fig.update_layout(legend={"y": -0.28}, margin={"b": 90})  # the legend clear of the axis title
    return stamp(fig, label)


def _against_cache(fig: go.Figure, points: list[dict], row: int, col: int) -> None:
    by_policy: dict[str, list[dict]] = {}
    for p in points:
        by_policy.setdefault(p["policy"], []).append(p)
    for policy, ps in by_policy.items():
        ps = sorted(ps, key=lambda p: p["cache_tokens"])
        colour = policy_color(policy)
        hover = [f"{p['run']}<br>cache {p['cache_tokens']} tokens<extra></extra>" for p in ps]
        fig.add_trace(go.Scatter(x=[p["cache_tokens"] for p in ps], y=[p["consistency"] for p in ps],
                                 mode="lines+markers", name=f"{policy} consistency",
                                 line={"color": colour}, marker={"size": 8},
                                 hovertemplate=[f"consistency %{{y:.3f}}<br>{h}" for h in hover]),
                      row, col)
        fig.add_trace(go.Scatter(x=[p["cache_tokens"] for p in ps], y=[p["tracking"] for p in ps],
                                 mode="lines+markers", name=f"{policy} tracking",
                                 line={"color": colour, "dash": "dot"},
                                 marker={"size": 8, "symbol": "circle-open"},
                                 hovertemplate=[f"tracking %{{y:.3f}}<br>{h}" for h in hover]),
                      row, col)
    fig.update_xaxes(title_text="peak cache (tokens per head)", rangemode="tozero", row=row, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=row, col=col)
