"""Deep Forcing: a deep sink, query-selected candidates, contiguous re-rotated positions.

Deep Forcing (Yi et al., 2025, "Deep Forcing: Training-Free Long Video
Generation with Deep Sink and Participative Compression"), as read here:
  * deep sink: the first S = floor(sink_ratio x budget frames) frames stay;
  * the newest ``n_recent`` frames stay;
  * the rest of the budget goes to the tokens with the largest summed q.k'
    over the queries of the newest ``query_frames`` frames (post-RoPE queries
    of the last denoising step of each chunk, buffered here; the buffer resets
    when the frame index goes backwards, i.e. a new run);
  * re-rotation: the kept keys' distinct effective temporal positions
    (``LayerCache.time``) are renumbered contiguously so the newest is
    ``ctx.frame`` (dense rank, order kept), and each key is turned by the shift
    with ``Rope3D.shift_time``, as if RoPE had been applied there.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch

from ffviz.cache import take_rows
from ffviz.models.rope import apply_rotation
from ffviz.policies.base import check_bool, check_range, need
from ffviz.policies.scored import ScoredPolicy


def contiguous_times(t: torch.Tensor, newest: int) -> torch.Tensor:
    """Renumber times t (B, H, K) per head: the distinct values, in order, become
    consecutive integers ending at ``newest``."""
    sv, order = t.sort(-1)
    step = torch.zeros_like(sv)
    step[..., 1:] = (sv[..., 1:] != sv[..., :-1]).long()
    rank = step.cumsum(-1)  # dense rank in sorted order
    new_sorted = newest - (rank[..., -1:] - rank)
    return torch.empty_like(t).scatter_(-1, order, new_sorted)


@dataclasses.dataclass
class DeepForcing(ScoredPolicy):
    """sink_ratio: share of the budget (frames, floored) given to the deep sink, in
    [0, 1]; query_frames: newest frames whose queries score candidates (1-64);
    rerotate: renumber kept positions; n_recent: protected newest frames (>= 0)."""
    name = "deep_forcing"
    n_sink: int = dataclasses.field(default=0, init=False, repr=False)  # from sink_ratio instead
    sink_ratio: float = 0.5
    query_frames: int = 2
    rerotate: bool = True
    # a sum of q.k is no attention share: heads' scores cannot be pooled (head_budget.py)
    head_budget: str = dataclasses.field(default="uniform", init=False, repr=False)
    head_floor: float = dataclasses.field(default=1.0, init=False, repr=False)
    protected_names: ClassVar[str] = "floor(sink_ratio x budget) + n_recent"
    _buffer: list = dataclasses.field(default_factory=list, init=False, repr=False, compare=False)
    _last_frame: int = dataclasses.field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        check_range("sink_ratio", self.sink_ratio, 0.0, 1.0, kind=float)
        check_range("query_frames", self.query_frames, 1, 64)
        check_bool("rerotate", self.rerotate)

    def sink_frames(self, budget_tokens, ctx):
        """The deep sink: floor(sink_ratio x the budget in frames)."""
        return int(self.sink_ratio * (budget_tokens // ctx.tokens_per_frame))

    def observe(self, cache, ctx):
        """Buffer this chunk's queries (a list over layers of (B, H, n, d))."""
        if ctx.frame < self._last_frame:
            self._buffer.clear()
        qs = ctx.chunk_queries
        if qs is not None and not all(q is not None and bool(torch.isfinite(q).all()) for q in qs):
            warnings.warn("deep_forcing: chunk queries missing or non-finite; not buffered",
                          RuntimeWarning)
            qs = None
        if qs is not None:
            if ctx.frame == self._last_frame and self._buffer:
                self._buffer.pop()  # the same chunk again: replace it
            self._buffer.append(list(qs))
            del self._buffer[:-self.query_frames]  # R chunks always cover R frames
        self._last_frame = ctx.frame

    def score(self, layer, index, ctx):
        """(B, H, N): summed q.k' over the buffered queries of the newest query_frames
        frames (0 before any)."""
        if not self._buffer:
            return layer.mass.new_zeros(layer.mass.shape, dtype=torch.float32)
        q = torch.cat([c[index].to(layer.k.device) for c in self._buffer],
                      2)[:, :, -self.query_frames * ctx.tokens_per_frame:]
        return (q.float() @ layer.k.float().transpose(-1, -2)).sum(-2)

    def decide(self, cache, ctx, score, sel):
        decision = super().decide(cache, ctx, score, sel)
        if not self.rerotate:
            return decision
        need(ctx, self.name, "rope")
        for layer, d in zip(cache.layers, decision.layers):
            old = layer.time.gather(-1, d.keep)
            real = layer.mass.gather(-1, d.keep) > 0
            if d.live is not None:
                real &= d.live.to(real.device)
            # only real tokens are renumbered: others take a real time and keep their own
            oldest = old.masked_fill(~real, torch.iinfo(old.dtype).max).amin(-1, keepdim=True)
            new = torch.where(real, contiguous_times(torch.where(real, old, oldest), ctx.frame), old)
            idx = d.keep.unsqueeze(-1).expand(*d.keep.shape, layer.k.shape[-1])
            x = take_rows(layer.k, d.keep)
            # Rope3D.shift_time(x, new - old), with the angles on the host (Rope3D's
            # frequencies live there) and the rotation on the cache's device
            c, s = ctx.rope.cos_sin((new - old).cpu(), 0, 0, dtype=x.dtype)
            shifted = apply_rotation(x, c.to(x.device), s.to(x.device))
            d.k = layer.k.scatter(2, idx, shifted)
            d.time = layer.time.scatter(-1, d.keep, new)
        return decision
