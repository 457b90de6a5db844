"""Future Forcing: evict by the expected share of FUTURE attention, merge redundant keys.

The seed paper's idea as read in docs/policies.md: pre-RoPE query
statistics are stationary over a run, so the queries of the next ``horizon``
frames are predicted per layer and head by N(R(p) mu, R(p) Sigma_r R(p)^T) at
every future position p (Sigma_r: top-``rank`` eigenpairs of the historical
covariance, ``ctx.stats``). Token j scores its expected attention share

    z_pj = (R(p) mu).k'_j / sqrt(d) + sum_i lambda_i ((R(p) u_i).k'_j)^2 / (2d) + log m_j
    a_j  = mean_p softmax_j(z_pj)            (x ||v_j|| when value_norm)

with its own softmax per future position. Protected sink/recent frames stay,
the best ``a_j`` fill the budget, and every other token merges into its nearest
kept token under D(a, b) = (k'_a - k'_b)^T M (k'_a - k'_b) / d,
M = mean_p R(p) (mu mu^T + Sigma_r) R(p)^T, when D <= tau x the median D of
the step (per layer and head), or when its key duplicates the kept one's
(``ffviz.policies.merge``); otherwise it is dropped. ``KVCache.apply``
merges mass-weighted, so the log-mass bias keeps the total mass.
Vectorised over layers and heads; on float32 CPU caches a whole compression is
one numba kernel (``kernels.future_compress``), the same math and rules.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ffviz import kernels
from ffviz.cache import Decision
from ffviz.policies.base import (StatisticsAtSwitch, check_bool, check_range, future_positions,
                                 rotate)
from ffviz.policies.eigen_tracking import EigenTracker
from ffviz.policies.merge import merge_to_nearest
from ffviz.policies.scored import (ScoredPolicy, Selection, check_protected_tokens, stack_layers,
                                   warn_non_finite)


@dataclasses.dataclass
class FutureForcing(StatisticsAtSwitch, ScoredPolicy):
    """horizon: future frames predicted (1-64); stride: proxy positions every
    stride-th row and column (1 = the whole grid, 1-64); rank: eigenpairs of Sigma
    (0 = mean only, capped at d; the default 1 scored as 2 did in ``ffviz eval`` over
    6 seeds, for ~20% less time); value_norm: multiply by ||v||; tau: merge
    threshold relative to the step's median D (0 = never merge, up to 100; the default
    4 merges nearly every evicted token: in ``ffviz eval`` more merging tracked the
    full cache closer: 0.5 -> 4 gave +9 to +12 dB PSNR vs full at budgets 2-6);
    eig_every: an exact eigendecomposition at least every this many compressions
    (1-1000; in between the eigenpairs are tracked, ``eigen_tracking``; in
    ``ffviz eval`` 64 and 16 gave the same fidelity to the third digit);
    n_sink, n_recent: protected first / newest frames (a frame sink by default);
    head_budget, head_floor: per-head budgets (``ScoredPolicy``; adaptive runs the PyTorch
    path, the CPU kernel keeps the same number in every head);
    on_switch, switch_half_life: the statistics at a prompt switch (``StatisticsAtSwitch``)."""
    name = "future_forcing"
    n_sink: int = 1
    horizon: int = 1
    stride: int = 2
    rank: int = 1
    value_norm: bool = False
    tau: float = 4.0
    eig_every: int = 64
    needs: ClassVar[tuple[str, ...]] = ("stats", "rope")
    _tracker: EigenTracker = dataclasses.field(init=False, repr=False, compare=False)
    _angles: tuple = dataclasses.field(default=(None, None), init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        self.check_switch_rule()
        check_range("horizon", self.horizon, 1, 64)
        check_range("stride", self.stride, 1, 64)
        check_range("rank", self.rank, 0, 1024)
        check_bool("value_norm", self.value_norm)
        check_range("tau", self.tau, 0.0, 100.0, kind=float)
        check_range("eig_every", self.eig_every, 1, 1000)
        self._tracker = EigenTracker(self.eig_every)

    def compress(self, cache, budget_tokens, ctx):
        if not self.must_evict(cache, budget_tokens, ctx):
            return None
        if (kernels.compiled_cpu(*(t for l in cache.layers for t in (l.k, l.v, l.mass)))
                and self.head_budget == "uniform" and not cache.has_dead()):  # the kernel: K per head
            return self._compress_compiled(cache, budget_tokens, ctx)
        k, mass, frame = stack_layers(cache, "k", "mass", "frame")  # (L, B, H, N, ...)
        score, w, P = self.scores(cache, ctx, k, mass)
        sel = self.select(score, frame, budget_tokens, ctx, mass > 0)
        # M = mean_p R(p) (mu mu^T + Sigma_r) R(p)^T = F^T F with F = w / sqrt(P): the
        # proxies are the metric's factor, so with (1 + r) P < d the search runs on w.k
        merges = (merge_to_nearest(k, sel.keep, None, self.tau, factor=w / P ** 0.5, gone=sel.gone,
                                   target=sel.live, candidate=sel.candidate)
                  if self.tau > 0 else None)
        return self.merging_decision(cache, ctx, score, sel, merges)

    def scores(self, cache, ctx, k, mass):
        """The future share of every cached token (L, B, H, N) (x ||v|| with
        ``value_norm``), and the proxies (w, P) it was computed from."""
        w, P = self.proxies(ctx, k.shape[-1])  # built on the host, from the host statistics
        w = w.to(k.device)
        score = self.future_share(k, mass, w, P)
        if self.value_norm:
            score = score * torch.stack([l.v.norm(dim=-1) for l in cache.layers])
        return score, w, P

    def merging_decision(self, cache, ctx, score, sel, merges, prepared=None) -> Decision:
        """The decision for the ``Selection`` sel, with the merges (merge_into, distance)
        (L, B, H, N) or None (tau = 0), and the cache it leaves where the CPU kernel made it."""
        decision = self.decide(cache, ctx, score, sel)
        decision.prepared = prepared
        for i, d in enumerate(decision.layers if merges else ()):
            d.merge_into, d.distance = merges[0][i], merges[1][i]
        return decision

    def proxies(self, ctx, d: int) -> tuple[torch.Tensor, int]:
        """The proxy queries (L, 1, H, (1 + r) P, d): R(p) mu for the P positions,
        then sqrt(lambda_i) R(p) u_i for i = 1..r (direction-major), and P."""
        lam, u = self._tracker.eigenpairs(ctx.stats, ctx.frame, min(self.rank, d))
        if kernels.compiled_cpu_enabled():  # one kernel call; the statistics live on the host
            spatial, ahead, per_frame = self._proxy_angles(ctx)
            mean = ctx.stats.moments()[1]  # float64, no copy
            w = kernels.future_proxies(mean, u, lam, spatial, ahead, per_frame, ctx.frame)
            return w.unsqueeze(1), spatial.shape[0]
        pos = future_positions(ctx, self.horizon, self.stride)
        vecs = torch.cat([ctx.stats.mean_all().unsqueeze(2), u * lam.sqrt().unsqueeze(-1)], 2)
        return rotate(vecs, ctx.rope, *pos).flatten(2, 3).unsqueeze(1), pos[0].numel()

    def _proxy_angles(self, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The proxy positions' RoPE angles as ``kernels.future_proxies`` takes them. Angles
        are linear in the position: the spatial angles (P, d/2) (fixed for a grid) are kept
        between calls, with each position's frame offset from the next frame (P,) and the
        angles of one frame (d/2,) (float64, the products ``Rope3D.angles`` makes); the
        kernel adds the current frame."""
        key = (ctx.grid, self.horizon, self.stride, ctx.rope)
        if self._angles[0] != key:
            f, y, x = future_positions(ctx, self.horizon, self.stride)
            spatial = ctx.rope.angles(0, y, x)  # (P, d/2), temporal planes 0
            per_frame = ctx.rope.angles(1, 0, 0)  # (d/2,), spatial planes 0
            self._angles = (key, (spatial, (f - ctx.frame - 1).double(), per_frame))
        return self._angles[1]

    def future_share(self, k, mass, w, P: int):
        """k (L, B, H, N, d); mass (L, B, H, N); proxies w (L, 1, H, (1 + r) P, d)
        -> a (L, B, H, N), through the ``kernels.future_score`` dispatch (Triton on
        CUDA, PyTorch elsewhere) with layers, batch and heads flattened. The
        direction proxies already carry sqrt(lambda_i), so their eigenvalues are 1."""
        L, B, H, N, d = k.shape
        X, r = L * B * H, w.shape[-2] // P - 1
        w = w.expand(L, B, H, -1, d).reshape(X, (1 + r) * P, d)
        dirs = w[:, P:].reshape(X, r, P, d).transpose(1, 2)  # (X, P, r, d)
        log_mass = mass.clamp_min(1e-30).log().reshape(X, N)
        a = kernels.future_score(k.reshape(X, N, d), log_mass, w[:, :P], dirs, w.new_ones(X, r))
        return torch.nan_to_num(a.view(L, B, H, N))

    def _compress_compiled(self, cache, budget_tokens, ctx):
        """``compress`` as numba kernels (CPU, float32): the proxies, then score, order,
        merge targets and the cache they leave in one call over the layers' own arrays
        (no stacking; the decision carries that cache for ``KVCache.apply``); the same
        math and rules as the PyTorch path (the tests compare the two)."""
        layers = cache.layers
        N, d = layers[0].k.shape[2:]
        K = min(budget_tokens, N)
        w, P = self.proxies(ctx, d)
        scale = torch.stack([l.v.norm(dim=-1) for l in layers]) if self.value_norm else None
        score, keep, into, dist, most, bad, after = kernels.future_compress(
            cache.fields(), scale, w.squeeze(1), P, K, self.tau, self.first_recent(ctx), self.n_sink)
        check_protected_tokens(most, K, self.protected_names)
        if bad:
            warn_non_finite()
        merges = (into, dist) if self.tau > 0 else None
        return self.merging_decision(cache, ctx, score, Selection(keep, keep[..., :0]), merges,
                                     cache.prepared(*after))
