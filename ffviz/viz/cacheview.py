"""The cache view: the cached tokens of one layer and head, drawn on the grids of
the frames they came from.

Each source frame is a small grid of patch cells over a faint copy of the
frame itself; a cell is coloured kept / merged / dropped (the policy's decision
at the newest chunk), brighter for a higher score; a line links each merged
token to the token it merged into; a dot marks a token that already stands for
several (mass > 1). Grid cells with no token are the ones evicted earlier.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ffviz.viz.colors import DROPPED, KEPT, MERGED, rgb

CELL = 14  # pixels per token cell
GAP = 16  # pixels between frame grids (room for the label)
PER_ROW = 5  # frame grids per row


def token_states(n: int, head: int, layer_decision) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """For one head: state (N,) 0 kept / 1 merged / 2 dropped, merge target (N,)
    (-1 none) and score (N,) or None. No decision means everything was kept."""
    state = np.zeros(n, np.int64)
    into = np.full(n, -1, np.int64)
    score = None
    if layer_decision is None:
        return state, into, score
    keep = layer_decision.keep[0, head].numpy()
    state[:] = 2
    state[keep] = 0
    if layer_decision.merge_into is not None:
        into = layer_decision.merge_into[0, head].numpy().astype(np.int64)
        state[(state == 2) & (into >= 0)] = 1
    if layer_decision.score is not None:
        score = layer_decision.score[0, head].float().numpy()
    return state, into, score


def _shade(score: np.ndarray | None, n: int) -> np.ndarray:
    """Score as brightness in [0.35, 1] by rank (scores of different policies
    live on different scales; ranks read the same everywhere)."""
    if score is None or n == 0:
        return np.ones(n)
    order = np.argsort(np.argsort(np.nan_to_num(score, nan=-np.inf), kind="stable"), kind="stable")
    return 0.35 + 0.65 * order / max(n - 1, 1)


def render_cache_view(snapshot, frames: np.ndarray, layer: int, head: int,
                      grid: tuple[int, int]) -> np.ndarray:
    """RGB uint8 image of the cache view.

    snapshot: ``CacheSnapshot`` (provenance per layer (H, N), decision)
    frames: (T, 32, 32, 3) uint8 video so far (the source frames' pixels)
    """
    rows, cols = grid
    if snapshot is None:
        return _blank("no run yet: press Generate")
    prov = snapshot.provenance[layer]
    fr = prov["frame"][head].numpy()
    ry, cx = prov["row"][head].numpy(), prov["col"][head].numpy()
    mass = prov["mass"][head].float().numpy()
    d = None if snapshot.decision is None else snapshot.decision.layers[layer]
    state, into, score = token_states(len(fr), head, d)
    shade = _shade(score, len(fr))
    sources = sorted(set(fr.tolist()))
    slot = {f: i for i, f in enumerate(sources)}
    gw, gh = cols * CELL, rows * CELL
    ncol = min(PER_ROW, len(sources))
    nrow = (len(sources) + PER_ROW - 1) // PER_ROW
    W, H = ncol * (gw + GAP) + GAP, nrow * (gh + GAP) + GAP
    img = np.full((H, W, 3), 255, np.uint8)
    origin = {}
    for f in sources:
        i = slot[f]
        x0, y0 = GAP + (i % PER_ROW) * (gw + GAP), GAP + (i // PER_ROW) * (gh + GAP)
        origin[f] = (x0, y0)
        if 0 <= f < len(frames):  # the frame itself, faint, under its grid
            px = np.asarray(Image.fromarray(frames[f]).resize((gw, gh), Image.NEAREST), np.float32)
            img[y0:y0 + gh, x0:x0 + gw] = (0.35 * px + 0.65 * 255).astype(np.uint8)
    palette = np.array([rgb(KEPT), rgb(MERGED), rgb(DROPPED)], np.float32)
    centers = np.zeros((len(fr), 2))
    for j in range(len(fr)):
        x0, y0 = origin[int(fr[j])]
        xa, ya = x0 + int(cx[j]) * CELL, y0 + int(ry[j]) * CELL
        centers[j] = (xa + CELL / 2, ya + CELL / 2)
        under = img[ya + 1:ya + CELL, xa + 1:xa + CELL].astype(np.float32)
        colour = palette[state[j]] * shade[j] + 255 * (1 - shade[j])
        img[ya + 1:ya + CELL, xa + 1:xa + CELL] = (0.25 * under + 0.75 * colour).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for f, (x0, y0) in origin.items():
        draw.rectangle([x0 - 1, y0 - 1, x0 + gw, y0 + gh], outline=(90, 90, 90))
        draw.text((x0, y0 - GAP + 1), f"frame {f}", fill=(40, 40, 40))
    for j in np.nonzero(mass > 1.0 + 1e-6)[0]:
        x, y = centers[j]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 0, 0))
    for j in np.nonzero(state == 1)[0]:
        (x1, y1), (x2, y2) = centers[j], centers[into[j]]
        draw.line([x1, y1, x2, y2], fill=rgb(MERGED), width=1)
        draw.ellipse([x2 - 2, y2 - 2, x2 + 2, y2 + 2], outline=rgb(MERGED))
    return np.asarray(pil)


def _blank(text: str) -> np.ndarray:
    pil = Image.new("RGB", (360, 120), (255, 255, 255))
    ImageDraw.Draw(pil).text((12, 52), text, fill=(90, 90, 90))
    return np.asarray(pil)


def upscale(frame: np.ndarray, size: int = 256) -> np.ndarray:
    """A 32x32 frame shown big (nearest: patches stay visible)."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.NEAREST))


def filmstrip(frames: np.ndarray, last: int = 12, size: int = 64) -> np.ndarray:
    """The newest ``last`` frames side by side."""
    if len(frames) == 0:
        return np.full((size, size, 3), 255, np.uint8)
    tiles = [upscale(f, size) for f in frames[-last:]]
    sep = np.full((size, 2, 3), 255, np.uint8)
    out = []
    for t in tiles:
        out += [t, sep]
    return np.concatenate(out[:-1], 1)
