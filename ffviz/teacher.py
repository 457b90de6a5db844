"""The renderer as teacher: the frame that follows from what the model drew.

Training on the model's own rollouts with the TRUE frames as targets teaches it
to paint what the truth shows whatever its context shows (a blurred object
fades, a shifted one jumps back). Here the target follows from the rollout
instead: every object is read from the model's frame (its integer position,
by matching its shape near where it should be), moved one step by the world's
rule (velocity, round the torus), and rendered with hard edges. So the model learns to
continue from its own frames, and to redraw each object whole and in its
colour. Where the reading fails (something of the object's colour is drawn but
not where or how it should be), the next frame gets no loss. Where nothing of its
colour is drawn at all, the object is missing (most often one that should come
back from behind the pillar or from outside the view): the renderer still knows
where it is, so the target shows it there. Without that, a model that never
brings an object back is never told to, as every frame after gets no loss.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ffviz.scenes import COLORS, VIEW, Scene

SEARCH = 4  # pixels around the expected position where an object is looked for
MIN_IOU = 0.4  # a reading below this fails (a misshapen object still reads: it is redrawn whole)
MIN_VISIBLE = 4  # pixels: an object expected to show fewer is not read (hidden)
# reading statuses
FOUND, HIDDEN, FAILED, MISSING = 1, 0, -1, -2


def read_positions(scene: Scene, frame: np.ndarray, guess: np.ndarray):
    """Read each object's top-left corner from ``frame`` (V, V, 3) uint8 near ``guess``
    (n, 2). Returns (positions (n, 2), status (n,): FOUND, HIDDEN (too little of it
    should show to read), FAILED (its colour is drawn, but it does not read near its
    place) or MISSING (fewer than MIN_VISIBLE pixels of its colour in the whole frame))."""
    n = len(scene.spec.objects)
    pos, status = guess.copy(), np.full(n, HIDDEN)
    masks, pillar = scene.object_masks(guess[None])
    for i, o in enumerate(scene.spec.objects):
        bm = scene.bitmaps[i].astype(np.int32)
        s = bm.shape[0]
        occluded = pillar | masks[0, i + 1:].any(0)  # the pillar and objects drawn after it
        seen = np.all(frame == np.asarray(COLORS[o.color], np.uint8), -1)  # frames are snapped
        # the object's torus, of which the view is the top-left corner (0 beyond the view),
        # repeated around its edges so that a window may cross them
        width, height = (int(v) for v in scene.period[i])
        visible_map, seen_map = np.zeros((2, height, width), np.int32)
        visible_map[:VIEW, :VIEW], seen_map[:VIEW, :VIEW] = ~occluded, seen & ~occluded
        pad = SEARCH + s
        visible_map, seen_map = (np.pad(m, pad, mode="wrap") for m in (visible_map, seen_map))
        x, y = int(guess[i, 0]) % width + pad - SEARCH, int(guess[i, 1]) % height + pad - SEARCH
        win = (slice(y, y + s + 2 * SEARCH), slice(x, x + s + 2 * SEARCH))
        vis = np.einsum("abij,ij->ab", sliding_window_view(visible_map[win], (s, s)), bm)
        inter = np.einsum("abij,ij->ab", sliding_window_view(seen_map[win], (s, s)), bm)
        if vis[SEARCH, SEARCH] < MIN_VISIBLE:
            continue
        iou = inter / np.maximum(vis + seen.sum() - inter, 1)
        near = np.abs(np.arange(-SEARCH, SEARCH + 1))
        # ties (a half-hidden object reads the same at several places) go to the nearest
        dy, dx = np.unravel_index(int(np.argmax(iou - 1e-3 * (near[:, None] + near))), iou.shape)
        if iou[dy, dx] >= MIN_IOU:
            pos[i] = np.mod(guess[i] + np.array([dx - SEARCH, dy - SEARCH]), scene.period[i])
            status[i] = FOUND
        else:
            status[i] = MISSING if seen.sum() < MIN_VISIBLE else FAILED
    return pos, status


def renderer_targets(scene: Scene, frames: np.ndarray, given: int, start: int = 0,
                     redraw_failed: bool = False):
    """Targets for a rollout ``frames`` (T, V, V, 3) uint8 of scene frames
    ``start .. start + T - 1`` whose first ``given`` frames are true.

    Returns (targets (T, V, V, 3) uint8, valid (T,) bool): target f is what follows
    from the rollout's frames before f (objects read from frame f - 1, moved one
    step; a missing object where the world puts it); the given frames are their own
    targets. valid[f] is False where a reading of frame f - 1 failed, unless
    ``redraw_failed``: then a misread object is asked back whole where it should be (as
    a missing one is), so a model that tears or smears an object is taught to repair it."""
    T = len(frames)
    pos = scene.positions([start + given - 1])[0]
    vel = scene.velocities(start + given - 1)
    out = np.empty((T, pos.shape[0], 2), np.int64)
    out[:given] = scene.positions(np.arange(start, start + given))
    valid = np.ones(T, bool)
    for f in range(given, T):
        pos, vel = scene.step(pos, vel)  # what frame f should show, given frame f - 1
        out[f] = pos
        if f + 1 < T:  # read frame f to continue from what the model drew
            read, status = read_positions(scene, frames[f], pos)
            valid[f + 1] = redraw_failed or not (status == FAILED).any()
            pos = np.where((status == FOUND)[:, None], read, pos)
    return scene.render_positions(out), valid
