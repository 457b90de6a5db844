"""Kernels: the PyTorch references against the definitions, the Triton kernels
against the references (under TRITON_INTERPRET=1 on CPU, set in conftest.py),
and the dispatch rules.

Tolerances follow flash-attention's tests: with ``truth`` the reference in
float64 on the same (already rounded) inputs, a kernel's error
``|kernel - truth|`` must be no worse than ``SLACK`` times that of a
same-precision PyTorch implementation, ``|ref(dtype) - truth|`` (float32 for
float32 inputs, bfloat16 arithmetic for bfloat16 ones), plus a floor of a few
float32 ulps of the output's scale (the baseline can be exact by luck).
Shapes are tiny and odd (N not a multiple of the block): the interpreter is slow.
"""
from __future__ import annotations

import math

import pytest
import torch

from ffviz.kernels import dispatch, reference, triton_kernels

SLACK = 4.0  # a different summation order (tiles, tensor-core dot) than the reference
FLOOR = 1e-6  # relative to the output's scale: ~8 float32 ulps

triton_only = pytest.mark.skipif(
    not triton_kernels.AVAILABLE, reason=f"triton is not importable ({triton_kernels.IMPORT_ERROR})")


def _device() -> str:
    if triton_kernels.interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def _score_inputs(H, N, d, P, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(H, 1, d, generator=g)  # keys share a mean, as real keys do
    keys = torch.randn(H, N, d, generator=g) + offset
    log_mass = torch.randint(1, 5, (H, N), generator=g).float().log()
    mean = torch.randn(H, P, d, generator=g) * 0.7
    dirs = torch.nn.functional.normalize(torch.randn(H, P, r, d, generator=g), dim=-1)
    eig = torch.rand(H, r, generator=g) * d  # quadratic term of order 1
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(keys), log_mass.to(device), cast(mean), cast(dirs), eig.to(device)


def _f64(*tensors):
    return [t.double() for t in tensors]


def _check_close(out, truth, same_prec, dtype, what):
    scale = truth.abs().max().item()
    err = (out.double() - truth).abs().max().item()
    base = (same_prec.double() - truth).abs().max().item()
    bound = SLACK * base + FLOOR * scale
    assert err <= bound, f"{what}: error {err:.3g} > {SLACK} x same-precision {base:.3g} + floor"
    return err, base


# ---------------------------------------------------------------- references


def test_reference_future_score_matches_definition(monkeypatch):
    H, N, d, P, r = 2, 37, 16, 6, 2
    args = _score_inputs(H, N, d, P, r, torch.float32)
    keys, lm, mean, dirs, eig = _f64(*args)
    z = torch.einsum("hpd,hnd->hpn", mean, keys) / math.sqrt(d)
    u = torch.einsum("hprd,hnd->hprn", dirs, keys)
    z = z + (eig[:, None, :, None] * u.square()).sum(2) / (2 * d) + lm[:, None, :]
    want = torch.softmax(z, -1).mean(1)
    got = reference.future_score(*args)
    assert got.dtype == torch.float32 and got.shape == (H, N)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reference.future_score(keys, lm, mean, dirs, eig), want)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * H * N)  # two positions per chunk
    torch.testing.assert_close(reference.future_score(*args), got)
    torch.testing.assert_close(got.sum(1), torch.ones(H))


def test_reference_merge_neighbour_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(1)
    H, Nc, Nk, d = 2, 13, 9, 8
    cand, kept = torch.randn(H, Nc, d, generator=g) + 3, torch.randn(H, Nk, d, generator=g) + 3
    A = torch.randn(H, d, d, generator=g)
    M = A @ A.transpose(1, 2) / d
    diff = cand[:, :, None] - kept[:, None]  # (H, Nc, Nk, d)
    D = torch.einsum("hckd,hde,hcke->hck", diff, M, diff) / d
    dist, index = reference.merge_neighbour(cand, kept, M)
    torch.testing.assert_close(dist, D.min(-1).values, rtol=1e-4, atol=1e-5)
    assert torch.equal(index, D.argmin(-1))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * H * Nk)
    d2, i2 = reference.merge_neighbour(cand, kept, M)
    torch.testing.assert_close(d2, dist)
    assert torch.equal(i2, index)
    empty_d, empty_i = reference.merge_neighbour(cand, kept[:, :0], M)
    assert torch.isinf(empty_d).all() and (empty_i == -1).all()
    twins = torch.cat([kept[:, :1], kept], 1)  # kept 0 twice: a tie goes to the first
    _, i3 = reference.merge_neighbour(kept[:, :1] + 1e-3, twins, M)
    assert (i3 == 0).all()
    d64, i64 = reference.merge_neighbour(cand.double(), kept.double(), M.double())  # numpy's argmin
    assert d64.dtype == torch.float64 and torch.equal(i64, index)
    d16, _ = reference.merge_neighbour(cand.bfloat16(), kept.bfloat16(), M.bfloat16(), upcast=False)
    torch.testing.assert_close(d16, dist, rtol=0.1, atol=0.1)  # torch's min: numpy has no bf16


def test_reference_attention_matches_definition(monkeypatch):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (7, 11, 11))
    lm = torch.randint(1, 4, (1, 2, 11), generator=g).float().log()
    want = torch.softmax(q @ k.transpose(-1, -2) / 4 + lm[:, :, None], -1) @ v
    torch.testing.assert_close(reference.attention(q, k, v, lm), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 2 * 11)  # chunks of 2 queries
    torch.testing.assert_close(reference.attention(q, k, v, lm), want, rtol=1e-5, atol=1e-6)
    ones = torch.zeros(1, 2, 11)  # all masses 1: the plain attention
    torch.testing.assert_close(reference.attention(q, k, v, ones), reference.attention(q, k, v))


# ---------------------------------------------------------------- Triton vs reference

DTYPES = [torch.float32, torch.bfloat16]
SCORE_CASES = [(32, 0, 5), (64, 1, 17), (128, 4, 3), (32, 3, 20), (64, 2, 1)]  # (d, r, P)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,r,P", SCORE_CASES)
def test_future_score_kernel(d, r, P, dtype):
    dev = _device()
    H, N = 2, 83  # 83 = 5 blocks of 16 + 3
    args = _score_inputs(H, N, d, P, r, dtype, dev, seed=d + r)
    out = triton_kernels.future_score(*args, block_n=16, block_p=16, n_splits=3)
    truth = reference.future_score(*_f64(*args))  # float64 on the same rounded inputs
    same = reference.future_score(*args, upcast=False)
    assert out.dtype == torch.float32 and out.shape == (H, N)
    err, base = _check_close(out, truth, same, dtype, f"future_score d={d} r={r} P={P} {dtype}")
    if dtype == torch.bfloat16:  # exact bf16 products, fp32 sums: far below bf16 arithmetic
        assert err <= 0.01 * base
    torch.testing.assert_close(out.sum(1), torch.ones(H, device=dev), rtol=1e-4, atol=1e-4)


@triton_only
def test_future_score_kernel_default_tiling():
    """The launcher's own blocks and split count (one split on CPU)."""
    dev = _device()
    args = _score_inputs(3, 150, 64, 70, 2, torch.float32, dev, seed=5)
    want = reference.future_score(*args)
    torch.testing.assert_close(triton_kernels.future_score(*args), want, rtol=1e-4, atol=1e-7)
    strided = torch.cat([args[0], args[0]], -1)[..., :64]  # token stride 2d: a view, not a copy
    got = triton_kernels.future_score(strided, *args[1:], block_n=32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_merge_neighbour_kernel(d, dtype):
    dev = _device()
    g = torch.Generator().manual_seed(d)
    H, Nc, Nk = 2, 37, 29
    offset = 2 * torch.randn(H, 1, d, generator=g)
    kept = torch.randn(H, Nk, d, generator=g) + offset
    near = kept[:, torch.randint(0, Nk, (Nc,), generator=g)] + 0.3 * torch.randn(H, Nc, d, generator=g)
    cand = near.to(dev, dtype)
    kept = kept.to(dev, dtype)
    A = torch.randn(H, d, d, generator=g)
    M = (A @ A.transpose(1, 2) / d).to(dev)
    dist, index = triton_kernels.merge_neighbour(cand, kept, M, block_c=16, block_k=16)
    ref_d, _ = reference.merge_neighbour(*_f64(cand, kept, M))
    same_d, _ = reference.merge_neighbour(cand, kept, M, upcast=False)
    assert dist.dtype == torch.float32 and index.dtype == torch.int64
    err, base = _check_close(dist, ref_d, same_d, dtype, f"merge dist d={d} {dtype}")
    if dtype == torch.bfloat16:  # the hi + lo cross term: far below a bf16 expansion
        assert err <= 0.1 * base
    # index: the exact distance of the chosen token is the minimum, up to the same error
    a, b = cand.double(), kept.double()
    diff = a[:, :, None] - b[:, None]
    D = torch.einsum("hckd,hde,hcke->hck", diff, M.double(), diff) / d
    chosen = D.gather(2, index[..., None]).squeeze(2)
    slack = 2 * SLACK * (same_d.double() - ref_d).abs().max() + FLOOR * D.max()
    assert (chosen - D.min(-1).values).max() <= slack


@triton_only
def test_merge_neighbour_kernel_default_tiling_and_empty():
    dev = _device()
    g = torch.Generator().manual_seed(3)
    cand, kept = torch.randn(2, 70, 32, generator=g).to(dev), torch.randn(2, 65, 32, generator=g).to(dev)
    M = torch.eye(32).expand(2, 32, 32).to(dev)
    dist, index = triton_kernels.merge_neighbour(cand, kept, M)
    ref_d, ref_i = reference.merge_neighbour(cand, kept, M)
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-5)
    assert (index == ref_i).float().mean() > 0.99
    d0, i0 = triton_kernels.merge_neighbour(cand, kept[:, :0], M)
    assert torch.isinf(d0).all() and (i0 == -1).all()


def _attention_same_precision(q, k, v, lm):
    """Attention in the inputs' dtype, op by op (flash-attention's ``attention_ref``
    with ``upcast=False``): the kernel also rounds the probabilities to v's
    dtype before the second product, as fused GPU kernels do. (CPU's fused
    scaled_dot_product_attention keeps them in float32, so it is a stricter
    baseline than any GPU kernel meets.)"""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if lm is not None:
        s = s + lm.to(q.dtype)[:, :, None, :]
    return torch.softmax(s, -1) @ v


ATTN_CASES = [(32, True), (64, True), (128, True), (64, False)]


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,bias", ATTN_CASES)
def test_attention_kernel(d, bias, dtype):
    dev = _device()
    g = torch.Generator().manual_seed(d)
    B, H, n, N = 1, 2, 21, 45
    q, k, v = (torch.randn(B, H, m, d, generator=g).to(dev, dtype) for m in (n, N, N))
    lm = torch.randint(1, 6, (B, H, N), generator=g).float().log().to(dev) if bias else None
    out = triton_kernels.attention(q, k, v, lm, block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    truth = reference.attention(*_f64(q, k, v), None if lm is None else lm.double())
    same = _attention_same_precision(q, k, v, lm)
    _check_close(out, truth, same, dtype, f"attention d={d} bias={bias} {dtype}")


@triton_only
def test_attention_kernel_default_tiling():
    dev = _device()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, m, 32, generator=g).to(dev) for m in (9, 70, 70))
    lm = torch.rand(2, 3, 70, generator=g).log().to(dev)
    torch.testing.assert_close(triton_kernels.attention(q, k, v, lm), reference.attention(q, k, v, lm),
                               rtol=1e-4, atol=1e-5)


@triton_only
def test_attention_kernel_gives_dead_slots_nothing():
    """Dead cache slots (log-mass -inf), a whole first block of them included: the
    attention over the live keys alone, no NaN from an all -inf block."""
    dev = _device()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, m, 32, generator=g).to(dev) for m in (5, 40, 40))
    lm = torch.zeros(1, 2, 40)
    lm[:, :, :20] = -math.inf  # blocks of 16: the first all dead, the second half dead
    out = triton_kernels.attention(q, k, v, lm.to(dev), block_m=16, block_n=16)
    want = reference.attention(q, k[:, :, 20:], v[:, :, 20:])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- dispatch


def test_dispatch_modes(monkeypatch):
    args = _score_inputs(2, 9, 16, 3, 1, torch.float32)
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert dispatch.backend(*args) == "reference"  # CPU tensors: the reference
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.backend(*args) == "reference"
    monkeypatch.setenv(dispatch.ENV, "bogus")
    with pytest.raises(ValueError, match="FFVIZ_KERNELS"):
        dispatch.backend(*args)
    monkeypatch.setenv(dispatch.ENV, "triton")
    if not triton_kernels.AVAILABLE:
        with pytest.raises(RuntimeError, match="not importable"):
            dispatch.backend(*args)
    elif triton_kernels.interpreting():
        assert dispatch.backend(*args) == "triton"
        torch.testing.assert_close(dispatch.future_score(*args), reference.future_score(*args),
                                   rtol=1e-4, atol=1e-7)
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            dispatch.backend(*args)


def test_dispatch_calls_reference_on_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "auto")
    calls = []
    for name in ("future_score", "merge_neighbour", "attention"):
        fn = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    args = _score_inputs(2, 9, 16, 3, 0, torch.float32)
    assert dispatch.future_score(*args).shape == (2, 9)
    dist, index = dispatch.merge_neighbour(args[0], args[0][:, :4], torch.eye(16).expand(2, 16, 16))
    assert torch.equal(index[:, :4], torch.arange(4).expand(2, 4)) and dist[:, :4].abs().max() < 1e-4
    q = torch.randn(1, 2, 3, 16)
    assert dispatch.attention(q, q, q, None).shape == q.shape
    assert calls == ["future_score", "merge_neighbour", "attention"]


def test_dispatch_rejects_bad_shapes():
    keys, lm, mean, dirs, eig = _score_inputs(2, 9, 16, 3, 1, torch.float32)
    with pytest.raises(ValueError, match="eigvals"):
        dispatch.future_score(keys, lm, mean, dirs, eig[:, :0])
    with pytest.raises(ValueError, match="P = 0"):
        dispatch.future_score(keys, lm, mean[:, :0], dirs[:, :0], eig)
    with pytest.raises(ValueError, match="M must be"):
        dispatch.merge_neighbour(keys, keys, torch.eye(8).expand(2, 8, 8))
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="log_mass"):
        dispatch.attention(q, q, q, torch.zeros(1, 2, 4))


# ---------------------------------------------------------------- bench

TINY = dict(heads=2, tokens=40, head_dim=32, positions=3, rank=1, queries=5, dtype=torch.float32)


def test_bench_kernels_cli_on_cpu(monkeypatch, tmp_path, capsys):
    import json

    from ffviz.__main__ import main
    from ffviz.kernels import bench
    monkeypatch.setattr(bench, "REDUCED", TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "k.json"
    assert main(["bench", "--kernels", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["gpu"] is False and "no GPU found" in result["note"]
    assert result["size"]["tokens"] == 40 and result["size"]["dtype"] == "float32"
    for name in ("future_score", "merge_neighbour", "attention"):
        assert result[name]["reference_ms"] > 0 and "triton_ms" not in result[name]
    assert json.loads(capsys.readouterr().out) == result


@triton_only
def test_bench_kernels_triton_rows():
    """The rows a GPU run fills, computed here with the interpreter."""
    from ffviz.kernels import bench
    if not triton_kernels.interpreting():
        pytest.skip("computes the GPU rows with the interpreter (TRITON_INTERPRET=1)")
    result = bench.bench_kernels("cpu", size=TINY, repeats=1, interpreted=True)
    for name in ("future_score", "merge_neighbour", "attention"):
        row = result[name]
        assert row["triton_ms"] > 0 and row["speedup"] >= 0 and row["achieved_gbs"] >= 0
        assert row["max_abs_diff"] < 1e-4


def test_package_imports_without_triton():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom ffviz import kernels\n"
            "from ffviz.kernels import triton_kernels\n"
            "assert not triton_kernels.AVAILABLE and 'triton' in triton_kernels.IMPORT_ERROR\n"
            "k = torch.randn(2, 5, 8)\n"
            "s = kernels.future_score(k, torch.zeros(2, 5), k[:, :2], k[:, :2, None], torch.ones(2, 1))\n"
            "assert s.shape == (2, 5) and kernels.backend(k) == 'reference'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
