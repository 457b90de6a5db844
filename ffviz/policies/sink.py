"""Attention sink: the first ``n_sink`` frames plus the newest frames.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks") keeps the first tokens as a sink; LongLive (Yang et al., 2025)
keeps the first frame chunk as a frame sink for long video generation.
"""
from __future__ import annotations

import dataclasses

from ffviz.cache import Decision, LayerDecision
from ffviz.policies.base import Policy, check_range, protected_mask, select


@dataclasses.dataclass
class Sink(Policy):
    """n_sink: frames at the start of the run that are always kept (>= 0)."""
    name = "sink"
    n_sink: int = 1

    def validate(self):
        check_range("n_sink", self.n_sink, 0)

    def compress(self, cache, budget_tokens, ctx):
        if cache.size <= budget_tokens:
            return None
        layers = []
        for layer in cache.layers:
            recency = layer.frame.float()  # an order, not a score: the decision carries none
            sink = protected_mask(layer.frame, ctx, self.n_sink, 0, budget_tokens, "n_sink")
            keep = select(recency, budget_tokens, layer.frame, sink, "n_sink")
            layers.append(LayerDecision(keep=keep))
        return Decision(layers)
