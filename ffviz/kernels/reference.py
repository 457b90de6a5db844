"""PyTorch references for the three kernels: the spec the Triton kernels are
tested against, and the path ffviz takes on CPU.

Each works in chunks so that memory stays bounded at real-model size
(32,760 cached tokens x 12 heads, head dim 128): no function here holds more
than about ``CHUNK_ELEMENTS`` float32 logits or distances at once.

``upcast=True`` (the default) computes in float32 whatever the input dtype
(float64 inputs stay float64 and give float64 results: the tests' ground truth);
the tests call ``upcast=False`` to get a same-precision PyTorch implementation,
the error baseline a kernel must not be worse than (flash-attention's test style).
Math: docs/policies.md ("Future Forcing score", "Future Forcing merge").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 25  # logits held at once (128 MiB in float32)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: torch.Tensor, upcast: bool, like: torch.Tensor) -> torch.Tensor:
    return t.to(_wide(like.dtype) if upcast else like.dtype)


def proxy_logits(keys, log_mass, proxy_mean, proxy_dirs, eigvals):
    """z (H, P, N): the Gaussian expected logit of every proxy position for every key.

    keys (H, N, d); log_mass (H, N); proxy_mean (H, P, d); proxy_dirs (H, P, r, d);
    eigvals (H, r). Computed in the dtype of ``keys`` (cast the inputs first).
    The constants go into the (1 + r) P proxies, not the (H, ., N) logits:
    proxy_mean / sqrt(d) and proxy_dirs x sqrt(eigvals / 2d) (eigvals >= 0), so
    z = m.k + sum_i (u_i.k)^2 + log_mass, with all proxies in one product.
    """
    H, P, d = proxy_mean.shape
    r = proxy_dirs.shape[2]
    scale = (eigvals.clamp_min(0) / (2 * d)).sqrt()[:, :, None, None]  # (H, r, 1, 1)
    q = torch.cat([proxy_mean / math.sqrt(d),
                   (proxy_dirs.transpose(1, 2) * scale).reshape(H, r * P, d)], 1)
    y = q @ keys.transpose(1, 2)  # (H, (1 + r) P, N)
    z = y[:, :P] + log_mass[:, None, :]
    if r:
        z = z + y[:, P:].view(H, r, P, -1).square().sum(1)
    return z


def future_score(keys, log_mass, proxy_mean, proxy_dirs, eigvals, upcast: bool = True):
    """Mean over proxy positions of each key's softmax share.

    keys (H, N, d) post-RoPE cached keys; log_mass (H, N); proxy_mean (H, P, d);
    proxy_dirs (H, P, r, d) (r may be 0); eigvals (H, r) >= 0.
    Returns scores (H, N) float32 (float64 for float64 keys); each head sums to 1.

    Chunked over positions: each chunk's (H, Pc, N) logits get a full softmax
    over N, then are summed over positions and dropped.
    """
    H, N, d = keys.shape
    P = proxy_mean.shape[1]
    k = _cast(keys, upcast, keys)
    lm, mean, dirs, lam = (_cast(t, upcast, keys) for t in (log_mass, proxy_mean, proxy_dirs, eigvals))
    acc = torch.zeros(H, N, dtype=_wide(k.dtype), device=k.device)
    step = max(1, CHUNK_ELEMENTS // max(1, H * N * (1 + dirs.shape[2])))
    for p0 in range(0, P, step):
        z = proxy_logits(k, lm, mean[:, p0:p0 + step], dirs[:, p0:p0 + step], lam)
        acc += torch.softmax(z, dim=-1).to(acc.dtype).sum(1)
    return acc / P


def merge_neighbour(cand, kept, M, upcast: bool = True):
    """Nearest kept token of every candidate under D(a, b) = (a-b)^T M (a-b) / d.

    cand (H, Nc, d); kept (H, Nk, d); M (H, d, d) symmetric PSD.
    Returns dist (H, Nc) float32 (float64 for float64 inputs; clamped at 0) and
    index (H, Nc) int64;
    with no kept token, dist is +inf and index -1.

    Expanded as a'Ma - 2 a'Mb + b'Mb after centring both on the mean kept key;
    chunked over candidates.
    """
    H, Nc, d = cand.shape
    Nk = kept.shape[1]
    if Nk == 0:
        return (torch.full((H, Nc), math.inf, device=cand.device),
                torch.full((H, Nc), -1, dtype=torch.long, device=cand.device))
    a, b, m = _cast(cand, upcast, cand), _cast(kept, upcast, cand), _cast(M, upcast, cand)
    c = b.mean(1, keepdim=True)  # D is shift invariant: centring cuts the cancellation
    a, b = a - c, b - c
    bM = b @ m
    qb = (bM * b).sum(-1)  # (H, Nk)
    dist = torch.empty(H, Nc, dtype=_wide(cand.dtype), device=cand.device)
    index = torch.empty(H, Nc, dtype=torch.long, device=cand.device)
    step = max(1, CHUNK_ELEMENTS // max(1, H * Nk))
    for c0 in range(0, Nc, step):
        ac = a[:, c0:c0 + step]
        aM = ac @ m
        qa = (aM * ac).sum(-1)
        # b'Mb - 2 a'Mb in one fused product; a'Ma is the same for the whole row, so it
        # is added after the min (one (H, Nc, Nk) temporary instead of three)
        D = torch.baddbmm(qb[:, None, :], aM, b.transpose(1, 2), alpha=-2)
        dmin, imin = _row_min(D)
        dist[:, c0:c0 + step] = (dmin + qa).to(dist.dtype).clamp_min(0) / d
        index[:, c0:c0 + step] = imin
    return dist, index


def _row_min(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``D.min(-1)`` (values, first index of the minimum). On CPU the index comes from
    numpy's argmin: torch's CPU min-with-index is about 10x slower at merge shapes
    (a (16, 64, 256) block: ~320 us vs ~30 us, torch 2.13)."""
    if D.device.type != "cpu" or D.dtype not in (torch.float32, torch.float64):
        return D.min(-1)
    index = torch.from_numpy(D.detach().numpy().argmin(-1))
    return D.gather(-1, index.unsqueeze(-1)).squeeze(-1), index


def attention(q, k, v, log_mass=None, upcast: bool = False):
    """softmax(q k^T / sqrt(d) + log_mass) v.

    q (B, H, n, d); k, v (B, H, N, d); log_mass (B, H, N) or None.
    Returns (B, H, n, d) in q's dtype. scaled_dot_product_attention with a float
    bias, chunked over queries; ``upcast`` computes in float32 (float64 stays).
    """
    B, H, n, d = q.shape
    N = k.shape[2]
    dt = q.dtype
    if upcast:
        q, k, v = (t.to(_wide(dt)) for t in (q, k, v))
    bias = None if log_mass is None else log_mass.to(q.dtype)[:, :, None, :]
    step = max(1, CHUNK_ELEMENTS // max(1, B * H * N))
    if step >= n or q.is_cuda:  # CUDA's fused kernels do not materialise the logits
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).to(dt)
    out = torch.empty(B, H, n, d, dtype=dt, device=q.device)
    for i in range(0, n, step):
        out[:, :, i:i + step] = F.scaled_dot_product_attention(q[:, :, i:i + step], k, v, attn_mask=bias)
    return out


def subspace_step(u, weight, m2):
    """One step of subspace iteration per row, on covariances given by their sums.

    u (..., r, d) orthonormal rows; weight (...), m2 (..., d, d) float64 (cov = m2 /
    max(weight, 1), symmetrised, in float32: ``QueryStats.cov_all``).
    Returns basis (..., r, d), an orthonormal basis of the rows of u cov (QR); lam
    (..., r), the Rayleigh quotients b_i^T cov b_i (>= 0, NaN -> 0); residual (...),
    max_i |cov b_i - lam_i b_i| / max_i lam_i (0 where every lam_i is 0): how far the
    pairs are from eigenpairs. If any row's basis is not finite (degenerate
    statistics), every row keeps u.
    """
    c = m2 / weight.clamp_min(1.0)[..., None, None]
    cov = (0.5 * (c + c.transpose(-1, -2))).float()
    basis = torch.linalg.qr((u @ cov).transpose(-1, -2)).Q.transpose(-1, -2)
    if not bool(torch.isfinite(basis).all()):
        basis = u
    sb = basis @ cov
    lam = torch.nan_to_num((sb * basis).sum(-1).clamp_min(0))
    off = (sb - lam.unsqueeze(-1) * basis).norm(dim=-1).amax(-1)
    top = lam.amax(-1)
    residual = torch.where(top > 0, off / torch.where(top > 0, top, 1.0), 0.0)
    return basis, lam, residual
