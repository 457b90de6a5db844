"""RoPE 101 in three steps: (1) one query turns under 3D RoPE, (2) so the mean of
post-RoPE queries turns too, (3) so post-RoPE statistics drift while pre-RoPE ones
stay (which the Drift tab then shows on the user's own run).

3D RoPE splits the head dim into planes; each plane belongs to one axis
(time, row or column) and turns by ``position * omega``. A fixed pre-RoPE
query therefore traces a circle in every plane as its frame (or row, column)
changes: low planes spin fast, high planes slowly. The mean of post-RoPE
queries over frames moves along those circles, i.e. it drifts, although the
pre-RoPE query distribution never changed.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ffviz.viz.colors import POST, PRE
from ffviz.viz.figures import _layout

AXES = ("time", "row", "column")


def plane_name(rope, plane: int) -> str:
    """"time plane 2": the axis a plane turns with and its rank among that axis's
    planes (what every title and the dropdown call it)."""
    axes = rope.axis.tolist()
    return f"{AXES[axes[plane]]} plane {axes[:plane].count(axes[plane])}"


def planes(rope) -> list[tuple[str, int]]:
    """Dropdown choices: (label, plane index) for every 2D plane of the head dim."""
    return [(f"{plane_name(rope, i)} (dims {2 * i},{2 * i + 1}; omega {omega:.3g} rad/step)", i)
            for i, omega in enumerate(rope.omega.tolist())]


def _rotate_pair(pair: np.ndarray, angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([pair[0] * c - pair[1] * s, pair[0] * s + pair[1] * c], -1)


def rotation_figure(rope, query: np.ndarray, frame: int, row: int, col: int, plane: int,
                    max_frame: int = 32) -> go.Figure:
    """3D view: the chosen plane's two components of ``query`` (d,) after RoPE at
    (f, row, col) for f = 0..max_frame, stacked along the frame axis (a helix for
    a time plane; a vertical line for a row/column plane, which turns with the
    row or column instead)."""
    pair = np.asarray(query, np.float64)[2 * plane: 2 * plane + 2]
    axis = int(rope.axis[plane])
    omega = float(rope.omega[plane])
    fs = np.arange(max_frame + 1)
    pos = np.stack([fs, np.full_like(fs, row), np.full_like(fs, col)], 1)
    pts = _rotate_pair(pair, pos[:, axis] * omega)
    here = _rotate_pair(pair, np.array([(frame, row, col)[axis] * omega]))[0]
    fine = np.linspace(0, max_frame, 40 * max_frame + 1)  # the continuous turn between frames
    fpos = np.stack([fine, np.full_like(fine, row), np.full_like(fine, col)], 1)
    smooth = _rotate_pair(pair, fpos[:, axis] * omega)
    fig = go.Figure()
    fig.add_trace(go.Scatter3d(x=smooth[:, 0], y=smooth[:, 1], z=fine, mode="lines",
                               name="the turn between frames", line={"color": "#f4a3a3", "width": 2},
                               hoverinfo="skip"))
    fig.add_trace(go.Scatter3d(x=pts[:, 0], y=pts[:, 1], z=fs, mode="markers",
                               name="post-RoPE at each frame", marker={"size": 3, "color": POST}))
    fig.add_trace(go.Scatter3d(x=[0, pair[0]], y=[0, pair[1]], z=[frame, frame], mode="lines",
                               name="pre-RoPE (same at every position)",
                               line={"color": PRE, "width": 6}))
    fig.add_trace(go.Scatter3d(x=[0, here[0]], y=[0, here[1]], z=[frame, frame], mode="lines+markers",
                               name=f"post-RoPE at (f={frame}, y={row}, x={col})",
                               line={"color": POST, "width": 8}, marker={"size": 4}))
    angle = (frame, row, col)[axis] * omega
    fig = _layout(fig, f"Step 1 of 3: one query in {plane_name(rope, plane)}",
                  f"angle = {AXES[axis]} position x omega = {angle:.2f} rad; "
                  "drag to rotate the view", height=520)
    # the whole helix in view: a camera further out, the legend inside the top left
    fig.update_layout(scene={"xaxis_title": f"dim {2 * plane}", "yaxis_title": f"dim {2 * plane + 1}",
                             "zaxis_title": "frame", "aspectmode": "manual",
                             "aspectratio": {"x": 1, "y": 1, "z": 1.2},
                             "camera": {"eye": {"x": 1.7, "y": 1.7, "z": 0.9}},
                             "domain": {"x": [0, 1], "y": [0, 1]}},
                      margin={"l": 0, "r": 0, "t": 70, "b": 0},
                      legend={"orientation": "v", "x": 0.01, "y": 0.98, "bgcolor": "rgba(255,255,255,0.7)"})
    return fig


def mean_query_figure(rope, mean_pre: np.ndarray, mean_post: np.ndarray, frames, plane: int,
                      source: str) -> go.Figure:
    """Step 2: the plane's two components of the per-frame MEAN query, pre-RoPE and
    post-RoPE side by side on the same axes (mean_pre, mean_post: (F, d))."""
    name = plane_name(rope, plane)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("pre-RoPE mean", "post-RoPE mean"))
    fr = np.asarray(frames)
    for col, (m, colour) in enumerate(((mean_pre, PRE), (mean_post, POST)), 1):
        p = m[:, 2 * plane: 2 * plane + 2]
        fig.add_trace(go.Scatter(x=p[:, 0], y=p[:, 1], mode="lines+markers", showlegend=False,
                                 marker={"color": fr, "colorscale": "Viridis", "size": 6,
                                         "showscale": col == 2, "colorbar": {"title": "frame"}},
                                 line={"color": colour, "width": 1},
                                 hovertemplate="frame %{marker.color}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text=f"dim {2 * plane}", row=1, col=col)
    fig.update_yaxes(title_text=f"dim {2 * plane + 1}", row=1, col=1)
    fig.update_xaxes(matches="x", row=1, col=2)  # one scale for pre and post
    fig.update_yaxes(matches="y", row=1, col=2)
    fig.update_yaxes(scaleanchor="x", row=1, col=1)
    return _layout(fig, f"Step 2 of 3: the mean query in {name}",
                   f"{source}: the pre-RoPE mean stays put; the post-RoPE mean is the same "
                   "vector turned by frame x omega", height=400)


def mean_distance_figure(mean_pre: np.ndarray, mean_post: np.ndarray, frames,
                         source: str) -> go.Figure:
    """Step 3: how far each frame's mean query is from the first frame's, over all dims."""
    fr = np.asarray(frames)
    fig = go.Figure()
    for m, name, colour in ((mean_pre, "pre-RoPE", PRE), (mean_post, "post-RoPE", POST)):
        fig.add_trace(go.Scatter(x=fr, y=np.linalg.norm(m - m[:1], axis=1), name=name,
                                 line={"color": colour, "width": 2.5}))
    fig.update_xaxes(title_text="frame")
    fig.update_yaxes(title_text=f"|mean(frame) - mean(frame {int(fr[0])})|")
    return _layout(fig, "Step 3 of 3: so post-RoPE statistics drift, pre-RoPE ones stay",
                   f"{source}; a proxy built on post-RoPE statistics chases a moving target, one "
                   "built on pre-RoPE statistics does not", height=360)


def synthetic_means(rope, frames: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame means of a stationary query distribution, pre and post RoPE (at
    the grid centre), for when there is no run yet."""
    rng = np.random.default_rng(seed)
    d = rope.head_dim
    mu = rng.normal(size=d)
    pre = mu + 0.05 * rng.normal(size=(frames, d))
    ang = rope.angles(np.arange(frames)[:, None], 4.0, 4.0).numpy()[:, 0]  # (F, d/2)
    post = _rotate_pair(pre.reshape(frames, -1, 2).transpose(2, 0, 1), ang).reshape(frames, d)
    return np.arange(frames), pre, post
