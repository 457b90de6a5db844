"""One complete run: generate, record, measure, write. Shared by the CLI's
``generate`` and ``bench`` and by the app's API endpoint."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ffviz.export import VIDEO_FPS, RunWriter, json_safe
from ffviz.generate import Controls, RunSettings, generate
from ffviz.hooks import QueryRecorder
from ffviz.metrics import consistency
from ffviz.scenes import Scene


def make_recorder(model) -> QueryRecorder:
    cfg = model.cfg
    return QueryRecorder(cfg.layers, cfg.heads, cfg.head_dim).attach(model)


def summarize(settings: RunSettings, model, video: np.ndarray, seconds: float, policy, budget: int,
              peak: int, policy_s: float, steps: int, recorder_bytes: int, switches: list,
              model_name: str | None = None) -> dict:
    """The summary of a finished (or stopped) run: settings, speed, cache, scene metrics.
    Shared by the CLI's ``run`` and the app's sessions, so both write the same keys."""
    scenes = getattr(model, "has_scenes", True)  # Wan: no scene grammar, no scene metrics
    spec, unknown = settings.validate(scenes)
    g = model.cfg.given_frames
    if not scenes:
        metrics = {"computed": False, "reason": "consistency metrics compare against the tiny "
                   "model's scene renderer; this model has no scenes"}
    else:
        metrics = consistency(video[g:], Scene(spec, settings.seed), start=g) if len(video) > g else {}
    return json_safe({
        "prompt": settings.prompt, "scene": spec.describe() if spec else None, "prompt_notes": unknown,
        "model": model_name or getattr(model, "name", "tiny"),
        "seed": settings.seed, "frames": int(len(video)), "given_frames": g,
        "seconds": round(seconds, 3), "fps": round(len(video) / max(seconds, 1e-9), 2),
        "policy": policy.name, "policy_params": policy.params(), "budget_frames": budget,
        "tokens_per_frame": model.cfg.tokens_per_frame,
        "peak_cache_tokens": int(peak),
        "policy_ms_per_step": round(1000 * policy_s / max(steps, 1), 3),
        "recorder_bytes": recorder_bytes,
        "switches": switches, "stopped_early": len(video) < settings.frames,
        "metrics": metrics,
    })


def run(model, settings: RunSettings, controls: Controls, out_dir: Path | None = None,
        progress=None, on_step=None) -> dict:
    """Generate ``settings`` under ``controls``; write files to ``out_dir`` when
    given. ``progress`` is a tqdm-like object (``update(n)``); ``on_step(step)``
    sees every step. Returns the summary (also written as summary.json)."""
    scenes = getattr(model, "has_scenes", True)  # Wan: no scene grammar, no scene metrics
    spec, unknown = settings.validate(scenes)
    recorder = make_recorder(model) if settings.record else None
    writer = RunWriter(out_dir, fps=getattr(model.cfg, "fps", VIDEO_FPS)) if out_dir is not None else None
    frames, peak, switches, policy_s, steps = [], 0, [], 0.0, 0
    started = time.perf_counter()
    try:
        for step in generate(model, settings, controls):
            if writer:
                writer.add(step)
            frames.append(step.frames)
            peak = max(peak, step.cache_tokens_peak)
            policy_s += step.seconds["policy"]
            steps += 1
            if step.switched:
                switches.append({"frame": step.frame_indices[0], "policy": step.policy,
                                 "budget_frames": step.budget_frames})
            if progress is not None:
                progress.update(len(step.frame_indices))
            if on_step is not None:
                on_step(step)
    except BaseException:
        if writer:
            writer.abort()
        raise
    finally:
        if recorder is not None:
            recorder.detach()
    seconds = time.perf_counter() - started

    policy, budget, _ = controls.snapshot()
    summary = summarize(settings, model, np.concatenate(frames), seconds, policy, budget, peak,
                        policy_s, steps, recorder.nbytes() if recorder else 0, switches)
    if writer:
        writer.close(summary, recorder)
    return summary
