"""Procedural scenes and the prompt grammar of the embedded model.

A scene is a plain background, one to three coloured shapes moving at constant
velocity inside a *world box* larger than the 32x32 view (so they leave the
view and come back after bouncing off its walls), and optionally a vertical
pillar drawn in front of them (so they pass behind it and reappear). The
scene's parameters are the ground truth of the consistency metric
(``ffviz.metrics``); its trajectories are closed-form, so frame 1000 costs
what frame 0 costs.

Prompts are short English: ``"a red circle and two small blue squares on a
green background with a gray pillar, fast"``. ``parse_prompt`` returns the
spec and the words it did not understand; it raises ``PromptError`` when no
scene can be read at all.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

VIEW = 32  # frame side in pixels
MARGIN_X, MARGIN_Y = 14.0, 8.0  # world box extends this far beyond the view
MAX_OBJECTS = 3
SUPERSAMPLE = 2  # anti-aliased edges: render at 2x then average

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 225),
    "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (240, 130, 30),
    "cyan": (40, 200, 210), "pink": (240, 120, 180), "white": (240, 240, 240),
    "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (130, 80, 40),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 3.0, "medium": 4.5, "big": 6.0}  # half-extent in pixels
SPEEDS = {"slow": (0.35, 0.6), "normal": (0.6, 1.0), "fast": (1.0, 1.5)}  # px/frame

_SYNONYMS = {
    "grey": "gray", "violet": "purple", "magenta": "pink", "teal": "cyan",
    "circles": "circle", "balls": "circle", "ball": "circle", "disc": "circle",
    "disk": "circle", "dot": "circle", "squares": "square", "box": "square",
    "boxes": "square", "cube": "square", "triangles": "triangle",
    "large": "big", "tiny": "small", "little": "small", "huge": "big",
    "slowly": "slow", "quickly": "fast", "quick": "fast", "rapidly": "fast",
    "wall": "pillar", "column": "pillar", "post": "pillar", "occluder": "pillar",
    "pillars": "pillar", "walls": "pillar",
}
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_FILLER = {"and", "on", "with", "the", "of", "in", "front", "behind", "moving",
           "background", "scene", "that", "is", "are", "which", "move", "bouncing",
           "bounce", "around", "over", "across", "plain", "colored", "coloured"}


class PromptError(ValueError):
    """A prompt from which no scene can be read."""


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str = "medium"


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    background: str
    objects: tuple[ObjectSpec, ...]
    pillar: str | None = None  # colour of the occluding pillar, if any
    speed: str = "normal"

    def describe(self) -> str:
        parts = [f"a {o.size} {o.color} {o.shape}" for o in self.objects]
        text = " and ".join(parts) + f" on a {self.background} background"
        if self.pillar:
            text += f" with a {self.pillar} pillar"
        return text + ("" if self.speed == "normal" else f", {self.speed}")

    def condition_ids(self) -> np.ndarray:
        """Integer ids the model embeds as its prompt: (3 + 3 * MAX_OBJECTS,).

        [background, pillar(0=none), speed, then per slot shape, colour, size
        (0 = empty slot)]; colours are 1-based so 0 can mean "none".
        """
        ids = [COLOR_NAMES.index(self.background) + 1,
               COLOR_NAMES.index(self.pillar) + 1 if self.pillar else 0,
               list(SPEEDS).index(self.speed)]
        for i in range(MAX_OBJECTS):
            if i < len(self.objects):
                o = self.objects[i]
                ids += [SHAPES.index(o.shape) + 1, COLOR_NAMES.index(o.color) + 1,
                        list(SIZES).index(o.size) + 1]
            else:
                ids += [0, 0, 0]
        return np.asarray(ids, dtype=np.int64)


CONDITION_VOCAB = [len(COLORS) + 1, len(COLORS) + 1, len(SPEEDS)] + \
    [len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1] * MAX_OBJECTS


def parse_prompt(prompt: str) -> tuple[SceneSpec, list[str]]:
    """Read a scene from ``prompt``; return it and the words not understood."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: describe shapes and a background, e.g. "
                          "'a red circle and a blue square on a green background'")
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
    unknown: list[str] = []
    objects: list[ObjectSpec] = []
    background = pillar = None
    speed = "normal"
    count, size, color = 1, None, None
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in _COUNTS:
            if color is not None:  # a colour that never met its shape
                unknown.append(color)
            count, size, color = _COUNTS[w], None, None
        elif w in SIZES:
            size = w
        elif w in COLORS:
            if nxt == "background":
                background = w
            elif nxt == "pillar":
                pillar = w
            else:
                color = w
        elif w == "pillar":
            if pillar is None:
                pillar = color or "gray"
            color = None
        elif w in SHAPES:
            if color is None:
                raise PromptError(f"'{w}' has no colour: say e.g. 'a red {w}'")
            objects += [ObjectSpec(w, color, size or "medium")] * count
            count, size, color = 1, None, None
        elif w in SPEEDS:
            speed = w
        elif w not in _FILLER:
            unknown.append(w)
    if color is not None:
        unknown.append(color)
    if not objects:
        raise PromptError("no object found in the prompt: name at least one shape "
                          f"({', '.join(SHAPES)}) with a colour ({', '.join(COLOR_NAMES)})"
                          + (f"; not understood: {', '.join(unknown)}" if unknown else ""))
    if len(objects) > MAX_OBJECTS:
        raise PromptError(f"at most {MAX_OBJECTS} objects, the prompt names {len(objects)}")
    background = background or "black"
    clash = [o.color for o in objects if o.color == background]
    if clash:
        raise PromptError(f"a {clash[0]} object on a {background} background would be invisible")
    if pillar == background:
        raise PromptError(f"a {pillar} pillar on a {background} background would be invisible")
    return SceneSpec(background, tuple(objects), pillar, speed), unknown


def random_spec(rng: np.random.Generator) -> SceneSpec:
    """A random scene of the grammar (training and evaluation suites)."""
    bg = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    colors = [c for c in COLOR_NAMES if c != bg]
    picked = rng.choice(len(colors), size=n, replace=False)
    objs = tuple(ObjectSpec(SHAPES[rng.integers(len(SHAPES))], colors[j],
                            list(SIZES)[rng.integers(len(SIZES))]) for j in picked)
    pillar = None
    if rng.random() < 0.35:
        pillar = [c for c in COLOR_NAMES if c != bg][rng.integers(len(COLOR_NAMES) - 1)]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    return SceneSpec(bg, objs, pillar, speed)


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position after bouncing between walls lo and hi (triangle wave)."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


class Scene:
    """A spec plus the random initial state drawn from ``seed``."""

    PILLAR = (13.0, 19.0)  # x extent of the pillar in pixels

    def __init__(self, spec: SceneSpec, seed: int):
        self.spec, self.seed = spec, int(seed)
        rng = np.random.default_rng(self.seed)
        lo, hi = SPEEDS[spec.speed]
        n = len(spec.objects)
        half = np.array([SIZES[o.size] for o in spec.objects])
        self.pos0 = rng.uniform(half[:, None] + 1, VIEW - half[:, None] - 1, size=(n, 2))
        angle = rng.uniform(0, 2 * np.pi, size=n)
        # mostly horizontal motion, so objects leave sideways and come back
        speed = rng.uniform(lo, hi, size=n)
        self.vel = np.stack([np.cos(angle), 0.45 * np.sin(angle)], -1) * speed[:, None] \
            / np.sqrt(np.cos(angle) ** 2 + (0.45 * np.sin(angle)) ** 2)[:, None]
        self.half = half

    def positions(self, frames) -> np.ndarray:
        """Object centres (T, n, 2) as (x, y) pixels for frame indices ``frames``."""
        t = np.asarray(frames, dtype=np.float64)[:, None, None]
        p = self.pos0[None] + self.vel[None] * t
        x = _reflect(p[..., 0], -MARGIN_X, VIEW + MARGIN_X)
        y = _reflect(p[..., 1], -MARGIN_Y, VIEW + MARGIN_Y)
        return np.stack([x, y], -1)

    def _masks(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """Coverage in [0, 1] of each object (T, n, V, V) and of the pillar (V, V)."""
        s = SUPERSAMPLE
        g = (np.arange(VIEW * s) + 0.5) / s
        gx, gy = g[None, None, None, :], g[None, None, :, None]
        pos = self.positions(frames)
        cx, cy = pos[..., 0][..., None, None], pos[..., 1][..., None, None]
        h = self.half[None, :, None, None]
        dx, dy = gx - cx, gy - cy
        masks = []
        for i, o in enumerate(self.spec.objects):
            hi_, dxi, dyi = h[:, i], dx[:, i], dy[:, i]
            if o.shape == "circle":
                m = dxi ** 2 + dyi ** 2 <= hi_ ** 2
            elif o.shape == "square":
                m = (np.abs(dxi) <= hi_) & (np.abs(dyi) <= hi_)
            else:  # upward triangle inscribed in the square
                m = (dyi <= hi_) & (dyi >= -hi_) & (np.abs(dxi) <= (dyi + hi_) / 2)
            masks.append(m)
        m = np.stack(masks, 1).astype(np.float32)
        m = m.reshape(*m.shape[:2], VIEW, s, VIEW, s).mean((3, 5))
        pillar = np.zeros((VIEW, VIEW), np.float32)
        if self.spec.pillar:
            a, b = self.PILLAR
            cols = (np.arange(VIEW * s) + 0.5) / s
            pillar[:] = ((cols >= a) & (cols <= b)).reshape(VIEW, s).mean(1)[None, :]
        return m, pillar

    def render(self, frames) -> np.ndarray:
        """uint8 frames (T, V, V, 3) for frame indices ``frames``."""
        frames = np.atleast_1d(np.asarray(frames))
        masks, pillar = self._masks(frames)
        img = np.empty((len(frames), VIEW, VIEW, 3), np.float32)
        img[:] = COLORS[self.spec.background]
        for i, o in enumerate(self.spec.objects):
            a = masks[:, i, :, :, None]
            img = img * (1 - a) + a * np.asarray(COLORS[o.color], np.float32)
        if self.spec.pillar:
            a = pillar[None, :, :, None]
            img = img * (1 - a) + a * np.asarray(COLORS[self.spec.pillar], np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def visible_area(self, frames) -> np.ndarray:
        """Visible pixels of each object (T, n): in view, not covered by the pillar
        or by objects drawn after it."""
        frames = np.atleast_1d(np.asarray(frames))
        masks, pillar = self._masks(frames)
        vis = masks.copy()
        for i in range(masks.shape[1]):
            for j in range(i + 1, masks.shape[1]):
                vis[:, i] *= 1 - masks[:, j]
            vis[:, i] *= 1 - pillar[None]
        return vis.sum((2, 3))

    def full_area(self) -> np.ndarray:
        """Area in pixels of each object when fully visible (n,)."""
        a = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
        return np.array([a[o.shape] * h * h for o, h in zip(self.spec.objects, self.half)])


def scene_from_prompt(prompt: str, seed: int) -> tuple[Scene, list[str]]:
    spec, unknown = parse_prompt(prompt)
    return Scene(spec, seed), unknown


EXAMPLE_PROMPTS = [
    "a red circle and a blue square on a green background",
    "a big yellow triangle on a purple background with a gray pillar",
    "a small white circle, a cyan square and an orange triangle on a black background",
    "two pink squares on a blue background, fast",
    "a big green circle on a white background with a brown pillar, slow",
]
