"""The cache view: the cached tokens of one layer and head, grouped by the frame
they came from, as one zoomable, scrollable figure.

Source frames sit side by side in one row (a faint copy of each frame under its
grid of token cells), oldest left; the newest dozen are in view and the range
slider under the plot scrolls to the others, so the cells keep their size however
many frames the cache holds. A cell is coloured kept / merged / dropped (the
policy's decision at the step shown), brighter for a higher score; hovering a
cell names the token, its score and, for a merged one, the token it merged into.
Merge lines are optional (many merges make a tangle). Empty cells were evicted
at an earlier step. The filmstrip and the big frame live here too.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

from ffviz.viz.colors import DROPPED, KEPT, MERGED, rgb
from ffviz.viz.figures import _layout, empty, stamp

STATES = ("kept", "merged", "dropped")
IN_VIEW = 6  # source frames in view at first (the range slider scrolls to the rest)
MAX_SHOWN = 64  # newest source frames drawn at all (hover text for more gets heavy)


def _shade(score: np.ndarray | None, n: int) -> np.ndarray:
    """Score as brightness in [0, 1] by rank (scores of different policies live on
    different scales; ranks read the same everywhere)."""
    if score is None or n == 0:
        return np.ones(n)
    order = np.argsort(np.argsort(np.nan_to_num(score, nan=-np.inf), kind="stable"), kind="stable")
    return order / max(n - 1, 1)


def _colorscale() -> list:
    """z = state + brightness (0..1): a light-to-full band per state."""
    scale = []
    for k, colour in enumerate((KEPT, MERGED, DROPPED)):
        full = np.array(rgb(colour), float)
        light = 0.3 * full + 0.7 * 255
        scale += [[k / 3 + (1e-4 if k else 0), "rgb(%d,%d,%d)" % tuple(light)],
                  [(k + 1) / 3 - 1e-4 if k < 2 else 1.0, "rgb(%d,%d,%d)" % tuple(full)]]
    return scale


def _png_uri(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cache_figure(tokens: dict | None, frames: np.ndarray, grid: tuple[int, int], layer: int,
                 head: int, given: int = 0, merges: bool = False, label: str = "",
                 steps_kept: int | None = None) -> go.Figure:
    """The cache view of one head.

    tokens: its arrays (``CacheStep.tokens``: frame, row, col, mass, state, into,
        score, step, frame_now, budget_tokens, compressed), or None before a run
    frames: (T, h, w, 3) uint8 video so far (the source frames' pixels)
    given: frames rendered from the prompt (labelled "given")
    merges: draw a line from each merged token to its target
    """
    title = f"Cache view (L{layer} H{head})"
    if tokens is None:
        return empty(title, "no run yet: press Generate")
    rows, cols = grid
    fr, ry, cx = tokens["frame"], tokens["row"].astype(int), tokens["col"].astype(int)
    state, into, mass = tokens["state"], tokens["into"], tokens["mass"].astype(float)
    score = tokens["score"]
    sources = sorted({f for f in fr.tolist() if f >= 0})  # frame -1: a dead slot (a head kept fewer)
    hidden = max(0, len(sources) - MAX_SHOWN)
    sources = sources[hidden:]
    slot = {f: i for i, f in enumerate(sources)}
    width = len(sources) * (cols + 1) - 1
    x = np.array([slot.get(int(f), -1) * (cols + 1) + c for f, c in zip(fr, cx)])
    shown = np.array([int(f) in slot for f in fr])
    shade = _shade(score, len(fr))
    z = np.full((rows, width), np.nan)
    text = np.full((rows, width), "", dtype=object)
    for j in np.nonzero(shown)[0]:
        z[ry[j], x[j]] = state[j] + 0.999 * shade[j]
        lines = [f"token of frame {fr[j]}, row {ry[j]}, col {cx[j]}", STATES[state[j]]]
        if score is not None:
            lines.append(f"score {score[j]:.4g} (rank {shade[j]:.0%} from the bottom)")
        if state[j] == 1 and into[j] >= 0:
            t = into[j]
            lines.append(f"merged into frame {fr[t]}, row {ry[t]}, col {cx[t]}")
        if mass[j] > 1 + 1e-6:
            lines.append(f"stands for {mass[j]:.1f} tokens (earlier merges)")
        text[ry[j], x[j]] = "<br>".join(lines)
    fig = go.Figure()
    # the source frames themselves, faint, under their grids (one picture for all)
    ph, pw = frames.shape[1] // rows if len(frames) else 4, frames.shape[2] // cols if len(frames) else 4
    back = np.full((rows * ph, width * pw, 3), 255, np.uint8)
    for f, i in slot.items():
        if 0 <= f < len(frames):
            x0 = i * (cols + 1) * pw
            back[:, x0:x0 + cols * pw] = (0.45 * np.asarray(frames[f], np.float32) + 0.55 * 255).astype(np.uint8)
    fig.add_trace(go.Image(source=_png_uri(back), x0=-0.5 + 0.5 / pw, dx=1 / pw, y0=-0.5 + 0.5 / ph,
                           dy=1 / ph, hoverinfo="skip"))
    fig.add_trace(go.Heatmap(z=z, text=text, hovertemplate="%{text}<extra></extra>", zmin=0, zmax=3,
                             colorscale=_colorscale(), showscale=False, opacity=0.78, xgap=1, ygap=1,
                             hoverongaps=False))
    many = np.nonzero(shown & (mass > 1 + 1e-6))[0]
    if len(many):
        fig.add_trace(go.Scatter(x=x[many], y=ry[many], mode="markers", hoverinfo="skip",
                                 marker={"size": 4, "color": "black"}, showlegend=False))
    if merges:
        xs, ys = [], []
        for j in np.nonzero(shown & (state == 1) & (into >= 0))[0]:
            t = into[j]
            if shown[t]:
                xs += [x[j], x[t], None]
                ys += [ry[j], ry[t], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": MERGED, "width": 1}))
    centers = [i * (cols + 1) + (cols - 1) / 2 for i in range(len(sources))]
    names = [f"f{f}" + (" given" if f < given else "") for f in sources]
    lo = max(-0.5, width - IN_VIEW * (cols + 1) - 0.5)
    fig.update_xaxes(tickvals=centers, ticktext=names, range=[lo, width - 0.5], showgrid=False,
                     zeroline=False, rangeslider={"visible": len(sources) > IN_VIEW, "thickness": 0.12},
                     title_text="source frame (oldest left; drag the bar below to scroll, "
                                "or drag on the plot to zoom)")
    fig.update_yaxes(range=[rows - 0.5, -0.5], showticklabels=False, showgrid=False, zeroline=False)
    counts = {name: int(((state == k) & shown).sum()) for k, name in enumerate(STATES)}
    swatch = lambda c, t: f"<span style='color:{c}'>■ {t}</span>"
    what = (f"step {tokens['step']}, newest frame {tokens['frame_now']}: " +
            (f"{swatch(KEPT, 'kept')} {counts['kept']}, {swatch(MERGED, 'merged')} "
             f"{counts['merged']}, {swatch(DROPPED, 'dropped')} {counts['dropped']}; brighter = "
             "higher score; hover a cell" if tokens["compressed"] else
             f"the cache fits its budget: all {counts['kept']} tokens kept"))
    if hidden:
        what += f"; {hidden} older source frames not drawn"
    if steps_kept is not None:
        what += f" ({steps_kept} steps to replay)"
    fig = _layout(fig, title, what, height=380)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 70, "b": 40}, showlegend=False,
                      plot_bgcolor="white")
    return stamp(fig, label)


def upscale(frame: np.ndarray, size: int = 256) -> np.ndarray:
    """A 32x32 frame shown big (nearest: patches stay visible)."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.NEAREST))


def filmstrip(frames: np.ndarray, last: int = 12, size: int = 64, first: int = 0,
              given: int = 0) -> np.ndarray:
    """The newest ``last`` frames side by side, each captioned with its index; the
    ``given`` first frames of the run (rendered from the prompt, not generated) are
    framed and captioned "given". ``first``: the run index of ``frames[0]``."""
    if len(frames) == 0:
        return np.full((size, size, 3), 255, np.uint8)
    start = max(0, len(frames) - last)
    tiles = []
    for k, f in enumerate(frames[start:]):
        i = first + start + k
        tile = Image.new("RGB", (size + 2, size + 14), (255, 255, 255))
        tile.paste(Image.fromarray(upscale(f, size)), (1, 0))
        draw = ImageDraw.Draw(tile)
        if i < given:
            draw.rectangle([0, 0, size + 1, size - 1], outline=rgb(KEPT), width=2)
        draw.text((3, size + 1), f"{i} given" if i < given else f"{i}", fill=(60, 60, 60))
        tiles.append(np.asarray(tile))
    return np.concatenate(tiles, 1)


def side_by_side(frames: list[np.ndarray | None], captions: list[str], banner: str = "",
                 size: int = 224) -> np.ndarray:
    """Several runs' current frames next to each other, each captioned (its policy),
    under one banner line (e.g. "red circle hidden since frame 29")."""
    pad, top = 8, 22 if banner else 0
    W = len(frames) * (size + pad) + pad
    img = Image.new("RGB", (W, top + size + 22), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if banner:
        draw.text((pad, 3), banner, fill=(150, 30, 30), font=ImageFont.load_default(size=15))
    for k, (f, cap) in enumerate(zip(frames, captions)):
        x = pad + k * (size + pad)
        if f is not None:
            img.paste(Image.fromarray(upscale(f, size)), (x, top))
        else:
            draw.rectangle([x, top, x + size - 1, top + size - 1], outline=(200, 200, 200))
        draw.text((x, top + size + 3), cap, fill=(30, 30, 30), font=ImageFont.load_default(size=15))
    return np.asarray(img)
