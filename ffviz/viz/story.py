"""The first view's picture: what the app is about, drawn from a real short run.

A row of frames: the given ones (rendered from the prompt), then the generated
ones; under the newest, a bracket over the frames still in the KV cache (the
budget), and the older ones faded: the policy chose to drop them.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ffviz.viz.cacheview import upscale
from ffviz.viz.colors import DROPPED, KEPT, POST, rgb


def story_picture(frames: np.ndarray, given: int, budget: int, size: int = 88) -> np.ndarray:
    """frames (T, h, w, 3) uint8 of one run; ``budget``: frames the cache keeps."""
    T, pad = len(frames), 8
    W, H = T * (size + pad) + pad + 120, size + 70
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    kept = set(range(max(0, T - 1 - budget), T - 1))  # what the newest frame may still look at
    for i, f in enumerate(frames):
        x = pad + i * (size + pad)
        tile = upscale(f, size).astype(np.float32)
        if i < T - 1 and i not in kept:
            tile = 0.6 * tile + 0.4 * 255  # dropped from the cache
        img.paste(Image.fromarray(tile.astype(np.uint8)), (x, 18))
        colour = rgb(KEPT) if i < given else rgb(POST) if i == T - 1 else (120, 120, 120)
        draw.text((x, 1), f"{i} given" if i < given else (f"{i} now" if i == T - 1 else f"{i} generated"),
                  fill=colour, font=font)
        if i < given:
            draw.rectangle([x - 2, 16, x + size + 1, 19 + size], outline=rgb(KEPT), width=2)
    y = 18 + size + 8

    def bracket(lo, hi, colour, text):
        x0, x1 = pad + lo * (size + pad), pad + hi * (size + pad) + size
        draw.line([x0, y, x1, y], fill=colour, width=2)
        for xx in (x0, x1):
            draw.line([xx, y - 5, xx, y], fill=colour, width=2)
        draw.text((x0, y + 5), text, fill=colour, font=font)

    if kept:
        bracket(min(kept), max(kept), rgb(KEPT), f"in the KV cache ({budget} frames)")
    if min(kept, default=0) > 0:
        bracket(0, min(kept) - 1, rgb(DROPPED), "dropped by the policy")
    draw.text((pad + T * (size + pad), 18 + size // 2 - 8), "-> next", fill=(60, 60, 60), font=font)
    return np.asarray(img)
