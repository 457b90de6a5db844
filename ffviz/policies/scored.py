"""Scored policies: each writes only a score, this base keeps what scores high.

A scored policy rates every cached token (higher = keep), kvpress style:
``score(layer, index, ctx) -> (B, H, N)`` per layer, or ``scores(cache, ctx) ->
(L, B, H, N)`` for a policy that scores every layer at once. This base does the
rest, once for all of them: the protected frames (the first ``n_sink`` and the
newest ``n_recent``) and the check that they fit the budget, top-k selection with
the protected tokens first (``rank``), how many tokens each head keeps
(``head_budget``: uniform, or adaptive over a layer's heads, ``head_budget.py``),
and the ``Decision``. A policy with more to do (Future Forcing's merge, Deep
Forcing's re-rotation, Forcing-KV's head roles) extends ``decide``, ``compress``
or ``head_counts`` and reuses the rest. Dead slots (``ffviz.cache``) never score,
are never protected and rank after every real token.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch

from ffviz.cache import Decision, KVCache, LayerCache, LayerDecision
from ffviz.policies.base import Policy, PolicyContext, PolicyError, check_choice, check_range, need
from ffviz.policies.head_budget import HEAD_BUDGETS, adaptive_counts, uniform_counts


@dataclasses.dataclass
class Selection:
    """What stays, per head (leading dims (L, B, H) or any (...)).

    keep: (..., W) cache indices of the kept slots, W = the most any head keeps; in
    each head its live ones first, ascending, then its padding (``live`` False).
    live: (..., W) bool, or None when every head keeps W tokens.
    gone: (..., G) evicted tokens, best first (merge candidates); with ``live`` it
    also lists the tokens of the padding slots, which are evicted too.
    candidate: (..., G) bool, which of ``gone`` are real evicted tokens (not dead
    slots, not kept), or None when all are.
    """
    keep: torch.Tensor
    gone: torch.Tensor
    live: torch.Tensor | None = None
    candidate: torch.Tensor | None = None

    @classmethod
    def from_order(cls, order: torch.Tensor, counts: torch.Tensor | None, K: int,
                   real: torch.Tensor | None = None) -> "Selection":
        """order (..., N): every head's tokens best first (``rank``); counts (...) the
        tokens each head keeps, or None for K everywhere; real (..., N) bool in cache
        order: the slots that hold a token (None: all)."""
        N = order.shape[-1]
        W, low = (K, K) if counts is None else (int(counts.max()), int(counts.min()))
        if W == low:  # the same in every head
            gone = order[..., W:]
            candidate = None if real is None else real.gather(-1, gone)
            return cls(order[..., :W].sort(-1).values, gone, None, candidate)
        kept_rank = torch.arange(N, device=order.device) < counts.unsqueeze(-1)  # (..., N) by rank
        # live slots first (ascending), padding after (ascending): one sort of shifted indices
        shifted = (order[..., :W] + N * (~kept_rank[..., :W])).sort(-1).values
        gone = order[..., low:]
        candidate = ~kept_rank[..., low:]
        if real is not None:
            candidate &= real.gather(-1, gone)
        return cls(shifted % N, gone, shifted < N, candidate)


@dataclasses.dataclass
class ScoredPolicy(Policy):
    """n_sink, n_recent: the first / newest frames that are always kept (>= 0);
    head_budget: "uniform" (every head keeps the budget) or "adaptive" (a layer's
    heads share its heads x budget tokens by a joint top-k of their scores, AdaKV);
    head_floor: with adaptive, the share of the uniform budget every head keeps at
    least, in [0, 1] (AdaKV's safeguard; 1 = uniform)."""
    n_sink: int = 0
    n_recent: int = 1
    head_budget: str = "uniform"
    head_floor: float = 0.2
    protected_names: ClassVar[str] = "n_sink + n_recent"  # how errors name the protected frames
    needs: ClassVar[tuple[str, ...]] = ()  # the ``PolicyContext`` fields the score reads

    def __post_init__(self):
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)
        check_choice("head_budget", self.head_budget, HEAD_BUDGETS)
        check_range("head_floor", self.head_floor, 0.0, 1.0, kind=float)

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
        frame, mass = stack_layers(cache, "frame", "mass")
        return self.decide(cache, ctx, score, self.select(score, frame, budget_tokens, ctx, mass > 0))

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
               ctx: PolicyContext, real: torch.Tensor | None = None) -> Selection:
        """score, frame, real (the slots holding a token; None = all) (..., N) -> the
        ``Selection``: every head keeps its ``head_counts`` best tokens, protected first."""
        dead = None if real is None or bool(real.all()) else ~real
        protected = self.protected(frame, budget_tokens, ctx)
        if dead is not None:
            protected &= ~dead
        order = rank(score, budget_tokens, frame, protected, self.protected_names, dead)
        K = min(budget_tokens, order.shape[-1])
        counts = self.head_counts(score, order, protected, dead, budget_tokens, ctx)
        return Selection.from_order(order, counts, K, None if dead is None else ~dead)

    def protected(self, frame: torch.Tensor, budget_tokens: int, ctx: PolicyContext) -> torch.Tensor:
        """(..., N) bool: the tokens of the protected frames."""
        return (frame < self.sink_frames(budget_tokens, ctx)) | (frame >= self.first_recent(ctx))

    def head_counts(self, score: torch.Tensor, order: torch.Tensor, protected: torch.Tensor,
                    dead: torch.Tensor | None, budget_tokens: int,
                    ctx: PolicyContext) -> torch.Tensor | None:
        """(L, B, H) tokens each head keeps, or None for min(budget, N) in every head
        (``head_budget``; tensors (L, B, H, N), ``order`` from ``rank``)."""
        if self.head_budget == "adaptive":
            in_order = lambda t: t.gather(-1, order)
            real = torch.ones_like(protected) if dead is None else ~dead
            return adaptive_counts(in_order(score), in_order(protected), in_order(real),
                                   budget_tokens, self.head_floor)
        return None if dead is None else uniform_counts(~dead, budget_tokens)

    def first_recent(self, ctx: PolicyContext) -> int:
        """The oldest of the protected newest frames."""
        return ctx.frame - self.n_recent + 1

    def decide(self, cache: KVCache, ctx: PolicyContext, score: torch.Tensor,
               sel: Selection) -> Decision:
        """The decision for the selection over stacked layers, with the score for the log."""
        return Decision([LayerDecision(keep=sel.keep[i], score=score[i],
                                       live=None if sel.live is None else sel.live[i])
                         for i in range(len(sel.keep))])


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
         protected: torch.Tensor | None = None, what: str = "n_sink + n_recent",
         dead: torch.Tensor | None = None) -> torch.Tensor:
    """Every token's cache index (..., N), best first in ``select``'s order: the first
    K = min(budget, N) are the kept ones, the rest the evicted ones (a policy that
    merges gets both from one sort). Raises when protected tokens exceed the budget.
    ``dead`` (..., N): dead slots, after every real token whatever their score (also
    after one with a non-finite score: ties go to the newer frame, and theirs is DEAD)."""
    N = score.shape[-1]
    if protected is not None:
        check_protected_tokens(int(protected.sum(-1).max()), min(budget, N), what)
    s = score.float()
    finite = torch.isfinite(s)
    if not finite.all():
        if bool((~finite if dead is None else ~finite & ~dead).any()):  # a dead slot's is no score
            warn_non_finite()
        s = torch.where(finite, s, torch.full_like(s, -math.inf))
    if dead is not None:
        s = s.masked_fill(dead, -math.inf)
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
