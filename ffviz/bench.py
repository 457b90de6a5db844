"""Benchmarks (``python -m ffviz bench``): ratios against a baseline measured in
the same process, so they mean something on any machine."""
from __future__ import annotations

import platform
import time

import torch

from ffviz.generate import Controls, RunSettings, generate
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
