"""Head roles: which attention heads carry the scene across frames.

``python -m ffviz heads`` runs a model on prompts x seeds with the full cache and
measures every layer and head (``ffviz.head_measures``: Forcing-KV's score, the
attention's entropy, its shares on the sink, the chunk, the frame before it and
older frames) from the post-RoPE queries of every denoising step of every chunk
whose context reaches past the sink and the recent frames. Per run and denoising
step, a head's measure is its mean over those chunks: a sample. heads.json gives
each head the mean of its samples and their spread (std, min, max over all; the
std across prompts, across seeds and across denoising steps), its role (static:
mean score >= threshold) and how many samples agree with that role, so that the
claim that roles are stable is tested, not assumed. ``heads_plot`` draws it.

``HeadMeter`` is the measurement of one run, live: an ``Observer`` of the run with
hooks on the model; ``matrices()`` are its layer x head means so far (the app's
heads view). ``head_matrices`` reads the same matrices back from a heads.json.
Shapes: L layers, H heads, S denoising steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ffviz.generate import Controls, GenerationError, Observer, RunSettings
from ffviz.head_measures import (MEASURES, STATIC_THRESHOLD, default_recent, frame_attention,
                                 head_measures, informative)
from ffviz.hooks import Hooks
from ffviz.run import Run

DEFAULT_FRAMES, DEFAULT_SEEDS = 24, (0, 1)
MEASURE_DOCS = {
    "score": "Forcing-KV: attention on the newest `recent` key frames / on every key frame "
             "after the sink; static when >= threshold",
    "entropy": "attention entropy per query over log(keys seen): 0 = one key, 1 = even",
    "sink_share": "share of attention on the sink frames (frame < sink)",
    "chunk_share": "share on the chunk's own frames",
    "recent_share": "share on the newest frame before the chunk",
    "older_share": "share on every other frame: the memory a head reaches back for",
}


class HeadsError(GenerationError):
    """Settings the heads measurement cannot run with (the message says which)."""


class HeadMeter(Observer):
    """Every layer and head of one run, measured as it goes.

    ``meter = HeadMeter(model)``; run with ``observers=[meter]``; ``meter.remove()``
    afterwards (the hooks). ``matrices()``: the means so far; ``per_step()``: per
    denoising step. sink: the sink frames; recent: the score's newest key frames
    (None: the chunk and the frame before it)."""

    def __init__(self, model, sink: int = 1, recent: int | None = None, last_step_only: bool = False):
        cfg = model.cfg
        self.last_step_only = last_step_only  # a live view: one denoising step, a quarter the cost
        self.L, self.H = cfg.layers, cfg.heads
        self.sink = sink
        self.recent = recent or default_recent(cfg.chunk_frames)
        self.sums: dict[int, dict[str, np.ndarray]] = {}  # step -> measure -> (L, H)
        self.counts: dict[int, np.ndarray] = {}  # step -> (L,) chunks measured
        self.cache = None
        self._queries: dict[int, torch.Tensor] = {}
        self.hooks = Hooks(model)
        for layer in range(self.L):  # queries first, then the chunk's own keys: measure there
            self.hooks.add(f"blocks.{layer}.attn.hook_q_post", self._keep_queries(layer))
            self.hooks.add(f"blocks.{layer}.attn.hook_k_post", self._measure(layer))

    def after_write(self, cache, frames, ctx):
        self.cache = cache  # the cache the next chunk attends to

    def _keep_queries(self, layer: int):
        def hook(q, point):
            ctx = point.ctx
            if ctx.phase == "denoise" and not (self.last_step_only and ctx.step != ctx.steps - 1):
                self._queries[layer] = q
        return hook

    def _measure(self, layer: int):
        def hook(k, point):
            ctx = point.ctx
            q = self._queries.pop(layer, None)
            if ctx.phase != "denoise" or q is None or self.cache is None:
                return
            token_frame = ctx.token_frame.to(k.device)
            if not informative(int(token_frame.max()), self.sink, self.recent):
                return
            self.add(layer, ctx.step, q[0], k[0], token_frame, self.cache[layer])
        return hook

    @torch.no_grad()
    def add(self, layer: int, step: int, q, k, token_frame, cached) -> None:
        """One chunk's measures: queries q (H, n, d) and keys k (H, n, d) of the chunk's
        frames ``token_frame`` (n,), attending to the ``LayerCache`` ``cached`` too."""
        H, n = k.shape[:2]
        own = token_frame.view(1, n).expand(H, n)
        if cached.k is None:
            keys, frame, log_mass = k, own, None
        else:
            keys = torch.cat([cached.k[0].to(k.dtype), k], 1)
            frame = torch.cat([cached.frame[0].to(own.device), own], 1)
            log_mass = torch.cat([cached.mass[0].float().log(), k.new_zeros(H, n, dtype=torch.float32)], 1)
        fa = frame_attention(q, keys, frame, log_mass)
        measures = head_measures(fa, int(token_frame.min()), self.sink, self.recent)
        sums = self.sums.setdefault(step, {m: np.zeros((self.L, self.H)) for m in MEASURES})
        for name, value in measures.items():
            sums[name][layer] += value.cpu().numpy()
        self.counts.setdefault(step, np.zeros(self.L))[layer] += 1

    def per_step(self) -> dict[str, np.ndarray]:
        """Per measure, (S, L, H): the mean over the measured chunks of each denoising
        step (NaN where none was measured); steps in order."""
        steps = sorted(self.sums)
        out = {}
        for name in MEASURES:
            rows = [self.sums[s][name] / np.where(self.counts[s] > 0, self.counts[s], np.nan)[:, None]
                    for s in steps]
            out[name] = np.stack(rows) if rows else np.full((0, self.L, self.H), np.nan)
        return out

    def matrices(self, threshold: float = STATIC_THRESHOLD) -> dict[str, np.ndarray]:
        """Per measure, (L, H): the mean over every measured chunk and step so far (NaN
        before any), and "static" (L, H) bool: score >= threshold."""
        out = {}
        total = sum(self.counts.values()) if self.counts else np.zeros(self.L)
        denom = np.where(total > 0, total, np.nan)[:, None]
        for name in MEASURES:
            out[name] = sum(s[name] for s in self.sums.values()) / denom if self.sums else \
                np.full((self.L, self.H), np.nan)
        out["static"] = np.nan_to_num(out["score"], nan=-1.0) >= threshold
        return out

    def remove(self) -> None:
        self.hooks.remove()


def measure_heads(model, prompts: Sequence[str], seeds: Sequence[int], frames: int = DEFAULT_FRAMES,
                  steps: int | None = None, sink: int = 1, recent: int | None = None,
                  threshold: float = STATIC_THRESHOLD, progress=None) -> dict:
    """heads.json's content (see the module docstring) from full-cache runs of ``model``
    on every prompt x seed; ``progress``: a tqdm-like ``update(runs)``."""
    recent = recent or default_recent(model.cfg.chunk_frames)
    check_settings(prompts, seeds, frames, sink, recent, threshold)
    if not informative(frames - 1, sink, recent):
        raise HeadsError(f"{frames} frames never reach past sink ({sink}) + recent ({recent}) "
                         f"frames: nothing to measure; give more frames")
    samples = []  # per run: measure -> (S, L, H)
    for prompt in prompts:
        for seed in seeds:
            meter = HeadMeter(model, sink, recent)
            try:
                settings = RunSettings(prompt, frames=frames, seed=seed, steps=steps, record=False)
                Run(model, settings, Controls("full", 1), observers=[meter]).finish()
            finally:
                meter.remove()
            samples.append(meter.per_step())
            if progress is not None:
                progress.update(1)
    # (prompts, seeds, steps, L, H) per measure
    by = {m: np.stack([s[m] for s in samples]).reshape(len(prompts), len(seeds), *samples[0][m].shape)
          for m in MEASURES}
    return summarize(by, model, list(prompts), list(seeds), frames, steps, sink, recent, threshold)


def check_settings(prompts, seeds, frames, sink, recent, threshold) -> None:
    """``HeadsError`` naming the first setting the measurement cannot run with."""
    if not prompts:
        raise HeadsError("prompts: give at least one")
    if not seeds:
        raise HeadsError("seeds: give at least one")
    for name, value, low in (("frames", frames, 2), ("sink", sink, 0), ("recent", recent, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise HeadsError(f"{name} must be a whole number >= {low}, got {value!r}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise HeadsError(f"threshold must be in [0, 1], got {threshold!r}")


def _spread(x: np.ndarray, keep_axis: int) -> np.ndarray:
    """x (P, Sd, T, L, H): the std across axis ``keep_axis`` of the means over the other
    two sample axes -> (L, H) (0 with one value)."""
    others = tuple(a for a in range(3) if a != keep_axis)
    with np.errstate(all="ignore"):
        return np.nanstd(np.nanmean(x, axis=others), axis=0)


def summarize(by: dict[str, np.ndarray], model, prompts, seeds, frames, steps, sink, recent,
              threshold) -> dict:
    """heads.json's content from the samples ``by`` (measure -> (P, Sd, T, L, H))."""
    L, H = by["score"].shape[-2:]
    flat = {m: v.reshape(-1, L, H) for m, v in by.items()}  # (samples, L, H)
    with np.errstate(all="ignore"):
        mean = {m: np.nanmean(v, 0) for m, v in flat.items()}
        std = {m: np.nanstd(v, 0) for m, v in flat.items()}
        low, high = np.nanmin(flat["score"], 0), np.nanmax(flat["score"], 0)
    static = mean["score"] >= threshold
    measured = ~np.isnan(flat["score"])
    agree = ((flat["score"] >= threshold) == static) & measured
    agreement = agree.sum(0) / np.maximum(measured.sum(0), 1)
    across = {axis: _spread(by["score"], i) for i, axis in enumerate(("prompts", "seeds", "steps"))}
    num = lambda x: None if not math.isfinite(float(x)) else round(float(x), 4)
    heads = []
    for l in range(L):
        for h in range(H):
            row = {"layer": l, "head": h, "score": num(mean["score"][l, h]),
                   "role": "static" if static[l, h] else "dynamic",
                   "score_std": num(std["score"][l, h]), "score_min": num(low[l, h]),
                   "score_max": num(high[l, h]),
                   **{f"score_std_{axis}": num(s[l, h]) for axis, s in across.items()},
                   "role_agreement": num(agreement[l, h]), "samples": int(measured[:, l, h].sum())}
            for m in MEASURES[1:]:
                row[m], row[f"{m}_std"] = num(mean[m][l, h]), num(std[m][l, h])
            heads.append(row)
    split = static[1:] if L > 1 else static
    unstable = np.argwhere(agreement < 1)
    return {
        "model": model.name, "layers": L, "heads_per_layer": H, "threshold": threshold, "sink": sink,
        "recent": recent, "frames": frames, "steps": steps or model.cfg.sample_steps,
        "prompts": prompts, "seeds": seeds, "measures": MEASURE_DOCS,
        "summary": {
            "static_heads": int(static.sum()), "static_share": num(static.mean()),
            "static_share_without_layer0": num(split.mean()),
            "static_per_layer": static.sum(1).tolist(),
            "score_std_mean": num(np.nanmean(std["score"])), "score_std_max": num(np.nanmax(std["score"])),
            **{f"score_std_{axis}_mean": num(np.nanmean(s)) for axis, s in across.items()},
            "role_agreement_mean": num(agreement.mean()), "role_agreement_min": num(agreement.min()),
            "heads_changing_role": unstable.tolist(),
        },
        "note": "role by the mean score over every sample; forcing_kv never splits layer 0",
        "heads": heads,
    }


def head_matrices(result: dict) -> dict[str, np.ndarray]:
    """Per measure, (L, H) from heads.json's content (NaN where missing), and "static"
    (L, H) bool: the role it gives."""
    L, H = result["layers"], result["heads_per_layer"]
    out = {m: np.full((L, H), np.nan) for m in (*MEASURES, "score_std", "role_agreement")}
    static = np.zeros((L, H), bool)
    for row in result["heads"]:
        l, h = row["layer"], row["head"]
        for m in out:
            if row.get(m) is not None:
                out[m][l, h] = row[m]
        static[l, h] = row["role"] == "static"
    out["static"] = static
    return out


def head_view(meter: HeadMeter | None = None, policy=None, decision=None, budget_tokens: int = 0,
              masses=None, threshold: float = STATIC_THRESHOLD) -> dict[str, np.ndarray]:
    """What a layer x head view of a live run shows, each (L, H): the ``meter``'s
    measures so far; "static", the roles in force (the policy's own where it has
    them, Forcing-KV's, else the meter's score >= threshold); "share", each head's
    kept tokens over the uniform budget in ``decision`` (the run's latest; with
    ``masses``, per layer the (B, H, N) mass of the cache it was made on, as
    ``head_budget.budget_shares`` takes them). Parts without their input are left out."""
    from ffviz.policies.head_budget import budget_shares
    out = meter.matrices(threshold) if meter is not None else {}
    report = policy.report() if policy is not None else None
    shape = ((meter.L, meter.H) if meter is not None else
             (len(decision.layers), decision.layers[0].keep.shape[1]) if decision is not None else None)
    if report is not None and "static_heads" in report and shape is not None:
        static = np.zeros(shape, bool)
        for l, h in report["static_heads"]:
            static[l, h] = True
        out["static"] = static
    if decision is not None and budget_tokens:
        out["share"] = budget_shares(decision, budget_tokens, masses)
    return out


def write_heads(result: dict, out_dir: Path) -> list[Path]:
    """heads.json and heads.png in ``out_dir``; returns their paths."""
    from ffviz.heads_plot import plot_heads
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "heads.json", out_dir / "heads.png"]
    paths[0].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_heads(result, paths[1])
    return paths
