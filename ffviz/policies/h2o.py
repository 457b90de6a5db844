"""Heavy hitters: keep the tokens that received the most attention so far.

H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models"). Every chunk, the attention each cached
token receives from the chunk's queries (``ctx.chunk_queries``, last denoising
step, softmax over the whole cache with the log-mass bias) is added to
``cache[l].aux["h2o"]`` (B, H, N); the cache carries it with the tokens (summed
on merge). The newest ``n_recent`` frames are kept, as H2O keeps a recent window.
"""
from __future__ import annotations

import dataclasses

from ffviz.cache import Decision, LayerDecision
from ffviz.policies.base import (Policy, attention_share, check_range, protected_mask,
                                 select)


@dataclasses.dataclass
class H2O(Policy):
    """n_sink, n_recent: protected first / newest frames (>= 0)."""
    name = "h2o"
    n_sink: int = 0
    n_recent: int = 1

    def validate(self):
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)

    def compress(self, cache, budget_tokens, ctx):
        for i, layer in enumerate(cache.layers):  # accumulate every chunk, even when it fits
            acc = layer.aux.setdefault("h2o", layer.mass.new_zeros(layer.mass.shape))
            if ctx.chunk_queries is not None and ctx.chunk_queries[i] is not None:
                layer.aux["h2o"] = acc + attention_share(ctx.chunk_queries[i], layer).to(acc.dtype)
        if cache.size <= budget_tokens:
            return None
        layers = []
        for layer in cache.layers:
            score = layer.aux["h2o"]
            prot = protected_mask(layer.frame, ctx, self.n_sink, self.n_recent, budget_tokens)
            keep = select(score, budget_tokens, layer.frame, prot)
            layers.append(LayerDecision(keep=keep, score=score))
        return Decision(layers)
