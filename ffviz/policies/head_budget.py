"""Per-head budgets: how many tokens each head of a layer keeps.

``uniform`` (the default): every head keeps the budget K (fewer only where a head
holds fewer real tokens). ``adaptive``: AdaKV's rule (Feng et al., 2024, "Ada-KV:
Optimizing KV Cache Eviction by Adaptive Budget Allocation"; kvpress's AdaKVPress):
a layer's H x K tokens go to its heads by a joint top-k of their scores, so a head
whose score is concentrated on few tokens gives the rest of its share to heads
whose score is spread out. Each head first keeps its protected tokens and a floor
of ``floor x K`` tokens (AdaKV's safeguard); the remaining budget is the joint
top-k of every head's other tokens. A layer never holds more than H x K real
tokens; a head may hold more than K. The scores must be comparable across heads
(attention shares), which is why only policies that score by a share offer it.

A head that keeps fewer tokens than the widest one pads with dead slots
(``ffviz.cache``). ``kept_per_head`` and ``budget_shares`` read each head's count
back from a decision (the decision log and the app's heads view).

Shapes: L layers, B batch, H heads, N slots, K = budget tokens per head.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ffviz.cache import Decision

HEAD_BUDGETS = ("uniform", "adaptive")


def uniform_counts(live: torch.Tensor, budget: int) -> torch.Tensor:
    """(..., H) tokens each head keeps: ``budget``, or all it holds when fewer;
    live (..., H, N) bool."""
    return live.sum(-1).clamp_max(budget)


def adaptive_counts(ranked_score: torch.Tensor, protected: torch.Tensor, live: torch.Tensor,
                    budget: int, floor: float) -> torch.Tensor:
    """(..., H) tokens each head keeps under AdaKV's rule (see the module docstring).

    ranked_score (..., H, N): each head's scores in its own rank order (best first:
    the protected tokens, then by score; ``scored.rank``); protected, live (..., H, N)
    bool in that same order (a head's live tokens come before its dead slots).
    Each head keeps a prefix of its order: at least its protected tokens and
    min(floor x budget, its live tokens); the rest of the layer's H x budget goes
    to the best remaining scores over all heads (ties: the lower head, then the
    earlier rank). The counts sum to at most H x budget per layer.
    """
    *lead, H, N = ranked_score.shape
    n_live = live.sum(-1)
    reserved = torch.minimum(protected.sum(-1).clamp_min(int(floor * budget)), n_live)
    rest = (H * budget - reserved.sum(-1, keepdim=True)).clamp_min(0)  # (..., 1)
    position = torch.arange(N, device=live.device)
    open_ = (position >= reserved.unsqueeze(-1)) & (position < n_live.unsqueeze(-1))
    low = torch.finfo(torch.float32).min  # a live token with a non-finite score is still a token
    value = torch.nan_to_num(ranked_score.float(), nan=low, posinf=low, neginf=low)
    value = value.masked_fill(~open_, -math.inf).flatten(-2)  # (..., H * N), joint over heads
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    joint_rank = torch.empty_like(order).scatter_(-1, order, torch.arange(H * N, device=order.device)
                                                  .expand_as(order))
    picked = (joint_rank < rest) & open_.flatten(-2)
    return reserved + picked.view(*lead, H, N).sum(-1)


def kept_per_head(decision: Decision, masses: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(L, H) long: the real tokens each head keeps after ``decision`` (batch row 0).
    ``masses``: per layer, the mass (B, H, N) of the cache the decision was made on,
    when known: a kept slot that was already dead is then not counted (a scored
    policy's decision never keeps one live; the window's may)."""
    rows = []
    for i, d in enumerate(decision.layers):
        kept = torch.ones(d.keep.shape[1:], dtype=torch.bool) if d.live is None else d.live[0].cpu()
        if masses is not None:
            kept = kept & (masses[i][0].cpu().gather(-1, d.keep[0].cpu()) > 0)
        rows.append(kept.sum(-1))
    return torch.stack(rows)


def budget_shares(decision: Decision, budget_tokens: int,
                  masses: list[torch.Tensor] | None = None) -> np.ndarray:
    """(L, H) float: each head's kept tokens as a share of the uniform budget (1 = its
    uniform share; an adaptive head may go above 1, a layer's mean is at most 1);
    ``masses`` as for ``kept_per_head``."""
    return (kept_per_head(decision, masses).double() / budget_tokens).numpy()
