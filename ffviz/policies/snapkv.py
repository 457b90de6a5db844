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

from ffviz.policies.base import PolicyError, attention_share, check_choice, check_range
from ffviz.policies.scored import ScoredPolicy


@dataclasses.dataclass
class SnapKV(ScoredPolicy):
    """kernel: odd spatial pooling size in tokens (1 = no pooling, up to 15);
    pooling: "max" or "avg"; n_sink, n_recent: protected first / newest frames."""
    name = "snapkv"
    kernel: int = 3
    pooling: str = "max"

    def __post_init__(self):
        super().__post_init__()
        check_range("kernel", self.kernel, 1, 15)
        if self.kernel % 2 == 0:
            raise PolicyError(f"kernel must be odd (1, 3, 5, ...), got {self.kernel}")
        check_choice("pooling", self.pooling, ("max", "avg"))

    def score(self, layer, index, ctx):
        """(B, H, N): the attention share from the chunk's queries, pooled (0 without them)."""
        q = None if ctx.chunk_queries is None else ctx.chunk_queries[index]
        if q is None:
            return layer.mass.new_zeros(layer.mass.shape, dtype=torch.float32)
        score = attention_share(q, layer)
        return self.pool(score, layer, ctx.grid) if self.kernel > 1 else score

    def pool(self, score: torch.Tensor, layer, grid: tuple[int, int]) -> torch.Tensor:
        """score (B, H, N) -> pooled (B, H, N): scattered onto a (frames, rows, cols)
        grid per head (each (frame, row, col) is held by one token at most), pooled
        over the kernel x kernel window, read back; absent tokens are ignored."""
        B, H, N = score.shape
        rows, cols = grid
        frames, slot = torch.unique(layer.frame, return_inverse=True)
        # dead slots (frame DEAD) share a grid of their own at (0, 0): no real token sees them
        idx = (slot * rows + layer.row.clamp_min(0)) * cols + layer.col.clamp_min(0)  # (B, H, N)
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
