"""Benchmarks (``python -m ffviz bench``): ratios against a baseline measured in
the same process, so they mean something on any machine."""
from __future__ import annotations

import platform
import time

import torch

from ffviz.generate import Controls, RunSettings, cuda_device, generate
from ffviz.run import make_recorder

BENCH_PROMPT = "a red circle and a blue square on a green background"


def _time_run(model, frames: int, policy: str, budget: int, record: bool) -> float:
    settings = RunSettings(BENCH_PROMPT, frames=frames, seed=0, record=record)
    recorder = make_recorder(model) if record else None
    t0 = time.perf_counter()
    try:
        for _ in generate(model, settings, Controls(policy, budget)):
            pass
    finally:
        if recorder:
            recorder.detach()
    return time.perf_counter() - t0


def bench_generation(model, frames: int = 64, repeats: int = 3) -> dict:
    """Frames/s with the full cache and the default window, with and without the
    recorder; configurations interleaved, best of ``repeats`` each."""
    configs = {"full": ("full", frames), "window4": ("window", 4)}
    best: dict[tuple, float] = {}
    _time_run(model, 8, "window", 4, True)  # warm-up
    for _ in range(repeats):
        for name, (policy, budget) in configs.items():
            for record in (False, True):
                t = _time_run(model, frames, policy, budget, record)
                best[(name, record)] = min(best.get((name, record), float("inf")), t)
    out = {"frames": frames, "repeats": repeats, "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine()}
    for name in configs:
        plain, rec = best[(name, False)], best[(name, True)]
        out[name] = {"fps": round(frames / plain, 2), "fps_recording": round(frames / rec, 2),
                     "recorder_overhead": round(rec / plain - 1, 4)}
    return out


def bench_policies(model, policies: list[str], budget: int, frames: int = 64,
                   repeats: int = 3) -> dict:
    """Each policy's cost as a share of a generation step: per policy, frames/s, the
    mean step time and the mean time of one compression (steps that compressed), over
    the run's steps after the first chunk; the run with the lowest total of ``repeats``."""
    from ffviz.policies import make_policy
    for name in policies:
        make_policy(name)  # an unknown name fails before any timing
    settings = RunSettings(BENCH_PROMPT, frames=frames, seed=0, record=False)
    for name in policies:  # warm-up: first calls (kernels, allocator, an eigh) are not timed
        for _ in generate(model, RunSettings(BENCH_PROMPT, frames=min(frames, 8), seed=0),
                          Controls(name, min(budget, 7))):
            pass
    out = {"frames": frames, "budget_frames": budget, "repeats": repeats,
           "torch_threads": torch.get_num_threads(), "device": _device_name(model), "policies": {}}
    for name in policies:
        best = None
        for _ in range(repeats):
            t0, steps, compress = time.perf_counter(), [], []
            for i, step in enumerate(generate(model, settings, Controls(name, budget))):
                if i:  # the first chunk has no cache to compress; only numbers are kept
                    steps.append(step.seconds["total"])
                    if step.decision is not None:
                        compress.append(step.seconds["policy"])
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, steps, compress)
        total, steps, compress = best
        step_ms = 1000 * sum(steps) / max(1, len(steps))
        policy_ms = 1000 * sum(compress) / len(compress) if compress else 0.0
        out["policies"][name] = {
            "fps": round(frames / total, 2), "step_ms": round(step_ms, 2),
            "policy_ms_per_compression": round(policy_ms, 3), "compressions": len(compress),
            "policy_share_of_step": round(policy_ms / step_ms, 4) if step_ms else None}
    return out


def _device_name(model) -> str:
    dev = cuda_device(model)
    return torch.cuda.get_device_name(dev) if dev is not None else (
        platform.processor() or platform.machine())
