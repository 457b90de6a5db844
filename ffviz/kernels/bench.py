"""Kernel benchmark (``python -m ffviz bench --kernels``).

With CUDA and triton: each kernel against its PyTorch reference on the same
device at real-model size (one layer of Wan2.1-1.3B's cache: 12 heads, 32,760
cached tokens, head dim 128, bf16), reported as a speedup, the achieved GB/s
against the device's peak memory bandwidth, and the time against reading the
keys once at peak bandwidth (the floor for ``future_score``).
Without a GPU: the reference alone at a reduced size, saying so.

Times are the best of ``repeats`` averages of back-to-back calls, after a warm-up
call (which also compiles the Triton kernels).
"""
from __future__ import annotations

import math
import os
import platform
import time

import torch

from ffviz.kernels import reference, triton_kernels

REAL = dict(heads=12, tokens=32760, head_dim=128, positions=64, rank=4, queries=4680,
            dtype=torch.bfloat16)
REDUCED = dict(heads=2, tokens=4096, head_dim=128, positions=16, rank=2, queries=256,
               dtype=torch.float32)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int = 5, inner: int = 3) -> float:
    """Seconds per call: best over ``repeats`` of the mean of ``inner`` calls."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def peak_bandwidth_gbs(device) -> float | None:
    """The device's peak memory bandwidth (GB/s) from its clock and bus width."""
    if torch.device(device).type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return None


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), device, repeats=5, inner=5)
    return 2 * nbytes / t / 1e9


def make_inputs(heads, tokens, head_dim, positions, rank, queries, dtype, device, seed=0):
    """Random inputs for the three kernels at the given size (on ``device``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, N, d = heads, tokens, head_dim
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    keys = rnd(H, N, d) + rnd(H, 1, d)
    log_mass = torch.randint(1, 4, (H, N), generator=g).float().log()
    mean = rnd(H, positions, d) * 0.7
    dirs = torch.nn.functional.normalize(rnd(H, positions, rank, d), dim=-1)
    eig = torch.rand(H, rank, generator=g) * d
    A = rnd(H, d, d)
    M = A @ A.transpose(1, 2) / d
    q = rnd(1, H, queries, d)
    v = rnd(H, N, d)
    to = lambda t: t.to(device=device, dtype=dtype)
    return {
        "future_score": (to(keys), log_mass.to(device), to(mean), to(dirs), eig.to(device)),
        "merge_neighbour": (to(keys[:, : N // 2]), to(keys[:, N // 2:]), M.to(device)),
        "attention": (to(q), to(keys)[None], to(v)[None], log_mass[None].to(device)),
    }


def _bytes(name: str, args) -> int:
    """Bytes a kernel must move at least: its big inputs read once, its output written."""
    nb = lambda t: t.numel() * t.element_size()
    if name == "future_score":
        keys, lm = args[0], args[1]
        return nb(keys) + nb(lm) + keys.shape[0] * keys.shape[1] * 4
    if name == "merge_neighbour":
        cand, kept = args[0], args[1]
        return nb(cand) + nb(kept) + cand.shape[0] * cand.shape[1] * 12
    q, k, v, lm = args
    return 2 * nb(q) + nb(k) + nb(v) + nb(lm)


def _flops(name: str, args) -> float:
    """Useful floating-point operations of one call (multiply-adds count 2)."""
    if name == "future_score":
        keys, _, mean, dirs, _ = args
        H, N, d = keys.shape
        return 4.0 * H * mean.shape[1] * (1 + dirs.shape[2]) * N * d  # logits in both passes
    if name == "merge_neighbour":
        cand, kept = args[0], args[1]
        return 2.0 * cand.shape[0] * cand.shape[1] * kept.shape[1] * cand.shape[2]
    q, k = args[0], args[1]
    return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]


def _max_err(a, b) -> float:
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    return float((a.float() - b.float()).abs().max())


SWEEP = [(16, 0), (16, 2), (64, 0), (64, 4), (256, 4)]  # (proxy positions, rank)


def _score_sweep(args, bw, key_bytes, repeats) -> list[dict]:
    """Triton future_score time over proxy sizes: its compute grows with P (1 + r)
    while the key traffic does not, so only small proxies can sit near the key-read floor."""
    keys, lm = args[0], args[1]
    H, N, d = keys.shape
    rows = []
    for P, r in SWEEP:
        g = torch.Generator(device="cpu").manual_seed(P + r)
        m = (torch.randn(H, P, d, generator=g) * 0.7).to(keys)
        u = torch.nn.functional.normalize(torch.randn(H, P, r, d, generator=g), dim=-1).to(keys)
        lam = (torch.rand(H, r, generator=g) * d).to(keys.device)
        t = time_call(lambda: triton_kernels.future_score(keys, lm, m, u, lam), keys.device, repeats)
        row = {"positions": P, "rank": r, "triton_ms": round(t * 1e3, 4),
               "tflops": round(_flops("future_score", (keys, lm, m, u, lam)) / t / 1e12, 1)}
        if bw:
            row["time_over_key_read"] = round(t / (key_bytes / (bw * 1e9)), 2)
        rows.append(row)
    return rows


def bench_kernels(device=None, size: dict | None = None, repeats: int = 5,
                  interpreted: bool = False) -> dict:
    """Time the kernels; returns a JSON-able dict (see the module docstring).

    ``interpreted`` also runs the Triton kernels on CPU under TRITON_INTERPRET=1
    (for the tests of this function: the times mean nothing).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    use_triton = triton_kernels.AVAILABLE and (
        on_gpu or (interpreted and triton_kernels.interpreting()))
    size = dict(size or (REAL if on_gpu else REDUCED))
    out: dict = {
        "device": torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine()),
        "gpu": on_gpu,
        "triton": getattr(triton_kernels.triton, "__version__", None),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "size": {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in size.items()},
    }
    if not on_gpu:
        out["note"] = ("no GPU found: Triton kernels not timed; the PyTorch reference is timed "
                       "at a reduced size on the CPU")
        if use_triton:
            out["note"] = "no GPU found: Triton kernels run in the interpreter (times mean nothing)"
    elif not triton_kernels.AVAILABLE:
        out["note"] = f"triton is not importable ({triton_kernels.IMPORT_ERROR}): reference only"
    peak = peak_bandwidth_gbs(device)
    if on_gpu:
        out["peak_bandwidth_gbs"] = round(peak, 1) if peak else None
        out["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(device), 1)
    bw = peak or out.get("copy_bandwidth_gbs")
    inputs = make_inputs(**size, device=device)
    keys = inputs["future_score"][0]
    key_bytes = keys.numel() * keys.element_size()
    if bw:
        out["key_read_ms"] = round(key_bytes / (bw * 1e9) * 1e3, 4)
    with torch.inference_mode():
        for name, args in inputs.items():
            ref_fn = getattr(reference, name)
            row = {"bytes": _bytes(name, args)}
            t_ref = time_call(lambda: ref_fn(*args), device, repeats)
            row["reference_ms"] = round(t_ref * 1e3, 4)
            if use_triton:
                tri_fn = getattr(triton_kernels, name)
                t_tri = time_call(lambda: tri_fn(*args), device, repeats)
                gbs = row["bytes"] / t_tri / 1e9
                row.update(triton_ms=round(t_tri * 1e3, 4), speedup=round(t_ref / t_tri, 2),
                           achieved_gbs=round(gbs, 1), tflops=round(_flops(name, args) / t_tri / 1e12, 2),
                           max_abs_diff=_max_err(tri_fn(*args), ref_fn(*args)))
                if bw:
                    row["fraction_of_peak_bandwidth"] = round(gbs / bw, 3)
                if bw and name == "future_score":
                    row["time_over_key_read"] = round(t_tri / (key_bytes / (bw * 1e9)), 2)
            out[name] = row
    if use_triton and on_gpu:
        out["future_score_sweep"] = _score_sweep(inputs["future_score"], bw, key_bytes, repeats)
        fs = out["future_score"]
        out["targets"] = {"future_score_speedup>=5": fs["speedup"] >= 5,
                          "future_score_within_2x_key_read": fs.get("time_over_key_read", math.inf) <= 2}
    return out
