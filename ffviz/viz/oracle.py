"""The offline oracle view: how well did the policy's proxy scores rank what
future queries really attended to?

After a run, a reference run with the full cache (same prompt, seed, frames)
records the real post-RoPE queries of every frame (last denoising step). For
each compression step of the user's run (at newest frame ``t``), the true
future attention share of cached token ``j`` is

    truth_j = mean over queries q of frames t+1..t+F of softmax_j(q . k'_j / sqrt(d) + log mass_j)

with the keys the policy saw (kept by the session). The policy's score is
compared with it by Spearman and top-B recall (``ffviz.stats``), B = the budget
in tokens. A policy without scores (window) is judged by recency, its implicit
score.
"""
from __future__ import annotations

import numpy as np
import torch

from ffviz.generate import Controls, RunSettings, generate
from ffviz.hooks import Hooks, run_copy
from ffviz.stats import spearman, topb_recall


def reference_queries(template, settings: RunSettings, should_stop=lambda: False) -> dict:
    """{frame: [per layer (H, n, d) float16]} of a full-cache run's post-RoPE
    queries at the last denoising step. Runs on its own model copy."""
    model = run_copy(template)
    steps = settings.steps or model.cfg.sample_steps
    out: dict[int, list] = {}
    hooks = Hooks(model)

    def tap(layer):
        def fn(q, hook):
            if hook.ctx.phase == "denoise" and hook.ctx.step == steps - 1:
                tf = hook.ctx.token_frame
                for f in torch.unique(tf).tolist():
                    out.setdefault(int(f), [None] * model.cfg.layers)[layer] = \
                        q[0][:, tf == f].to(torch.float16).clone()
        return fn

    for i in range(model.cfg.layers):
        hooks.add(f"blocks.{i}.attn.hook_q_post", tap(i))
    ref = RunSettings(settings.prompt, frames=settings.frames, seed=settings.seed,
                      steps=settings.steps, context_noise=settings.context_noise, record=False)
    controls = Controls("full", settings.frames)
    try:
        with torch.no_grad():
            for _ in generate(model, ref, controls):
                if should_stop():
                    controls.stop()
    finally:
        hooks.remove()
    return out


def true_share(queries: torch.Tensor, keys: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """queries (H, M, d), keys (H, N, d), mass (H, N) -> mean attention share (H, N)."""
    d = keys.shape[-1]
    logits = queries.float() @ keys.float().transpose(1, 2) / d ** 0.5 + mass.float().log()[:, None]
    return logits.softmax(-1).mean(1)


def fidelity(oracle_steps: list[dict], ref: dict, horizon: int, layer: int = 0, head: int = 0) -> dict:
    """Spearman and top-B recall per scored step, layer and head.

    Returns frames (S,), spearman and recall (S, L, H), the scatter data of the
    last step for every layer/head, and whether recency stood in for scores."""
    frames, rho, rec = [], [], []
    scatter, scatter_frame, recency = None, None, False
    for st in oracle_steps:
        t = st["frame"]
        future = [ref[f] for f in range(t + 1, t + 1 + horizon) if f in ref]
        if not future:
            continue
        rho_l, rec_l, sc_l = [], [], []
        for l, keys in enumerate(st["keys"]):
            q = torch.cat([fq[l] for fq in future], 1)  # (H, M, d)
            truth = true_share(q, keys, st["provenance"][l]["mass"]).numpy()
            score = st["score"][l]
            if score is None:  # implicit score of a recency policy
                recency = True
                prov = st["provenance"][l]
                score = prov["frame"].double() + 1e-3 * torch.arange(keys.shape[1]) / keys.shape[1]
            score = score.double().numpy()
            b = max(1, min(int(st["budget_tokens"]), score.shape[-1]))
            rho_l.append(spearman(score, truth))
            rec_l.append(topb_recall(score, truth, b))
            kept = np.zeros_like(score, dtype=bool)
            top = np.argsort(-score, -1)[:, :b]
            np.put_along_axis(kept, top, True, -1)
            sc_l.append([{"score": score[h], "truth": truth[h], "kept": kept[h]}
                         for h in range(score.shape[0])])
        frames.append(t)
        rho.append(np.stack(rho_l))
        rec.append(np.stack(rec_l))
        scatter, scatter_frame = sc_l, t
    if not frames:
        return {"steps": 0, "horizon": horizon, "recency": recency,
                "message": "no compression step has future frames to compare with "
                           "(run longer than the budget, or pick a policy that compresses)"}
    return {"steps": len(frames), "frames": np.array(frames), "spearman": np.stack(rho),
            "recall": np.stack(rec), "scatter": scatter, "scatter_frame": scatter_frame,
            "horizon": horizon, "recency": recency}
