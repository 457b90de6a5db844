"""Fidelity on shared caches: every scorer ranks the same cache, with the same context.

A policy's own-cache fidelity (``evaluate.RunProbe``: ``proxy_spearman``) compares
its scores with the truth on the cache it built itself, so it measures the cache as
much as the predictor: on Future Forcing's merged caches ``log(mass)`` enters both
its score and the truth, and mass alone ranks well. Here one reference policy's run
(``EvalConfig.fidelity_reference``) is the only cache. At each of its compressions
whose future the full-cache reference run recorded, every scorer rates a copy of
that cache as it is before the compression, with the run's context (query
statistics, chunk queries; an offline policy also gets the reference run's future
queries), and is compared with the true future share (``reference.true_share``) per
layer and head: Spearman, and recall of the true top-B (B = the budget in tokens).

Scorers: each scored policy of the grid, run as a shadow (its own instance, handed
every chunk as if the cache were its own, so running state such as H2O's
accumulated attention or Future Forcing's tracked eigenvectors evolves as in a run;
its decisions are never applied), plus two that need no policy: ``mass`` (log mass)
and ``recency`` (the source frame, newer first). A policy whose ranking is recency
(sink: its decision has no score) is left to ``recency``.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ffviz.cache import KVCache, LayerCache
from ffviz.generate import Observer
from ffviz.policies import Policy, PolicyError
from ffviz.reference import ReferenceQueries, agreement, true_share

PLAIN_SCORERS = ("mass", "recency")


def plain_score(name: str, layer: LayerCache) -> torch.Tensor:
    """(B, H, N) scores of a scorer that needs no policy."""
    if name == "mass":
        return layer.mass.double().clamp_min(1e-30).log()
    N = layer.frame.shape[-1]  # recency: newer frame first, then the later slot
    return layer.frame.double() + 1e-3 * torch.arange(N, dtype=torch.float64) / N


class SharedCacheFidelity(Observer):
    """Observe the reference policy's run; ``results()`` after it: per scorer the
    Spearman and top-B recall (layers, heads) averaged over compressions, and any
    scorer that could not score (its error)."""

    def __init__(self, shadows: dict[str, Policy], budget_tokens: int, reference: ReferenceQueries):
        self.shadows, self.budget_tokens, self.reference = shadows, budget_tokens, reference
        self.mirrors = {label: None for label in shadows}  # label -> KVCache (own aux)
        self.sums: dict[str, list[np.ndarray]] = {}  # label -> [spearman (L, H), recall (L, H)]
        self.compressions = 0
        self.errors: dict[str, str] = {}
        self.seconds_in_step = 0.0  # after_write time, inside Step.seconds["total"]
        self._before: list[dict] | None = None

    @torch.no_grad()
    def after_write(self, cache, frames, ctx) -> None:
        t0 = time.perf_counter()
        # the cache before the policy acts, cloned once: the shadows share these tensors
        # (no policy edits a cache's tensors in place) but each keeps its own aux
        self._before = [{name: getattr(l, name).clone() for name in KVCache.FIELDS}
                        for l in cache.layers]
        for label, mirror in self.mirrors.items():
            self.mirrors[label] = self._synced(mirror, cache)
        self.seconds_in_step += time.perf_counter() - t0

    def _synced(self, mirror: KVCache | None, cache: KVCache) -> KVCache:
        """``mirror`` holding the cache's tokens as they are now, its aux carried over
        (zeros for the chunk just written)."""
        if mirror is None:
            mirror = KVCache(len(cache.layers), cache.tokens_per_frame, cache.grid)
        for layer, fields in zip(mirror.layers, self._before):
            B, H, N = fields["mass"].shape
            for name, t in fields.items():
                setattr(layer, name, t)
            for name, t in layer.aux.items():
                layer.aux[name] = torch.cat([t, t.new_zeros(B, H, N - t.shape[-1])], 2)
        return mirror

    @torch.no_grad()
    def after_compress(self, cache, decision, ctx) -> None:
        before, self._before = self._before, None
        ref = self.reference
        measure = decision is not None and ctx.frame + 1 < ref.frames
        scores = {}
        for label, policy in self.shadows.items():
            if label in self.errors or (policy.offline and not measure):
                continue
            mirror = self.mirrors[label]
            shadow_ctx = dataclasses.replace(ctx, future_queries=(
                lambda layer, f=ctx.frame: ref.future(f, layer)) if policy.offline else None)
            try:
                d = policy.compress(mirror, self.budget_tokens, shadow_ctx)
            except PolicyError as e:  # e.g. its protected frames exceed the budget
                self.errors[label] = str(e)
                continue
            if measure and d is not None and d.layers[0].score is not None:
                scores[label] = [x.score for x in d.layers]
            if decision is not None:
                self._carry_aux(mirror, before, decision)
        if not measure:
            return
        for name in PLAIN_SCORERS:
            scores[name] = [plain_score(name, _layer(f)) for f in before]
        truths = [true_share(ref.future(ctx.frame, i)[0], f["k"][0], f["mass"][0]).double().numpy()
                  for i, f in enumerate(before)]
        for label, per_layer in scores.items():
            rho, rec = zip(*(agreement(s[0].detach().double().cpu().numpy(), t, self.budget_tokens)
                             for s, t in zip(per_layer, truths)))
            acc = self.sums.setdefault(label, [0.0, 0.0])
            acc[0] = acc[0] + np.stack(rho)
            acc[1] = acc[1] + np.stack(rec)
        self.compressions += 1

    @staticmethod
    def _carry_aux(mirror: KVCache, before: list[dict], decision) -> None:
        """The reference policy's decision applied to the mirror's aux quantities (kept,
        or summed into merge targets, as ``LayerCache.apply`` does)."""
        for layer, fields, d in zip(mirror.layers, before, decision.layers):
            if not layer.aux:
                continue
            moved = _layer(fields)
            moved.aux = layer.aux
            moved.apply(d)
            layer.aux = moved.aux

    def results(self) -> dict:
        """{"compressions", "scorers": {label: {"spearman", "recall"}: (L, H) lists},
        "errors": {label: message}}."""
        n = max(self.compressions, 1)
        return {"compressions": self.compressions, "errors": dict(self.errors),
                "scorers": {label: {"spearman": (rho / n).tolist(), "recall": (rec / n).tolist()}
                            for label, (rho, rec) in self.sums.items()}}


def _layer(fields: dict) -> LayerCache:
    layer = LayerCache()
    for name, t in fields.items():
        setattr(layer, name, t)
    return layer
