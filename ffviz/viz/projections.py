"""Query projections: pre- and post-RoPE samples of one layer/head on ONE map.

Both sets are fitted together (a common PCA basis, or a common UMAP
embedding), so their spread can be compared directly: pre-RoPE queries of all
frames pile up in one cloud, post-RoPE ones smear out by frame. PCA is cheap
and runs live; UMAP runs on a button. UMAP's first call JIT-compiles numba
code (tens of seconds), so ``warm_up_umap`` does that once in the background
at start-up.
"""
from __future__ import annotations

import threading

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ffviz.viz.figures import _layout, empty, stamp

UMAP_READY = threading.Event()
_warm_lock = threading.Lock()
_warm_started = False


def warm_up_umap(block: bool = False) -> None:
    """Import umap and fit a tiny problem once, so the user's first click is fast."""
    global _warm_started
    with _warm_lock:
        if _warm_started:
            if block:
                UMAP_READY.wait()
            return
        _warm_started = True

    def work():
        try:
            import umap  # noqa: F401  (import itself takes seconds)
            rng = np.random.default_rng(0)
            _fit_umap(rng.normal(size=(80, 8)).astype(np.float32))
        except Exception:  # no umap installed: the button explains, PCA still works
            pass
        finally:
            UMAP_READY.set()
            print("ffviz: UMAP warmed up", flush=True)

    if block:
        work()
    else:
        threading.Thread(target=work, name="umap-warm-up", daemon=True).start()


def _fit_umap(x: np.ndarray) -> np.ndarray:
    import umap
    n = len(x)
    return umap.UMAP(n_neighbors=max(2, min(15, n - 1)), min_dist=0.1, n_components=2,
                     random_state=0, init="random" if n < 20 else "spectral",
                     n_epochs=200).fit_transform(x)


def pca_common(pre: np.ndarray, post: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project (n, d) pre and post samples on the top-2 principal axes of both
    together. Returns (n, 2), (n, 2) and the explained variance ratios (2,)."""
    x = np.concatenate([pre, post]).astype(np.float64)
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    basis = vt[:2].T
    ratio = (s[:2] ** 2) / max((s ** 2).sum(), 1e-12)
    return (pre - mu) @ basis, (post - mu) @ basis, ratio


def umap_common(pre: np.ndarray, post: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = _fit_umap(np.concatenate([pre, post]).astype(np.float32))
    return emb[: len(pre)], emb[len(pre):]


def samples(recorder, layer: int, head: int):
    """Paired (n, d) pre/post query samples of one layer/head and their frames."""
    if recorder is None:
        return None
    fr = recorder.sample_frame[layer, head]
    ok = fr >= 0
    if ok.sum() < 4:
        return None
    pre = recorder.sample["pre"][layer, head][ok].astype(np.float32)
    post = recorder.sample["post"][layer, head][ok].astype(np.float32)
    return pre, post, fr[ok]


def projection_figure(recorder, layer: int, head: int, method: str = "pca",
                      label: str = "") -> go.Figure:
    title = f"Query projections, L{layer} H{head} ({method.upper()}, one common map)"
    data = samples(recorder, layer, head)
    if data is None:
        return empty(title, "projections appear after the first generated frame", label)
    pre, post, fr = data
    if method == "umap":
        if not UMAP_READY.is_set():
            warm_up_umap(block=True)
        try:
            a, b = umap_common(pre, post)
        except ImportError:
            return empty(title, "UMAP is not installed (pip install umap-learn); PCA works")
        hint = "UMAP of pre and post together: pre-RoPE stays one cloud, post-RoPE splits by frame"
        axis = ("UMAP 1", "UMAP 2")
    else:
        a, b, ratio = pca_common(pre, post)
        hint = (f"PCA fitted on pre and post together ({ratio.sum():.0%} of variance): "
                "pre-RoPE stays one cloud, post-RoPE drifts with the frame index")
        axis = ("PC 1", "PC 2")
    fig = make_subplots(rows=1, cols=2, shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=("pre-RoPE", "post-RoPE"))
    cmin, cmax = int(fr.min()), int(fr.max())
    for col, pts in ((1, a), (2, b)):
        fig.add_trace(go.Scatter(  # SVG: no WebGL context needed
            x=pts[:, 0], y=pts[:, 1], mode="markers", showlegend=False,
            marker={"color": fr, "colorscale": "Viridis", "cmin": cmin, "cmax": cmax, "size": 4,
                    "opacity": 0.75, "showscale": col == 2,
                    "colorbar": {"title": "frame"} if col == 2 else None},
            hovertemplate="frame %{marker.color}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text=axis[0], row=1, col=col)
    fig.update_yaxes(title_text=axis[1], row=1, col=1)
    # one map: both panels share both axes (make_subplots shares x only within a column)
    fig.update_xaxes(matches="x", row=1, col=2)
    fig.update_yaxes(matches="y", row=1, col=2)
    return stamp(_layout(fig, title, hint, height=380), label)
