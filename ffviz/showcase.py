"""Free-running quality over seeds (``python -m ffviz showcase``): what memory buys.

For each seed a scene of the grammar (drawn from the seed; user seeds never
overlap the training seeds), a long free-running rollout under three cache
settings: the default policy and budget, the full cache, and a 1-frame window.
Writes ``showcase.md`` (consistency metrics per setting, mean over seeds, and
per seed), ``showcase.json`` and ``strip.png`` (truth and each setting for the
first seeds, every ``stride``-th frame).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ffviz.generate import DEFAULT_BUDGET, DEFAULT_POLICY, Controls, RunSettings, generate
from ffviz.metrics import consistency
from ffviz.scenes import Scene, parse_prompt, random_spec

METRICS = ("consistency", "background", "color_presence", "shape", "returns", "off_palette")


def showcase_prompt(seed: int) -> str:
    return random_spec(np.random.default_rng([seed, 7])).describe()


def settings_list(budget: int = DEFAULT_BUDGET, policy: str = DEFAULT_POLICY):
    return [(f"{policy} {budget} (default)", policy, budget), ("full cache", "full", 1),
            ("window 1", "window", 1)]


def run_frames(model, prompt: str, seed: int, frames: int, policy: str, budget: int) -> np.ndarray:
    settings = RunSettings(prompt, frames=frames, seed=seed, record=False)
    return np.concatenate([s.frames for s in generate(model, settings, Controls(policy, budget))])


def showcase(model, seeds, frames: int, out: Path, stride: int = 8, strip_seeds: int = 2,
             budget: int = DEFAULT_BUDGET, progress=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    g = model.cfg.given_frames
    rows, strips = {}, []
    for i, seed in enumerate(seeds):
        prompt = showcase_prompt(seed)
        scene = Scene(parse_prompt(prompt)[0], seed)
        truth = scene.render(np.arange(frames))
        if i < strip_seeds:
            strips.append(("truth", seed, truth))
        for name, policy, b in settings_list(budget):
            video = run_frames(model, prompt, seed, frames, policy, b)
            m = consistency(video[g:], scene, start=g)
            m.pop("curves")
            rows.setdefault(name, []).append({"seed": seed, "prompt": prompt, **m})
            if i < strip_seeds:
                strips.append((name, seed, video))
            if progress:
                progress.update(1)
    summary = {name: {k: _nanmean([r[k] for r in rs]) for k in METRICS}
               for name, rs in rows.items()}
    for name, rs in rows.items():
        summary[name]["returns_events"] = int(sum(r["returns_count"] for r in rs))
    _write_strip(strips, out / "strip.png", stride)
    (out / "showcase.json").write_text(json.dumps({"frames": frames, "seeds": list(seeds),
                                                   "summary": summary, "runs": rows}, indent=2))
    (out / "showcase.md").write_text(_table(summary, rows, frames, list(seeds)))
    return summary


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


def _table(summary, rows, frames, seeds) -> str:
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
            f"`returns`: share of objects that left the view and showed their colour again)\n\n"
            + head + body + per_seed)
