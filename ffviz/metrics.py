"""Consistency of a generated run against its scene's ground truth.

The scene knows, for every frame, where each object is and how much of it is
visible. Generated frames are compared with that truth per frame:

* ``background``: share of pixels that should show background (away from any
  object and the pillar) whose colour is near the background colour;
* ``off_palette``: share of pixels near none of the scene's colours (noise, smears);
* ``color_presence``: per object and frame where it should be visible, whether
  its colour forms one blob of at least a third of its visible area somewhere in
  the frame (scattered pixels of noise do not count);
* ``shape``: where an object should be fully visible and its colour is present,
  whether the largest blob of its colour looks like its own shape rather than
  another: two features (fill ratio of the bounding box, top-half vs bottom-half
  balance) are compared with those of each shape rendered at the same size
  (frames where this reading fails on the true frame itself are left out);
* ``returns``: objects that left the view (or hid behind the pillar) for at
  least 3 frames and came back: the share that shows its colour again within
  the 8 frames after its return (``return_events`` lists each, with its frames;
  ``returns_count``: how many).
* ``returns_tracked``: the same returns, counted only where the object is also
  back in place: its colour blob within ``TRACK_TOL`` of where it truly is (as
  ``tracking``), in at least half of the 8 frames after its return where it should
  be seen. A frozen copy of an earlier frame, or an object painted from the prompt
  wherever the model likes, shows its colour (``returns``) but is not in place.
* ``tracking``: per object and frame where it should be visible, whether the
  largest blob of its colour lies within ``TRACK_TOL`` pixels (centroids) of where
  the object truly is. Not part of ``consistency``: it exists because the other
  measures cannot tell a moving object from a frozen copy of the first frames (a
  cache that keeps only the given frames scores well on colour and returns while
  nothing moves; README, "Free-running quality").

Per-frame curves (``curves``): background, off_palette, color_presence, tracking
and consistency (the mean of background and colour presence in that frame).

The view wraps (``ffviz.scenes``): a blob that crosses an edge goes on at the
opposite one, and centroid distances go round the edges.

``consistency`` is the mean of background, colour presence, shape and returns
(those defined for the run). It does not compare positions: a free-running model
may place an object slightly off and still keep it; ``tracking`` does, loosely.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from ffviz.scenes import COLORS, SHAPES, VIEW, ObjectSpec, Scene, SceneSpec

COLOR_TOL = 60.0  # RGB distance within which a pixel "has" a colour
TRACK_TOL = 6.0  # pixels between blob centroids (of 32) that still count as "in place"
MIN_HIDDEN = 3  # frames an object must be hidden for its return to count
RETURN_WINDOW = 8  # frames after a return within which its colour must show again


def _near(frames: np.ndarray, rgb) -> np.ndarray:
    d = frames.astype(np.float32) - np.asarray(rgb, np.float32)
    return np.sqrt((d * d).sum(-1)) < COLOR_TOL


def _blobs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected blobs of ``mask`` (H, W) on the torus the world is (a blob crossing an
    edge goes on at the opposite one): (labels, count), labels 1..count."""
    labels, n = ndimage.label(mask)
    if n < 2:
        return labels, n
    parent = np.arange(n + 1)

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(np.concatenate([labels[:, 0], labels[0]]), np.concatenate([labels[:, -1], labels[-1]])):
        if a and b:
            parent[root(a)] = root(b)
    roots = np.array([root(a) for a in range(n + 1)])
    _, dense = np.unique(roots, return_inverse=True)  # root 0 stays label 0
    return dense[labels], int(dense.max())


def _seam_shift(blob: np.ndarray) -> np.ndarray:
    """(rows, columns) to roll ``blob`` back by so that it does not cross the view's
    edges: to just past its first empty row and column (every object is smaller than
    the view, so it leaves some empty)."""
    shift = np.zeros(2, int)
    for axis in (0, 1):
        empty = np.nonzero(~blob.any(1 - axis))[0]
        if len(empty):
            shift[axis] = int(empty[0]) + 1
    return shift


def _unwrapped(blob: np.ndarray) -> np.ndarray:
    """``blob`` rolled so that it does not cross the view's edges."""
    return np.roll(blob, tuple(-_seam_shift(blob)), (0, 1))


def _torus_centroid(blob: np.ndarray) -> np.ndarray:
    """(y, x) centroid of ``blob`` (H, W) on the torus: the centroid of the unwrapped
    blob, shifted back and taken modulo the view."""
    centre = np.array(ndimage.center_of_mass(_unwrapped(blob)))
    return np.mod(centre + _seam_shift(blob), blob.shape)


def torus_distance(a: np.ndarray, b: np.ndarray, size: int = VIEW) -> float:
    """Distance between two (y, x) points of the view, going round its edges."""
    d = np.abs(np.asarray(a, float) - np.asarray(b, float)) % size
    return float(np.hypot(*np.minimum(d, size - d)))


def shape_features(mask: np.ndarray) -> np.ndarray:
    """(fill ratio of the bounding box, top-half share) of the largest blob."""
    labels, n = _blobs(mask)
    if n == 0:
        return np.zeros(2)
    sizes = np.bincount(labels.ravel())[1:]
    blob = _unwrapped(labels == (1 + int(np.argmax(sizes))))
    ys, xs = np.nonzero(blob)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    top = (ys < ys.min() + h / 2).sum() / ys.size
    return np.array([ys.size / (h * w), top])


def _largest_blob(mask: np.ndarray) -> tuple[int, np.ndarray | None]:
    """Size and (y, x) centroid of the largest blob of ``mask`` (0 and None when empty),
    from one labelling."""
    labels, n = _blobs(mask)
    if n == 0:
        return 0, None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = 1 + int(np.argmax(sizes))
    return int(sizes[biggest - 1]), _torus_centroid(labels == biggest)


@functools.lru_cache(maxsize=None)
def _reference_features(size: str) -> dict:
    """Features of each shape rendered alone at ``size`` (calibrates the classifier)."""
    refs = {}
    for shape in SHAPES:
        scene = Scene(SceneSpec("black", (ObjectSpec(shape, "white", size),)), 0)
        scene.pos0[:] = (VIEW - scene.side[0]) // 2
        scene.vel[:] = 0
        refs[shape] = shape_features(_near(scene.render([0])[0], COLORS["white"]))
    return refs


def classify_shape(mask: np.ndarray, size: str) -> str:
    feat = shape_features(mask)
    refs = _reference_features(size)
    return min(refs, key=lambda s: float(np.abs(refs[s] - feat).sum()))


def consistency(frames: np.ndarray, scene: Scene, start: int = 0) -> dict:
    """Metrics of ``frames`` (T, H, W, 3) uint8, which show scene frames
    ``start .. start + T - 1``. Returns scalars and per-frame curves."""
    T = len(frames)
    idx = np.arange(start, start + T)
    spec = scene.spec
    truth = scene.render(idx)
    vis = scene.visible_area(idx)  # (T, n)
    full = scene.full_area()  # (n,)
    bg_rgb = COLORS[spec.background]
    palette = [bg_rgb] + [COLORS[o.color] for o in spec.objects] + \
              ([COLORS[spec.pillar]] if spec.pillar else [])
    is_bg_true = _near(truth, bg_rgb)
    # background pixels well away from objects (a dilation by 2 px, round the edges)
    pad = np.pad(~is_bg_true, ((0, 0), (2, 2), (2, 2)), mode="wrap")
    near_obj = np.zeros_like(is_bg_true)
    for dy in range(5):
        for dx in range(5):
            near_obj |= pad[:, dy:dy + is_bg_true.shape[1], dx:dx + is_bg_true.shape[2]]
    bg_region = is_bg_true & ~near_obj
    bg_ok = _near(frames, bg_rgb)
    bg_curve = (bg_ok & bg_region).sum((1, 2)) / np.maximum(bg_region.sum((1, 2)), 1)
    off = np.ones(frames.shape[:3], bool)
    for rgb in palette:
        off &= ~_near(frames, rgb)
    off_curve = off.mean((1, 2))

    presence, shape_ok, returns, returns_tracked, tracked, events = [], [], [], [], [], []
    track_hits = np.zeros(T)
    presence_curve = np.full(T, np.nan)
    per_frame_hits = np.zeros(T)
    per_frame_due = np.zeros(T)
    for i, o in enumerate(spec.objects):
        has = _near(frames, COLORS[o.color])
        blobs = [_largest_blob(m) for m in has]
        count = np.array([size for size, _ in blobs])
        due = vis[:, i] >= 6
        present = count >= np.maximum(vis[:, i] / 3, 3)
        presence += present[due].tolist()
        per_frame_hits += present & due
        per_frame_due += due
        whole = vis[:, i] >= 0.9 * full[i]
        truth_has = _near(truth, COLORS[o.color])
        in_place = np.zeros(T, bool)  # present within TRACK_TOL of the true blob
        for t in np.nonzero(due)[0]:
            want, got = _largest_blob(truth_has[t])[1], (blobs[t][1] if present[t] else None)
            hit = want is not None and got is not None and torus_distance(want, got) <= TRACK_TOL
            in_place[t] = hit
            tracked.append(hit)
            track_hits[t] += hit
        for t in np.nonzero(whole & present)[0]:
            # only frames where the classifier reads the true frame right count
            if classify_shape(truth_has[t], o.size) == o.shape:
                shape_ok.append(classify_shape(has[t], o.size) == o.shape)
        for left, back in hidden_spans(vis[:, i]):
            if back >= T:
                continue  # still hidden when the frames end
            window = slice(back, min(back + RETURN_WINDOW, T))
            w_due = due[window]
            if w_due.any():
                recovered = bool(present[window][w_due].mean() >= 0.5)
                returns.append(recovered)
                returns_tracked.append(bool(in_place[window][w_due].mean() >= 0.5))
                events.append({"object": i, "name": f"{o.color} {o.shape}", "left": start + left,
                               "back": start + back, "recovered": recovered,
                               "in_place": returns_tracked[-1]})
    presence_curve = np.where(per_frame_due > 0, per_frame_hits / np.maximum(per_frame_due, 1), np.nan)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")
    out = {
        "background": float(bg_curve.mean()),
        "off_palette": float(off_curve.mean()),
        "color_presence": mean(presence),
        "shape": mean(shape_ok),
        "returns": mean(returns),
        "returns_count": len(returns),
        "returns_tracked": mean(returns_tracked),
        "tracking": mean(tracked),
    }
    parts = [out[k] for k in ("background", "color_presence", "shape", "returns")]
    out["consistency"] = float(np.nanmean(parts)) if not all(np.isnan(parts)) else float("nan")
    track_curve = np.where(per_frame_due > 0, track_hits / np.maximum(per_frame_due, 1), np.nan)
    with np.errstate(invalid="ignore"):  # a frame with no object due: background alone
        frame_quality = np.nanmean(np.stack([bg_curve, presence_curve]), 0)
    listed = lambda c: [None if np.isnan(x) else round(float(x), 4) for x in c]
    out["return_events"] = events
    out["curves"] = {"background": bg_curve.round(4).tolist(),
                     "off_palette": off_curve.round(4).tolist(),
                     "color_presence": listed(presence_curve),
                     "tracking": listed(track_curve),
                     "consistency": listed(frame_quality)}
    return out


def hidden_spans(visible: np.ndarray, min_frames: int = MIN_HIDDEN) -> list[tuple[int, int]]:
    """(first hidden frame, first frame back) of each time one object, visible before,
    is hidden for at least ``min_frames`` frames; ``visible``: its visible area per
    frame (T,). A span still open at the end has back = T."""
    gone = np.asarray(visible) < 1
    spans, t, T = [], 1, len(gone)
    while t < T:
        if gone[t] and not gone[t - 1]:
            end = t
            while end < T and gone[end]:
                end += 1
            if end - t >= min_frames:
                spans.append((t, end))
            t = end
        else:
            t += 1
    return spans


def story_consistency(frames: np.ndarray, story: list[Scene], start: int = 0) -> dict:
    """``consistency`` of a run whose prompt switched: frames from each scene's ``t0``
    on are graded against that scene (the prompt in force). Scalars are means over the
    segments weighted by their frames (``returns``: by their events); curves are joined."""
    if len(story) == 1:
        return consistency(frames, story[0], start)
    bounds = [max(sc.t0, start) for sc in story] + [start + len(frames)]
    segments = [(sc, a, b) for sc, a, b in zip(story, bounds, bounds[1:]) if b > a]
    parts = [(consistency(frames[a - start:b - start], sc, start=a), b - a)
             for sc, a, b in segments]

    def weighted(pairs):
        pairs = [(v, w) for v, w in pairs if not np.isnan(v) and w > 0]
        return float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs])) if pairs \
            else float("nan")

    out = {key: weighted((m[key], w) for m, w in parts)
           for key in ("background", "off_palette", "color_presence", "shape", "tracking")}
    for key in ("returns", "returns_tracked"):
        out[key] = weighted((m[key], m["returns_count"]) for m, _ in parts)
    out["returns_count"] = int(sum(m["returns_count"] for m, _ in parts))
    out["return_events"] = [e for m, _ in parts for e in m["return_events"]]
    vals = [out[k] for k in ("background", "color_presence", "shape", "returns")]
    out["consistency"] = float(np.nanmean(vals)) if not all(np.isnan(vals)) else float("nan")
    out["curves"] = {k: sum((m["curves"][k] for m, _ in parts), []) for k in parts[0][0]["curves"]}
    # each prompt's own grades: what a switch did is read in the segment after it
    out["segments"] = [{"from_frame": sc.t0, "prompt": sc.spec.describe(),
                        **{k: m[k] for k in ("consistency", "background", "color_presence",
                                             "shape", "tracking")}}
                       for (sc, _, _), (m, _) in zip(segments, parts)]
    return out
