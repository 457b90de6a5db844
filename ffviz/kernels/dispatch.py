"""One entry point per kernel: Triton on CUDA, the PyTorch reference elsewhere
(attention: PyTorch's SDPA in ``auto`` mode everywhere, measured faster on an H200).
On the CPU, whole steps that are many small ops (a Future Forcing compression, its
proxies and eigenvector step, the cache's merge) run as numba kernels
(``kernels.cpu_kernels``) where ``compiled_cpu`` says so; their entry points are here
too and take and return tensors.

``FFVIZ_KERNELS`` picks the backend: ``auto`` (default: Triton when every tensor
is on CUDA and triton imports, else the reference; numba for those whole steps on
float32 CPU tensors), ``triton`` (always Triton;
an error if it cannot run, e.g. CPU tensors without ``TRITON_INTERPRET=1``) or
``reference`` (always PyTorch). The policies call these functions, never a
kernel directly. Shapes are checked here, so both backends see valid input.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ffviz.kernels import cpu_kernels, reference, triton_kernels

ENV = "FFVIZ_KERNELS"
MODES = ("auto", "triton", "reference")


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {m!r}")
    return m


def backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'reference': what a call with these tensors would run."""
    m = mode()
    if m == "reference":
        return "reference"
    if m == "triton":
        if not triton_kernels.AVAILABLE:
            raise RuntimeError(f"{ENV}=triton but triton is not importable ({triton_kernels.IMPORT_ERROR})")
        if not triton_kernels.interpreting() and not all(t.is_cuda for t in tensors):
            raise RuntimeError(f"{ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
        return "triton"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    return "triton" if on_cuda and triton_kernels.AVAILABLE else "reference"


def compiled_cpu_enabled() -> bool:
    """Whether the numba kernels are on at all: ``auto`` mode and numba importable (for
    inputs that are always on the host, such as the query statistics)."""
    return mode() == "auto" and cpu_kernels.AVAILABLE


def compiled_cpu(*tensors: torch.Tensor) -> bool:
    """Whether a whole-step numba kernel runs for these tensors: the kernels on
    (``compiled_cpu_enabled``) and every tensor float32 on the CPU (the kernels are
    compiled for that); False for no tensors."""
    return (compiled_cpu_enabled() and bool(tensors)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def future_score(keys, log_mass, proxy_mean, proxy_dirs, eigvals) -> torch.Tensor:
    """Each cached key's mean softmax share over proxy positions (policies.md,
    "Future Forcing score").

    keys (H, N, d) post-RoPE cached keys; log_mass (H, N) log(mass);
    proxy_mean (H, P, d) = R(p) mu per proxy position; proxy_dirs (H, P, r, d) =
    R(p) u_i (r may be 0); eigvals (H, r) >= 0.
    z_pj = proxy_mean[p].k_j / sqrt(d) + sum_i eigvals[i] (proxy_dirs[p, i].k_j)^2 / (2d)
           + log_mass[j];  scores[j] = mean_p softmax_j(z_pj).
    Returns (H, N) float32 (each head sums to 1).
    """
    _check(keys.dim() == 3, f"keys must be (H, N, d), got {tuple(keys.shape)}")
    H, N, d = keys.shape
    _check(tuple(log_mass.shape) == (H, N), f"log_mass must be {(H, N)}, got {tuple(log_mass.shape)}")
    _check(proxy_mean.dim() == 3 and proxy_mean.shape[0] == H and proxy_mean.shape[2] == d,
           f"proxy_mean must be (H={H}, P, d={d}), got {tuple(proxy_mean.shape)}")
    P = proxy_mean.shape[1]
    _check(P > 0, "proxy_mean has no positions (P = 0): the mean over positions is undefined")
    _check(proxy_dirs.dim() == 4 and proxy_dirs.shape[:2] == (H, P) and proxy_dirs.shape[3] == d,
           f"proxy_dirs must be (H={H}, P={P}, r, d={d}), got {tuple(proxy_dirs.shape)}")
    r = proxy_dirs.shape[2]
    _check(tuple(eigvals.shape) == (H, r), f"eigvals must be {(H, r)}, got {tuple(eigvals.shape)}")
    args = (keys, log_mass, proxy_mean, proxy_dirs, eigvals)
    if backend(*args) == "triton":
        return triton_kernels.future_score(*args)
    return reference.future_score(*args)


def merge_neighbour(cand, kept, M) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest kept token of every candidate under the future-query metric
    D(a, b) = (a - b)^T M (a - b) / d (policies.md, "Future Forcing merge").

    cand (H, Nc, d); kept (H, Nk, d); M (H, d, d) symmetric PSD.
    Returns dist (H, Nc) float32 and index (H, Nc) int64 into kept; with Nk = 0,
    dist is +inf and index -1.
    """
    _check(cand.dim() == 3 and kept.dim() == 3, "cand and kept must be (H, n, d)")
    H, Nc, d = cand.shape
    _check(kept.shape[0] == H and kept.shape[2] == d, f"kept must be (H={H}, Nk, d={d}), got {tuple(kept.shape)}")
    _check(tuple(M.shape) == (H, d, d), f"M must be {(H, d, d)}, got {tuple(M.shape)}")
    if backend(cand, kept, M) == "triton":
        return triton_kernels.merge_neighbour(cand, kept, M)
    return reference.merge_neighbour(cand, kept, M)


def attention(q, k, v, log_mass=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + log_mass) v over a cache with merged tokens.

    q (B, H, n, d); k, v (B, H, N, d); log_mass (B, H, N) or None.
    Returns (B, H, n, d) in q's dtype.
    """
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, n, d)")
    B, H, n, d = q.shape
    _check(k.shape[:2] == (B, H) and k.shape[3] == d and v.shape == k.shape,
           f"k and v must be (B={B}, H={H}, N, d={d}), got {tuple(k.shape)} and {tuple(v.shape)}")
    N = k.shape[2]
    _check(log_mass is None or tuple(log_mass.shape) == (B, H, N),
           f"log_mass must be {(B, H, N)} or None, got {None if log_mass is None else tuple(log_mass.shape)}")
    tensors = (q, k, v) if log_mass is None else (q, k, v, log_mass)
    # "auto" keeps PyTorch's SDPA here: on an H200 it beat this kernel (2.74 vs 3.35 ms at
    # the Wan size, docs/speed/bench_kernels.json); FFVIZ_KERNELS=triton still runs the kernel
    if mode() == "triton" and backend(*tensors) == "triton":
        return triton_kernels.attention(q, k, v, log_mass)
    return reference.attention(q, k, v, log_mass)


# -- whole steps on the CPU (numba) -----------------------------------------------------
# For ``compiled_cpu`` inputs (float32 CPU tensors; the query statistics, always on the
# host, where ``compiled_cpu_enabled``). Per-layer fields come as tuples over the layers,
# in the order of ``KVCache.FIELDS``: k, v (B, H, N, d); mass; frame, row, col, time
# (B, H, N), the provenance int64.

def _arrays(tensors) -> tuple[np.ndarray, ...]:
    """C-ordered numpy arrays (views of contiguous tensors): the layout compiled for."""
    return tuple(np.ascontiguousarray(t.numpy()) for t in tensors)


def _after(k, v, mass, meta) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(t) for t in (k, v, mass, meta))


def merge_apply(fields, keep, into) -> tuple[torch.Tensor, ...]:
    """Every layer's cache after a decision: keep (L, B, H, K) stay, each other token
    with into (L, B, H, N) >= 0 adds to its kept target (``cpu_kernels.merge_apply``).
    Returns k, v (L, B, H, K, d), mass (L, B, H, K), the provenance (L, 4, B, H, K);
    IndexError for an index out of range (nothing changed)."""
    *out, ok = cpu_kernels.merge_apply(*(_arrays(f) for f in fields), keep.long().numpy(),
                                       into.long().numpy())
    if not ok:
        raise IndexError(f"decision indices out of range for a cache of {fields[0][0].shape[2]} tokens")
    return _after(*out)


def future_compress(fields, scale, proxies, P, K, tau, first_recent, n_sink):
    """One Future Forcing compression of every layer (``cpu_kernels.future_compress``):
    scale (L, B, H, N) multiplies the score (None: nothing); proxies (L, H, (1 + r) P, d);
    K kept per head; tau the merge threshold; protected: frame < n_sink or frame >=
    first_recent. Returns score, keep, merge_into, distance (L, B, H, .), the most
    protected tokens of a head, the count of non-finite scores, and the cache it leaves
    (k, v, mass, provenance, as ``merge_apply``; garbage when the most protected
    tokens exceed K: the caller raises)."""
    none = np.zeros((0, 0, 0, 0), np.float32)
    score, keep, into, dist, most, bad, *after, ok = cpu_kernels.future_compress(
        *(_arrays(f) for f in fields), none if scale is None else _arrays([scale])[0],
        _arrays([proxies])[0], P, K, float(tau), first_recent, n_sink)
    if most <= K and not ok:  # pragma: no cover - the kernel's own indices
        raise IndexError("future_compress made indices out of range")
    decision = tuple(torch.from_numpy(t) for t in (score, keep, into, dist))
    return (*decision, most, bad, _after(*after))


def future_proxies(mean, u, lam, spatial, ahead, per_frame, frame) -> torch.Tensor:
    """Future Forcing's proxy queries (``cpu_kernels.future_proxies``): mean (..., d)
    float64, u (..., r, d), lam (..., r) float32; the positions' angles spatial (P, d/2),
    ahead (P,), per_frame (d/2,) float64 -> w (..., (1 + r) P, d) float32."""
    *lead, r, d = u.shape
    X = int(np.prod(lead))
    w = cpu_kernels.future_proxies(*_arrays([mean.reshape(X, d), u.reshape(X, r, d),
                                            lam.reshape(X, r), spatial, ahead, per_frame]), frame)
    return torch.from_numpy(w).view(*lead, -1, d)


def subspace_step(u, weight, m2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of subspace iteration on covariances given by their sums
    (``reference.subspace_step``: basis, Rayleigh quotients, residual): numba (a
    Gram-Schmidt basis, the same span) where ``compiled_cpu_enabled``, else PyTorch."""
    if not compiled_cpu_enabled():
        return reference.subspace_step(u, weight, m2)
    *lead, r, d = u.shape
    X = int(np.prod(lead))
    out = cpu_kernels.subspace_step(*_arrays([u.reshape(X, r, d), m2.reshape(X, d, d),
                                              weight.reshape(X)]))
    basis, lam, residual = (torch.from_numpy(t) for t in out)
    return basis.view(*lead, r, d), lam.view(*lead, r), residual.view(lead)


def warm(layers: int) -> None:
    """Compile the numba kernels for a model of ``layers`` layers, once per process
    (``cpu_kernels.warm``), so that no timed compression pays for it."""
    cpu_kernels.warm(layers)
