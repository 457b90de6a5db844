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

from ffviz.policies.base import attention_share
from ffviz.policies.scored import ScoredPolicy


@dataclasses.dataclass
class H2O(ScoredPolicy):
    """No parameters of its own; n_sink, n_recent: protected first / newest frames."""
    name = "h2o"

    def observe(self, cache, ctx):
        """Accumulate this chunk's attention, every chunk, even when the cache fits."""
        for i, layer in enumerate(cache.layers):
            acc = layer.aux.setdefault("h2o", layer.mass.new_zeros(layer.mass.shape))
            if ctx.chunk_queries is not None and ctx.chunk_queries[i] is not None:
                layer.aux["h2o"] = acc + attention_share(ctx.chunk_queries[i], layer).to(acc.dtype)

    def score(self, layer, index, ctx):
        """(B, H, N): the attention accumulated so far."""
        return layer.aux["h2o"]
