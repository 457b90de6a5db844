"""Procedural scenes and the prompt grammar of the embedded model.

The world is built to be learnable by a small model on a CPU:

* a plain background and one to three shapes with **hard edges** (no
  anti-aliasing), drawn at **integer positions**, of 8, 10 or 12 pixels (at
  least four 4x4 patches), in colours far apart (``COLORS``);
* **one integer velocity per scene**: |vx| in {1, 2} and vy in {-1, 0, 1} pixels
  per frame, shared by every object (the objects move as one, as under a panning
  camera), so objects never overlap and the next frame follows exactly from the
  last two;
* objects **wrap around the view** (the view is a torus: what leaves at one edge
  comes in at the opposite one, so an object crossing an edge shows in two parts),
  and never turn: the next frame is the last one moved, exactly. In scenes whose
  prompt says they leave the view, the horizontal torus is longer than the view
  by the largest side plus ``EXIT_GAP``: an object leaves whole at one edge and
  comes back at the other after 9-21 frames out of sight;
* optionally a vertical pillar drawn in front of them (``wide``: 16 px, which
  hides an 8-px object for up to 9 frames; else 8 px, which never hides one
  whole).

A scene's trajectories are closed-form (a position modulo its torus), so
frame 1000 costs what frame 0 costs, and they are the ground truth of the
consistency metrics (``ffviz.metrics``) and of training (``ffviz.train``).

Prompts are short English: ``"a red circle and two small blue squares on a
green background with a gray pillar, fast"``. ``parse_prompt`` returns the spec
and notes on what it did not understand or had to assume (an unknown word, a
colour the palette does not have mapped to its nearest, a shape without a
colour drawn in a seeded palette colour); it raises ``PromptError`` when no
scene can be read at all.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

WORLD_VERSION = 5  # bump when what a scene looks like changes (3: the view wraps; 4: one motion;
# 5: objects start whole in the given frames)
VIEW = 32  # frame side in pixels
MAX_OBJECTS = 3
# pixels of world beyond the view (past the object's side) where a leaving object is out of sight
EXIT_GAP = 16
EXITS_ID = 4  # where ``SceneSpec.condition_ids`` says whether objects leave the view
MAX_PROMPT_CHARS = 2000

COLORS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128),
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 225),
    "yellow": (235, 210, 40), "cyan": (40, 200, 210), "purple": (180, 40, 210),
}
COLOR_NAMES = list(COLORS)
# colours of earlier palettes: read as the nearest colour of this one (and said so)
_OLD_COLORS = {"orange": (240, 130, 30), "pink": (240, 120, 180), "brown": (130, 80, 40)}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 8, "medium": 10, "big": 12}  # side in pixels
SPEEDS = {"slow": (1,), "normal": (1, 2), "fast": (2,)}  # |vx| in px/frame
PILLARS = {"narrow": (12, 20), "wide": (8, 24)}  # x extent [a, b) in pixels

_SYNONYMS = {
    "grey": "gray", "violet": "purple", "magenta": "purple", "teal": "cyan",
    "circles": "circle", "balls": "circle", "ball": "circle", "disc": "circle",
    "disk": "circle", "dot": "circle", "dots": "circle", "squares": "square", "box": "square",
    "boxes": "square", "cube": "square", "cubes": "square", "triangles": "triangle",
    "large": "big", "tiny": "small", "little": "small", "huge": "big",
    "slowly": "slow", "quickly": "fast", "quick": "fast", "rapidly": "fast",
    "wall": "pillar", "column": "pillar", "post": "pillar", "occluder": "pillar",
    "pillars": "pillar", "walls": "pillar", "broad": "wide", "thick": "wide",
    "leaving": "leave", "leaves": "leave", "exit": "leave", "exits": "leave",
    "exiting": "leave", "left": "leave",
}
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_FILLER = {"and", "on", "with", "the", "of", "in", "front", "behind", "moving",
           "background", "scene", "that", "is", "are", "which", "move", "bouncing",
           "bounce", "around", "over", "across", "plain", "colored", "coloured", "view",
           "frame", "picture", "different", "colors", "colours", "color", "colour", "they",
           "it", "some", "come", "back", "returning", "then", "and", "to", "from", "each"}


def exit_torus() -> int:
    """The horizontal torus (pixels) of a scene whose objects leave the view: the view, the
    largest object and ``EXIT_GAP`` (60: whole 4-px patches)."""
    return VIEW + max(SIZES.values()) + EXIT_GAP


class PromptError(ValueError):
    """A prompt from which no scene can be read."""


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str = "medium"
    # whether the prompt named the colour: only then does the condition carry it, so an
    # unnamed object's colour lives in the frames (and, once hidden, in the cache) alone
    named: bool = True


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    background: str
    objects: tuple[ObjectSpec, ...]
    pillar: str | None = None  # colour of the occluding pillar, if any
    speed: str = "normal"
    wide_pillar: bool = False
    exits: bool = False  # objects leave the view and come back

    def describe(self) -> str:
        parts = [f"a {o.size} {o.color} {o.shape}" for o in self.objects]
        text = " and ".join(parts) + f" on a {self.background} background"
        if self.pillar:
            text += f" with a {'wide ' if self.wide_pillar else ''}{self.pillar} pillar"
        if self.exits:
            text += ", leaving the view"
        return text + ("" if self.speed == "normal" else f", {self.speed}")

    def palette(self) -> list[str]:
        """The scene's colour names: background first, then objects and pillar."""
        names = [self.background] + [o.color for o in self.objects]
        if self.pillar:
            names.append(self.pillar)
        return list(dict.fromkeys(names))

    def condition_ids(self) -> np.ndarray:
        """Integer ids the model embeds as its prompt: (5 + 3 * MAX_OBJECTS,).

        [background, pillar (0 = none), speed, pillar width, exits, then per slot
        shape, colour, size (0 = empty slot)]; colours are 1-based so 0 can mean "none"
        (an empty slot, or an object whose colour the prompt does not name).
        """
        ids = [COLOR_NAMES.index(self.background) + 1,
               COLOR_NAMES.index(self.pillar) + 1 if self.pillar else 0,
               list(SPEEDS).index(self.speed), int(self.wide_pillar), int(self.exits)]
        for i in range(MAX_OBJECTS):
            if i < len(self.objects):
                o = self.objects[i]
                ids += [SHAPES.index(o.shape) + 1, COLOR_NAMES.index(o.color) + 1 if o.named else 0,
                        list(SIZES).index(o.size) + 1]
            else:
                ids += [0, 0, 0]
        return np.asarray(ids, dtype=np.int64)


CONDITION_VOCAB = [len(COLORS) + 1, len(COLORS) + 1, len(SPEEDS), 2, 2] + \
    [len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1] * MAX_OBJECTS
OBJECT_COLOUR_IDS = tuple(5 + 3 * i + 1 for i in range(MAX_OBJECTS))  # their places in it


def _nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.subtract(COLORS[c], rgb)) ** 2)))


def parse_prompt(prompt: str, seed: int = 0) -> tuple[SceneSpec, list[str]]:
    """Read a scene from ``prompt``; return it and notes: the words not understood,
    and what was assumed (``"orange -> yellow"``, ``"circle: no colour, drawn red"``).
    A shape without a colour gets a palette colour drawn from ``seed``, which the
    condition leaves out (``ObjectSpec.named``)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: describe shapes and a background, e.g. "
                          "'a red circle and a blue square on a green background'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt of {len(prompt)} characters: at most {MAX_PROMPT_CHARS}")
    notes: list[str] = []
    words = []
    for w in re.findall(r"[a-z]+", prompt.lower()):
        w = _SYNONYMS.get(w, w)
        if w in _OLD_COLORS:
            new = _nearest_color(_OLD_COLORS[w])
            notes.append(f"{w} -> {new}")
            w = new
        words.append(w)
    objects: list[tuple[str, str | None, str]] = []  # (shape, colour or None, size)
    background = pillar = None
    speed, wide, exits = "normal", False, False
    count, size, color = 1, None, None
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in _COUNTS:
            if color is not None:  # a colour that never met its shape
                notes.append(color)
            count, size, color = _COUNTS[w], None, None
        elif w in SIZES:
            size = w
        elif w == "wide":
            wide = True
        elif w in COLORS:
            if nxt == "background":
                background = w
            elif nxt == "pillar" or (nxt == "wide" and i + 2 < len(words) and words[i + 2] == "pillar"):
                pillar = w
            else:
                color = w
        elif w == "pillar":
            if pillar is None:
                pillar = color or "gray"
            color = None
        elif w in SHAPES:
            objects += [(w, color, size or "medium")] * count
            count, size, color = 1, None, None
        elif w in SPEEDS:
            speed = w
        elif w == "leave":
            exits = True
        elif w not in _FILLER:
            notes.append(w)
    if color is not None:
        notes.append(color)
    if not objects:
        raise PromptError("no object found in the prompt: name at least one shape "
                          f"({', '.join(SHAPES)}), e.g. 'a red circle'"
                          + (f"; not understood: {', '.join(notes)}" if notes else ""))
    if len(objects) > MAX_OBJECTS:
        raise PromptError(f"at most {MAX_OBJECTS} objects, the prompt names {len(objects)}")
    background = background or "black"
    clash = [c for _, c, _ in objects if c == background]
    if clash:
        raise PromptError(f"a {clash[0]} object on a {background} background would be invisible")
    if pillar == background:
        raise PromptError(f"a {pillar} pillar on a {background} background would be invisible")
    if wide and pillar is None:
        notes.append("wide")
        wide = False
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 11])
    taken = {background, pillar} | {c for _, c, _ in objects if c}
    objs = []
    for shape, c, s in objects:
        color_named = c is not None
        if c is None:  # a seeded colour the scene does not use yet (else any but the background's)
            free = [n for n in COLOR_NAMES if n not in taken] or \
                   [n for n in COLOR_NAMES if n not in (background, pillar)]
            c = free[int(rng.integers(len(free)))]
            taken.add(c)
            notes.append(f"{shape}: no colour, drawn {c}")
        objs.append(ObjectSpec(shape, c, s, named=color_named))
    return SceneSpec(background, tuple(objs), pillar, speed, wide, exits), notes


def random_spec(rng: np.random.Generator, exits_share: float = 0.3,
                pillar_share: float = 0.35) -> SceneSpec:
    """A random scene of the grammar (training and evaluation suites): distinct
    colours within a scene."""
    names = list(COLOR_NAMES)
    order = rng.permutation(len(names))
    bg = names[order[0]]
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objs = tuple(ObjectSpec(SHAPES[rng.integers(len(SHAPES))], names[order[1 + j]],
                            list(SIZES)[rng.integers(len(SIZES))]) for j in range(n))
    pillar, wide = None, False
    if rng.random() < pillar_share:
        pillar = names[order[1 + n]]
        wide = bool(rng.random() < 1 / 3)
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    exits = bool(rng.random() < exits_share)
    return SceneSpec(bg, objs, pillar, speed, wide, exits)


def restyled_spec(rng: np.random.Generator, spec: SceneSpec, reshape: float = 0.3) -> SceneSpec:
    """``spec`` under another prompt of the same motion: new background, object and
    pillar colours (distinct within the scene), each object's shape redrawn with
    probability ``reshape``; sizes, speed, pillar width and exits stay."""
    order = rng.permutation(len(COLOR_NAMES))
    names = [COLOR_NAMES[i] for i in order]
    objs = tuple(ObjectSpec(SHAPES[rng.integers(len(SHAPES))] if rng.random() < reshape else o.shape,
                            names[1 + j], o.size) for j, o in enumerate(spec.objects))
    pillar = names[1 + len(objs)] if spec.pillar else None
    return dataclasses.replace(spec, background=names[0], objects=objs, pillar=pillar)


def _bitmap(shape: str, side: int) -> np.ndarray:
    """The object's pixels (side, side) bool: pixel centres inside the shape."""
    c = (np.arange(side) + 0.5)
    y, x = c[:, None], c[None, :]
    if shape == "circle":
        return (x - side / 2) ** 2 + (y - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "square":
        return np.ones((side, side), bool)
    row = np.arange(side)[:, None]  # upward triangle: width grows by 2 px every 2 rows
    return np.abs(x - side / 2) <= (row // 2 + 1)


def _overlap(a: np.ndarray, b: np.ndarray, side_a: int, side_b: int, period: np.ndarray) -> bool:
    """Whether two objects' boxes at top-left corners ``a`` and ``b`` overlap on the torus."""
    d = np.mod(b - a, period)
    return bool(np.all((d < side_a) | (np.mod(-d, period) < side_b)))


def _apart(rng: np.random.Generator, side: np.ndarray, period: np.ndarray,
           shown: np.ndarray | None = None, vx: int = 0, across_edge: bool = False) -> np.ndarray:
    """Top-left corners (n, 2) in view whose boxes do not overlap on the torus: drawn
    until they are apart and, with ``shown`` ((period_x,) bool: the world's columns the
    view shows, the pillar's not), until every object is whole in the given frames
    (frames 0 and 1, moving ``vx`` px between them); the best draw where none is (a
    wide pillar in a scene leaving the view leaves no room). ``across_edge``:
    a corner may put the box across the view's right edge (a view that wraps: it shows
    in two parts), the only room beside a wide pillar for an object of 10 or 12 px.
    Failing to draw apart a thousand times, corners (0, 0), (s, 0), (0, s) moved
    together, s the largest side."""
    n, s = len(side), max(SIZES.values())

    def seen(x, w):  # which of the columns an object at x covers in frames 0 and 1 are shown
        return shown[(x + np.arange(min(0, vx), w + max(0, vx))) % len(shown)]

    # each object's columns to draw from: those where it is whole (all of them if none is)
    starts = []
    for w in side:
        xs = np.arange(VIEW if across_edge else VIEW - w + 1)
        if shown is not None:
            whole = np.array([seen(x, w).all() for x in xs])
            xs = xs[whole] if whole.any() else xs
        starts.append(xs)
    best, best_shown = None, -1.0
    for _ in range(1000):
        pick = rng.integers(0, [len(xs) for xs in starts])
        pos = np.stack([np.array([xs[k] for xs, k in zip(starts, pick)]),
                        rng.integers(0, VIEW - side + 1)], -1)
        if any(_overlap(pos[i], pos[j], side[i], side[j], period)
               for i in range(n) for j in range(i + 1, n)):
            continue
        if shown is None:
            return pos
        share = min(seen(x, w).mean() for x, w in zip(pos[:, 0], side))
        if share == 1.0:
            return pos
        if share > best_shown:
            best, best_shown = pos, share
    if best is not None:
        return best
    corner = np.array([[0, 0], [s, 0], [0, s]])[:n]
    return np.mod(corner + rng.integers(0, VIEW - s + 1, size=2), period)


class Scene:
    """A spec plus the integer initial state drawn from ``seed`` (at frame ``t0``)."""

    def __init__(self, spec: SceneSpec, seed: int):
        self.spec, self.seed, self.t0 = spec, int(seed), 0
        rng = np.random.default_rng(self.seed)
        n = len(spec.objects)
        self.side = np.array([SIZES[o.size] for o in spec.objects])
        self.bitmaps = [_bitmap(o.shape, SIZES[o.size]) for o in spec.objects]
        # one torus for all objects (n, 2) for x and y: top-left corners live in [0, period)
        width = exit_torus() if spec.exits else VIEW
        self.period = np.tile([width, VIEW], (n, 1))
        self.pillar_x = PILLARS["wide" if spec.wide_pillar else "narrow"] if spec.pillar else None
        # every object starts whole in the given frames (image-to-video: what the model is
        # to hold is shown first; an object that starts behind the pillar or out of view
        # would have to be invented, not remembered), apart from the others
        shown = np.arange(width) < VIEW
        if self.pillar_x:
            shown[self.pillar_x[0]:self.pillar_x[1]] = False
        # one velocity for the scene: objects move as one, so they never overlap
        vx = rng.choice(SPEEDS[spec.speed]) * rng.choice([-1, 1])
        self.vel = np.tile([vx, rng.integers(-1, 2)], (n, 1))
        self.pos0 = _apart(rng, self.side, self.period[0], shown, int(vx),
                           across_edge=bool(spec.pillar) and not spec.exits)

    def positions(self, frames) -> np.ndarray:
        """Top-left corners (T, n, 2) as integer (x, y) pixels in [0, period) for frame
        indices ``frames``."""
        t = np.asarray(frames, dtype=np.int64)[:, None, None] - self.t0
        return np.mod(self.pos0[None] + self.vel[None] * t, self.period[None])

    def continued(self, spec: SceneSpec, frame: int) -> "Scene":
        """The scene from ``frame`` on under another prompt: object i keeps object i's
        position (on its new torus) and motion, while the looks and background follow
        ``spec``; an object the old scene lacks starts where the seed puts it."""
        new = Scene(spec, self.seed)
        new.t0 = int(frame)
        pos, vel = self.positions([frame])[0], self.velocities(frame)
        k = min(len(pos), len(new.pos0))
        new.pos0[:k] = np.mod(pos[:k], new.period[:k])
        if len(vel):  # the scene keeps its one motion
            new.vel[:] = vel[0]
        return new

    def velocities(self, frame: int) -> np.ndarray:
        """(n, 2) velocities at ``frame`` (signed; nothing turns, so every frame's)."""
        return self.vel.copy()

    def step(self, pos: np.ndarray, vel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame of motion of top-left corners ``pos`` (n, 2) at ``vel``: the new
        positions (around the torus) and velocities (the closed form, one step at a time)."""
        return np.mod(pos + vel, self.period), vel

    def centres(self, frames) -> np.ndarray:
        """Object centres (T, n, 2) as (x, y) pixels."""
        return self.positions(frames) + self.side[None, :, None] / 2

    def object_masks(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coverage of each object (T, n, V, V) bool for top-left ``positions`` (T, n, 2),
        and of the pillar (V, V). An object is drawn on its torus, of which the view is
        the top-left corner."""
        T, n = positions.shape[:2]
        masks = np.zeros((T, n, VIEW, VIEW), bool)
        for i, bm in enumerate(self.bitmaps):
            s = bm.shape[0]
            width, height = (int(v) for v in self.period[i])
            world = np.zeros((height, width), bool)
            for t in range(T):
                x, y = int(positions[t, i, 0]), int(positions[t, i, 1])
                rows, cols = (y + np.arange(s)) % height, (x + np.arange(s)) % width
                world[:] = False
                world[np.ix_(rows, cols)] = bm
                masks[t, i] = world[:VIEW, :VIEW]
        pillar = np.zeros((VIEW, VIEW), bool)
        if self.pillar_x:
            pillar[:, self.pillar_x[0]:self.pillar_x[1]] = True
        return masks, pillar

    def render_positions(self, positions: np.ndarray) -> np.ndarray:
        """uint8 frames (T, V, V, 3) with the objects at top-left ``positions`` (T, n, 2)."""
        masks, pillar = self.object_masks(positions)
        img = np.empty((len(positions), VIEW, VIEW, 3), np.uint8)
        img[:] = COLORS[self.spec.background]
        for i, o in enumerate(self.spec.objects):
            img[masks[:, i]] = COLORS[o.color]
        if self.spec.pillar:
            img[:, pillar] = COLORS[self.spec.pillar]
        return img

    def render(self, frames) -> np.ndarray:
        """uint8 frames (T, V, V, 3) for frame indices ``frames``."""
        return self.render_positions(self.positions(np.atleast_1d(np.asarray(frames))))

    def visibleobject_masks(self, positions: np.ndarray) -> np.ndarray:
        """Visible pixels of each object (T, n, V, V) bool: in view, not covered by the
        pillar or by objects drawn after it."""
        masks, pillar = self.object_masks(positions)
        vis = masks & ~pillar
        for i in range(masks.shape[1]):
            for j in range(i + 1, masks.shape[1]):
                vis[:, i] &= ~masks[:, j]
        return vis

    def visible_area(self, frames) -> np.ndarray:
        """Visible pixels of each object (T, n)."""
        return self.visibleobject_masks(self.positions(np.atleast_1d(np.asarray(frames)))).sum((2, 3))

    def full_area(self) -> np.ndarray:
        """Area in pixels of each object when fully visible (n,)."""
        return np.array([bm.sum() for bm in self.bitmaps])


def scene_story(scene: Scene, switches, seed: int) -> list[Scene]:
    """The scenes of a run whose prompt switched: ``scene`` then, per switch
    (``{"frame", "prompt"}``, in order), the scene continued under its prompt."""
    story = [scene]
    for s in switches:
        story.append(story[-1].continued(parse_prompt(s["prompt"], seed)[0], s["frame"]))
    return story


def palette_rgb(spec: SceneSpec) -> np.ndarray:
    """(P, 3) uint8 colours of the scene (``SceneSpec.palette``)."""
    return np.array([COLORS[c] for c in spec.palette()], np.uint8)


def scene_from_prompt(prompt: str, seed: int) -> tuple[Scene, list[str]]:
    spec, notes = parse_prompt(prompt, seed)
    return Scene(spec, seed), notes


EXAMPLE_PROMPTS = [
    "a red circle and a blue square on a black background",
    "a big yellow triangle on a purple background with a gray pillar",
    "a small white circle, a cyan square and a red triangle on a black background",
    "a green square and a yellow circle on a blue background, fast",
    "a big red circle and a small cyan square on a white background, leaving the view",
]
