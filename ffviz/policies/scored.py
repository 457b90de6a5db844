"""Scored policies: each writes only a score, this base keeps what scores high.

A scored policy rates every cached token (higher = keep), kvpress style:
``score(layer, index, ctx) -> (B, H, N)`` per layer, or ``scores(cache, ctx) ->
(L, B, H, N)`` for a policy that scores every layer at once. This base does the
rest, once for all of them: the protected frames (the first ``n_sink`` and the
newest ``n_recent``) and the check that they fit the budget, top-k selection with
the protected tokens first (``rank``), and the ``Decision``. A policy with more
to do (Future Forcing's merge, Deep Forcing's re-rotation) extends ``decide`` or
``compress`` and reuses the rest.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch

from ffviz.cache import Decision, KVCache, LayerCache, LayerDecision
from ffviz.policies.base import Policy, PolicyContext, PolicyError, check_range, need


@dataclasses.dataclass
class ScoredPolicy(Policy):
    """n_sink, n_recent: the first / newest frames that are always kept (>= 0)."""
    n_sink: int = 0
    n_recent: int = 1
    protected_names: ClassVar[str] = "n_sink + n_recent"  # how errors name the protected frames
    needs: ClassVar[tuple[str, ...]] = ()  # the ``PolicyContext`` fields the score reads

    def __post_init__(self):
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)

    # -- what a policy writes ---------------------------------------------------------

    def score(self, layer: LayerCache, index: int, ctx: PolicyContext) -> torch.Tensor:
        """(B, H, N): how much each of layer ``index``'s cached tokens is worth keeping."""
        raise NotImplementedError

    def scores(self, cache: KVCache, ctx: PolicyContext) -> torch.Tensor:
        """(L, B, H, N): every layer's ``score``."""
        return torch.stack([self.score(layer, i, ctx) for i, layer in enumerate(cache.layers)])

    def observe(self, cache: KVCache, ctx: PolicyContext) -> None:
        """Called on every chunk, also when the cache fits (running quantities)."""

    def sink_frames(self, budget_tokens: int, ctx: PolicyContext) -> int:
        """How many of the first frames stay."""
        return self.n_sink

    # -- what this base does ----------------------------------------------------------

    def compress(self, cache, budget_tokens, ctx):
        self.observe(cache, ctx)
        if not self.must_evict(cache, budget_tokens, ctx):
            return None
        score = self.scores(cache, ctx)
        keep, gone = self.select(score, stack_layers(cache, "frame")[0], budget_tokens, ctx)
        return self.decide(cache, ctx, score, keep, gone)

    def must_evict(self, cache: KVCache, budget_tokens: int, ctx: PolicyContext) -> bool:
        """False when the cache fits; otherwise True once the context holds what the
        score reads and the protected frames fit the budget (else ``PolicyError``)."""
        if cache.size <= budget_tokens:
            return False
        need(ctx, self.name, *self.needs)
        frames = self.sink_frames(budget_tokens, ctx) + self.n_recent
        if frames * ctx.tokens_per_frame > budget_tokens:
            raise PolicyError(f"{self.protected_names} = {frames} protected frames do not fit the "
                              f"budget of {budget_tokens // ctx.tokens_per_frame} frames; lower "
                              f"them or raise the budget")
        return True

    def select(self, score: torch.Tensor, frame: torch.Tensor, budget_tokens: int,
               ctx: PolicyContext) -> tuple[torch.Tensor, torch.Tensor]:
        """score, frame (..., N) -> the kept tokens (..., K) ascending and the evicted
        ones (..., N - K), best first, K = min(budget, N)."""
        protected = ((frame < self.sink_frames(budget_tokens, ctx))
                     | (frame >= self.first_recent(ctx)))
        order = rank(score, budget_tokens, frame, protected, self.protected_names)
        K = min(budget_tokens, order.shape[-1])
        return order[..., :K].sort(-1).values, order[..., K:]

    def first_recent(self, ctx: PolicyContext) -> int:
        """The oldest of the protected newest frames."""
        return ctx.frame - self.n_recent + 1

    def decide(self, cache: KVCache, ctx: PolicyContext, score: torch.Tensor, keep: torch.Tensor,
               gone: torch.Tensor) -> Decision:
        """The decision for the kept tokens keep (L, B, H, K), with the score for the log."""
        return Decision([LayerDecision(keep=keep[i], score=score[i]) for i in range(len(keep))])


def stack_layers(cache: KVCache, *names: str) -> list[torch.Tensor]:
    """Every layer's field ``name`` stacked: (L, B, H, N, ...) each."""
    return [torch.stack([getattr(layer, name) for layer in cache.layers]) for name in names]


# -- selection ------------------------------------------------------------------------

def select(score: torch.Tensor, budget: int, frame: torch.Tensor,
           protected: torch.Tensor | None = None, what: str = "n_sink + n_recent") -> torch.Tensor:
    """Indices (..., K) ascending of the tokens to keep, K = min(budget, N).

    score, frame (source frames), protected: (..., N), e.g. (B, H, N) or stacked
    layers (L, B, H, N). Order: protected tokens first, then by ``score``, ties
    to the newer source frame, then the later cache slot. Non-finite scores rank last.
    """
    K = min(budget, score.shape[-1])
    return rank(score, budget, frame, protected, what)[..., :K].sort(-1).values


def rank(score: torch.Tensor, budget: int, frame: torch.Tensor,
         protected: torch.Tensor | None = None, what: str = "n_sink + n_recent") -> torch.Tensor:
    """Every token's cache index (..., N), best first in ``select``'s order: the first
    K = min(budget, N) are the kept ones, the rest the evicted ones (a policy that
    merges gets both from one sort). Raises when protected tokens exceed the budget."""
    N = score.shape[-1]
    if protected is not None:
        check_protected_tokens(int(protected.sum(-1).max()), min(budget, N), what)
    s = score.float()
    if not torch.isfinite(s).all():
        warn_non_finite()
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, -math.inf))
    if protected is not None:
        s = s.masked_fill(protected, math.inf)  # first; among them, the tie-break below
    stable_desc = lambda t: torch.sort(t, stable=True, dim=-1, descending=True).indices
    if bool((frame[..., 1:] >= frame[..., :-1]).all()):  # cache order is frame order (as appended)
        return (N - 1) - stable_desc(s.flip(-1))  # ties: the later slot first
    order = stable_desc(frame.double() * (N + 1)
                        + torch.arange(N, dtype=torch.float64, device=frame.device))
    return order.gather(-1, stable_desc(s.gather(-1, order)))


def check_protected_tokens(most: int, K: int, what: str) -> None:
    """Frames of more tokens than the context says can hold more protected tokens
    in a head than the K kept ones: an error, whoever selects."""
    if most > K:
        raise PolicyError(f"{what}: {most} protected tokens in one head exceed the budget of {K}")


def warn_non_finite() -> None:
    warnings.warn("policy score had non-finite values; they rank last", RuntimeWarning)
