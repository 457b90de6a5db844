"""Observation-window attention, pooled: keep what the current chunk looks at.

SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation"): score each cached token by the attention it gets from the newest
queries (here ``ctx.chunk_queries``, the last denoising step of the chunk just
generated), then pool the scores so neighbours of important tokens survive
together. SnapKV pools with a 1D kernel over the sequence; for video we pool
over the spatial ``kernel x kernel`` neighbourhood of each token in its own
source frame (by row/col provenance, so partly evicted frames work too).
Without chunk queries (the first step) every score is 0 and the newest win.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ffviz.cache import Decision, LayerDecision
from ffviz.policies.base import (Policy, PolicyError, attention_share, check_choice,
                                 check_range, protected_mask, select)


@dataclasses.dataclass
class SnapKV(Policy):
    """kernel: odd spatial pooling size in tokens (1 = no pooling, up to 15);
    pooling: "max" or "avg"; n_sink, n_recent: protected first / newest frames."""
    name = "snapkv"
    kernel: int = 3
    pooling: str = "max"
    n_sink: int = 0
    n_recent: int = 1

    def validate(self):
        check_range("kernel", self.kernel, 1, 15)
        if self.kernel % 2 == 0:
            raise PolicyError(f"kernel must be odd (1, 3, 5, ...), got {self.kernel}")
        check_choice("pooling", self.pooling, ("max", "avg"))
        check_range("n_sink", self.n_sink, 0)
        check_range("n_recent", self.n_recent, 0)

    def pool(self, score: torch.Tensor, layer, grid: tuple[int, int]) -> torch.Tensor:
        """score (B, H, N) -> pooled (B, H, N): scattered onto a (frames, rows, cols)
        grid per head (each (frame, row, col) is held by one token at most), pooled
        over the kernel x kernel window, read back; absent tokens are ignored."""
        B, H, N = score.shape
        rows, cols = grid
        frames, slot = torch.unique(layer.frame, return_inverse=True)
        idx = (slot * rows + layer.row) * cols + layer.col  # (B, H, N)
        shape = (B * H * frames.numel(), 1, rows, cols)
        fill = float("-inf") if self.pooling == "max" else 0.0
        dense = score.new_full((B, H, frames.numel() * rows * cols), fill).scatter_(-1, idx, score)
        if self.pooling == "max":
            out = F.max_pool2d(dense.view(shape), self.kernel, 1, self.kernel // 2)
        else:
            present = torch.zeros_like(dense).scatter_(-1, idx, 1.0)
            pool = lambda t: F.avg_pool2d(t.view(shape), self.kernel, 1, self.kernel // 2)
            out = pool(dense) / pool(present)
        return out.view(B, H, -1).gather(-1, idx)

    def compress(self, cache, budget_tokens, ctx):
        if cache.size <= budget_tokens:
            return None
        layers = []
        for i, layer in enumerate(cache.layers):
            q = None if ctx.chunk_queries is None else ctx.chunk_queries[i]
            score = layer.mass.new_zeros(layer.mass.shape, dtype=torch.float32)
            if q is not None:
                score = attention_share(q, layer)
                if self.kernel > 1:
                    score = self.pool(score, layer, ctx.grid)
            prot = protected_mask(layer.frame, ctx, self.n_sink, self.n_recent, budget_tokens)
            keep = select(score, budget_tokens, layer.frame, prot)
            layers.append(LayerDecision(keep=keep, score=score))
        return Decision(layers)
