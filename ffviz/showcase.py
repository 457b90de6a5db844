"""Free-running quality over seeds (``python -m ffviz showcase``): what memory buys.

For each seed a scene of the grammar (drawn from the seed; user seeds never
overlap the training seeds), a long free-running rollout under three cache
settings: the default policy and budget, the full cache, and a 1-frame window,
plus any asked for with ``--also POLICY:BUDGET[:KEY=VALUE...]``.
Writes ``showcase.md`` (consistency metrics per setting, mean over seeds, and
per seed), ``showcase.json`` and ``strip.png`` (truth and each setting for the
first seeds, every ``stride``-th frame).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ffviz.generate import (DEFAULT_BUDGET, DEFAULT_POLICY, Controls, RunSettings, scene_condition,
                            scene_motion)
from ffviz.metrics import consistency
from ffviz.policies import PolicyError, make_policy, parse_policy_args
from ffviz.run import Run
from ffviz.sampling import palette_tensor, rollout
from ffviz.scenes import Scene, parse_prompt, random_spec

METRICS = ("consistency", "background", "color_presence", "shape", "returns", "off_palette",
           "tracking", "mse")
TEACHER = "teacher-forced"  # the setting of ``teacher_forced_frames`` (a diagnostic, not a policy)


def showcase_prompt(seed: int) -> str:
    return random_spec(np.random.default_rng([seed, 7])).describe()


def settings_list(budget: int = DEFAULT_BUDGET, policy: str = DEFAULT_POLICY, also=()):
    """(label, policy name, its parameters, budget) per setting."""
    return [(f"{policy} {budget} (default)", policy, {}, budget), ("full cache", "full", {}, 1),
            ("window 1", "window", {}, 1), *also]


def parse_setting(spec: str) -> tuple[str, str, dict, int]:
    """``"sink:2:n_sink=2"`` -> ("sink 2, n_sink=2", "sink", {"n_sink": 2}, 2); a clear
    ``PolicyError`` for a bad name, budget or parameter. ``teacher-forced:B``: frames
    generated from a window of B true frames (``teacher_forced_frames``)."""
    name, *rest = spec.split(":")
    if not rest or not rest[0].isdigit() or int(rest[0]) < 1:
        raise PolicyError(f"setting {spec!r} must look like POLICY:BUDGET[:KEY=VALUE...] "
                          "with a budget of at least 1 frame")
    if name == TEACHER:
        if rest[1:]:
            raise PolicyError(f"{TEACHER} takes a budget only, got {spec!r}")
        return f"{TEACHER} {rest[0]} (true frames in the cache)", TEACHER, {}, int(rest[0])
    params = parse_policy_args(name, rest[1:])
    make_policy(name, **params)  # a bad value fails here, before any run
    label = ", ".join([f"{name} {rest[0]}", *rest[1:]])
    return label, name, params, int(rest[0])


def run_frames(model, prompt: str, seed: int, frames: int, policy: str, budget: int,
               params: dict | None = None, steps: int | None = None,
               snap: bool | None = None, one_motion: bool | None = None) -> np.ndarray:
    settings = RunSettings(prompt, frames=frames, seed=seed, record=False, steps=steps, snap=snap,
                           one_motion=one_motion)
    controls = Controls(make_policy(policy, **(params or {})), budget)  # a fresh policy per run
    return np.array(Run(model, settings, controls).finish().frames.all())


def teacher_forced_frames(model, prompt: str, seed: int, frames: int, budget: int,
                          steps: int | None = None, snap: bool | None = None,
                          one_motion: bool | None = None) -> np.ndarray:
    """Every frame generated as in a run (same sampler, same noise seed) but from a cache
    of the TRUE previous frames (the newest ``budget``), never of its own output: what
    the model can do without its own errors to build on. A diagnostic, not a policy:
    the training rollout with horizon 1 (the true frame cached after every frame)."""
    spec = parse_prompt(prompt, seed)[0]
    cfg = model.cfg
    if cfg.chunk_frames != 1:
        raise ValueError(f"teacher-forced frames are generated one at a time; this model's "
                         f"chunks hold {cfg.chunk_frames} frames")
    truth = torch.from_numpy(Scene(spec, seed).render(np.arange(frames)))[None].float()
    with torch.no_grad():
        given = model.patchify(truth[:, :cfg.given_frames] / 127.5 - 1)
        cond = scene_condition(model, spec, scene_motion(model, given), one_motion)
    palette = palette_tensor([spec]) if (cfg.snap if snap is None else snap) else None
    out = rollout(model, model.patchify(truth / 127.5 - 1), cond, steps or cfg.sample_steps,
                  budget, torch.Generator().manual_seed(seed), palette=palette, horizon=1)
    return model.decode(out)


def showcase(model, seeds, frames: int, out: Path, stride: int = 8, strip_seeds: int = 2,
             budget: int = DEFAULT_BUDGET, progress=None, also=(), steps: int | None = None,
             snap: bool | None = None, one_motion: bool | None = None) -> dict:
    """Run every setting on every seed's scene, score it against the scene's truth and
    write the table, JSON and strip to ``out``. ``steps``: denoising steps per frame for
    every setting, the teacher-forced diagnostic included (None: the card's); ``snap``:
    palette snapping, ``one_motion``: picks kept to the scene's motion (None: the card's)."""
    out.mkdir(parents=True, exist_ok=True)
    g = model.cfg.given_frames
    rows, strips, copy_mse = {}, [], []
    for i, seed in enumerate(seeds):
        prompt = showcase_prompt(seed)
        scene = Scene(parse_prompt(prompt, seed)[0], seed)
        truth = scene.render(np.arange(frames))
        first = max(g, 1)
        copy_mse.append(pixel_mse(truth[first - 1:-1], truth[first:]))  # predicting "nothing moves"
        if i < strip_seeds:
            strips.append(("truth", seed, truth))
        for name, policy, params, b in settings_list(budget, also=also):
            video = (teacher_forced_frames(model, prompt, seed, frames, b, steps, snap, one_motion)
                     if policy == TEACHER else
                     run_frames(model, prompt, seed, frames, policy, b, params, steps, snap, one_motion))
            m = consistency(video[g:], scene, start=g)
            m.pop("curves")
            m["mse"] = pixel_mse(video[g:], truth[g:])
            rows.setdefault(name, []).append({"seed": seed, "prompt": prompt, **m})
            if i < strip_seeds:
                strips.append((name, seed, video))
            if progress:
                progress.update(1)
    summary = {name: {k: _nanmean([r[k] for r in rs]) for k in METRICS}
               for name, rs in rows.items()}
    for name, rs in rows.items():
        summary[name]["returns_events"] = int(sum(r["returns_count"] for r in rs))
    if strips:
        _write_strip(strips, out / "strip.png", stride)
    copy = float(np.mean(copy_mse))
    (out / "showcase.json").write_text(json.dumps({"frames": frames, "seeds": list(seeds),
                                                   "summary": summary, "copy_previous_mse": copy,
                                                   "runs": rows}, indent=2), encoding="utf-8")
    (out / "showcase.md").write_text(_table(summary, rows, frames, list(seeds), copy), encoding="utf-8")
    return summary


def pixel_mse(video: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error of uint8 frames against the true ones, pixels scaled to [-1, 1]."""
    return float(np.mean(((video.astype(np.float32) - truth.astype(np.float32)) / 127.5) ** 2))


def _nanmean(xs) -> float:
    xs = [x for x in xs if not np.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _write_strip(strips, path: Path, stride: int, scale: int = 3) -> None:
    lines = []
    for _, _, video in strips:
        picked = video[::stride]
        lines.append(np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                     for f in picked], 1))
    img = np.concatenate(lines, 0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(img).save(path)


def _table(summary, rows, frames, seeds, copy_mse: float) -> str:
    head = "| setting | " + " | ".join(METRICS) + " | return events |\n"
    head += "| --- |" + " --- |" * (len(METRICS) + 1) + "\n"
    body = "".join(f"| {name} | " + " | ".join(f"{v[k]:.3f}" for k in METRICS) +
                   f" | {v['returns_events']} |\n" for name, v in summary.items())
    per_seed = "\n| seed | prompt | " + " | ".join(rows) + " |\n| --- | --- |" + " --- |" * len(rows) + "\n"
    for j, seed in enumerate(seeds):
        prompt = next(iter(rows.values()))[j]["prompt"]
        per_seed += f"| {seed} | {prompt} | " + " | ".join(
            f"{rs[j]['consistency']:.3f}" for rs in rows.values()) + " |\n"
    return (f"Free-running, {frames} frames, seeds {seeds[0]}..{seeds[-1]} (mean over seeds; "
            f"`returns`: share of objects that left the view and showed their colour again; "
            f"`tracking`: share of visible object-frames with the object's colour where it is, "
            f"not part of `consistency`; `mse`: mean squared pixel error against the true "
            f"frames, pixels in [-1, 1])\n\n"
            + head + body
            + f"\nCopying the previous true frame (a predictor that knows nothing moves) scores "
              f"mse {copy_mse:.4f}: a teacher-forced row above that is not clearly below it has "
              f"not learned the motion.\n"
            + per_seed)
