"""The oracle's ground truth: a full-cache reference run's queries, and how well a
policy's proxy scores rank what those queries really attend to (fidelity).

The reference run has the prompt, seed and length of the run it judges and keeps
every token, so its post-RoPE queries of frames t+1 .. t+h are the queries the
cache had to serve after a compression at newest frame t. ``ReferenceQueries``
records them through ``hooks.QueryTap`` (float16; every denoising step, or the
last of each chunk). The truth of cached token j is then

    truth_j = mean over those queries q of softmax_j(q . k_j / sqrt(d) + log mass_j)

over the keys the policy saw (``true_share``: attention as the model computes it,
``policies.base.attention_share``), and a policy's scores are ranked against it per
head: Spearman, and recall of the true top-B, B = the budget in tokens
(``agreement``). Used by ``eval`` (its probes; the offline ``oracle`` policy reads
the future queries) and by the app's Oracle view (``reference_run``, ``fidelity``).
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import torch

from ffviz.cache import LayerCache
from ffviz.generate import Controls, RunSettings
from ffviz.hooks import QueryTap, run_copy
from ffviz.policies.base import attention_share
from ffviz.run import Run
from ffviz.stats import spearman, topb_recall


class ReferenceQueries:
    """Post-RoPE queries of every generated frame of a full-cache run, float16.

    ``q``: (frames, S, layers, heads, tokens_per_frame, d), S = denoising steps
    recorded (all of them, or 1 for the last). Attach to the model for the run,
    then detach; ``future(frame, layer)`` is the oracle's ``future_queries``.
    """

    def __init__(self, model, frames: int, steps: int, horizon: int, query_steps: str = "all"):
        cfg = model.cfg
        self.steps, self.horizon, self.frames = steps, horizon, frames
        self.last_only = query_steps == "last"
        S = 1 if self.last_only else steps
        self.q = torch.zeros(frames, S, cfg.layers, cfg.heads, cfg.tokens_per_frame, cfg.head_dim,
                             dtype=torch.float16)
        self.filled = torch.zeros(frames, dtype=torch.bool)
        self.seconds = 0.0  # time spent in the hooks (not the model's)
        self._model, self._tap = model, None

    def attach(self) -> "ReferenceQueries":
        self._tap = QueryTap(self._model, self._store, post="last" if self.last_only else "all")
        return self

    def detach(self) -> None:
        if self._tap:
            self._tap.remove()
            self._tap = None

    def _store(self, layer: int, kind: str, q: torch.Tensor, ctx) -> None:
        t0 = time.perf_counter()
        s = 0 if self.last_only else ctx.step
        tf = ctx.token_frame
        for f in torch.unique(tf).tolist():
            if f < self.frames:
                self.q[f, s, layer] = q[0, :, tf == f].to(torch.float16)
                self.filled[f] = True
        self.seconds += time.perf_counter() - t0

    def future(self, frame: int, layer: int, horizon: int | None = None) -> torch.Tensor | None:
        """True queries of frames frame+1 .. frame+horizon (default: the constructor's;
        clipped at the run's end) as (1, heads, m, d) float32, m = frames x S x
        tokens_per_frame; None when no frame follows."""
        lo, hi = frame + 1, min(frame + (horizon or self.horizon), self.frames - 1) + 1
        if lo >= hi:
            return None
        if not bool(self.filled[lo:hi].all()):
            raise RuntimeError(f"reference queries of frames {lo}..{hi - 1} were not recorded")
        q = self.q[lo:hi, :, layer]  # (F, S, H, n, d)
        H, d = q.shape[2], q.shape[4]
        return q.permute(2, 0, 1, 3, 4).reshape(1, H, -1, d).float()

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size()


def reference_run(template, settings: RunSettings, horizon: int,
                  query_steps: str = "last", controls: Controls | None = None) -> ReferenceQueries:
    """The full-cache run of ``settings`` on a copy of ``template`` (its hooks are its
    own); its queries. ``controls``: a full-cache ``Controls`` whose ``stop()`` ends the
    run early (the app's Stop button); frames not reached stay unfilled."""
    model = run_copy(template)
    steps = settings.steps or model.cfg.sample_steps
    ref = ReferenceQueries(model, settings.frames, steps, horizon, query_steps).attach()
    try:
        Run(model, dataclasses.replace(settings, record=False),
            controls or Controls("full", settings.frames)).finish()
    finally:
        ref.detach()
    return ref


def true_share(queries: torch.Tensor, keys: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """queries (H, M, d), keys (H, N, d), mass (H, N) -> the mean attention share (H, N)
    each key gets, float32."""
    layer = LayerCache()
    layer.k, layer.mass = keys[None], mass[None]
    return attention_share(queries[None], layer)[0] / max(queries.shape[1], 1)


def agreement(score: np.ndarray, truth: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head (rows of (H, N) arrays): Spearman of ``score`` against ``truth``, and the
    share of the true top-``budget`` tokens the scores also rank top-``budget``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant scores read as 0
        return spearman(score, truth), topb_recall(score, truth, budget)


def fidelity(oracle_steps: list[dict], ref: ReferenceQueries, horizon: int) -> dict:
    """Spearman and top-B recall per compression step, layer and head, against the
    next ``horizon`` frames of ``ref``. ``oracle_steps``: per step the newest
    ``frame``, per layer the ``keys`` (H, N, d), ``provenance`` (``frame``, ``mass``
    (H, N)) and ``score`` (H, N) or None (a recency policy: its implicit score,
    newer first, stands in), and ``budget_tokens``.

    Returns frames (S,), spearman and recall (S, L, H), the scatter data of the last
    step for every layer/head, and whether recency stood in for scores."""
    frames, rho, rec = [], [], []
    scatter, scatter_frame, recency = None, None, False
    for st in oracle_steps:
        t = st["frame"]
        if ref.future(t, 0, horizon) is None:
            continue
        rho_l, rec_l, sc_l = [], [], []
        for l, keys in enumerate(st["keys"]):
            prov = st["provenance"][l]
            truth = true_share(ref.future(t, l, horizon)[0], keys, prov["mass"]).numpy()
            score = st["score"][l]
            if score is None:  # implicit score of a recency policy
                recency = True
                score = prov["frame"].double() + 1e-3 * torch.arange(keys.shape[1]) / keys.shape[1]
            score = score.double().numpy()
            b = max(1, min(int(st["budget_tokens"]), score.shape[-1]))
            r, c = agreement(score, truth, b)
            rho_l.append(r)
            rec_l.append(c)
            kept = np.zeros_like(score, dtype=bool)
            np.put_along_axis(kept, np.argsort(-score, -1)[:, :b], True, -1)
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
