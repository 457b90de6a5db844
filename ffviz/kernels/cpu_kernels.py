"""Numba kernels for the CPU: a whole Future Forcing compression, and the cache's merge.

On a small model a compression is not arithmetic but op count: the PyTorch path is
~100 small tensor ops (score, rank, merge search, bookkeeping) at several
microseconds each, ~12% of a generation step of the tiny model. Here each is one
compiled loop over the (layer, head) rows, with the two products (proxies x keys,
the merge metric) through BLAS (``np.dot``, on one thread: ``_one_blas_thread``), and
the same math, order and tie rules as the PyTorch path (``ffviz.policies.scored.rank``,
``ffviz.policies.merge``, ``kernels.reference``, ``ffviz.cache.LayerCache``), which the
tests compare them to. ``future_compress`` also builds the cache its decision leaves,
head by head while the keys are in the CPU's caches (``KVCache.prepared``);
``merge_apply`` carries out any other decision. Callers reach them through
``kernels.dispatch``, which converts tensors to the arrays compiled for.

numba comes with umap-learn (the app's UMAP); without it (``AVAILABLE`` False) the
callers stay on PyTorch. ``warm(layers)`` compiles the kernels on tiny inputs (a few
seconds once; cached on disk next to this file when it is writable); ``generate``
calls it before its first step, so that no timed compression pays for compilation.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import numba
    AVAILABLE, IMPORT_ERROR = True, None
except Exception as e:  # pragma: no cover - numba ships with umap-learn
    numba, AVAILABLE, IMPORT_ERROR = None, False, e


CHUNK_ELEMENTS = 1 << 22  # the merge search's distance block (16 MB of float32) at most


def _one_blas_thread() -> None:
    """scipy's BLAS (OpenBLAS in its wheels; numba's ``np.dot`` calls it) on one
    thread, as torch runs the model: the kernels' products are small, and OpenBLAS's
    second thread spins while it waits, so with another process on the other core a
    compression took ~16x longer (18 ms against 1.1 ms); on a free CPU one thread was
    faster too (1.10 against 1.35 ms, median in-loop, the tiny model). Only the
    library inside scipy's own install is limited (numpy's and torch's keep their
    threads); where scipy shares a system BLAS, nothing is changed."""
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (numba's BLAS: loaded, so visible)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - both come with scikit-learn (umap-learn)
        return
    home = os.path.dirname(os.path.abspath(scipy.__file__))  # .../site-packages/scipy
    controller = ThreadpoolController()
    inside = (home + os.sep, home + ".libs" + os.sep)  # the package, or its wheel's libs
    paths = [lib.filepath for lib in controller.lib_controllers
             if lib.user_api == "blas" and os.path.abspath(lib.filepath).startswith(inside)]
    if paths:
        controller.select(filepath=paths).limit(limits=1)


# reordered sums and fused multiply-adds (vector loops); NaN and inf stay honoured
_FAST = {"reassoc", "contract", "arcp"}


def _jit(fn):
    if not AVAILABLE:
        return fn
    # error_model="numpy": x / 0 is inf or NaN as in numpy and torch, not a Python exception
    opts = dict(nogil=True, fastmath=_FAST, error_model="numpy")
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # no writable place for the on-disk cache: compile per process
        return numba.njit(**opts)(fn)


@_jit
def _kth_smallest(values, k):
    """The k-th smallest of ``values`` (0-based), by quickselect on a copy (no NaN).
    Hand-written, as the sorts below: numba compiles plain loops in a fraction of the
    time of its sort and partition routines (seconds, on every fresh machine)."""
    a = values.copy()
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@_jit
def _select(s, frame, K):
    """The K best tokens (ascending) and the others, in ``rank``'s order: by s
    descending, ties to the newer source frame, then the later cache slot. The K-th
    best value is found by selection; only ties at it need the tie rule."""
    N = s.shape[0]
    if K >= N:
        return np.arange(N), np.empty(0, np.int64)
    if K <= 0:
        return np.empty(0, np.int64), np.arange(N)
    cut = _kth_smallest(s, N - K)  # the K-th largest score
    inside = np.zeros(N, np.bool_)
    room = K
    for j in range(N):
        if s[j] > cut:
            inside[j] = True
            room -= 1
    # the tied tokens, best first by the tie rule: insertion into an ordered list
    # (ties are few: equal scores, or protected tokens)
    tied = np.empty(N, np.int64)
    n = 0
    for j in range(N):
        if s[j] == cut:
            at = n
            while at > 0 and (frame[tied[at - 1]] < frame[j]
                              or (frame[tied[at - 1]] == frame[j] and tied[at - 1] < j)):
                tied[at] = tied[at - 1]
                at -= 1
            tied[at] = j
            n += 1
    for i in range(room):
        inside[tied[i]] = True
    keep = np.empty(K, np.int64)
    gone = np.empty(N - K, np.int64)
    a, b = 0, 0
    for j in range(N):
        if inside[j]:
            keep[a] = j
            a += 1
        else:
            gone[b] = j
            b += 1
    return keep, gone


@_jit
def _exp_nonpositive(z, bits):
    """exp(z) in place for z <= 0 (a softmax's shifted logits) as loops the compiler
    vectorises (a scalar libm exp is most of a score's time otherwise): z = n ln 2 + f
    with n an integer (2^n built in the float's exponent bits) and |f| <= ln 2 / 2
    (Cody-Waite: ln 2 in two parts, so f keeps its digits), e^f by its Taylor series to
    f^7. Within 1e-7 relative of the exact exp (numpy's float32 exp: 1.6e-7); z below
    -87 gives e^-87 ~ 1.6e-38, nothing next to the softmax's largest term, 1.
    ``bits``: int32 scratch of z's length."""
    for j in range(z.shape[0]):
        x = max(z[j], np.float32(-87.0))
        n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        f = (x - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)
        z[j] = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(1 / 2) + f * (
            np.float32(1 / 6) + f * (np.float32(1 / 24) + f * (np.float32(1 / 120) + f * (
                np.float32(1 / 720) + f * np.float32(1 / 5040)))))))
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for j in range(z.shape[0]):
        z[j] *= scale[j]


@_jit
def _future_share(y, logm, P, r, d):
    """Mean over the P proxy positions of each key's softmax share, from the proxy-key
    products y ((1 + r) P, N): z_pj = y_pj / sqrt(d) + sum_i y_(P + iP + p)j^2 / (2d) + log m_j
    (``kernels.reference.future_score``). A NaN logit makes the position's shares NaN,
    as in a softmax."""
    N = y.shape[1]
    inv_sd, inv_2d = np.float32(1.0 / np.sqrt(d)), np.float32(1.0 / (2.0 * d))
    acc = np.zeros(N, np.float32)
    z = np.empty(N, np.float32)
    bits = np.empty(N, np.int32)
    for p in range(P):  # row views and plain loops: the compiler vectorises these
        yp = y[p]
        for j in range(N):
            z[j] = yp[j] * inv_sd + logm[j]
        for i in range(r):
            yr = y[P + i * P + p]
            for j in range(N):
                z[j] += yr[j] * yr[j] * inv_2d
        top, nan = z[0], False
        for j in range(N):
            top = max(top, z[j])
            nan |= z[j] != z[j]
        if np.isfinite(top) and not nan:
            for j in range(N):
                z[j] -= top
            _exp_nonpositive(z, bits)
        else:  # a NaN or an infinite logit: the plain formula's result
            z = np.exp(z - top)
        tot = np.float32(0.0)
        for j in range(N):
            tot += z[j]
        inv = np.float32(1.0) / tot
        for j in range(N):
            acc[j] += z[j] * inv
    return acc / np.float32(P)


@_jit
def _nearest_kept(y, keep, gone, scale):
    """For every evicted token, its nearest kept token under D(a, b) = |F (k_a - k_b)|^2 / d
    with the projections F k = y / sqrt(P) already at hand: D = |y_a - y_b|^2 x ``scale``
    (= 1 / (P d)). The search runs centred on the mean kept projection (fewer cancelled
    digits); the winner's distance is then summed directly.
    Returns D (G,) float32 and the index into ``keep`` (G,) (the first minimum). As in the
    PyTorch path, a non-finite projection gives D = inf (no merge): for the candidate's
    own row, or for the whole head when it is a kept token's (it spoils the centre)."""
    R, N = y.shape
    K, G = keep.shape[0], gone.shape[0]
    is_kept = np.zeros(N, np.bool_)
    for m in range(K):
        is_kept[keep[m]] = True
    c = np.empty(R, np.float32)
    zero = np.float32(0.0)
    for t in range(R):  # a masked sum over contiguous rows: no gathers (an evicted NaN is skipped)
        yr = y[t]
        acc = zero
        for j in range(N):
            acc += yr[j] if is_kept[j] else zero
        c[t] = acc / np.float32(K)
    dmin = np.full(G, np.inf, np.float32)
    arg = np.full(G, -1, np.int64)
    for t in range(R):
        if not np.isfinite(c[t]):
            arg[:] = 0
            return dmin, arg
    # argmin_b |a - b|^2 = argmin_b (|b|^2 - 2 a.b): one product of [-2b, |b|^2] for every
    # token (contiguous rows, cheaper than gathering the kept ones) and [a; 1] per candidate
    b = np.empty((R + 1, N), np.float32)
    qb = b[R]
    qb[:] = 0.0
    a = np.empty((R + 1, G), np.float32)
    a[R] = 1.0
    for t in range(R):
        yr, br, ar = y[t], b[t], a[t]
        ct = c[t]
        for j in range(N):
            e = yr[j] - ct
            br[j] = np.float32(-2.0) * e
            qb[j] += e * e
        for i in range(G):
            ar[i] = yr[gone[i]] - ct
    best = np.full(G, np.inf, np.float32)
    step = max(1, CHUNK_ELEMENTS // N)  # candidates per product: memory stays bounded
    for start in range(0, G, step):
        stop = min(G, start + step)
        block = a if stop - start == G else np.ascontiguousarray(a[:, start:stop])
        part = np.dot(b.T, block)  # (tokens, candidates)
        # kept rows in keep order, a running minimum per candidate (vectorised over the
        # candidates; strict < keeps the first minimum, NaN never wins)
        best_block, arg_block = best[start:stop], arg[start:stop]
        for m in range(K):
            row = part[keep[m]]
            for i in range(stop - start):
                v = row[i]
                if v < best_block[i] or (arg_block[i] < 0 and v == v):
                    best_block[i] = v
                    arg_block[i] = m
    for i in range(G):
        at = arg[i]
        if at < 0:  # a NaN candidate
            arg[i] = 0
            continue
        # the winner's distance summed directly: the expansion above cancels digits
        # for near-duplicates, which are what merging is about
        v = np.float32(0.0)
        for t in range(R):
            e = y[t, gone[i]] - y[t, keep[at]]
            v += e * e
        v *= scale
        dmin[i] = np.inf if np.isnan(v) else v
    return dmin, arg


@_jit
def _same_row(x, i, j):
    """Whether rows i and j of x are equal (an exact duplicate key; NaN never is)."""
    for t in range(x.shape[1]):
        if x[i, t] != x[j, t]:
            return False
    return True


@_jit
def future_compress(ks, vs, masses, frames, rows, cols, times, scale, w, P, K, tau,
                    first_recent, n_sink):
    """One Future Forcing compression of every layer, batch row and head, and the cache
    it leaves, made head by head while the head's keys are still in the CPU's caches.

    Per layer (tuples, as ``merge_apply`` takes them) the cache's keys ks and values vs
    (B, H, N, d) float32, keys post-RoPE; masses (B, H, N) float32; the int64 provenance
    frames (source frames), rows, cols, times (B, H, N); scale (L, B, H, N) float32
    multiplies the score (||v|| for value_norm; shape (0, 0, 0, 0) for none); w (L, H,
    (1 + r) P, d) float32 proxies (P rows R(p) mu, then sqrt(lambda_i) R(p) u_i,
    direction-major), which are also the merge metric's factor (M = w^T w / P); K kept
    tokens per head; tau the merge threshold (0 = no merging; the rule of
    ``ffviz.policies.merge``: D <= tau x the median D when the median is > 0, and exact
    duplicate keys always); protected: frame < n_sink or frame >= first_recent.

    Returns (L, B, H, .) arrays: score float32, keep (K,) int64 ascending, merge_into
    int64 (-1 = none), distance float32; the most protected tokens of a head and the
    count of non-finite scores (they rank last); then ``merge_apply``'s results for this
    decision (k, v, mass, provenance, ok), which are garbage when the most protected
    tokens exceed K (the caller raises).
    """
    L, H, R, d = w.shape
    B, N = ks[0].shape[0], ks[0].shape[2]
    r = R // P - 1
    score = np.empty((L, B, H, N), np.float32)
    keep = np.empty((L, B, H, K), np.int64)
    into = np.full((L, B, H, N), -1, np.int64)
    dist = np.zeros((L, B, H, N), np.float32)
    most_protected, bad = 0, 0
    fmax = np.float32(3.4028234663852886e38)
    s = np.empty(N, np.float64)
    logm = np.empty(N, np.float32)
    k2 = np.empty((L, B, H, K, d), np.float32)
    v2 = np.empty((L, B, H, K, d), np.float32)
    m2 = np.empty((L, B, H, K), np.float32)
    meta = np.empty((L, 4, B, H, K), np.int64)
    slot, dest, fed = np.empty(N, np.int64), np.empty(N, np.int64), np.empty(K, np.bool_)
    ok = True
    for l in range(L):
        for b in range(B):
            for h in range(H):
                mass, frame = masses[l][b, h], frames[l][b, h]
                y = np.dot(w[l, h], ks[l][b, h].T)  # (R, N): every proxy against every key
                for j in range(N):  # most tokens stand for themselves: log 1 = 0, no call
                    m = mass[j]
                    logm[j] = np.float32(0.0) if m == 1 else np.log(max(m, np.float32(1e-30)))
                share = _future_share(y, logm, P, r, d)
                n_prot = 0
                for j in range(N):
                    a = share[j]
                    if np.isnan(a):  # nan_to_num, as the PyTorch score
                        a = np.float32(0.0)
                    elif np.isinf(a):
                        a = fmax if a > 0 else -fmax
                    if scale.shape[0]:
                        a *= scale[l, b, h, j]
                    score[l, b, h, j] = a
                    s[j] = a
                    if not np.isfinite(a):
                        bad += 1
                        s[j] = -np.inf
                    if frame[j] < n_sink or frame[j] >= first_recent:
                        s[j] = np.inf  # protected tokens first
                        n_prot += 1
                most_protected = max(most_protected, n_prot)
                kept, gone = _select(s, frame, K)
                keep[l, b, h] = kept
                if tau > 0 and 0 < K < N:
                    dmin, at = _nearest_kept(y, kept, gone, 1.0 / (P * d))
                    med = _kth_smallest(dmin, (N - K - 1) // 2)  # the lower median, as torch.median
                    for i in range(N - K):
                        dist[l, b, h, gone[i]] = 0.0 if np.isinf(dmin[i]) else dmin[i]
                        near = med > 0 and dmin[i] <= tau * med and np.isfinite(dmin[i])
                        if near or _same_row(ks[l][b, h], gone[i], kept[at[i]]):
                            into[l, b, h, gone[i]] = kept[at[i]]
                if n_prot <= K:
                    meta_in = (frame, rows[l][b, h], cols[l][b, h], times[l][b, h])
                    ok &= _apply_head(ks[l][b, h], vs[l][b, h], mass, meta_in, kept,
                                      into[l, b, h], k2[l, b, h], v2[l, b, h], m2[l, b, h],
                                      meta[l, :, b, h], slot, dest, fed)
    return score, keep, into, dist, most_protected, bad, k2, v2, m2, meta, ok


@_jit
def covariances(m2, weight):
    """QueryStats' covariances from its float64 sums, as ``QueryStats.cov_all`` forms
    them: m2 (X, d, d) / max(weight (X,), 1), symmetrised, in float32 (X, d, d)."""
    X, d = m2.shape[0], m2.shape[1]
    cov = np.empty((X, d, d), np.float32)
    for x in range(X):
        w = max(weight[x], 1.0)
        for i in range(d):
            for j in range(d):
                cov[x, i, j] = np.float32(0.5 * (m2[x, i, j] / w + m2[x, j, i] / w))
    return cov


@_jit
def subspace_step(u, m2, weight):
    """One step of subspace iteration per row: u (X, r, d) orthonormal rows, and the
    covariance cov (X, d, d) from QueryStats' sums (``covariances``) -> an orthonormal
    basis of the rows of u cov (Gram-Schmidt: the span of a QR's Q, up to signs, which
    nothing downstream sees), the Rayleigh quotients u_i^T cov u_i (X, r), clamped at
    0 with NaN -> 0 and inf -> the largest float32 (the PyTorch path's nan_to_num), and
    each row's residual max_i |cov u_i - lam_i u_i| / max_i lam_i (X,) (0 where every
    lam_i is 0): how far the pairs are from eigenpairs. If any row's new basis is not
    finite (degenerate statistics), every row keeps u, as in the PyTorch path
    (``kernels.reference.subspace_step``)."""
    cov = covariances(m2, weight)
    X, r, d = u.shape
    basis = np.empty((X, r, d), u.dtype)
    lam = np.zeros((X, r), u.dtype)
    residual = np.zeros(X, u.dtype)
    finite = True
    for x in range(X):
        v = np.dot(u[x], cov[x])  # (r, d)
        for i in range(r):
            for j in range(i):
                proj = np.float32(0.0)
                for t in range(d):
                    proj += v[i, t] * v[j, t]
                for t in range(d):
                    v[i, t] -= proj * v[j, t]
            norm = np.float32(0.0)
            for t in range(d):
                norm += v[i, t] * v[i, t]
            norm = np.sqrt(norm)
            for t in range(d):
                v[i, t] /= norm
                basis[x, i, t] = v[i, t]
                finite &= np.isfinite(v[i, t])
    if not finite:
        basis[:] = u
    fmax = np.float32(3.4028234663852886e38)
    for x in range(X):
        sv = np.dot(basis[x], cov[x])
        top, worst = np.float32(0.0), np.float32(0.0)
        for i in range(r):
            q = np.float32(0.0)
            for t in range(d):
                q += sv[i, t] * basis[x, i, t]
            lam[x, i] = 0.0 if np.isnan(q) else min(max(q, np.float32(0.0)), fmax)
            off = np.float32(0.0)
            for t in range(d):
                e = sv[i, t] - lam[x, i] * basis[x, i, t]
                off += e * e
            top, worst = max(top, lam[x, i]), max(worst, np.sqrt(off))
        residual[x] = worst / top if top > 0 else 0.0
    return basis, lam, residual


@_jit
def future_proxies(mean, u, lam, spatial, ahead, per_frame, frame):
    """The proxy queries per row: mean (X, d) (QueryStats' float64 mean), eigenpairs u
    (X, r, d), lam (X, r) >= 0, and the P future positions' RoPE angles (float64, as
    ``Rope3D.angles`` forms them: linear in the position): the spatial part ``spatial``
    (P, d/2) plus frame ``ahead`` (P,) + ``frame`` + 1 times ``per_frame`` (d/2,) -> w
    (X, (1 + r) P, d) float32: R(p) mu for the P positions, then sqrt(lambda_i) R(p) u_i,
    direction-major (interleaved RoPE planes)."""
    X, r, d = u.shape
    P = spatial.shape[0]
    cos = np.empty((P, d // 2), np.float32)
    sin = np.empty((P, d // 2), np.float32)
    for p in range(P):
        f = ahead[p] + (frame + 1.0)
        for m in range(d // 2):
            a = spatial[p, m] + f * per_frame[m]
            cos[p, m], sin[p, m] = np.float32(np.cos(a)), np.float32(np.sin(a))
    w = np.empty((X, (1 + r) * P, d), np.float32)
    vec = np.empty(d, np.float32)
    for x in range(X):
        for i in range(1 + r):
            for t in range(d):
                vec[t] = np.float32(mean[x, t]) if i == 0 else u[x, i - 1, t] * np.sqrt(lam[x, i - 1])
            for p in range(P):
                row = i * P + p
                for m in range(d // 2):
                    a, b, c, s = vec[2 * m], vec[2 * m + 1], cos[p, m], sin[p, m]
                    w[x, row, 2 * m] = a * c - b * s
                    w[x, row, 2 * m + 1] = a * s + b * c
    return w


@_jit
def _apply_head(k, v, mass, meta_in, keep, into, kk, vv, mm, meta, slot, dest, fed):
    """One head of ``merge_apply``: k, v (N, d), mass (N,), provenance ``meta_in`` (a
    tuple of four (N,) arrays) in; kept ``keep`` (K,), targets ``into`` (N,); writes
    kk, vv (K, d), mm (K,), meta (4, K). ``slot``, ``dest`` (N,) and ``fed`` (K,) are
    scratch. False when an index is out of range."""
    N, d = k.shape
    K = keep.shape[0]
    slot[:] = K  # a kept token's place among the kept, K for the others
    fed[:] = False  # kept places that receive a merge
    for i in range(K):
        j = keep[i]
        if j < 0 or j >= N:
            return False
        slot[j] = i
        for f in range(4):
            meta[f, i] = meta_in[f][j]
        mm[i] = mass[j]
        for t in range(d):  # element loops: no array views per token
            kk[i, t] = k[j, t]
            vv[i, t] = v[j, t]
    for j in range(N):  # where a token's mass goes: a kept place, or K (dropped)
        if into[j] < -1 or into[j] >= N:
            return False
        dest[j] = slot[j]
        if slot[j] == K and into[j] >= 0:
            dest[j] = slot[into[j]]
            if dest[j] < K:
                fed[dest[j]] = True
    for i in range(K):
        if fed[i]:
            mm[i] = 0.0
            for t in range(d):
                kk[i, t] = 0.0
                vv[i, t] = 0.0
    for j in range(N):  # the targets of merges: mass-weighted sums in token order
        i = dest[j]
        if i < K and fed[i]:
            m = mass[j]
            mm[i] += m
            for t in range(d):
                kk[i, t] += k[j, t] * m
                vv[i, t] += v[j, t] * m
    for i in range(K):
        if fed[i]:
            for t in range(d):
                kk[i, t] /= mm[i]
                vv[i, t] /= mm[i]
    return True


@_jit
def merge_apply(ks, vs, masses, frames, rows, cols, times, keep, into):
    """Every layer's cache after a decision: per layer (tuples of the cache's arrays:
    keys and values (B, H, N, d), mass and the int64 provenance frame, row, col, time
    (B, H, N)), the tokens ``keep`` (L, B, H, K) stay and each other token with ``into``
    (L, B, H, N) >= 0 adds to its (kept) target: masses summed, keys and values
    mass-weighted averages, summed in token order as ``LayerCache._merge_into_kept``; a
    token whose target is evicted is dropped. A kept token that receives nothing is
    copied as it is (the PyTorch path's (m k) / m can move it by a rounding). Returns
    k, v (L, B, H, K, d), mass (L, B, H, K), the provenance (L, 4, B, H, K) and False
    when an index was out of range (nothing else is then to be trusted)."""
    L, B, H, K = keep.shape
    N, d = ks[0].shape[2], ks[0].shape[3]
    k2 = np.empty((L, B, H, K, d), ks[0].dtype)
    v2 = np.empty((L, B, H, K, d), vs[0].dtype)
    m2 = np.empty((L, B, H, K), masses[0].dtype)
    meta = np.empty((L, 4, B, H, K), np.int64)
    slot, dest, fed = np.empty(N, np.int64), np.empty(N, np.int64), np.empty(K, np.bool_)
    for l in range(L):
        for b in range(B):
            for h in range(H):
                meta_in = (frames[l][b, h], rows[l][b, h], cols[l][b, h], times[l][b, h])
                if not _apply_head(ks[l][b, h], vs[l][b, h], masses[l][b, h], meta_in,
                                   keep[l, b, h], into[l, b, h], k2[l, b, h], v2[l, b, h],
                                   m2[l, b, h], meta[l, :, b, h], slot, dest, fed):
                    return k2, v2, m2, meta, False
    return k2, v2, m2, meta, True


_warm: set[int] = set()


def warm(layers: int) -> None:
    """Compile the kernels for a model of ``layers`` layers (a tuple's length is part of
    its type), once per process, on tiny inputs of the types the callers pass: a few
    seconds the first time, then loaded from numba's disk cache; so that no timed
    compression pays for compilation."""
    if layers in _warm or not AVAILABLE:
        return
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 6, 4)).astype(np.float32)
    mass = np.ones((1, 2, 6), np.float32)
    frame = np.repeat(np.arange(3), 2)[None, None].repeat(2, 1).astype(np.int64)
    u = np.eye(4, dtype=np.float32)[None, :1].repeat(2, 0)
    u, lam, _ = subspace_step(u, np.eye(4)[None].repeat(2, 0), np.ones(2))  # (H=2, 4, 4): r = 1
    w = future_proxies(np.ones((2, 4)), u, lam, np.ones((2, 2)), np.zeros(2), np.ones(2), 3)  # P = 2
    per_layer = lambda t: (t,) * layers
    w = np.stack([w] * layers)
    for scale in (np.zeros((0, 0, 0, 0), np.float32), np.ones((layers, 1, 2, 6), np.float32)):
        out = future_compress(per_layer(k), per_layer(k), per_layer(mass), *(per_layer(frame),) * 4,
                              scale, w, 2, 3, 4.0, 2, 1)
        keep, into = out[1], out[2]
    merge_apply(per_layer(k), per_layer(k), per_layer(mass), *(per_layer(frame),) * 4, keep, into)
    _one_blas_thread()  # after the first np.dot: numba loads its BLAS library lazily
    _warm.add(layers)
