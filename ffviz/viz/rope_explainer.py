"""RoPE 101: a query rotating under 3D RoPE, and why that makes post-RoPE
statistics drift while pre-RoPE ones stay.

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


def planes(rope) -> list[tuple[str, int]]:
    """Dropdown choices: (label, plane index) for every 2D plane of the head dim."""
    out = []
    count = {0: 0, 1: 0, 2: 0}
    for i, (axis, omega) in enumerate(zip(rope.axis.tolist(), rope.omega.tolist())):
        out.append((f"{AXES[axis]} plane {count[axis]} (dims {2 * i},{2 * i + 1}; "
                    f"omega {omega:.3g} rad/step)", i))
        count[axis] += 1
    return out


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
    fig.update_layout(scene={"xaxis_title": f"dim {2 * plane}", "yaxis_title": f"dim {2 * plane + 1}",
                             "zaxis_title": "frame", "aspectmode": "manual",
                             "aspectratio": {"x": 1, "y": 1, "z": 1.4}})
    angle = (frame, row, col)[axis] * omega
    return _layout(fig, f"One query in a {AXES[axis]} plane",
                   f"angle = {AXES[axis]} position x omega = {angle:.2f} rad; "
                   "drag to rotate the view", height=460)


def drift_explainer_figure(rope, mean_pre: np.ndarray, mean_post: np.ndarray, frames,
                           plane: int, source: str) -> go.Figure:
    """Left: the plane's components of the per-frame MEAN query, pre vs post RoPE.
    Right: distance of each frame's mean to frame 0's, over all dims.

    mean_pre, mean_post: (F, d) per-frame means (recorded, or synthetic)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"mean query, plane {plane}", "|mean(frame) - mean(frame 0)|"))
    fr = np.asarray(frames)
    for m, name, colour in ((mean_pre, "pre-RoPE", PRE), (mean_post, "post-RoPE", POST)):
        p = m[:, 2 * plane: 2 * plane + 2]
        fig.add_trace(go.Scatter(x=p[:, 0], y=p[:, 1], mode="lines+markers", name=name,
                                 marker={"color": fr, "colorscale": "Viridis", "size": 6},
                                 line={"color": colour, "width": 1}), 1, 1)
        fig.add_trace(go.Scatter(x=fr, y=np.linalg.norm(m - m[:1], axis=1), name=name,
                                 line={"color": colour, "width": 2.5}, showlegend=False), 1, 2)
    fig.update_xaxes(scaleanchor="y", row=1, col=1)
    fig.update_xaxes(title_text="frame", row=1, col=2)
    return _layout(fig, "Why post-RoPE drifts", f"{source}: the pre-RoPE mean stays put; "
                   "the post-RoPE mean is the same vector turned by frame x omega", height=400)


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
