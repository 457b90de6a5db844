"""Recall: the embedded model's lookup along the scene's motion through the KV cache.

A scene moves as one (docs/model.md), so what a patch shows now is what the patch the
motion carried it from showed some frames back, wherever that was not hidden. Two heads
of the model's last block (``TinyConfig.recall``) are fixed to that lookup:

* their keys are content-free (every RoPE plane (1, 0)): a cached key is its position;
* a token at frame f, row r, column c asks, for each lag in RECALL_LAGS, for the place
  (f - lag, r - lag dy / patch, c - lag dx / patch) on the view's torus: the query of
  each lag is the content-free vector rotated there with the model's own 3D RoPE;
* their values carry the cached patch's pixels (half of them a head) and a learnt trust
  (a pillar's patch hides what recall looks for).

What the lags read, weighted by trust, is one more choice beside the displacements of
the previous frame (``TinyVideoModel.forward``). The lookup holds no weights: the trust
and the choice are the model's own layers; this module is the geometry of the read.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ffviz.models.rope import apply_rotation
from ffviz.scenes import exit_torus

# Recall looks this many frames back: multiples of the patch side, so every integer motion
# lands on whole patches (a 4-px patch moved 1 px a frame is a whole patch 4 frames later).
RECALL_LAGS = (4, 8, 12, 16, 20, 24)
# With ``recall_round_trip`` a scene that leaves the view also looks this far back: at 1 px
# a frame a patch comes back in at one edge 32 frames or more after it was last seen at
# the other (the scene's torus is 15 patches, the view 8), beyond RECALL_LAGS' reach; at
# 2 px lag 28 reads the column next to lag 24's.
ROUND_TRIP_LAGS = (28, 32, 36, 40, 44)
RECALL_HEADS = 2  # heads of the recall block that carry the pixels (each: part of them and trust)
# Sharpness of the recall's look: a key one frame or one patch off the place looked at
# scores 0.46 or 0.77 below a perfect one (of 16, the RoPE planes of a 32-dim head) ...
RECALL_GAIN = 30.0
# ... and a null key scores this far below perfect (half the nearest miss), so where the
# place is not cached (evicted, before the run) attention goes to the null, not elsewhere.
RECALL_MARGIN = 0.23
# Training picks recall where it gives the patch: a mean squared error (pixels in [-1, 1])
# under this, about one pixel of 16 off by a small colour step; better but wrong (a prompt
# switch's old colours) is not taught.
RECALL_GIVES = 0.01
# Recall is a choice only where it found this much (trusted attention mass per lag); with
# nothing cached at the places it looks, the null takes all but about 1e-4.
RECALL_FOUND = 0.01


class RecallRead(NamedTuple):
    """What recall read for each token: the trust-weighted mean over its lags (pixels (B,
    N, patch_dim), found (B, N) as ``RecallLookup.read`` says), and each lag's own read
    (lag_pixels (B, L, N, patch_dim), lag_found (B, L, N): the lag's trusted attention
    mass, up to 1)."""
    pixels: torch.Tensor
    found: torch.Tensor
    lag_pixels: torch.Tensor
    lag_found: torch.Tensor


def nothing_read(x: torch.Tensor, lags: int) -> RecallRead:
    """The read where nothing is cached (or the pass only fills the cache): no pixels found."""
    B, N, P = x.shape[0], x.shape[1], x.shape[2]
    zeros = lambda *shape: x.new_zeros(*shape, dtype=torch.float32)
    return RecallRead(zeros(B, N, P), zeros(B, N), zeros(B, lags, N, P), zeros(B, lags, N))


def check_config(cfg) -> None:
    """ValueError where a ``TinyConfig`` cannot carry the lookup."""
    if not cfg.motion_pick or cfg.motion_per_pixel:
        raise ValueError("recall is one more choice of a per-patch pick: it needs motion_pick "
                         "without motion_per_pixel")
    if cfg.layers < 2 or cfg.heads < RECALL_HEADS:
        raise ValueError(f"recall takes the last of several blocks and {RECALL_HEADS} of its heads")
    if RECALL_HEADS * (cfg.head_dim - 1) < cfg.patch_dim:
        raise ValueError(f"recall carries a patch's {cfg.patch_dim} pixels in {RECALL_HEADS} heads "
                         f"of {cfg.head_dim - 1} values")
    if any(lag % cfg.patch for lag in RECALL_LAGS + ROUND_TRIP_LAGS):
        raise ValueError(f"recall lags {RECALL_LAGS + ROUND_TRIP_LAGS} must be multiples of the patch "
                         f"side {cfg.patch}")


class RecallLookup:
    """The read of the recall heads for one model: ``queries``, ``values``, ``read``
    (attention over a cache, as generation runs it), ``gather`` (the same read for
    whole-clip training) and ``read_cache`` (``read`` kept for a frame's denoising steps)."""

    def __init__(self, cfg, rope):
        self.cfg, self.rope = cfg, rope
        self.key = torch.zeros(cfg.head_dim)
        self.key[0::2] = 1.0  # every RoPE plane (1, 0): the key is its position alone
        self.per_head = -(-cfg.patch_dim // RECALL_HEADS)  # pixel values a head carries
        self._kept = None  # the last ``read_cache``: what it read from, and the read

    def __getstate__(self):  # a copied or pickled model keeps no read (weak references do not pickle)
        return {**self.__dict__, "_kept": None}

    def lags(self, open_sides=None) -> tuple[int, ...]:
        """The lags a batch looks back: RECALL_LAGS, and ROUND_TRIP_LAGS where some scene
        of it leaves the view (``open_sides``) and the model has ``recall_round_trip``."""
        if self.cfg.recall_round_trip and open_sides is not None and bool(open_sides.any()):
            return RECALL_LAGS + ROUND_TRIP_LAGS
        return RECALL_LAGS

    def places(self, frame, row, col, motion, open_sides=None):
        """Where tokens at (frame, row, col) (N,) look, each of ``lags`` frames back: the
        place ``motion`` (B, 2) carried them from, on the view's torus, or sideways on the
        longer torus of a scene that leaves the view (``open_sides`` (B,) bool, with
        ``scene_torus``). Returns frame (1, L, N), row and col (B, L, N), and in view (B, L, N)
        bool: a place off the view was never cached (nor is a round trip's in a scene that
        stays in it)."""
        lags = torch.tensor(self.lags(open_sides), device=frame.device).view(1, -1, 1)
        dy, dx = (motion[:, i].to(frame.device).view(-1, 1, 1) for i in (0, 1))
        side, p = self.cfg.side, self.cfg.patch
        across = torch.full((len(motion), 1, 1), side, device=frame.device)
        if open_sides is not None:
            across = torch.where(open_sides.to(frame.device).view(-1, 1, 1), exit_torus() // p, across)
        rows = torch.remainder(row.view(1, 1, -1) - lags * dy // p, side)
        cols = torch.remainder(col.view(1, 1, -1) - lags * dx // p, across)
        in_view = cols < side
        if lags.shape[1] > len(RECALL_LAGS):
            in_view = in_view & ((lags <= RECALL_LAGS[-1]) | open_sides.to(frame.device).view(-1, 1, 1))
        return frame.view(1, 1, -1) - lags, rows, cols, in_view

    def queries(self, frame, row, col, motion, open_sides=None) -> torch.Tensor:
        """Post-RoPE queries (B, lags, N, d) of tokens at (frame, row, col) (N,): each looks
        at its ``places`` along ``motion``. A place out of view gets a zero query: it
        matches no key, so the null takes the look."""
        at, rows, cols, in_view = self.places(frame.cpu(), row.cpu(), col.cpu(), motion.cpu(),
                                              None if open_sides is None else open_sides.cpu())
        cos, sin = self.rope.cos_sin(at, rows, cols.clamp_max(self.cfg.side - 1))
        q = apply_rotation(self.key.expand(*cos.shape[:-1], -1), cos, sin)
        return q * in_view[..., None]

    def values(self, x: torch.Tensor, trust: torch.Tensor) -> torch.Tensor:
        """The recall heads' values (B, RECALL_HEADS, N, d): each head a slice of the patch
        pixels ``x`` (B, N, patch_dim) and the trust (B, N, 1), zeros after."""
        d, per = self.cfg.head_dim, self.per_head
        heads = [torch.cat([x[..., i * per:(i + 1) * per], trust], -1) for i in range(RECALL_HEADS)]
        return torch.stack([F.pad(h, (0, d - h.shape[-1])) for h in heads], 1)

    def _widths(self):
        P, per = self.cfg.patch_dim, self.per_head
        return [min(per, P - h * per) for h in range(RECALL_HEADS)]

    def read(self, queries, keys, values, log_mass=None, allowed=None) -> RecallRead:
        """What recall reads: queries (B, lags, N, d); per recall head the keys (B, H', M, d)
        and values (B, H', M, d) of M cached tokens, log_mass (B, H', M) or None, allowed
        (N, M) bool or None. Each head attends on its own (a policy may keep other tokens in
        each), per lag against a null key. Each lag's read is its trust-weighted value, its
        found the trusted attention mass (the least of the heads); the mean read averages the
        lags weighted by trust, its found is theirs summed over len(RECALL_LAGS), at most 1
        (round trips' lags add to what the others found)."""
        perfect = float(self.key.pow(2).sum())
        q = queries.to(keys.device).float()
        per_head = []
        with torch.autocast(keys.device.type, enabled=False):  # logits of ~500: float32
            for h, width in enumerate(self._widths()):
                logits = RECALL_GAIN * (torch.einsum("blnd,bmd->blnm", q, keys[:, h].float()) - perfect)
                if log_mass is not None:
                    logits = logits + log_mass[:, h, None, None].float()
                if allowed is not None:
                    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
                null = logits.new_full((*logits.shape[:-1], 1), -RECALL_GAIN * RECALL_MARGIN)
                attn = torch.cat([logits, null], -1).softmax(-1)[..., :-1]  # (B, L, N, M)
                val = values[:, h].float()[:, None]
                trust = val[..., width:width + 1]
                mass = attn @ trust  # (B, L, N, 1)
                per_head.append((attn @ (val[..., :width] * trust), mass))
        return self._combined(per_head)

    @staticmethod
    def _combined(per_head) -> RecallRead:
        """The read from each head's (trusted sum of pixels (B, L, N, width), trusted mass
        (B, L, N, 1)): a found is the least of the heads' (a policy may keep other tokens in each)."""
        mean = torch.cat([(s.sum(1) / m.sum(1).clamp_min(1e-3)) for s, m in per_head], -1)
        lags = torch.cat([s / m.clamp_min(1e-3) for s, m in per_head], -1)
        found = torch.stack([m.sum(1)[..., 0] for _, m in per_head]).amin(0)
        lag_found = torch.stack([m[..., 0] for _, m in per_head]).amin(0)
        return RecallRead(mean.clamp(-1, 1), (found / len(RECALL_LAGS)).clamp_max(1.0),
                          lags.clamp(-1, 1), lag_found.clamp_max(1.0))

    def read_cache(self, layer, queries, frame, motion, open_sides=None):
        """``read`` of ``queries`` (from ``queries``: tokens of frames ``frame`` (N,),
        ``motion`` and ``open_sides``) over a cache layer. The read is the same
        at every denoising step of a frame (the same cache, and queries that depend on the
        place and the motion alone), so the last one is kept and given back while the
        layer's tensors are the same objects (a cache never changes a tensor in place: a
        write or a compression puts new ones). Weak references: nothing is kept alive."""
        H = RECALL_HEADS
        tensors = (layer.k, layer.v, layer.mass)
        kept = self._kept
        # no open sides reads as all shut
        sides = torch.zeros(len(motion), dtype=torch.bool) if open_sides is None else open_sides.cpu().clone()
        if (kept is not None and all(ref() is t for ref, t in zip(kept[0], tensors))
                and torch.equal(kept[1], frame) and torch.equal(kept[2], motion.cpu())
                and torch.equal(kept[3], sides)):
            return kept[4]
        log_mass = None if layer.bias() is None else layer.mass[:, :H].log()
        out = self.read(queries, layer.k[:, :H], layer.v[:, :H], log_mass)
        self._kept = (tuple(weakref.ref(t) for t in tensors), frame.clone(), motion.cpu().clone(), sides, out)
        return out

    def gather(self, meta, motion, values, mask, open_sides=None):
        """``read`` for whole-clip training, where the keys are whole clean frames at
        their own places: there every key but the one at the place looked at scores at
        least 0.46 x RECALL_GAIN below it (e^-13), so the read is that key's value against
        the null, a gather. meta: (frame, row, col) (N,) of the clip's tokens; values (B,
        RECALL_HEADS, N, d); mask (N, N) bool, the clip's layout (a key no token may see,
        such as a noisy copy, is never recalled); open_sides as ``places``. Returns a
        ``RecallRead`` like ``read``."""
        frame, row, col = (m.to(values.device) for m in meta)
        B, H, N, _ = values.shape
        side = self.cfg.side
        allowed = mask & (frame[None] < frame[:, None])
        # the first token of each frame's clean slot (-1: no such slot)
        first = torch.full((int(frame.max()) + 1,), -1, dtype=torch.long, device=values.device)
        keyed = allowed.any(0) & (row == 0) & (col == 0)
        first[frame[keyed]] = keyed.nonzero()[:, 0]
        at, rows, cols, in_view = self.places(frame, row, col, motion, open_sides)  # at: (1, L, N)
        base = torch.where(at >= 0, first[at.clamp_min(0)], -1)
        key = base + rows * side + cols.clamp_max(side - 1)  # (B, L, N)
        present = (base >= 0) & in_view & allowed.gather(
            1, key.clamp_min(0).view(-1, N).T.reshape(N, -1)).T.view(key.shape)
        weight = present.float() / (1 + math.exp(-RECALL_GAIN * RECALL_MARGIN))  # against the null
        per_head = []
        for h, width in enumerate(self._widths()):
            val = values[:, h].float().gather(1, key.clamp_min(0).view(B, -1, 1).expand(-1, -1, values.shape[-1]))
            val = val.view(B, key.shape[1], N, -1)
            trusted = weight[..., None] * val[..., width:width + 1]  # (B, L, N, 1)
            per_head.append((trusted * val[..., :width], trusted))
        return self._combined(per_head)
