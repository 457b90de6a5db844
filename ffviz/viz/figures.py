"""Plotly figures: each takes plain data and returns a figure.

Every figure carries a one-line subtitle saying what to look for, and marks
live switches (policy or budget changed mid-run) with the same dotted line.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ffviz.stats import drift
from ffviz.viz.colors import DROPPED, KEPT, MERGED, POST, PRE, STATE_COLORS, SWITCH

HEIGHT = 340


def _layout(fig: go.Figure, title: str, hint: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(
        title={"text": f"{title}<br><sup>{hint}</sup>", "x": 0.01, "font": {"size": 15}},
        height=height, margin={"l": 50, "r": 20, "t": 70, "b": 40}, template="plotly_white",
        legend={"orientation": "h", "y": -0.2})
    return fig


def stamp(fig: go.Figure, label: str) -> go.Figure:
    """Put the run's label (``RunTag.text``) on the figure's title line: a result left
    on screen still says which run it came from."""
    if label:
        head, sep, rest = (fig.layout.title.text or "").partition("<br>")
        fig.layout.title.text = (f"{head} <span style='font-size:11px;color:#777'>[{label}]</span>"
                                 f"{sep}{rest}")
    return fig


def empty(title: str, message: str, label: str = "") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return stamp(_layout(fig, title, "", height=260), label)


def mark_switches(fig: go.Figure, switches: list[dict], **where) -> go.Figure:
    """A dotted vertical line at every live switch, labelled with what it switched to: a
    policy and budget, or a prompt (``{"frame", "prompt", "recache"}``)."""
    for s in switches:
        text = (f"prompt: {_short(s['prompt'])} ({s.get('recache', 'none')})" if "prompt" in s
                else f"{s['policy']} @ {s['budget_frames']}f")
        fig.add_vline(x=s["frame"] - 0.5, line={"dash": "dot", "color": SWITCH, "width": 1.5},
                      annotation_text=text, annotation_font={"size": 10, "color": SWITCH}, **where)
    return fig


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def drift_figure(frames, mean_pre, var_pre, mean_post, var_post, layer: int, head: int,
                 switches=(), metric: str = "frechet", reference: str = "first",
                 label: str = "") -> go.Figure:
    """Drift of pre- vs post-RoPE query statistics over frames.

    frames (F,); means/vars (F, L, H, d). Left: averaged over layers and heads
    (solid) and the chosen layer/head (dashed). Right: per layer x head, the
    post/pre drift ratio at the newest frame.
    """
    if frames is None or len(frames) < 2:
        return empty(f"Query drift ({metric})", "drift appears after two generated frames", label)
    # the first recorded frame is the first generated one (the given frames are not recorded)
    against = f"frame {int(frames[0])}" if reference == "first" else "the frames before"
    title = f"Query drift ({metric}, each frame vs {against})"
    d_pre = drift(mean_pre, var_pre, reference, metric)  # (F, L, H)
    d_post = drift(mean_post, var_post, reference, metric)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32],
                        subplot_titles=("per frame", "post / pre at the newest frame"))
    x = np.asarray(frames)
    for name, d, colour in (("pre-RoPE", d_pre, PRE), ("post-RoPE", d_post, POST)):
        fig.add_trace(go.Scatter(x=x, y=d.mean((1, 2)), name=f"{name} (all heads)",
                                 line={"color": colour, "width": 2.5}), 1, 1)
        fig.add_trace(go.Scatter(x=x, y=d[:, layer, head], name=f"{name} L{layer}H{head}",
                                 line={"color": colour, "dash": "dash", "width": 1.2}), 1, 1)
    ratio = (d_post[-1] + 1e-9) / (d_pre[-1] + 1e-9)
    L, H = ratio.shape
    fig.add_trace(go.Heatmap(z=np.log10(ratio), x=[f"H{h}" for h in range(H)],
                             y=[f"L{l}" for l in range(L)], colorscale="RdBu_r", zmid=0,
                             colorbar={"title": "log10", "len": 0.8},
                             text=np.round(ratio, 1), texttemplate="%{text}x",
                             hovertemplate="%{y} %{x}: post/pre = %{text}x<extra></extra>"), 1, 2)
    fig.update_xaxes(title_text="frame", row=1, col=1)
    fig.update_yaxes(title_text=f"{metric} distance to {against}", row=1, col=1)
    mark_switches(fig, list(switches), row=1, col=1)
    return stamp(_layout(fig, title, "pre-RoPE statistics stay flat while post-RoPE ones move: "
                                     "the stationarity future-query proxies rely on"), label)


def scores_figure(tokens: dict | None, layer: int, head: int, policy: str = "",
                  label: str = "") -> go.Figure:
    """The policy's proxy score of every token it looked at (one layer/head):
    x = source frame (jittered by grid position), colour = kept / merged / dropped.
    ``tokens``: one head's arrays (``CacheStep.tokens``)."""
    title = f"Proxy scores over the cache (L{layer} H{head})"
    if tokens is None:
        return empty(title, "no run yet")
    if not tokens["compressed"]:
        return empty(title, f"step {tokens['step']}: the cache fits the budget, nothing to score", label)
    if tokens["score"] is None:
        return empty(title, f"policy {policy or '?'} gives no per-token score "
                            "(it keeps by recency); the cache view shows its choice", label)
    fr, score, state = tokens["frame"], tokens["score"], tokens["state"]
    cols = int(tokens["col"].max()) + 1
    n_pos = cols * (int(tokens["row"].max()) + 1)
    pos = (tokens["row"] * cols + tokens["col"]) / max(n_pos, 1)
    fig = go.Figure()
    for k, name in enumerate(("kept", "merged", "dropped")):
        m = state == k
        if m.any():
            fig.add_trace(go.Scatter(
                x=fr[m] + 0.8 * (pos[m] - 0.5), y=score[m], mode="markers", name=name,
                marker={"color": STATE_COLORS[name], "size": 5, "opacity": 0.8},
                hovertemplate="frame %{x:.0f}<br>score %{y:.4g}<extra>" + name + "</extra>"))
    fig.update_xaxes(title_text="source frame")
    fig.update_yaxes(title_text="score")
    return stamp(_layout(fig, title, f"step {tokens['step']} (newest frame {tokens['frame_now']}): "
                                     "what the policy believes future queries will attend to"), label)


def timeline_figure(timeline: list[tuple[int, dict]], switches=(), label: str = "") -> go.Figure:
    """Cache timeline: y = source frame, x = generation time (newest frame),
    cell = share of the source frame's tokens still cached (all layers and heads)."""
    title = "Cache timeline"
    if not timeline:
        return empty(title, "no run yet")
    xs = [t for t, _ in timeline]
    top = max(max(xs), max((max(d) for _, d in timeline if d), default=0))
    z = np.full((top + 1, len(xs)), np.nan)
    for i, (_, shares) in enumerate(timeline):
        for src, share in shares.items():
            z[src, i] = share
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=list(range(top + 1)), zmin=0, zmax=1,
                               colorscale=[[0, "#f7fcf5"], [1, KEPT]],
                               colorbar={"title": "kept"},
                               hovertemplate="at frame %{x}: %{z:.0%} of frame %{y}<extra></extra>"))
    fig.update_xaxes(title_text="generation time (newest frame)")
    fig.update_yaxes(title_text="source frame")
    mark_switches(fig, list(switches))
    return stamp(_layout(fig, title, "which frames' tokens survive as the run goes: a window is "
                                     "a diagonal band, sinks are flat rows, scoring policies leave "
                                     "gaps"), label)


def metrics_figure(steps, switches=(), label: str = "") -> go.Figure:
    """Speed (the model's per chunk, and the whole run's), cache tokens and bytes, and
    policy time per chunk. The first chunk (the given frames, rendered, not generated)
    has no generation speed: it is left out of the speed panel."""
    title = "Run metrics"
    if not steps:
        return empty(title, "no run yet")
    x = [s.frame for s in steps]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("frames / s", "cache", "policy ms / chunk"),
                        specs=[[{}, {"secondary_y": True}, {}]])
    gen = [s for s in steps if s.index > 0]
    fig.add_trace(go.Scatter(x=[s.frame for s in gen], y=[s.n_frames / max(s.seconds, 1e-9) for s in gen],
                             name="per chunk (model + policy)", line={"color": "#444"}), 1, 1)
    fig.add_trace(go.Scatter(x=[s.frame for s in gen], y=[(s.frame + 1) / max(s.elapsed, 1e-9) for s in gen],
                             name="whole run (wall clock, with the app's views)",
                             line={"color": "#444", "dash": "dot"}), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=[s.tokens_peak for s in steps], name="tokens before policy",
                             line={"color": DROPPED}), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=[s.tokens for s in steps], name="tokens after policy",
                             line={"color": KEPT}), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=[s.kv_bytes / 1e6 for s in steps], name="KV MB",
                             line={"color": MERGED, "dash": "dot"}), 1, 2, secondary_y=True)
    fig.add_trace(go.Scatter(x=x, y=[s.policy_ms for s in steps], name="policy ms",
                             line={"color": SWITCH}), 1, 3)
    for c in (1, 2, 3):
        fig.update_xaxes(title_text="frame", row=1, col=c)
        mark_switches(fig, list(switches), row=1, col=c)
    fig.update_yaxes(title_text="MB", secondary_y=True, row=1, col=2)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    return stamp(_layout(fig, title, "the cost side: a budgeted cache stays flat while the full one "
                                     "grows"), label)


def oracle_figure(result: dict | None, layer: int, head: int, label: str = "") -> go.Figure:
    """Proxy score vs true future attention share (one step, layer, head) and
    Spearman / top-B recall over the run (mean over layers and heads)."""
    title = "Oracle: proxy vs true future attention"
    if result is None:
        return empty(title, "finish a run, then press 'Run oracle'")
    if not result["steps"]:
        return empty(title, result.get("message", "no compression happened in this run"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"step at frame {result['scatter_frame']} (L{layer} H{head})", "fidelity over the run"))
    sc = result["scatter"][layer][head]
    state_colour = np.where(sc["kept"], KEPT, DROPPED)
    fig.add_trace(go.Scatter(x=sc["truth"], y=sc["score"], mode="markers", name="tokens",
                             marker={"color": state_colour, "size": 5, "opacity": 0.75},
                             hovertemplate="true %{x:.3g}<br>proxy %{y:.3g}<extra></extra>"), 1, 1)
    frames = result["frames"]
    fig.add_trace(go.Scatter(x=frames, y=result["spearman"].mean((1, 2)), name="Spearman",
                             line={"color": PRE}), 1, 2)
    fig.add_trace(go.Scatter(x=frames, y=result["recall"].mean((1, 2)), name="top-B recall",
                             line={"color": KEPT}), 1, 2)
    fig.add_trace(go.Scatter(x=frames, y=result["spearman"][:, layer, head],
                             name=f"Spearman L{layer}H{head}", line={"color": PRE, "dash": "dash"}), 1, 2)
    fig.update_xaxes(title_text="true future attention share", type="log", row=1, col=1)
    fig.update_yaxes(title_text="proxy score" + (" (recency)" if result["recency"] else ""),
                     row=1, col=1)
    fig.update_xaxes(title_text="frame", row=1, col=2)
    fig.update_yaxes(range=[-1.05, 1.05], row=1, col=2)
    s, r = result["spearman"].mean(), result["recall"].mean()
    return stamp(_layout(fig, title, f"mean Spearman {s:.3f}, mean top-B recall {r:.3f} "
                                     f"(horizon {result['horizon']} frames): how well the policy's "
                                     "guess ranks what the future really attends to", height=380),
                 label)


def ab_figure(a_steps, b_steps, a_name: str, b_name: str, label: str = "") -> go.Figure:
    """Two runs on the same prompt and seed: cache tokens and policy time per chunk."""
    title = f"A/B: {a_name} vs {b_name}"
    if not a_steps and not b_steps:
        return empty(title, "press 'Run A/B'")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cache tokens after policy", "policy ms / chunk"))
    for steps, name, colour in ((a_steps, f"A {a_name}", PRE), (b_steps, f"B {b_name}", POST)):
        x = [s.frame for s in steps]
        fig.add_trace(go.Scatter(x=x, y=[s.tokens for s in steps], name=name,
                                 line={"color": colour}), 1, 1)
        fig.add_trace(go.Scatter(x=x, y=[s.policy_ms for s in steps], name=name,
                                 line={"color": colour}, showlegend=False), 1, 2)
    return stamp(_layout(fig, title, "same prompt, seed and budget; quality is in the plot above and "
                                     "the table"), label)


def heads_figure(measures: dict, layer: int, head: int, threshold: float = 0.8,
                 label: str = "") -> go.Figure:
    """Layer x head: colour = Forcing-KV's score (attention on the newest frames over all
    after the sink), letter = role (S static, D dynamic), and each head's budget share
    under adaptive budgets when given; the selected layer and head framed.
    measures: (L, H) arrays "score", "entropy", "older_share", "static", optional "share"."""
    title = "Head roles"
    score = measures.get("score")
    if score is None or np.isnan(score).all():
        return empty(title, "no run yet, or no chunk that reaches past the sink", label)
    L, H = score.shape
    share = measures.get("share")
    text = np.empty((L, H), dtype=object)
    hover = np.empty((L, H), dtype=object)
    for l in range(L):
        for h in range(H):
            role = "S" if measures["static"][l, h] else "D"
            text[l, h] = role + (f"<br>{share[l, h]:.2f}x" if share is not None else "")
            hover[l, h] = (f"L{l} H{h}: {'static' if role == 'S' else 'dynamic'}<br>"
                           f"score {score[l, h]:.3f} (static at >= {threshold})<br>"
                           f"entropy {measures['entropy'][l, h]:.2f}<br>"
                           f"older frames {measures['older_share'][l, h]:.0%} of its attention"
                           + (f"<br>budget share {share[l, h]:.2f}x uniform" if share is not None else ""))
    fig = go.Figure(go.Heatmap(z=score, x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
                               zmin=0, zmax=1, colorscale="Viridis", text=text, customdata=hover,
                               texttemplate="%{text}", hovertemplate="%{customdata}<extra></extra>",
                               colorbar={"title": "score"}))
    fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                  line={"color": "red", "width": 3})
    fig.update_yaxes(autorange="reversed")
    hint = ("S: static head (attends to the newest frames: needs little memory), D: dynamic "
            "(reaches back) - " + ("N.NNx: share of a uniform budget" if share is not None else
                                   "pick a head in the table below to see its cache"))
    return stamp(_layout(fig, title, hint, height=120 + 60 * L), label)


def plots_html(figures: dict[str, go.Figure]) -> str:
    """All figures in one self-contained HTML page (plotly.js inlined once)."""
    parts, first = [], True
    for name, fig in figures.items():
        if fig is None:
            continue
        parts.append(f"<h2>{name}</h2>" + fig.to_html(full_html=False,
                                                      include_plotlyjs=True if first else False))
        first = False
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ffviz plots</title></head>"
            "<body style='font-family:sans-serif'>" + "\n".join(parts) + "</body></html>")
