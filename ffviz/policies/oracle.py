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

from ffviz.policies.base import PolicyError, attention_share
from ffviz.policies.scored import ScoredPolicy


@dataclasses.dataclass
class Oracle(ScoredPolicy):
    """No parameters of its own; n_sink, n_recent: protected first / newest frames
    (none by default)."""
    name = "oracle"
    offline: ClassVar[bool] = True  # needs a reference run: not offered for live runs
    n_recent: int = 0

    def score(self, layer, index, ctx):
        """(B, H, N): the mean share a_j over the true future queries (0 past the end)."""
        if ctx.future_queries is None:
            raise PolicyError("the oracle policy is offline: it needs the future queries of a "
                              "full-cache reference run; run it through `python -m ffviz eval`")
        q = ctx.future_queries(index)  # None or m = 0 past the end of the run: scores 0
        if q is None:
            return layer.mass.new_zeros(layer.mass.shape)
        return attention_share(q, layer) / max(q.shape[2], 1)
