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
the step (per layer and head); otherwise it is dropped. ``KVCache.apply``
merges mass-weighted, so the log-mass bias keeps the total mass.
Vectorised over layers and heads.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ffviz import kernels
from ffviz.cache import Decision, LayerDecision
from ffviz.policies.base import (Policy, PolicyError, check_bool, check_fits, check_range,
                                 future_positions, merge_to_nearest, need, protected_mask, rank,
                                 rotate)


@dataclasses.dataclass
class FutureForcing(Policy):
    """horizon: future frames predicted (1-64); stride: proxy positions every
    stride-th row and column (1 = the whole grid, 1-64); rank: eigenpairs of Sigma
    (0 = mean only, capped at d; the default 1 scored as 2 did in ``ffviz eval`` over
    6 seeds, for ~20% less time); value_norm: multiply by ||v||; tau: merge
    threshold relative to the step's median D (0 = never merge, up to 100; the default
    4 merges nearly every evicted token: in ``ffviz eval`` more merging tracked the
    full cache closer: 0.5 -> 4 gave +9 to +12 dB PSNR vs full at budgets 2-6);
    n_sink, n_recent: protected first / newest frames (>= 0); eig_every: an exact
    eigendecomposition every this many compressions (1-1000; in between one step of
    subspace iteration from the previous vectors follows the current Sigma: the
    statistics are stationary, and an eigh costs ~1 ms, a step a tenth of it; in
    ``ffviz eval`` 64 and 16 gave the same fidelity to the third digit)."""
    name = "future_forcing"
    horizon: int = 1
    stride: int = 2
    rank: int = 1
    value_norm: bool = False
    tau: float = 4.0
    n_sink: int = 1
    n_recent: int = 1
    eig_every: int = 64
    _eig: tuple = dataclasses.field(default=(None, -1, 0), init=False, repr=False, compare=False)
    _angles: tuple = dataclasses.field(default=(None, None), init=False, repr=False, compare=False)

    def validate(self):
        check_range("horizon", self.horizon, 1, 64)
        check_range("stride", self.stride, 1, 64)
        check_range("rank", self.rank, 0, 1024)
        check_bool("value_norm", self.value_norm)
        check_range("tau", self.tau, 0.0, 100.0, kind=float)
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)
        check_range("eig_every", self.eig_every, 1, 1000)

    def eigenpairs(self, ctx, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues (L, H, r) and eigenvectors (L, H, r, d) of the query
        covariance: an exact decomposition every ``eig_every`` calls and whenever the
        run restarts; in between, one step of subspace iteration from the previous
        vectors (u <- orthonormal basis of Sigma u, eigenvalues as Rayleigh
        quotients), which tracks the slowly moving top eigenspace for a few small ops."""
        if self._exact_due(ctx, r):
            return self._exact(ctx, r)
        u, _, calls = self._eig
        cov = ctx.stats.cov_all()  # (the CPU kernels' path: cpu_kernels.subspace_step)
        basis = torch.linalg.qr((u @ cov).transpose(-1, -2)).Q.transpose(-1, -2)  # (L, H, r, d)
        if not bool(torch.isfinite(basis).all()):  # degenerate statistics: keep the old vectors
            basis = u
        lam = torch.nan_to_num(((basis @ cov) * basis).sum(-1).clamp_min(0))  # u_i^T Sigma u_i
        self._eig = (basis, ctx.frame, calls + 1)
        return lam, basis

    def _exact_due(self, ctx, r: int) -> bool:
        """Whether this call decomposes exactly: every ``eig_every`` calls, and whenever
        there are no vectors yet, the rank or shape changed or the run restarted."""
        u, last, calls = self._eig
        return (u is None or u.shape[2] != r or ctx.frame < last or calls % self.eig_every == 0
                or u.shape[:2] != (ctx.stats.layers, ctx.stats.heads))

    def _exact(self, ctx, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        lam, u = ctx.stats.top_eig(None, r)
        fitted = bool((ctx.stats.weight > 0).all())  # no data yet: decompose again next time
        self._eig = (u if fitted else None, ctx.frame, 1)
        return lam, u

    def proxies(self, ctx, d: int) -> tuple[torch.Tensor, int]:
        """The proxy queries (L, 1, H, (1 + r) P, d): R(p) mu for the P positions,
        then sqrt(lambda_i) R(p) u_i for i = 1..r (direction-major), and P."""
        if kernels.compiled_cpu_enabled():  # the statistics live on the host
            w, P = self._proxies_compiled(ctx, d)
            return torch.from_numpy(w).unsqueeze(1), P
        lam, u = self.eigenpairs(ctx, min(self.rank, d))  # (L, H, r), (L, H, r, d)
        mean = ctx.stats.mean_all()
        pos = future_positions(ctx, self.horizon, self.stride)
        vecs = torch.cat([mean.unsqueeze(2), u * lam.sqrt().unsqueeze(-1)], 2)
        return rotate(vecs, ctx.rope, *pos).flatten(2, 3).unsqueeze(1), pos[0].numel()

    def _proxies_compiled(self, ctx, d: int) -> tuple[np.ndarray, int]:
        """``proxies`` in one kernel call (the subspace-iteration step, when no exact
        decomposition is due, then the rotations) -> w (L, H, (1 + r) P, d) float32
        numpy and P; the statistics read from their float64 sums."""
        r = min(self.rank, d)
        L, H = ctx.stats.layers, ctx.stats.heads
        step = not self._exact_due(ctx, r)
        if step:
            u, _, calls = self._eig
            lam = np.zeros((L * H, r), np.float32)  # not read: the step makes its own
        else:
            lam, u = self._exact(ctx, r)
            lam = lam.reshape(L * H, r).contiguous().numpy()
        weight, mean, m2 = ctx.stats.moments()
        spatial, ahead, per_frame = self._proxy_angles(ctx)
        w, basis, _ = kernels.cpu_kernels.future_proxies(
            mean.view(L * H, d).numpy(), u.reshape(L * H, r, d).contiguous().numpy(), lam,
            m2.view(L * H, d, d).numpy(), weight.view(L * H).numpy(), step,
            spatial, ahead, per_frame, ctx.frame)
        if step:
            self._eig = (torch.from_numpy(basis).view(L, H, r, d), ctx.frame, calls + 1)
        return w.reshape(L, H, -1, d), spatial.shape[0]

    def _proxy_angles(self, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The proxy positions' RoPE angles as ``future_proxies`` takes them. Angles are
        linear in the position: the spatial angles (P, d/2) (fixed for a grid) are kept
        between calls, with each position's frame offset from the next frame (P,) and the
        angles of one frame (d/2,) (float64, the products ``Rope3D.angles`` makes); the
        kernel adds the current frame."""
        key = (ctx.grid, self.horizon, self.stride, ctx.rope)
        if self._angles[0] != key:
            f, y, x = future_positions(ctx, self.horizon, self.stride)
            spatial = ctx.rope.angles(0, y, x).numpy()  # (P, d/2), temporal planes 0
            per_frame = ctx.rope.angles(1, 0, 0).numpy()  # (d/2,), spatial planes 0
            self._angles = (key, (spatial, (f - ctx.frame - 1).double().numpy(), per_frame))
        return self._angles[1]

    def score(self, k, mass, w, P: int):
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

    def compress(self, cache, budget_tokens, ctx):
        if cache.size <= budget_tokens:
            return None
        need(ctx, self.name, "stats", "rope")
        if kernels.compiled_cpu(*(t for l in cache.layers for t in (l.k, l.v, l.mass))):
            return self._compress_compiled(cache, budget_tokens, ctx)
        k, mass, frame = (torch.stack([getattr(l, f) for l in cache.layers])
                          for f in ("k", "mass", "frame"))  # (L, B, H, N, ...)
        w, P = self.proxies(ctx, k.shape[-1])  # built on the host, from the host statistics
        w = w.to(k.device)
        score = self.score(k, mass, w, P)
        if self.value_norm:
            score = score * torch.stack([l.v.norm(dim=-1) for l in cache.layers])
        prot = protected_mask(frame, ctx, self.n_sink, self.n_recent, budget_tokens)
        order = rank(score, budget_tokens, frame, prot)
        K = min(budget_tokens, order.shape[-1])
        keep = order[..., :K].sort(-1).values
        L = len(cache.layers)
        if self.tau == 0:
            return Decision([LayerDecision(keep=keep[i], score=score[i]) for i in range(L)])
        # M = mean_p R(p) (mu mu^T + Sigma_r) R(p)^T = F^T F with F = w / sqrt(P): the
        # proxies are the metric's factor, so with (1 + r) P < d the search runs on w.k
        into, dist = merge_to_nearest(k, keep, None, self.tau, factor=w / P ** 0.5,
                                      gone=order[..., K:])
        return Decision([LayerDecision(keep=keep[i], merge_into=into[i], score=score[i],
                                       distance=dist[i]) for i in range(L)])

    def _compress_compiled(self, cache, budget_tokens, ctx):
        """``compress`` as numba kernels (CPU, float32): the proxies, then score, order,
        merge targets and the cache they leave in one call over the layers' own arrays
        (no stacking; the decision carries that cache for ``KVCache.apply``); the same
        math and rules as the PyTorch path (the tests compare the two)."""
        check_fits("n_sink + n_recent", self.n_sink + self.n_recent, budget_tokens,
                   ctx.tokens_per_frame)
        layers = cache.layers
        L, (B, H, N, d) = len(layers), layers[0].k.shape
        K = min(budget_tokens, N)
        w, P = self._proxies_compiled(ctx, d)  # (L, H, R, d)
        scale = (torch.stack([l.v.norm(dim=-1) for l in layers]).numpy() if self.value_norm
                 else np.zeros((0, 0, 0, 0), np.float32))
        arrays = (kernels.cpu_kernels.layer_arrays(layers, name) for name in cache.FIELDS)
        (score, keep, into, dist, most, bad, *after) = kernels.cpu_kernels.future_compress(
            *arrays, scale, w, P, K,
            float(self.tau), ctx.frame - self.n_recent + 1, self.n_sink)
        if most > K:
            raise PolicyError(f"n_sink + n_recent: {most} protected tokens in one head exceed "
                              f"the budget of {K}")
        if bad:
            warnings.warn("policy score had non-finite values; they rank last", RuntimeWarning)
        k, v, mass, meta, ok = after  # the cache this leaves, for ``KVCache.apply``
        if not ok:  # pragma: no cover - the kernel's own indices
            raise IndexError("future_compress made indices out of range")
        prepared = cache.prepared(k, v, mass, meta)
        keep_t, into_t, score_t, dist_t = (torch.from_numpy(t).unbind(0)
                                           for t in (keep, into, score, dist))
        if self.tau == 0:
            return Decision([LayerDecision(keep=keep_t[i], score=score_t[i]) for i in range(L)],
                            prepared)
        return Decision([LayerDecision(keep_t[i], into_t[i], score_t[i], dist_t[i])
                         for i in range(L)], prepared)
