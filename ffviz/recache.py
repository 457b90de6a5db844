"""KV re-cache at a prompt switch (LongLive's idea): cached keys and values were
written under the old prompt, which conditions every block; a re-cache writes them
again under the new one.

``ChunkMemory`` keeps the clean tokens of every chunk that still has a token in the
cache (with its previous-frame input), so memory stays bounded by the cache.
``recache`` rebuilds the keys and values of those chunks in a scratch cache, frame
order, each chunk seeing the chunks before it (as when it was first written), and
copies them into the live cache token by token: every token keeps its place, mass
and temporal position; a merged token takes the key and value of the position it
sits at. Modes:

* ``none``: nothing is re-run (the old prompt lingers in the cache);
* ``recent``: every cached chunk but the given frames is re-run under the new prompt
  (the given frames, the run's sink, keep their keys);
* ``all``: every cached chunk is re-run under the new prompt.
"""
from __future__ import annotations

import torch

from ffviz.cache import KVCache
from ffviz.sampling import fill_cache

RECACHE_MODES = ("none", "recent", "all")


class ChunkMemory:
    """Clean tokens (B, T*n, d) and previous-frame inputs of the cached chunks."""

    def __init__(self):
        self.chunks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self, frames: torch.Tensor, tokens: torch.Tensor, prev: torch.Tensor) -> None:
        self.chunks[int(frames[0])] = (frames, tokens, prev)

    def prune(self, cached_frames) -> None:
        """Forget chunks none of whose frames has a token left in the cache."""
        keep = set(cached_frames)
        self.chunks = {k: c for k, c in self.chunks.items() if keep & set(c[0].tolist())}


@torch.no_grad()
def recache(model, cache: KVCache, memory: ChunkMemory, mode: str, cond_new: torch.Tensor,
            cond_old: torch.Tensor, given: int, level: float) -> int:
    """Rewrite the cache's keys and values under ``cond_new`` (see the module doc);
    returns the number of chunks re-run."""
    if mode not in RECACHE_MODES:
        raise ValueError(f"recache must be one of {', '.join(RECACHE_MODES)}, got {mode!r}")
    if mode == "none" or not memory.chunks or cache.size == 0:
        return 0
    scratch = model.new_cache()
    rerun = 0
    for start in sorted(memory.chunks):
        frames, tokens, prev = memory.chunks[start]
        kept_old = mode == "recent" and int(frames[-1]) < given
        fill_cache(model, scratch, tokens, frames, cond_old if kept_old else cond_new, level,
                   prev=prev)
        rerun += not kept_old
    for live, fresh in zip(cache.layers, scratch.layers):
        _copy_by_position(live, fresh, model.rope, given if mode == "recent" else 0,
                          cache.tokens_per_frame, cache.grid[1])
    return rerun


def cached_frames(cache: KVCache) -> set[int]:
    """Source frames with a token anywhere in the cache (any layer, batch row or head)."""
    return {f for layer in cache.layers if layer.frame is not None
            for f in torch.unique(layer.frame[layer.live]).tolist()}


def _copy_by_position(live, fresh, rope, first_frame: int, n: int, cols: int) -> None:
    """Every live token of a source frame >= ``first_frame`` takes the fresh key and value
    of its (frame, row, column), rotated to its own temporal position."""
    dev = fresh.k.device
    fresh_frames = fresh.frame[0, 0, ::n]  # the scratch cache holds whole frames, in order
    slot = torch.full((int(fresh_frames.max()) + 1,), -1, dtype=torch.long, device=dev)
    slot[fresh_frames] = torch.arange(len(fresh_frames), device=dev)
    frame = live.frame
    known = frame < len(slot)
    pos = torch.where(known, slot[frame.clamp_max(len(slot) - 1)], -1)
    take = known & (pos >= 0) & (frame >= first_frame)  # (B, H, N)
    idx = (pos.clamp_min(0) * n + live.row * cols + live.col)[..., None]
    k = fresh.k.gather(2, idx.expand(-1, -1, -1, fresh.k.shape[-1]))
    v = fresh.v.gather(2, idx.expand(-1, -1, -1, fresh.v.shape[-1]))
    shift = (live.time - frame).to(k.dtype)
    if bool((shift != 0).any()):  # a re-rotated key (Deep Forcing) sits at another time
        k = rope.shift_time(k, shift)
    live.k = torch.where(take[..., None], k, live.k)
    live.v = torch.where(take[..., None], v, live.v)
