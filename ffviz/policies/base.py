"""The policy interface: a small dataclass per policy over this base class.

A policy looks at the cache after a chunk was written and returns a
``Decision`` that brings every head down to ``budget_tokens`` tokens (or None
when the cache already fits). Parameters are dataclass fields, validated in
``__post_init__`` with a message that names the parameter and its range.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ffviz.cache import Decision, KVCache, LayerDecision


class PolicyError(ValueError):
    """A policy name or parameter that cannot be used."""


@dataclasses.dataclass
class PolicyContext:
    """What a policy may read besides the cache.

    frame: newest frame index in the cache (the chunk just written ends here)
    tokens_per_frame, grid (rows, cols), chunk_frames: the model's geometry
    rope: the model's ``Rope3D`` (rotate proxies to future positions, re-rotate keys)
    stats: ``QueryStats`` of pre-RoPE queries of every denoising step so far
        (this chunk included), per layer and head
    chunk_queries: per layer, post-RoPE queries (B, H, n, d) of the last
        denoising step of the chunk just generated (SnapKV, H2O, Deep Forcing)
    future_queries: for the offline oracle only: ``callable(layer) -> (B, H, m, d)``,
        the true post-RoPE queries of the next frames from a full-cache run
    """
    frame: int
    tokens_per_frame: int
    chunk_frames: int
    grid: tuple[int, int] = (8, 8)
    rope: object | None = None
    stats: object | None = None
    chunk_queries: list | None = None
    future_queries: object | None = None


@dataclasses.dataclass
class Policy:
    name: ClassVar[str] = "base"
    holds_budget: ClassVar[bool] = True  # False only for the full cache

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``PolicyError`` for a bad parameter value."""

    def compress(self, cache: KVCache, budget_tokens: int, ctx: PolicyContext) -> Decision | None:
        raise NotImplementedError

    def params(self) -> dict:
        return dataclasses.asdict(self)


def check_range(name: str, value, lo, hi=None, kind=int) -> None:
    """Raise ``PolicyError`` unless lo <= value (<= hi) and value is a ``kind``."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise PolicyError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise PolicyError(f"{name} must be {rng}, got {value}")


def keep_newest(cache: KVCache, budget_tokens: int) -> Decision:
    """Keep the newest ``budget_tokens`` tokens of every head (by source frame,
    then cache order), for every layer."""
    layers = []
    for layer in cache.layers:
        B, H, N = layer.frame.shape
        # order key: newer frames last; within a frame, cache order
        key = layer.frame.double() * (N + 1) + torch.arange(N, dtype=torch.float64)
        keep = key.topk(budget_tokens, dim=-1).indices.sort(-1).values
        layers.append(LayerDecision(keep=keep))
    return Decision(layers)
