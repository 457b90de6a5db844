"""Triton kernels for the policy math and their launchers.

Three kernels, each the streaming twin of a function in ``kernels/reference.py``:

``future_score`` (two launches + a tiny combine)
    pass 1, grid (splits, position blocks, heads): a program holds a block of
    ``BLOCK_P`` proxy positions' mean queries and streams one split of the keys
    in ``BLOCK_N`` tiles, keeping an online-softmax running max ``m`` and sum
    ``l`` per position (flash-attention's recurrence without the value product).
    The split partials are merged in PyTorch into one log-sum-exp per position,
    (H, P) floats.
    pass 2, grid (key blocks x heads): a program loads its ``BLOCK_N`` keys once,
    streams the positions in ``BLOCK_P`` tiles, recomputes the logits and adds
    ``exp(z - lse_p)`` over positions. The P x N logits only ever exist as one
    register tile. Pass 2 walks the programs in the reverse order of pass 1, so
    the keys pass 1 read last are still in L2 when pass 2 starts.
    Each logit tile is ``(1 + r)`` tensor-core dots: ``mean . k`` and, per
    direction, ``lambda_i (u_i . k)^2 / 2d``.

``merge_neighbour``, grid (candidate blocks x heads): a program computes
    ``aM = (a - c) M`` and ``(a-c)'M(a-c)`` for its ``BLOCK_C`` candidates once,
    then streams the kept tokens: ``D = a'Ma - 2 (aM) . b + b'Mb`` per tile
    (``b'Mb`` precomputed), keeping a running min and argmin per candidate.
    ``c`` is the mean kept key (D is shift invariant): centring cuts the
    expansion's cancellation. For 16-bit inputs ``aM`` enters the streamed dot
    as hi + lo 16-bit parts (two tensor-core dots per tile) against the keys as
    stored, so the distance of near neighbours, the ones a merge is about, is
    close to fp32-accurate rather than bf16-accurate (measured: ~100x smaller
    error than a bf16 PyTorch expansion).

``attention``, grid (query blocks x batch*heads): flash-attention forward
    (non-causal) with a per-key additive bias ``log(mass)``, exp2 online softmax,
    fp32 accumulator.

Every dot takes operands of the keys' dtype (tensor cores for bf16/fp16; fp32
uses 3xTF32 for near-fp32 accuracy) and accumulates in fp32. Under
``TRITON_INTERPRET=1`` the operands are upcast to fp32, because the interpreter
stores bf16 as raw uint16 and cannot do arithmetic on it; since 16-bit products
are exact in fp32, and the roundings a GPU run makes (probabilities to v's dtype,
hi/lo parts) are explicit casts in the kernels, the interpreter's numerics match
a GPU's up to the order of fp32 sums.

Triton is imported guarded: without it this module imports, ``AVAILABLE`` is
False and the launchers raise.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
    IMPORT_ERROR = ""
except Exception as e:  # ImportError, or a broken install
    triton = tl = None
    AVAILABLE = False
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require(*tensors: torch.Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"triton is not importable ({IMPORT_ERROR})")
    if not interpreting() and not all(t.is_cuda for t in tensors):
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _dot_types(dtype: torch.dtype):
    """(operand dtype, input_precision) of the kernels' dots for inputs of ``dtype``."""
    if interpreting():
        return tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float16, "tf32"
    return tl.float32, "tf32x3"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


if AVAILABLE:

    @triton.jit
    def _logit_tile(qm, k, lm, QD_h, LAM_h, offs_p, offs_d, mask_pd, qk_scale, quad_scale,
                    D: tl.constexpr, R: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
        """z (BLOCK_P, BLOCK_N) in natural-log units for mean queries qm (BLOCK_P, BLOCK_D),
        keys k (BLOCK_N, BLOCK_D) and log-masses lm (BLOCK_N,); directions are read
        from QD_h (P, R, D) row-major, eigenvalues from LAM_h (R,)."""
        z = tl.dot(qm, tl.trans(k), input_precision=PREC) * qk_scale
        for i in tl.static_range(R):
            u = tl.load(QD_h + offs_p[:, None] * (R * D) + i * D + offs_d[None, :],
                        mask=mask_pd, other=0.0).to(DOT)
            lam = tl.load(LAM_h + i).to(tl.float32)
            t = tl.dot(u, tl.trans(k), input_precision=PREC)
            z += (lam * quad_scale) * t * t
        return z + lm[None, :]

    @triton.jit
    def _fs_stats_kernel(K, LM, QM, QD, LAM, MOUT, LOUT,
                         N, P, split_len, n_splits, s_kh, s_kn, s_lh, qk_scale, quad_scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr):
        sid = tl.program_id(0)
        pb = tl.program_id(1)
        h = tl.program_id(2)
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        mask_p = offs_p < P
        mask_d = offs_d < D
        mask_pd = mask_p[:, None] & mask_d[None, :]
        qm = tl.load(QM + h * P * D + offs_p[:, None] * D + offs_d[None, :], mask=mask_pd, other=0.0).to(DOT)
        QD_h = QD + h * P * R * D
        LAM_h = LAM + h * R
        m_i = tl.full([BLOCK_P], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_P], tl.float32)
        start = sid * split_len
        end = tl.minimum(start + split_len, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            k = tl.load(K + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(DOT)
            lm = tl.load(LM + h * s_lh + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = _logit_tile(qm, k, lm, QD_h, LAM_h, offs_p, offs_d, mask_pd, qk_scale, quad_scale,
                            D, R, DOT, PREC)
            z = tl.where(mask_n[None, :], z * 1.4426950408889634, -float("inf"))  # log2 units
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
            m_i = m_new
        out = h * n_splits * P + sid * P + offs_p
        tl.store(MOUT + out, m_i, mask=mask_p)
        tl.store(LOUT + out, l_i, mask=mask_p)

    @triton.jit
    def _fs_share_kernel(K, LM, QM, QD, LAM, LSE2, OUT,
                         N, P, H, n_blocks, s_kh, s_kn, s_lh, qk_scale, quad_scale, inv_p,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr):
        lin = n_blocks * H - 1 - tl.program_id(0)  # reverse of pass 1's order (L2 reuse)
        h = lin // n_blocks
        nb = lin % n_blocks
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        mask_d = offs_d < D
        k = tl.load(K + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(DOT)
        lm = tl.load(LM + h * s_lh + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        QD_h = QD + h * P * R * D
        LAM_h = LAM + h * R
        acc = tl.zeros([BLOCK_N], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            mask_pd = mask_p[:, None] & mask_d[None, :]
            qm = tl.load(QM + h * P * D + offs_p[:, None] * D + offs_d[None, :], mask=mask_pd, other=0.0).to(DOT)
            z = _logit_tile(qm, k, lm, QD_h, LAM_h, offs_p, offs_d, mask_pd, qk_scale, quad_scale,
                            D, R, DOT, PREC)
            lse2 = tl.load(LSE2 + h * P + offs_p, mask=mask_p, other=float("inf"))
            acc += tl.sum(tl.exp2(z * 1.4426950408889634 - lse2[:, None]), axis=0)
        tl.store(OUT + h * N + offs_n, acc * inv_p, mask=mask_n)

    @triton.jit
    def _split(x, IN: tl.constexpr, DOT: tl.constexpr):
        """fp32 x as hi + lo, each exact in the input dtype IN (lo is 0 for fp32)."""
        hi = x.to(IN)
        lo = (x - hi.to(tl.float32)).to(IN)
        return hi.to(DOT), lo.to(DOT)

    @triton.jit
    def _merge_kernel(A, B, CEN, MM, QB, DIST, IDX, Nc, Nk, s_ah, s_an, s_bh, s_bn, inv_d,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      SPLIT: tl.constexpr):
        cb = tl.program_id(0)
        h = tl.program_id(1)
        IN: tl.constexpr = A.dtype.element_ty
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        mask_c = offs_c < Nc
        mask_d = offs_d < D
        cen = tl.load(CEN + h * D + offs_d, mask=mask_d, other=0.0)  # fp32 centre c
        a = tl.load(A + h * s_ah + offs_c[:, None] * s_an + offs_d[None, :],
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        a = tl.where(mask_d[None, :], a - cen[None, :], 0.0)  # a - c in fp32
        m = tl.load(MM + h * D * D + offs_d[:, None] * D + offs_d[None, :],
                    mask=mask_d[:, None] & mask_d[None, :], other=0.0)  # fp32
        # (a - c) M to ~fp32 accuracy from 16-bit dots: hi/lo parts (once per program)
        a_hi, a_lo = _split(a, IN, DOT)
        m_hi, m_lo = _split(m, IN, DOT)
        aM = tl.dot(a_hi, m_hi, input_precision=PREC)
        if SPLIT:
            aM += tl.dot(a_lo, m_hi, input_precision=PREC)
            aM += tl.dot(a_hi, m_lo, input_precision=PREC)
        qa = tl.sum(aM * a, axis=1)  # (a-c)'M(a-c)
        ac = tl.sum(aM * cen[None, :], axis=1)  # (a-c)'M c
        # For 16-bit inputs the cross term (a-c)'M(b-c) = aM.b - aM.c streams b as stored
        # (exact in its dtype) against aM as hi + lo: D cancels for near neighbours, the
        # tokens a merge is about, so one rounding of aM would dominate the error.
        w_hi, w_lo = _split(aM, IN, DOT)
        best = tl.full([BLOCK_C], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_C], tl.int32)
        for k0 in range(0, Nk, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < Nk
            b = tl.load(B + h * s_bh + offs_k[:, None] * s_bn + offs_d[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            qb = tl.load(QB + h * Nk + offs_k, mask=mask_k, other=0.0)  # (b-c)'M(b-c)
            if SPLIT:  # 16-bit: b exact as stored, aM as hi + lo, aM.c subtracted after
                bt = tl.trans(b.to(DOT))
                cross = tl.dot(w_hi, bt, input_precision=PREC) + tl.dot(w_lo, bt, input_precision=PREC)
                cross -= ac[:, None]
            else:  # fp32: centre b itself (3xTF32 dot)
                bc = tl.where(mask_d[None, :], b.to(tl.float32) - cen[None, :], 0.0)
                cross = tl.dot(aM, tl.trans(bc), input_precision=PREC)
            dist = qa[:, None] - 2.0 * cross + qb[None, :]
            dist = tl.where(mask_k[None, :], dist, float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_arg = tl.argmin(dist, axis=1).to(tl.int32) + k0
            upd = tile_min < best  # strict: the first minimum wins, as in a scan
            best = tl.where(upd, tile_min, best)
            best_i = tl.where(upd, tile_arg, best_i)
        tl.store(DIST + h * Nc + offs_c, tl.maximum(best, 0.0) * inv_d, mask=mask_c)
        tl.store(IDX + h * Nc + offs_c, best_i.to(tl.int64), mask=mask_c)

    @triton.jit
    def _attn_kernel(Q, K, V, LMB, O, n, N, H,
                     s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     s_ob, s_oh, s_on, s_lb, s_lh, qk_scale2,
                     HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr):
        mb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n
        mask_d = offs_d < D
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT)
        m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                        mask=mask_nd, other=0.0).to(DOT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2  # log2 units
            if HAS_BIAS:
                lm = tl.load(LMB + b * s_lb + h * s_lh + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                s += lm[None, :] * 1.4426950408889634
            s = tl.where(mask_n[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a block of dead slots only (log-mass -inf) leaves m_new at -inf: shift by 0
            # instead, or exp2(-inf - -inf) would be NaN
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :],
                        mask=mask_nd, other=0.0).to(DOT)
            p_in = p.to(V.dtype.element_ty).to(DOT)  # probabilities in v's dtype, as on GPU
            acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=PREC)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def future_score(keys, log_mass, proxy_mean, proxy_dirs, eigvals, *,
                 block_n: int | None = None, block_p: int | None = None,
                 n_splits: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Triton twin of ``reference.future_score``: (H, N) float32 scores.

    keys (H, N, d); log_mass (H, N); proxy_mean (H, P, d); proxy_dirs (H, P, r, d);
    eigvals (H, r). ``block_n``, ``block_p``, ``n_splits`` override the tiling
    (tests use them to cover several blocks and splits on tiny inputs).
    """
    _require(keys)
    H, N, d = keys.shape
    P, r = proxy_mean.shape[1], proxy_dirs.shape[2]
    scores = torch.zeros(H, N, dtype=torch.float32, device=keys.device)
    if N == 0:
        return scores
    keys = _last_dim_contiguous(keys)
    log_mass = _last_dim_contiguous(log_mass)
    qm = proxy_mean.to(keys.dtype).contiguous()
    qd = proxy_dirs.to(keys.dtype).contiguous()
    lam = eigvals.float().contiguous()
    if r == 0:  # never read; an empty tensor may have no valid device pointer
        qd, lam = qm, qm
    dot, prec = _dot_types(keys.dtype)
    BD = _block_d(d)
    BN = block_n or (32 if d > 64 else 64)  # keys tiles fit Hopper's shared memory when pipelined
    BP = block_p or min(64, max(16, triton.next_power_of_2(P)))
    p_blocks = triton.cdiv(P, BP)
    n_blocks = triton.cdiv(N, BN)
    if n_splits is None:  # enough programs for ~4 waves over the SMs
        n_splits = min(n_blocks, max(1, 4 * _sm_count(keys.device) // (H * p_blocks)))
    split_len = triton.cdiv(n_blocks, n_splits) * BN
    n_splits = triton.cdiv(N, split_len)  # every split starts inside [0, N)
    m = torch.empty(H, n_splits, P, dtype=torch.float32, device=keys.device)
    l = torch.empty_like(m)
    qk_scale, quad_scale = 1.0 / math.sqrt(d), 1.0 / (2.0 * d)
    common = dict(D=d, BLOCK_D=BD, R=r, BLOCK_N=BN, BLOCK_P=BP, DOT=dot, PREC=prec, num_warps=num_warps,
                  num_stages=2)
    _fs_stats_kernel[(n_splits, p_blocks, H)](
        keys, log_mass, qm, qd, lam, m, l, N, P, split_len, n_splits,
        keys.stride(0), keys.stride(1), log_mass.stride(0), qk_scale, quad_scale, **common)
    m_max = m.amax(1, keepdim=True)
    lse2 = (m_max + torch.log2((l * torch.exp2(m - m_max)).sum(1, keepdim=True))).squeeze(1).contiguous()
    _fs_share_kernel[(n_blocks * H,)](
        keys, log_mass, qm, qd, lam, lse2, scores, N, P, H, n_blocks,
        keys.stride(0), keys.stride(1), log_mass.stride(0), qk_scale, quad_scale, 1.0 / P, **common)
    return scores


def merge_neighbour(cand, kept, M, *, block_c: int | None = None, block_k: int | None = None,
                    num_warps: int = 4):
    """Triton twin of ``reference.merge_neighbour``: dist (H, Nc) float32, index (H, Nc) int64."""
    _require(cand, kept, M)
    H, Nc, d = cand.shape
    Nk = kept.shape[1]
    if Nk == 0 or Nc == 0:
        return (torch.full((H, Nc), math.inf, device=cand.device),
                torch.full((H, Nc), -1, dtype=torch.long, device=cand.device))
    cand, kept = _last_dim_contiguous(cand), _last_dim_contiguous(kept)
    cen = kept.float().mean(1)  # (H, d): D is shift invariant; centring cuts cancellation
    Mf = M.float().contiguous()
    bc = kept.float() - cen[:, None]
    qb = ((bc @ Mf) * bc).sum(-1).contiguous()  # (H, Nk) (b-c)'M(b-c), once
    dist = torch.empty(H, Nc, dtype=torch.float32, device=cand.device)
    index = torch.empty(H, Nc, dtype=torch.long, device=cand.device)
    dot, prec = _dot_types(cand.dtype)
    BC = block_c or 64
    BK = block_k or 64
    _merge_kernel[(triton.cdiv(Nc, BC), H)](
        cand, kept, cen, Mf, qb, dist, index, Nc, Nk,
        cand.stride(0), cand.stride(1), kept.stride(0), kept.stride(1), 1.0 / d,
        D=d, BLOCK_D=_block_d(d), BLOCK_C=BC, BLOCK_K=BK, DOT=dot, PREC=prec,
        SPLIT=cand.dtype != torch.float32, num_warps=num_warps, num_stages=2)
    return dist, index


def attention(q, k, v, log_mass=None, *, block_m: int | None = None, block_n: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None):
    """Triton twin of ``reference.attention``: (B, H, n, d) in q's dtype."""
    _require(q, k, v)
    B, H, n, d = q.shape
    N = k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty_like(q)
    if n == 0:
        return out
    has_bias = log_mass is not None
    lmb = _last_dim_contiguous(log_mass) if has_bias else q  # dummy pointer when no bias
    dot, prec = _dot_types(q.dtype)
    BM = block_m or 128
    BN = block_n or 64
    extra = {}
    if num_stages is not None:
        extra["num_stages"] = num_stages
    _attn_kernel[(triton.cdiv(n, BM), B * H)](
        q, k, v, lmb, out, n, N, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lmb.stride(0) if has_bias else 0, lmb.stride(1) if has_bias else 0,
        LOG2E / math.sqrt(d), HAS_BIAS=has_bias, D=d, BLOCK_D=_block_d(d),
        BLOCK_M=BM, BLOCK_N=BN, DOT=dot, PREC=prec, num_warps=num_warps or (4 if d <= 64 else 8), **extra)
    return out
