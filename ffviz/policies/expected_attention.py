"""Expected Attention: one Gaussian expected-attention score with averaged rotation.

kvpress's ExpectedAttentionPress (NVIDIA, 2025, "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution"), as read in
docs/policies.md: fit pre-RoPE queries with N(mu, Sigma), average the
rotation over the future positions, Rbar = mean_p R(p), and take ONE softmax:

    z_j = (Rbar mu).k'_j / sqrt(d) + k'_j^T Rbar Sigma Rbar^T k'_j / (2d) + log m_j
    a_j = softmax_j(z_j)                     (x ||v_j|| when value_norm)

``statistics="current"``: mu and Sigma of the current chunk's queries (as kvpress
fits the latest queries; ``ctx.chunk_queries`` de-rotated to pre-RoPE);
"historical": the run's streaming statistics ``ctx.stats``, the same ones Future
Forcing reads. With one future position and the same statistics this equals
Future Forcing with rank = d and no merging. Rbar is block-diagonal with the
mean cos/sin of each plane.

``tau > 0`` merges evicted tokens as Future Forcing does (``policies.merge``), under
the metric M = Rbar (mu mu^T + Sigma) Rbar^T of the same statistics: not part of
kvpress's press, it is there so that ``ffviz ablate`` can compare score and merge
for both policies (off by default).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch

from ffviz.models.rope import apply_rotation
from ffviz.policies.base import (StatisticsAtSwitch, check_bool, check_choice, check_range,
                                 future_positions, need, plane_matrix)
from ffviz.policies.merge import merge_to_nearest
from ffviz.policies.scored import ScoredPolicy, stack_layers


@dataclasses.dataclass
class ExpectedAttention(StatisticsAtSwitch, ScoredPolicy):
    """horizon: future frames averaged over (1-64); stride: positions every
    stride-th row and column (1 = the whole grid, 1-64); statistics: "current" or
    "historical"; value_norm: multiply by ||v||; tau: merge threshold as Future
    Forcing's (0 = never merge, the default; up to 100); n_sink, n_recent: protected
    first / newest frames (a frame sink by default); on_switch, switch_half_life: the
    statistics at a prompt switch (``StatisticsAtSwitch``)."""
    name = "expected_attention"
    n_sink: int = 1
    horizon: int = 1
    stride: int = 1
    statistics: str = "current"
    value_norm: bool = False
    tau: float = 0.0
    needs: ClassVar[tuple[str, ...]] = ("rope",)
    _metric: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False,
                                                     compare=False)
    _keys: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False,
                                                   compare=False)

    def __post_init__(self):
        super().__post_init__()
        self.check_switch_rule()
        check_range("horizon", self.horizon, 1, 64)
        check_range("stride", self.stride, 1, 64)
        check_choice("statistics", self.statistics, ("current", "historical"))
        check_bool("value_norm", self.value_norm)
        check_range("tau", self.tau, 0.0, 100.0, kind=float)

    def fit(self, ctx, L: int, H: int, d: int):
        """mu (L, H, d), Sigma (L, H, d, d) of pre-RoPE queries (zeros without data)."""
        if self.statistics == "historical":
            need(ctx, self.name, "stats")
            return ctx.stats.mean_all(), ctx.stats.cov_all()
        qs = ctx.chunk_queries
        if qs is None or any(q is None for q in qs):
            return torch.zeros(L, H, d), torch.zeros(L, H, d, d)
        q = torch.stack([q[0] for q in qs]).float()  # (L, H, n, d) post-RoPE, frame-major
        finite = torch.isfinite(q).flatten(1).all(1)
        if not finite.all():
            warnings.warn("expected_attention: non-finite chunk queries; those layers get zero "
                          "statistics", RuntimeWarning)
            q = torch.where(finite.view(L, 1, 1, 1), q, torch.zeros_like(q))
        rows, cols = ctx.grid
        T = q.shape[2] // (rows * cols)
        f = torch.arange(ctx.frame - T + 1, ctx.frame + 1).repeat_interleave(rows * cols)
        y = torch.arange(rows).repeat_interleave(cols).repeat(T)
        x = torch.arange(cols).repeat(rows * T)
        cos, sin = (t.to(q.device) for t in ctx.rope.cos_sin(f, y, x))  # host -> q's device
        q = apply_rotation(q, cos, -sin)  # back to pre-RoPE
        mu = q.mean(2)
        c = q - mu.unsqueeze(2)
        return mu, c.transpose(-1, -2) @ c / q.shape[2]

    def scores(self, cache, ctx):
        """(L, B, H, N): a_j for every layer at once."""
        k, v, mass = stack_layers(cache, "k", "v", "mass")  # (L, B, H, N, ...)
        L, B, H, N, d = k.shape
        mu, sigma = (t.to(k.device) for t in self.fit(ctx, L, H, d))  # stats live on the host
        cos, sin = ctx.rope.cos_sin(*future_positions(ctx, self.horizon, self.stride))
        rbar = plane_matrix(cos.mean(0), sin.mean(0)).to(k.device)  # Rbar = mean_p R(p), (d, d)
        qbar = (mu @ rbar.T).view(L, 1, H, d, 1)  # Rbar mu
        srot = (rbar @ sigma @ rbar.T).unsqueeze(1)  # Rbar Sigma Rbar^T, (L, 1, H, d, d)
        if self.tau > 0:  # the merge metric Rbar (mu mu^T + Sigma) Rbar^T, on these keys
            self._metric, self._keys = srot + qbar @ qbar.transpose(-1, -2), k
        z = (k @ qbar).squeeze(-1) / math.sqrt(d) + ((k @ srot) * k).sum(-1) / (2 * d) \
            + mass.clamp_min(1e-30).log()  # (L, B, H, N)
        score = torch.nan_to_num(z.softmax(-1))
        return score * v.norm(dim=-1) if self.value_norm else score

    def decide(self, cache, ctx, score, sel):
        decision = super().decide(cache, ctx, score, sel)
        if self.tau > 0:
            keys, self._keys = self._keys, None  # held from scores() to here only
            into, distance = merge_to_nearest(keys, sel.keep, self._metric,
                                              self.tau, gone=sel.gone, target=sel.live,
                                              candidate=sel.candidate)
            for i, d in enumerate(decision.layers):
                d.merge_into, d.distance = into[i], distance[i]
        return decision
