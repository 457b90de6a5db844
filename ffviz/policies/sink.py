"""Attention sink: the first ``n_sink`` frames plus the newest frames.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks") keeps the first tokens as a sink; LongLive (Yang et al., 2025)
keeps the first frame chunk as a frame sink for long video generation.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ffviz.policies.scored import ScoredPolicy


@dataclasses.dataclass
class Sink(ScoredPolicy):
    """n_sink: frames at the start of the run that are always kept (>= 0); the rest of
    the budget goes to the newest frames."""
    name = "sink"
    n_sink: int = 1
    n_recent: int = dataclasses.field(default=0, init=False, repr=False)  # recency keeps them
    # a frame index is no attention share: heads' scores cannot be pooled (head_budget.py)
    head_budget: str = dataclasses.field(default="uniform", init=False, repr=False)
    head_floor: float = dataclasses.field(default=1.0, init=False, repr=False)
    protected_names: ClassVar[str] = "n_sink"

    def score(self, layer, index, ctx):
        """(B, H, N): the source frame, so that the newest rank first."""
        return layer.frame.float()

    def decide(self, cache, ctx, score, sel):
        decision = super().decide(cache, ctx, score, sel)
        for d in decision.layers:
            d.score = None  # recency is an order, not a score: the log shows none
        return decision
