"""Forcing-KV's retention buffer: the most changed stripes of frames leaving the ring.

A frame that leaves the recent ring of Forcing-KV's dynamic heads is cut into
``stripes`` horizontal stripes (its token rows split as evenly as they go). A
stripe's change is 1 - the mean cosine similarity between its keys and the next
frame's keys at the same spatial token, in one layer (the choice layer), over the
heads that hold both frames: the content that changed most is what the next frames
cannot recover from their neighbours. The candidates are the frames leaving the ring
now (Forcing-KV's: the stripes held before are not candidates again); the buffer
keeps the most changed of their stripes, as many whole stripes as fit its capacity
in tokens (ties: the newer frame), until frames leave again. The choice is made
once per compression and shared by every later layer and dynamic head: hard
selection, no merging, keys stay at their absolute positions. On 1-frame chunks
with a buffer of one frame the whole leaving frame fits: the choice bites when
more frames leave at once than the buffer holds.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ffviz.cache import DEAD, LayerCache, take_rows


def stripe_of_rows(rows: int, stripes: int) -> torch.Tensor:
    """(rows,) long: the stripe of each token row (at most ``rows`` stripes)."""
    parts = torch.tensor_split(torch.arange(rows), min(stripes, rows))
    return torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])


@dataclasses.dataclass
class StripeBuffer:
    """stripes: stripes per frame; capacity: tokens the buffer holds at most; grid:
    token (rows, cols). ``held``: (change, frame, stripe) of the stripes kept."""
    stripes: int
    capacity: int
    grid: tuple[int, int]
    held: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)
    offered_upto: int = -1  # the newest frame offered so far

    def __post_init__(self):
        rows, cols = self.grid
        self.row_stripe = stripe_of_rows(rows, self.stripes)
        self.stripe_tokens = torch.bincount(self.row_stripe).mul(cols).tolist()

    def offer(self, layer: LayerCache, first: int, end: int, heads: torch.Tensor) -> None:
        """Frames ``first .. end - 1`` leave the ring (those not offered before and present
        in ``layer``): score their stripes against the next frame in the heads
        ``heads`` (H,) bool of ``layer``; the buffer becomes the best of them."""
        frames = [f for f in range(max(first, self.offered_upto + 1), end)]
        self.offered_upto = max(self.offered_upto, end - 1)
        if not frames or not bool(heads.any()):
            return
        change = self.change(layer, frames, heads)  # (frames, stripes), NaN where unknown
        fresh = [(float(c), f, s) for f, row in zip(frames, change.tolist())
                 for s, c in enumerate(row) if c == c]  # NaN: not both frames held
        if fresh:
            self.held = self.best(fresh)
        elif sum(self.stripe_tokens[s] for _, _, s in self.held) > self.capacity:
            self.held = self.best(self.held)  # a smaller capacity (a smaller budget)

    def best(self, candidates: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
        """The most changed stripes (ties: the newer frame) that fit the capacity."""
        room, out = self.capacity, []
        for c, f, s in sorted(candidates, key=lambda x: (-x[0], -x[1], x[2])):
            if self.stripe_tokens[s] <= room:
                out.append((c, f, s))
                room -= self.stripe_tokens[s]
        return out

    def change(self, layer: LayerCache, frames: list[int], heads: torch.Tensor) -> torch.Tensor:
        """(len(frames), stripes) float: 1 - mean cosine of each stripe's keys with the
        next frame's at the same token, over every batch row and head in ``heads``."""
        rows, cols = self.grid
        B, H, N = layer.frame.shape
        dev = layer.k.device
        wanted = torch.tensor(frames + [f + 1 for f in frames], device=dev).unique()
        local = torch.full((int(wanted.max()) + 2,), -1, dtype=torch.long, device=dev)
        local[wanted] = torch.arange(len(wanted), device=dev)
        frame = layer.frame.clamp_min(0).clamp_max(len(local) - 1)
        at = torch.where((layer.frame != DEAD) & (layer.frame < len(local)), local[frame], -1)
        # slot of (frame, token) per head: -1 where absent
        where = torch.full((B, H, len(wanted) * rows * cols + 1), -1, dtype=torch.long, device=dev)
        cell = torch.where(at >= 0, at * rows * cols + layer.row * cols + layer.col, where.shape[-1] - 1)
        where.scatter_(-1, cell, torch.arange(N, device=dev).expand(B, H, N))
        where = where[..., :-1].view(B, H, len(wanted), rows * cols)
        pick = lambda f: where[:, :, int(local[f])]  # (B, H, T)
        stripe = self.row_stripe.to(dev).repeat_interleave(cols)  # (T,)
        out = torch.full((len(frames), int(stripe.max()) + 1), float("nan"))
        for i, f in enumerate(frames):
            a, b = pick(f), pick(f + 1)
            ok = (a >= 0) & (b >= 0) & heads.to(dev).view(1, H, 1)
            if not bool(ok.any()):
                continue
            cos = F.cosine_similarity(take_rows(layer.k, a.clamp_min(0)).float(),
                                      take_rows(layer.k, b.clamp_min(0)).float(), dim=-1)
            total = torch.zeros(out.shape[1], device=dev).index_add_(0, stripe, (cos * ok).sum((0, 1)))
            count = torch.zeros(out.shape[1], device=dev).index_add_(0, stripe, ok.sum((0, 1)).float())
            out[i] = torch.where(count > 0, 1 - total / count.clamp_min(1), float("nan")).cpu()
        return out

    def held_table(self, device) -> torch.Tensor | None:
        """(frames, stripes) float: the change of each held stripe by its frame, NaN for
        the rest; None when nothing is held. Built once per compression, read per layer."""
        if not self.held:
            return None
        table = torch.full((max(f for _, f, _ in self.held) + 1, len(self.stripe_tokens)), float("nan"))
        for c, f, s in self.held:
            table[f, s] = c
        return table.to(device)

    def token_change(self, layer: LayerCache, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, N) float: the change of a held stripe's tokens, NaN for every other slot;
        ``table`` from ``held_table`` (built here when not given)."""
        dev = layer.frame.device
        table = self.held_table(dev) if table is None else table
        if table is None:
            return torch.full(layer.frame.shape, float("nan"), device=dev)
        top = table.shape[0]
        frame = layer.frame.clamp(0, top - 1)
        value = table[frame, self.row_stripe.to(dev)[layer.row.clamp_min(0)]]
        return torch.where((layer.frame >= 0) & (layer.frame < top), value, float("nan"))
