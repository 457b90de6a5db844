"""Quality over time: how well each run keeps its scene, frame by frame, and where
the scene tests memory (an object hides and comes back).

``quality(session)``: the per-frame curves of ``ffviz.metrics.consistency`` for
the frames generated so far (cached per frame count: the plots ask often).
``hide_events``: the scene's own truth of when each object is hidden, for the
whole planned run (drawn before the run gets there). ``QualityLog``: one line
per finished run of a user (policy, budget, cache size, mean quality), for
quality against cache size across runs and budgets.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ffviz.metrics import consistency, hidden_spans
from ffviz.scenes import Scene


def quality(session) -> dict | None:
    """``consistency`` of the session's generated frames (None: a model without scenes
    or nothing generated yet), recomputed only when frames were added."""
    spec, g = session.job.spec, session.cfg.given_frames
    n = len(session.frames)
    if spec is None or n <= g:
        return None
    cached = getattr(session, "_quality", None)
    if cached is None or cached[0] != n:
        video = np.asarray(session.frames.all()[g:n])
        session._quality = (n, consistency(video, Scene(spec, session.settings.seed), start=g))
    return session._quality[1]


def curves(session, label: str | None = None) -> dict | None:
    """Per-frame consistency and tracking, with their frame numbers and the run's
    return events (what the quality figures draw), named ``label`` (default: the
    run's policy)."""
    q = quality(session)
    if q is None:
        return None
    g = session.cfg.given_frames
    c = q["curves"]
    policy = session.steps[-1].policy if session.steps else session.tag.policy
    return {"label": label or policy, "policy": policy,
            "frames": list(range(g, g + len(c["consistency"]))), "consistency": c["consistency"],
            "tracking": c["tracking"], "returns": q["return_events"]}


def hide_events(spec, seed: int, frames: int) -> list[dict]:
    """When each object of the scene hides (leaves the view or goes behind the
    pillar) and comes back, over ``frames`` frames: name, left, back (back = frames:
    it does not come back within the run)."""
    if spec is None:
        return []
    vis = Scene(spec, seed).visible_area(np.arange(frames))
    return [{"name": f"{o.color} {o.shape}", "object": i, "left": left, "back": back}
            for i, o in enumerate(spec.objects) for left, back in hidden_spans(vis[:, i])]


@dataclasses.dataclass
class QualityPoint:
    """One finished run, for quality against cache size."""
    run: str  # the run's tag text
    policy: str
    budget_frames: int
    cache_tokens: int  # peak cached tokens per head
    consistency: float | None
    tracking: float | None
    prompt: str = ""
    seed: int = 0
    curve: dict | None = None  # its per-frame curves (``curves``)


class QualityLog:
    """A user's finished runs (their own state: never shared between users)."""

    MAX = 200

    def __init__(self):
        self.points: list[QualityPoint] = []

    def add(self, session) -> None:
        q, s = quality(session), session.summary
        if q is None or s is None:
            return
        num = lambda x: None if x is None or x != x else round(float(x), 4)
        self.points.append(QualityPoint(
            session.tag.text(), s["policy"], s["budget_frames"], s["peak_cache_tokens"],
            num(q["consistency"]), num(q["tracking"]), s["prompt"], s["seed"],
            curves(session, f"{session.tag.run_id} {s['policy']}")))
        del self.points[:-self.MAX]

    def as_dicts(self) -> list[dict]:
        return [dataclasses.asdict(p) for p in self.points]

    def same_scene(self, session, exclude=None, last: int = 3) -> list[dict]:
        """Curves of the newest finished runs with the session's prompt and seed (to
        compare policies run one after another)."""
        s = session.settings
        same = [p.curve for p in self.points if p.prompt == s.prompt and p.seed == s.seed
                and p.curve and p.run != exclude]
        return same[-last:]
