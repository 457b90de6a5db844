"""Benchmarks (``python -m ffviz bench``): ratios against a baseline measured in
the same process, so they mean something on any machine."""
from __future__ import annotations

import copy
import itertools
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ffviz.generate import Controls, RunSettings, cuda_device
from ffviz.run import Run

BENCH_PROMPT = "a red circle and a blue square on a green background"
_ROOT = Path(__file__).resolve().parents[1]  # where ``import ffviz`` works


def _paired_run(model, twin, frames: int, policy: str, budget: int) -> tuple[float, float]:
    """Seconds of one run without and one with the recorder, advanced in lockstep: a
    step of the plain run on ``model`` and the same step of the recording run on
    ``twin`` (a copy the recorder listens to), alternating which goes first. A machine
    that slows down for a while slows both alike, so their ratio holds where separate
    timed runs drift apart."""
    runs = [iter(Run(m, RunSettings(BENCH_PROMPT, frames=frames, seed=0, record=record),
                     Controls(policy, budget))) for m, record in ((model, False), (twin, True))]
    seconds = [0.0, 0.0]
    try:
        for step in itertools.count():
            done = False
            for i in ((0, 1) if step % 2 == 0 else (1, 0)):  # neither always goes first
                t0 = time.perf_counter()
                done = next(runs[i], None) is None
                seconds[i] += time.perf_counter() - t0
            if done:
                break
    finally:
        for run in runs:
            run.close()
    return seconds[0], seconds[1]


def bench_generation(model, frames: int = 64, repeats: int = 3) -> dict:
    """Frames/s with the full cache, the default window and future_forcing at the
    default budget, with and without the recorder (the two in lockstep,
    ``_paired_run``); per configuration, frames/s from the fastest of ``repeats`` runs
    and the recorder's overhead as the median over repeats of each pair's time ratio."""
    configs = {"full": ("full", frames), "window4": ("window", 4),
               "future_forcing4": ("future_forcing", 4)}
    twin = copy.deepcopy(model)
    _paired_run(model, twin, 8, "window", 4)  # warm-up
    pairs: dict[str, list] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (policy, budget) in configs.items():
            pairs[name].append(_paired_run(model, twin, frames, policy, budget))
    out = {"frames": frames, "repeats": repeats, "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine()}
    for name, runs in pairs.items():
        plain, rec = min(p for p, _ in runs), min(r for _, r in runs)
        out[name] = {"fps": round(frames / plain, 2), "fps_recording": round(frames / rec, 2),
                     "recorder_overhead": round(statistics.median(r / p - 1 for p, r in runs), 4)}
    return out


def first_frame_seconds(model, prompt: str, policy: str = "future_forcing", budget: int = 4,
                        repeats: int = 3) -> float:
    """Seconds from starting a recording run of ``prompt`` (what the app's Generate
    does with its model loaded and warmed up) to its first generated frame; the
    fastest of ``repeats``."""
    best, given = float("inf"), model.cfg.given_frames
    for _ in range(repeats):
        t0 = time.perf_counter()
        run = iter(Run(model, RunSettings(prompt, frames=8, seed=0, record=True), Controls(policy, budget)))
        try:
            for step in run:  # the given frames are rendered, not generated
                if step.frame_indices[-1] >= given:
                    break
            best = min(best, time.perf_counter() - t0)
        finally:
            run.close()
    return best


# What a fresh process does before its first frame: start Python, import, read the
# weights (hash checked), warm nothing, generate. Prints the seconds since ``start``.
_COLD_START = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from ffviz.bench import first_frame_seconds
from ffviz.models import load_model
model = load_model(sys.argv[1])
first_frame_seconds(model, sys.argv[2], repeats=1)
print(time.time() - float(sys.argv[3]))
"""


def cold_start_seconds(model_name: str, prompt: str, repeats: int = 3) -> float:
    """Seconds from launching a fresh ``python`` to its first generated frame of
    ``prompt`` (import, loading the weights, the first run's first calls) with this
    process's torch threads; the fastest of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.time()
        done = subprocess.run([sys.executable, "-c", _COLD_START, model_name, prompt, repr(start),
                               str(torch.get_num_threads())],
                              capture_output=True, text=True, encoding="utf-8", cwd=_ROOT)
        if done.returncode:
            raise RuntimeError(f"the cold-start run failed: {done.stderr.strip()[-2000:]}")
        best = min(best, float(done.stdout.split()[-1]))
    return best


def bench_latency(model, model_name: str, prompt: str, repeats: int = 3) -> dict:
    """The first frame's latency with future_forcing at budget 4 and recording on:
    from a click in a running app (model loaded and warm) and from a fresh process."""
    return {"prompt": prompt, "policy": "future_forcing", "budget_frames": 4, "repeats": repeats,
            "first_frame_seconds": round(first_frame_seconds(model, prompt, repeats=repeats), 3),
            "cold_start_first_frame_seconds": round(cold_start_seconds(model_name, prompt, repeats), 3)}


def bench_policies(model, policies: list[str], budget: int, frames: int = 64,
                   repeats: int = 3) -> dict:
    """Each policy's cost as a share of a generation step: per policy, frames/s, the
    mean step time and the mean time of one compression (steps that compressed), over
    the run's steps after the first chunk; the run with the lowest total of ``repeats``.
    A policy is a name with optional parameters, ``"future_forcing:rank=2"`` (so one
    run can time a policy at two settings); results are keyed by these strings."""
    from ffviz.policies import make_policy, parse_policy_args
    specs = {}
    for spec in policies:  # an unknown name or a bad parameter fails before any timing
        name, *pairs = spec.split(":")
        specs[spec] = (name, parse_policy_args(name, pairs))
        make_policy(name, **specs[spec][1])
    fresh = lambda spec: make_policy(specs[spec][0], **specs[spec][1])  # a policy keeps state
    settings = RunSettings(BENCH_PROMPT, frames=frames, seed=0, record=False)
    for spec in specs:  # warm-up: first calls (kernels, allocator, an eigh) are not timed
        Run(model, RunSettings(BENCH_PROMPT, frames=min(frames, 8), seed=0, record=False),
            Controls(fresh(spec), min(budget, 7))).finish()
    out = {"frames": frames, "budget_frames": budget, "repeats": repeats,
           "torch_threads": torch.get_num_threads(), "device": _device_name(model), "policies": {}}
    for spec in specs:
        best = None
        for _ in range(repeats):
            t0, steps, compress = time.perf_counter(), [], []
            for i, step in enumerate(Run(model, settings, Controls(fresh(spec), budget))):
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
        out["policies"][spec] = {
            "fps": round(frames / total, 2), "step_ms": round(step_ms, 2),
            "policy_ms_per_compression": round(policy_ms, 3), "compressions": len(compress),
            "policy_share_of_step": round(policy_ms / step_ms, 4) if step_ms else None}
    return out


def _device_name(model) -> str:
    dev = cuda_device(model)
    return torch.cuda.get_device_name(dev) if dev is not None else (
        platform.processor() or platform.machine())


SWITCH_PROMPT = "a yellow circle and a cyan square on a white background"


def bench_recache(model, policy: str = "window", budget: int = 8, frames: int = 48,
                  repeats: int = 3) -> dict:
    """What a prompt switch costs under each re-cache mode: a run that switches its
    prompt halfway, per mode the re-cache's time as a ratio to the run's median step
    (the fastest of ``repeats``), and how many chunks it re-ran."""
    from ffviz.generate import PromptSwitch
    from ffviz.recache import RECACHE_MODES
    at = frames // 2
    out = {"frames": frames, "policy": policy, "budget_frames": budget, "switch_frame": at,
           "repeats": repeats, "torch_threads": torch.get_num_threads(),
           "device": _device_name(model), "modes": {}}
    Run(model, RunSettings(BENCH_PROMPT, frames=8, seed=0, record=False), Controls(policy, 4)).finish()
    for mode in RECACHE_MODES:
        best = None
        for _ in range(repeats):
            settings = RunSettings(BENCH_PROMPT, frames=frames, seed=0, record=False,
                                   switches=(PromptSwitch(at, SWITCH_PROMPT, mode),))
            steps, switch = [], None
            for step in Run(model, settings, Controls(policy, budget)):
                if step.prompt_switch is not None:
                    switch = step.prompt_switch
                elif step.index:
                    steps.append(step.seconds["total"])
            ratio = switch["recache_seconds"] / statistics.median(steps)
            if best is None or ratio < best[0]:
                best = (ratio, switch, statistics.median(steps))
        ratio, switch, step_s = best
        out["modes"][mode] = {"recache_ms": round(1000 * switch["recache_seconds"], 3),
                              "step_ms": round(1000 * step_s, 3),
                              "recache_over_step": round(ratio, 3),
                              "rerun_chunks": switch["rerun_chunks"]}
    return out
