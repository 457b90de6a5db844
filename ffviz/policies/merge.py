"""Merging: every evicted token into its nearest kept token, when near enough.

The rule (``merge_to_nearest``, and the numba kernel ``future_compress`` the same
way): under D(a, b) = (k_a - k_b)^T M (k_a - k_b) / d, an evicted token merges into
its nearest kept token when D <= tau x the head's median nearest-D, and always when
its key equals that token's key (an exact duplicate: with the log-mass bias the
merge changes no attention at all, even where a median of 0 merges nothing else).
``KVCache.apply`` carries the merges out, mass-weighted.
"""
from __future__ import annotations

import math

import torch

from ffviz import kernels
from ffviz.cache import take_rows


def merge_to_nearest(k: torch.Tensor, keep: torch.Tensor, metric: torch.Tensor | None,
                     tau: float, factor: torch.Tensor | None = None,
                     gone: torch.Tensor | None = None, target: torch.Tensor | None = None,
                     candidate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge assignment of every evicted token to its nearest kept token.

    k: (..., N, d) keys, e.g. (B, H, N, d) or stacked layers (L, B, H, N, d);
    keep: (..., K); metric: PSD matrices M (..., d, d) broadcasting against k's
    leading dims (None = identity). D(a, b) = (k_a - k_b)^T M (k_a - k_b) / d. With tau > 0
    a token merges into its nearest kept token when the head's median nearest-D over
    evicted tokens is > 0 and D <= tau * median, or when its key equals that token's
    (an exact duplicate). The search is the
    ``kernels.merge_neighbour`` dispatch (Triton on CUDA, PyTorch elsewhere).
    factor: F (..., R, d) with M = F^T F, instead of ``metric``. With R < d the
    search runs on the projections F k (R coordinates, identity metric): the same
    D = |F (k_a - k_b)|^2 / d for fewer operations.
    gone: the evicted indices (..., G) in any order, when the caller has them
    (``rank``); otherwise they are found from ``keep`` (G = N - K).
    target (..., K), candidate (..., G) bool: which kept slots may receive a merge and
    which evicted tokens may merge (a ``scored.Selection``'s ``live`` and
    ``candidate``: per-head budgets and dead slots); None = all. Only candidates
    enter the median.
    Returns merge_into (..., N) long (-1 = none) and distance (..., N): the
    nearest-D for evicted tokens, 0 for kept ones.
    """
    *lead, N, d = k.shape
    K = keep.shape[-1]
    dev = k.device
    keep = keep.to(dev)
    merge_into = torch.full((*lead, N), -1, dtype=torch.long, device=dev)
    distance = torch.zeros(*lead, N, dtype=k.dtype, device=dev)
    if K == N or K == 0:
        return merge_into, distance
    if gone is None:
        kept = torch.zeros(*lead, N, dtype=torch.bool, device=dev).scatter_(-1, keep, True)
        gone = torch.arange(N, device=dev).expand(*lead, N)[~kept].view(*lead, N - K)  # each head evicts N - K
    gone = gone.to(dev)
    G = gone.shape[-1]
    if G == 0:
        return merge_into, distance
    has_target = None
    if target is not None:  # the search sees a head's first target in place of its non-targets
        target = target.to(dev)
        has_target = target.any(-1, keepdim=True)
        first = target.long().argmax(-1, keepdim=True)
        keep = keep.gather(-1, torch.where(target, torch.arange(K, device=dev), first))
    if factor is not None and factor.shape[-2] < d:  # search in the R projected coordinates
        R = factor.shape[-2]
        y = k.float() @ factor.to(dev, torch.float32).transpose(-1, -2)  # (..., N, R), float32
        M = torch.eye(R, dtype=torch.float32, device=dev) * (R / d)  # the kernel divides by R
        M, x, width = M.expand(math.prod(lead), R, R), y, R
    else:
        if factor is not None:
            metric = factor.transpose(-1, -2) @ factor
        M = torch.eye(d, dtype=k.dtype, device=dev) if metric is None else metric.to(dev)
        M, x, width = M.expand(*lead, d, d).reshape(-1, d, d), k, d
    gather = lambda idx: take_rows(x, idx).reshape(-1, idx.shape[-1], width)
    dmin, j = kernels.merge_neighbour(gather(gone), gather(keep), M)
    dmin = torch.nan_to_num(dmin.view(*lead, G).to(k.dtype), nan=math.inf)
    nearest = keep.gather(-1, j.view(*lead, G))  # kept-list index -> cache index
    if candidate is not None:  # a dead slot or a kept token: no distance, no merge
        candidate = candidate.to(dev)
        dmin = dmin.masked_fill(~candidate, math.inf)
    distance.scatter_(-1, gone, torch.nan_to_num(dmin, posinf=0.0))
    if tau > 0:
        med = (dmin.median(-1, keepdim=True).values if candidate is None else
               dmin.masked_fill(~candidate, math.nan).nanmedian(-1, keepdim=True).values)
        # a median of 0 (a zero metric: no statistics yet) says nothing about nearness
        near = (dmin <= tau * med) & (med > 0) & torch.isfinite(dmin)
        duplicate = (take_rows(k, gone) == take_rows(k, nearest)).all(-1)
        ok = near | duplicate
        for mask in (candidate, has_target):
            if mask is not None:
                ok &= mask
        merge_into.scatter_(-1, gone, torch.where(ok, nearest, torch.full_like(nearest, -1)))
    return merge_into, distance
