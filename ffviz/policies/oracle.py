"""Oracle: evict by the TRUE share of future attention (offline upper bound).

The reference run (full cache, same seed) records the real post-RoPE queries of
the next frames; ``ctx.future_queries(layer)`` gives them (B, H, m, d). Token j
scores its mean attention share over those m queries, softmax over the tokens
now cached with the model's log-mass bias:

    a_j = mean_q softmax_j(q.k'_j / sqrt(d) + log m_j)

(the share among the tokens a policy can choose from, not among the reference
run's full cache). It runs only through ``python -m ffviz eval``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ffviz.cache import Decision, LayerDecision
from ffviz.policies.base import (Policy, PolicyError, attention_share, check_range,
                                 protected_mask, select)


@dataclasses.dataclass
class Oracle(Policy):
    """n_sink, n_recent: protected first / newest frames (>= 0; none by default)."""
    name = "oracle"
    offline: ClassVar[bool] = True  # needs a reference run: not offered for live runs
    n_sink: int = 0
    n_recent: int = 0

    def validate(self):
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)

    def compress(self, cache, budget_tokens, ctx):
        if cache.size <= budget_tokens:
            return None
        if ctx.future_queries is None:
            raise PolicyError("the oracle policy is offline: it needs the future queries of a "
                              "full-cache reference run; run it through `python -m ffviz eval`")
        layers = []
        for i, layer in enumerate(cache.layers):
            q = ctx.future_queries(i)  # None or m = 0 past the end of the run: scores 0
            score = (layer.mass.new_zeros(layer.mass.shape) if q is None else
                     attention_share(q, layer) / max(q.shape[2], 1))
            prot = protected_mask(layer.frame, ctx, self.n_sink, self.n_recent, budget_tokens)
            keep = select(score, budget_tokens, layer.frame, prot)
            layers.append(LayerDecision(keep=keep, score=score))
        return Decision(layers)
