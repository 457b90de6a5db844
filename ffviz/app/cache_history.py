"""What the policy saw and did at each compression step, kept compactly so the cache
view can replay any step, not only the newest.

A ``CacheSnapshot`` (session.py) holds references to the live cache's tensors; a
``CacheStep`` is its plain, compact copy: per layer (H, N) numpy arrays of each
token's source frame, row, column and mass, and the decision as a state (kept /
merged / dropped), a merge target and a score. ``CacheHistory`` keeps the steps of
a run within a memory bound: past it, every other older step goes (a long run
keeps evenly spaced steps and always its newest).
"""
from __future__ import annotations

import dataclasses

import numpy as np

KEPT, MERGED, DROPPED = 0, 1, 2
MAX_BYTES = 32_000_000  # per run; a budgeted run's steps are ~50 kB each


@dataclasses.dataclass
class CacheStep:
    step: int  # chunk index
    frame: int  # newest frame of the chunk
    budget_tokens: int
    compressed: bool  # False: the cache fit, the policy kept everything
    layers: list[dict]  # per layer: frame, row, col, mass, state, into (H, N); score (H, N) or None

    def tokens(self, layer: int, head: int) -> dict:
        """One head's tokens as 1-D arrays (what the figures draw)."""
        arrays = self.layers[layer]
        out = {k: (None if v is None else v[head]) for k, v in arrays.items()}
        out.update(step=self.step, frame_now=self.frame, budget_tokens=self.budget_tokens,
                   compressed=self.compressed)
        return out

    def nbytes(self) -> int:
        return sum(v.nbytes for l in self.layers for v in l.values() if v is not None)


def decision_arrays(n: int, heads: int, layer_decision) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """state (H, N), merge target (H, N; -1 none) and score (H, N) or None of one
    layer's decision; no decision means everything was kept."""
    state = np.full((heads, n), KEPT, np.int8)
    into = np.full((heads, n), -1, np.int32)
    if layer_decision is None:
        return state, into, None
    state[:] = DROPPED
    keep = layer_decision.keep[0].numpy()
    np.put_along_axis(state, keep, KEPT, -1)
    if layer_decision.merge_into is not None:
        into = layer_decision.merge_into[0].numpy().astype(np.int32)
        state[(state == DROPPED) & (into >= 0)] = MERGED
    score = None if layer_decision.score is None else layer_decision.score[0].float().numpy().astype(np.float32)
    return state, into, score


def capture(snapshot) -> CacheStep:
    """The compact copy of a ``CacheSnapshot``."""
    layers = []
    for l, prov in enumerate(snapshot.provenance):
        heads, n = prov["frame"].shape
        d = None if snapshot.decision is None else snapshot.decision.layers[l]
        state, into, score = decision_arrays(n, heads, d)
        layers.append({"frame": prov["frame"].numpy().astype(np.int32),
                       "row": prov["row"].numpy().astype(np.int16),
                       "col": prov["col"].numpy().astype(np.int16),
                       "mass": prov["mass"].float().numpy().astype(np.float16),
                       "state": state, "into": into, "score": score})
    return CacheStep(snapshot.step, snapshot.frame, snapshot.budget_tokens,
                     snapshot.decision is not None, layers)


class CacheHistory:
    """The compression steps of one run, oldest first, within ``max_bytes``."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.steps: list[CacheStep] = []
        self._bytes = 0

    def add(self, step: CacheStep) -> None:
        self.steps.append(step)
        self._bytes += step.nbytes()
        while self._bytes > self.max_bytes and len(self.steps) > 2:
            keep = self.steps[:-1][::2] + [self.steps[-1]]  # thin the old ones, keep the newest
            self._bytes = sum(s.nbytes() for s in keep)
            self.steps = keep

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> CacheStep:
        return self.steps[i]
