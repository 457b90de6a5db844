"""The embedded model: Wan2.1 in miniature, readable in one sitting.

Frames (32x32 RGB in [-1, 1]) are cut into 4x4 patches: 64 tokens per frame.
A stack of DiT blocks with
  * adaLN modulation per frame from its noise level plus the prompt embedding
    (Wan-style: one shared projection to 6 x width, plus a learned offset per block),
  * self-attention with q/k RMSNorm over the full width before the head split
    (as Wan), 3D RoPE with Wan's temporal/height/width split of the head dim,
  * block-causal attention: a token sees every token of its own chunk of
    ``chunk_frames`` frames and of all earlier chunks,
  * the previous frame as a second input: its patches, through their own linear
    layer, are added to each token's embedding (a CPU-sized model does not learn
    copy-and-shift through attention alone; docs/model.md). Everything older than
    the newest frame reaches the model only through the KV cache,
predicts the clean frame x0 of each frame (``prediction="x0"``); the sampler
turns it into the flow-matching velocity v = (x_t - x0) / t.

Generation (``ffviz.generate``) runs one chunk at a time over a ``KVCache`` of
post-RoPE keys: a few Euler steps read the cache, then the finished chunk is
run once more at the context noise level to write its keys and values (as
Self-Forcing does). Training (``ffviz.train``) runs whole clips at once with
the block-causal mask; both paths share ``Attention.forward``.

The four hook points of every attention layer (``blocks.{i}.attn.hook_q_pre``,
``hook_q_post``, ``hook_k_pre``, ``hook_k_post``) expose queries and keys
before and after RoPE without changing the model.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffviz import kernels
from ffviz.cache import KVCache
from ffviz.hooks import HookContext, HookPoint
from ffviz.models.recall import (RECALL_FOUND, RECALL_GIVES, RECALL_HEADS, RECALL_LAGS, ROUND_TRIP_LAGS,
                                 RecallLookup, RecallRead, check_config, nothing_read)
from ffviz.models.rope import Rope3D, apply_rotation
from ffviz.scenes import CONDITION_VOCAB, EXITS_ID, VIEW, exit_torus


@dataclasses.dataclass
class TinyConfig:
    frame_size: int = 32
    patch: int = 4
    channels: int = 3
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    chunk_frames: int = 1  # frames denoised together (block-causal unit)
    given_frames: int = 2  # frames rendered from the prompt's scene (image-to-video)
    rope_theta: float = 10.0  # spatial base: every plane tells neighbouring patches apart
    rope_theta_time: float = 10000.0  # temporal base: no wrap-around within a long run
    previous_frame_input: bool = True  # the newest frame as a direct input (see above)
    prev_reach: int = 0  # patches around each token's own that its previous-frame input spans
    # The head predicts the change from the previous frame, x0 = previous + head: a zero
    # output copies the newest frame, so holding the scene is the starting point and
    # only motion has to be learnt. False for weights trained before it existed.
    predict_change: bool = False
    # With predict_change, the head also picks per patch a displacement of the previous
    # frame of up to this many pixels (0: none): x0 = sum_d p_d shift_d(previous) + head.
    # Moving an edge is then one choice out of (2r+1)^2, not 48 pixel values to paint.
    motion_reach: int = 0
    # One displacement per patch instead of the blend: the most likely one at sampling,
    # the true one (read from the target) in training, where cross-entropy teaches the
    # choice. A blend is the mean of the possible futures, which breaks shapes.
    motion_pick: bool = False
    # The pick is made per pixel, not per patch: a 4x4 patch often holds two motions (an
    # object's edge beside the still pillar, two objects that overlap, a trailing edge),
    # and one displacement for the whole patch tears one of them. What the motion memory
    # and its correction say stays per patch, added to every pixel's choice.
    motion_per_pixel: bool = False
    # Each token also sees how well each displacement of its previous frame explains its
    # own patch (a correlation input, as optical-flow networks have). A cached frame's
    # tokens so carry how that frame moved, and the next frame reads it through attention:
    # the frame before the newest still reaches the model through the cache alone.
    motion_match: bool = False
    # Motion memory: head 0 of layer 0 looks at the same patch of the frames before
    # (fixed, content-free queries and keys) and its values are each token's match,
    # less uniform: how its frame moved. What it reads is added to the motion choice,
    # so "keep moving as you moved" comes from the cache, and a policy that evicts the
    # newest frame takes it away.
    motion_memory: bool = False
    # A small MLP over the head's features and what the memory read, whose output is
    # added to the motion choice (zero at the start). Memory says "as before"; where that
    # is wrong (in the earlier world, an object bouncing at a wall) the correction has
    # to depend on both.
    motion_refine: bool = False
    # A learnt embedding of each patch's place in the frame (zero at the start). RoPE
    # tells tokens only where they are relative to each other; in the earlier world an
    # object bounced off the view's edge, which a token can then know it is next to.
    patch_position: bool = False
    # The world wraps around the view (ffviz.scenes): a displacement or a neighbourhood
    # that crosses an edge takes the pixels of the opposite one, so a moved frame shows an
    # object crossing an edge exactly. Off for weights of the earlier world, whose edges
    # were repeated (objects bounced there).
    wrap: bool = False
    # Recall: one more block, the last, whose heads 0 and 1 look back along the scene's
    # motion: a patch at frame f reads the cached tokens at the place the motion carried it
    # from, RECALL_LAGS frames back (content-free queries and keys; values: the cached
    # patch's pixels and how far it is to be trusted, learnt). What it reads is one more
    # choice next to the displacements of the previous frame, so an object coming out from
    # behind the pillar is painted from the frames that still showed it. The scene's motion
    # is measured once from the given frames (``measure_motion``) and rides on the condition.
    recall: bool = False
    prediction: str = "x0"  # what the head predicts: "x0" (clean frame) or "v" (velocity)
    # sampling defaults, stored with the weights
    sample_steps: int = 4
    shift: float = 3.0
    context_noise: float = 0.0  # noise level of the cache-filling pass
    snap: bool = True  # snap each generated frame to the scene's palette before it is cached
    # At sampling, each patch's pick gives what one of the moves this world has gives: the
    # scene's motion (measured from the given frames), standing still (the pillar, a plain
    # background), or recall (``keep_to_motion``). The learnt choice still decides between
    # them (training teaches it with ``--world-moves`` where no displacement gives a patch).
    # Free-running, the other displacements are where objects tear
    # (docs/experiments/sampling_choice.md).
    one_motion: bool = False
    # Added to recall's logit at sampling (not in training). Recall is taught only where it
    # alone gives the patch, a small share, so the choice learns a prior that underrates it
    # where it is right (an object coming out from behind the pillar: recall reads it back,
    # the choice gives it about 0.05); the logit adjustment for a rare class
    # (docs/experiments/sampling_choice.md).
    recall_bias: float = 0.0
    # Pixel by pixel, one of the world's moves. A patch beside the pillar holds pixels that
    # move with the scene and pixels whose source is the pillar (what the object uncovers:
    # the background standing still, or what recall reads); one pick per patch tears one of
    # them (docs/experiments/pixel_moves.md). Each pixel takes standing still, the scene's
    # motion or recall: the patch's pick, unless a learnt per-pixel correction outweighs it
    # by more than PIXEL_DEFAULT. Where the patch's pick is none of the three (the choice as
    # trained, without one_motion) nothing changes. Tried on the training line and not
    # adopted: free-running it took pixels away from recall and lost returning objects.
    pixel_moves: bool = False
    # The moves and recall follow the scene's own torus (ffviz.scenes). Where a scene's
    # objects leave the view its horizontal torus is longer than the view: there a
    # displacement does not wrap sideways (the edge column repeats: what comes in was out
    # of sight, most often background), nor does the previous-frame neighbourhood (the
    # edge patch stands for its neighbour past the edge), and recall looks
    # along the longer torus and finds nothing where the place it looks at is out of view.
    # With ``wrap`` alone an object leaving at one edge comes straight back in at the other
    # (docs/experiments/scene_torus.md). The condition carries whether the scene leaves
    # the view: a fourth trailing number.
    scene_torus: bool = False
    # With scene_torus, recall in a scene that leaves the view also looks ROUND_TRIP_LAGS
    # back (28-44 frames): at 1 px a frame what left at one edge comes back in at the other
    # 32 frames or more later (at 2 px, lag 28 reads the nearest column of the last pass). A training clip holds such a lag only across its gap (a recent block
    # 28-44 frames after the given frames, ``gap_start``); free-running, a full cache
    # always does (docs/experiments/scene_torus.md).
    recall_round_trip: bool = False
    # Recall gives one of its reads per patch: the trust-weighted mean over its lags, or a
    # single lag's, as a learnt pick ranks them (the mean first by LAG_PICK_DEFAULT, so a
    # grafted model starts as the one it was). At a pillar's edge the lags disagree (one
    # saw the object, another the pillar) and their mean gets 0.30 of pixels wrong where
    # the best single lag gets 0.04 (docs/experiments/occluder_edges.md).
    recall_lag_pick: bool = False

    @property
    def side(self) -> int:
        """Patches along each side of a (square) frame."""
        return self.frame_size // self.patch

    @property
    def grid(self) -> tuple[int, int]:
        return self.side, self.side

    @property
    def tokens_per_frame(self) -> int:
        return self.side ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


MEMORY_GAIN = 4.0  # sharpness of the motion memory's look at the same patch
# The patch-position embedding enters the residual stream at this gain: trained weights'
# streams are large (rms 5-17), and at the optimizer's step size a zero-started embedding
# would take thousands of steps to count in them.
POSITION_GAIN = 10.0
RECALL_BIAS_LAGS = 2  # recall_bias applies where recall found this many lags' worth (trusted)
# What a pixel's correction must outweigh to leave its patch's pick (pixel_moves): at
# the start (zero correction) every pixel keeps it, so a grafted model is the one it was.
PIXEL_DEFAULT = 2.0
WORLD_MOVES = 3  # per pixel: standing still, the scene's motion, recall
# The lag pick's head start for recall's mean read (recall_lag_pick): with the pick's
# output at zero the mean ranks first, as before the pick existed.
LAG_PICK_DEFAULT = 2.0
# A single lag is an option where it found as much as the mean needs from all of them.
LAG_FOUND = RECALL_FOUND * len(RECALL_LAGS)
# The pick's output enters its logits at this gain: grafted at the optimizer's late step
# size, a zero-started pick took more than 80 steps to move its logits by one (as
# POSITION_GAIN, for the same reason).
LAG_PICK_GAIN = 10.0
PIXEL_GIVES = 0.1  # a move gives a true pixel within this (each channel, pixels in [-1, 1])
ATTENTION_BANDS = 4  # bands of query rows of whole-clip training's attention (masked_attention)


def local_query_key(rope, head_dim: int, lag: int, gain: float):
    """Content-free query and key (head_dim,) whose RoPE dot product peaks at the same
    patch ``lag`` frames back: every key plane is (1, 0), the query's too, its temporal
    planes turned back by omega * lag; ``gain`` scales the query (the sharpness)."""
    key = torch.zeros(head_dim)
    key[0::2] = 1.0
    query = key.clone()
    planes = (rope.axis == 0).nonzero().flatten()
    phase = -rope.omega[planes].float() * lag
    query[2 * planes], query[2 * planes + 1] = phase.cos(), phase.sin()
    return gain * query, key


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of noise levels t in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


def masked_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA under a bool ``mask`` (N, N), run in ATTENTION_BANDS bands of query rows,
    each against the keys up to the last one any of its rows may see. Rows of a
    block-causal clip see a prefix of the keys, so the early bands skip most of them;
    the CPU kernel costs by the keys it is given, not by the ones the mask lets through
    (a training step's teacher-forcing pass: ``tools/train_step_time.py``), and the
    numbers are the same."""
    N = mask.shape[0]
    last = N - mask.flip(1).int().argmax(1)  # one past each row's last allowed key
    bounds = torch.linspace(0, N, min(ATTENTION_BANDS, N) + 1).long().tolist()
    out = []
    for a, z in zip(bounds[:-1], bounds[1:]):
        end = int(last[a:z].max())
        out.append(F.scaled_dot_product_attention(q[:, :, a:z], k[:, :, :end], v[:, :, :end],
                                                  attn_mask=mask[a:z, :end]))
    return torch.cat(out, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig, ctx: HookContext):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.norm_q, self.norm_k = RMSNorm(cfg.width), RMSNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.hook_q_pre, self.hook_q_post = HookPoint(ctx), HookPoint(ctx)
        self.hook_k_pre, self.hook_k_post = HookPoint(ctx), HookPoint(ctx)

    def forward(self, x, cos, sin, mask=None, cache_layer=None, write=False, meta=None,
                memory=None):
        """x (B, N, width); cos/sin (N, d/2) RoPE of the N tokens.

        mask: (N, N) bool, True = may attend (training path), or None.
        cache_layer: a ``LayerCache`` to read (its keys come first, all visible),
        and to extend with this call's keys and values when ``write``;
        meta = (frame, row, col) of the N tokens, needed to write.
        memory: (query, key, value) pre-RoPE of heads 0..m-1, each (B, m, N, d), instead
        of their own (the motion memory, the recall); what head 0 reads is left in
        ``memory_read`` (B, N, d).
        """
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = self.norm_q(q), self.norm_k(k)
        split = lambda t: t.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)  # (B, H, N, d)
        if memory is not None:
            q, k, v = (torch.cat([m.to(a.dtype), a[:, m.shape[1]:]], 1)
                       for m, a in zip(memory, (q, k, v)))
        q = self.hook_q_post(apply_rotation(self.hook_q_pre(q), cos, sin))
        k = self.hook_k_post(apply_rotation(self.hook_k_pre(k), cos, sin))
        if mask is not None:  # whole-clip training: the block-causal mask, no cache
            y = masked_attention(q, k, v, mask)
        else:
            log_mass = None
            if cache_layer is not None and cache_layer.size:
                lm = cache_layer.bias()  # (B, H, 1, Nc) or None
                if lm is not None:  # this call's own tokens have mass 1
                    log_mass = torch.cat([lm[:, :, 0], lm.new_zeros(B, self.heads, N)], -1)
                keys = torch.cat([cache_layer.k, k], 2)
                vals = torch.cat([cache_layer.v, v], 2)
            else:
                keys, vals = k, v
            # the log-mass attention dispatch: SDPA with a float bias (Triton when forced)
            y = kernels.attention(q, keys, vals, log_mass)
        if write:
            cache_layer.append(k, v, *meta)
        self.memory_read = y[:, 0] if memory is not None else None
        return self.out(y.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig, ctx: HookContext):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg, ctx)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, cfg.mlp_ratio * w), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * w, w))
        # learned offset added to the shared time projection (as Wan's blocks do)
        self.modulation = nn.Parameter(torch.randn(1, 6, w) / w ** 0.5)

    def forward(self, x, mod, cos, sin, **attn_kw):
        """x: (B, F, n, width) tokens by frame; mod: (B, F, 6, width) each frame's
        modulation (broadcast over its n tokens, never copied per token)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.modulation)[:, :, :, None].unbind(2)
        B, F, n, w = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h.view(B, F * n, w), cos, sin, **attn_kw).view(B, F, n, w)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TinyVideoModel(nn.Module):
    """The ``VideoModel`` of ``ffviz.models``: pixels in [-1, 1], scene-conditioned."""

    name = "tiny"
    fps = 8  # the video writer's frame rate for its frames
    has_scenes = True  # prompts are the scene grammar: given frames, scene metrics
    clamp_tokens = True  # tokens are pixels: generated ones are clamped to [-1, 1]

    def __init__(self, cfg: TinyConfig = TinyConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.hook_ctx = HookContext()
        self.patch_embed = nn.Linear(cfg.patch_dim, w)
        if cfg.previous_frame_input:
            self.prev_embed = nn.Linear((2 * cfg.prev_reach + 1) ** 2 * cfg.patch_dim, w)
            self.no_prev = nn.Parameter(torch.zeros(w))  # frame 0 has no previous frame
        if cfg.patch_position:
            self.position_embed = nn.Parameter(torch.zeros(cfg.tokens_per_frame, w))
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_embed = nn.ModuleList(nn.Embedding(n, w) for n in CONDITION_VOCAB)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))
        self.blocks = nn.ModuleList(Block(cfg, self.hook_ctx) for _ in range(cfg.layers))
        self.head_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.head_mod = nn.Parameter(torch.randn(1, 2, w) / w ** 0.5)
        self.head = nn.Linear(w, cfg.patch_dim)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta, cfg.rope_theta_time)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if cfg.motion_reach:
            if not cfg.predict_change:
                raise ValueError("motion_reach moves the previous frame: it needs predict_change")
        for flag in ("motion_match", "motion_memory"):
            if getattr(cfg, flag) and not cfg.motion_reach:
                raise ValueError(f"{flag} compares displacements: it needs motion_reach")
        if cfg.motion_memory and cfg.head_dim < (2 * cfg.motion_reach + 1) ** 2:
            raise ValueError(f"motion_memory carries one value per displacement in a head: head_dim "
                             f"{cfg.head_dim} < {(2 * cfg.motion_reach + 1) ** 2} displacements")
        if cfg.motion_refine and not cfg.motion_memory:
            raise ValueError("motion_refine corrects what the motion memory reads: it needs motion_memory")
        if cfg.motion_per_pixel and not cfg.motion_pick:
            raise ValueError("motion_per_pixel makes the pick per pixel: it needs motion_pick")
        if cfg.scene_torus and not (cfg.wrap and self.carries_motion):
            raise ValueError("scene_torus opens the sides of a wrapping world per scene, told on the "
                             "condition: it needs wrap and a per-patch pick (motion_reach, motion_pick)")
        if cfg.scene_torus and (cfg.frame_size != VIEW or exit_torus() % cfg.patch):
            raise ValueError(f"scene_torus follows the world of ffviz.scenes: frames of {VIEW} px and a "
                             f"patch side that divides its {exit_torus()}-px torus")
        if cfg.recall_round_trip and not (cfg.scene_torus and cfg.recall):
            raise ValueError("recall_round_trip looks back along a scene's own torus: it needs "
                             "scene_torus and recall")
        if cfg.motion_reach:
            side = 2 * cfg.motion_reach + 1
            dy, dx = torch.meshgrid(torch.arange(side) - cfg.motion_reach,
                                    torch.arange(side) - cfg.motion_reach, indexing="ij")
            # squared length of each displacement, row-major like displaced()
            self.register_buffer("displacement_length", (dy ** 2 + dx ** 2).flatten().float(),
                                 persistent=False)
            self.motion = nn.Linear(w, self.choices_per_token * side * side)
            if cfg.motion_memory:
                self.memory_scale = nn.Parameter(torch.tensor(1.0))
                query, key = local_query_key(self.rope, cfg.head_dim, lag=1, gain=MEMORY_GAIN)
                self.register_buffer("memory_query", query, persistent=False)
                self.register_buffer("memory_key", key, persistent=False)
            if cfg.motion_refine:
                self.motion_refine = nn.Sequential(nn.Linear(w + side * side, w), nn.GELU(approximate="tanh"),
                                                   nn.Linear(w, side * side))
                nn.init.zeros_(self.motion_refine[2].weight)  # starts as the model it is added to
                nn.init.zeros_(self.motion_refine[2].bias)
            if cfg.motion_match:
                self.match_embed = nn.Linear(side * side, w)
                nn.init.zeros_(self.match_embed.weight)  # starts as the model it is added to
                nn.init.zeros_(self.match_embed.bias)
            # (B, N, (2r+1)^2) displacement weights; (B, N, patch^2, (2r+1)^2) per pixel
            self.hook_motion = HookPoint(self.hook_ctx)
            nn.init.zeros_(self.motion.weight)
            with torch.no_grad():  # starts as (nearly) a copy: 94% on no displacement
                self.motion.bias.zero_().view(-1, side * side)[:, side * side // 2] = 6.0
        if cfg.recall:
            check_config(cfg)
            self.recall = RecallLookup(cfg, self.rope)  # the lookup's geometry (no weights)
            # how far a cached patch is to be trusted (a pillar's patch hides what recall looks for)
            self.recall_trust = nn.Linear(w, 1)
            nn.init.zeros_(self.recall_trust.weight)
            nn.init.zeros_(self.recall_trust.bias)
            # the logit of recall among the displacements, from the features, what recall read,
            # how much it found, and the patch's own previous pixels; it starts never chosen
            self.recall_choice = nn.Sequential(nn.Linear(w + 2 * cfg.patch_dim + 1, w),
                                               nn.GELU(approximate="tanh"), nn.Linear(w, 1))
            nn.init.zeros_(self.recall_choice[2].weight)
            nn.init.constant_(self.recall_choice[2].bias, -8.0)
        if cfg.recall_lag_pick:
            if not cfg.recall:
                raise ValueError("recall_lag_pick picks among recall's reads: it needs recall")
            # per option (the mean, each lag): a logit from the features, the option's pixels,
            # the patch's own previous pixels, what the option found and its lag (the mean: 0)
            self.recall_lag_pick = nn.Sequential(nn.Linear(w + 2 * cfg.patch_dim + 2, w),
                                                 nn.GELU(approximate="tanh"), nn.Linear(w, 1))
            nn.init.zeros_(self.recall_lag_pick[2].weight)  # starts on the mean: no change
            nn.init.zeros_(self.recall_lag_pick[2].bias)
        if cfg.pixel_moves:
            if not cfg.recall:
                raise ValueError("pixel_moves picks per pixel among still, the scene's motion and "
                                 "recall: it needs recall")
            # per pixel, how far each world move beats the patch's pick, from the features,
            # the three moves' pixels and how much recall found; it starts at zero (no change)
            self.pixel_moves = nn.Sequential(nn.Linear(w + WORLD_MOVES * cfg.patch_dim + 1, w),
                                             nn.GELU(approximate="tanh"),
                                             nn.Linear(w, cfg.patch ** 2 * WORLD_MOVES))
            nn.init.zeros_(self.pixel_moves[2].weight)
            nn.init.zeros_(self.pixel_moves[2].bias)
        nn.init.zeros_(self.time_proj[1].weight)
        nn.init.zeros_(self.time_proj[1].bias)

    @property
    def choices_per_token(self) -> int:
        """Motion choices per token: one, or one per pixel (``motion_per_pixel``)."""
        return self.cfg.patch ** 2 if self.cfg.motion_per_pixel else 1

    def neighbourhood(self, tokens: torch.Tensor, open_sides: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's patch and the patches within ``prev_reach`` of it (zeros past the
        edge, or the opposite edge's patches with ``wrap``; the edge's own where
        ``open_sides`` (B,) bool says a scene's sides do not wrap): (B, T*n, d) ->
        (B, T*n, (2r+1)^2 d). With r = 1 every pixel an object can bring into a patch in
        one frame (at most 2 px of a 4-px patch) is in its input."""
        r = self.cfg.prev_reach
        if r == 0:
            return tokens
        B, N, d = tokens.shape
        rows, cols = self.cfg.grid
        x = tokens.view(B, -1, rows, cols, d)
        if self.cfg.wrap:
            x = torch.cat([x[:, :, -r:], x, x[:, :, :r]], 2)
            wrapped = torch.cat([x[:, :, :, -r:], x, x[:, :, :, :r]], 3)
            if open_sides is not None and bool(open_sides.any()):
                edges = torch.cat([x[:, :, :, :1].expand(-1, -1, -1, r, -1), x,
                                   x[:, :, :, -1:].expand(-1, -1, -1, r, -1)], 3)
                wrapped = torch.where(open_sides.to(x.device).view(B, 1, 1, 1, 1), edges, wrapped)
            x = wrapped
        else:
            x = F.pad(x, (0, 0, r, r, r, r))
        parts = [x[:, :, dy:dy + rows, dx:dx + cols] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
        return torch.cat(parts, -1).view(B, N, -1)

    def displaced(self, tokens: torch.Tensor, open_sides: torch.Tensor | None = None) -> torch.Tensor:
        """Every displacement (dy, dx) in [-r, r]^2 of each frame of ``tokens`` (B, N, d):
        (B, N, (2r+1)^2, d); content moves by (dy, dx), and what comes in at an edge is the
        opposite edge's (``wrap``) or the edge repeated (also at the left and right edges
        where ``open_sides`` (B,) bool says a scene's sides do not wrap). Row-major over
        (dy, dx), so the middle one is the frame itself."""
        r, S = self.cfg.motion_reach, self.cfg.frame_size
        img = self.unpatchify(tokens)  # (B, T, S, S, C)
        B, T = img.shape[:2]
        img = img.permute(0, 1, 4, 2, 3).reshape(B * T, -1, S, S)
        pad = F.pad(img, (r, r, r, r), mode="circular" if self.cfg.wrap else "replicate")
        if self.cfg.wrap and open_sides is not None and bool(open_sides.any()):
            rows_wrapped = F.pad(img, (0, 0, r, r), mode="circular")
            opened = F.pad(rows_wrapped, (r, r, 0, 0), mode="replicate")
            which = open_sides.to(img.device).repeat_interleave(T).view(B * T, 1, 1, 1)
            pad = torch.where(which, opened, pad)
        pad = pad.view(B, T, -1, S + 2 * r, S + 2 * r).permute(0, 1, 3, 4, 2)
        shifts = [self.patchify(pad[:, :, r - dy:r - dy + S, r - dx:r - dx + S])
                  for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        return torch.stack(shifts, 2)

    def memory_inputs(self, match, first, t):
        """Head 0's query, key and value for the motion memory: fixed local ones, and
        the match less uniform (no evidence where a patch tells nothing), scaled by how
        clean the token is (a noisy token's match is mostly noise; frame 0 has none)."""
        B, N, K = match.shape
        clean = (1 - t).repeat_interleave(self.cfg.tokens_per_frame, 1)[..., None]
        value = torch.where(first, 0.0, (match - 1.0 / K) * clean)
        value = F.pad(value, (0, self.cfg.head_dim - K))
        return (self.memory_query.expand(B, 1, N, -1), self.memory_key.expand(B, 1, N, -1), value[:, None])

    def measure_motion(self, given: torch.Tensor) -> torch.Tensor:
        """The scene's motion (B, 2) long (dy, dx) pixels a frame, from its first two frames
        ``given`` (B, 2n, d): the displacement of frame 0 that explains the most pixels that
        changed into frame 1 (the shortest of equals; (0, 0) when nothing changed)."""
        n, r = self.cfg.tokens_per_frame, self.cfg.motion_reach
        f0, f1 = given[:, :n].float(), given[:, n:2 * n].float()
        px = lambda t: t.reshape(*t.shape[:-1], -1, self.cfg.channels)
        changed = (px(f1) - px(f0)).abs().amax(-1) > 1e-3  # (B, n, P)
        same = (px(self.displaced(f0)) - px(f1)[:, :, None]).abs().amax(-1) < 1e-3  # (B, n, K, P)
        count = (same & changed[:, :, None]).sum((1, 3)).float()  # (B, K)
        best = (count * 1e3 - self.displacement_length).argmax(-1)
        best = torch.where(count.amax(-1) > 0, best, torch.full_like(best, count.shape[-1] // 2))
        side = 2 * r + 1
        return torch.stack([best // side - r, best % side - r], -1)

    def scene_index(self, motion: torch.Tensor) -> torch.Tensor:
        """(B,) long: the index among the displacements of the scene's ``motion`` (B, 2)
        (row-major over (dy, dx), as ``displaced`` orders them)."""
        r = self.cfg.motion_reach
        return ((motion[:, 0] + r) * (2 * r + 1) + motion[:, 1] + r).long()

    @property
    def condition_extras(self) -> int:
        """Numbers after the prompt's embedding on the condition (``embed_condition``)."""
        return (3 + int(self.cfg.scene_torus)) if self.carries_motion else 0

    def split_condition(self, cond: torch.Tensor):
        """``cond`` from ``embed_condition`` -> (the prompt's embedding, the scene's motion
        (B, 2) long, one motion (B,) bool, open sides (B,) bool: the scene's objects leave the
        view and ``scene_torus`` follows them); the last three None where the condition
        carries no motion (a prompt's embedding alone, width numbers: a scene without it),
        the last None without ``scene_torus``."""
        n = self.condition_extras
        if not (n and cond.shape[-1] == self.cfg.width + n):
            return cond, None, None, None
        extra = cond[..., -n:]
        extra = extra[:, 0] if extra.dim() == 3 else extra
        open_sides = extra[:, 3] > 0.5 if self.cfg.scene_torus else None
        return cond[..., :-n], extra[:, :2].round().long(), extra[:, 2] > 0.5, open_sides

    def world_move_patches(self, moved: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """(B, N, 2, d): each patch of ``moved`` (B, N, K, d, every displacement) standing
        still and moved with the scene's ``motion`` (B, 2): this world's two moves."""
        B, N, K, d = moved.shape
        scene = self.scene_index(motion).to(moved.device)
        return torch.stack([moved[:, :, K // 2],
                            moved.gather(2, scene.view(B, 1, 1, 1).expand(B, N, 1, d))[:, :, 0]], 2)

    def sampling_logits(self, logits, recall_bias, motion, one_motion, moved):
        """The logits (B, N, K[+1]) sampling picks from: recall's (the last) raised by
        ``recall_bias`` (B, N, 1; None without recall), and where ``one_motion`` (B,) kept
        to the world's moves (``keep_to_motion``)."""
        if recall_bias is not None:
            logits = torch.cat([logits[..., :-1], logits[..., -1:] + recall_bias.to(logits.dtype)], -1)
        if one_motion is not None and bool(one_motion.any()):
            logits = self.keep_to_motion(logits, motion, one_motion, moved)
        return logits

    def keep_to_motion(self, logits: torch.Tensor, motion: torch.Tensor, one: torch.Tensor,
                       moved: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, N, K[+1]) over the displacements ``moved`` (B, N, K, d) and
        recall (last), kept where ``one`` (B,) to this world's moves. A patch keeps the
        model's own pick where that is recall or gives the patch that moving with the
        scene's ``motion`` (B, 2) or standing still gives (a pillar's edge moved along
        itself is the pillar standing still); elsewhere it gets the better of those two
        (or recall). Not a sum over the displacements that give the same patch: a plain
        background's many equals would outvote an object's leading edge."""
        K = moved.shape[2]
        scene = self.scene_index(motion).to(logits.device)
        allowed = torch.zeros(logits.shape[0], logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[:, K // 2] = True
        allowed[torch.arange(len(motion)), scene] = True
        allowed[:, K:] = True  # recall
        top = logits.argmax(-1, keepdim=True)  # (B, N, 1)
        gives = moved.gather(2, top.clamp_max(K - 1)[..., None].expand(-1, -1, 1, moved.shape[-1]))
        ways = self.world_move_patches(moved, motion)
        fits = ((ways - gives).abs().amax(-1) < 1e-4).any(-1) | (top[..., 0] >= K)  # (B, N)
        keep = one.to(logits.device)[:, None] & ~fits
        return torch.where(keep[..., None] & ~allowed[:, None], torch.finfo(logits.dtype).min, logits)

    def world_pixels(self, feat, moved, recalled, motion, pick, one_motion, truth=None, taught=None):
        """Patches made pixel by pixel (``pixel_moves``). ``pick`` (B, N, d): the patches of
        the pick sampling makes. Where it gives what standing still, the scene's ``motion``
        or recall (``recalled``: pixels, found) gives, each pixel takes the world move its
        logits rank first: the pick's, +PIXEL_DEFAULT, plus the learnt correction.
        Sampling (``truth`` None) returns those pixels where ``one_motion`` (B,) keeps the
        scene to the world's moves, ``pick`` elsewhere. Training (``truth``: the true
        tokens) returns the base the frame loss is taught against: each pixel of
        ``taught`` (the taught pick's patches) from the move that gives it (``taught``'s
        where it does), and keeps for the loss the logits ``pixel_logits`` (B, N, P, 3),
        which moves give each pixel ``pixel_gives``, and where the pick was a world move
        ``pixel_has`` (B, N) and which ``pixel_pick``."""
        B, N, K, d = moved.shape
        P, C = self.cfg.patch ** 2, self.cfg.channels
        read, found = recalled[:2]
        sources = torch.cat([self.world_move_patches(moved, motion),
                             read[:, :, None].to(moved.dtype)], 2).float()  # (B, N, 3, d)
        recall_ok = found >= RECALL_FOUND  # (B, N): recall read something
        def world_move(patches):
            """Which world move gives ``patches`` (the first of equals: still, scene, recall)
            and whether any does."""
            same = (sources - patches[:, :, None].float()).abs().amax(-1) < 1e-4
            same[..., 2] &= recall_ok
            return same.float().argmax(-1), same.any(-1)
        default, has = world_move(pick)
        # only patches where the moves differ have a choice (a plain background has none: most)
        differ = has & ((sources.amax(2) - sources.amin(2)).amax(-1) > 1e-4)
        rows = differ.nonzero(as_tuple=True)
        inputs = torch.cat([feat.reshape(B, N, -1)[rows], sources[rows].flatten(1).to(feat.dtype),
                            found[rows][:, None].to(feat.dtype)], -1)
        logits = feat.new_zeros(B, N, P * WORLD_MOVES, dtype=torch.float32)
        logits[rows] = self.pixel_moves(inputs).float()
        logits = logits.view(B, N, P, WORLD_MOVES)
        logits = logits + PIXEL_DEFAULT * F.one_hot(default, WORLD_MOVES)[:, :, None].float()
        no_recall = torch.zeros_like(logits, dtype=torch.bool)
        no_recall[..., 2] = ~recall_ok[..., None]
        logits = logits.masked_fill(no_recall, -1e4)
        px = sources.view(B, N, WORLD_MOVES, P, C)
        if truth is None:
            choice = logits.argmax(-1)  # (B, N, P)
            apply = has & (one_motion.to(has.device)[:, None] if one_motion is not None else False)
            base = pick
        else:
            gives = ((px - truth.float().view(B, N, 1, P, C)).abs().amax(-1) < PIXEL_GIVES).transpose(2, 3)
            gives = gives & ~no_recall  # (B, N, P, 3)
            self.pixel_logits, self.pixel_gives, self.pixel_has, self.pixel_pick = logits, gives, has, default
            taught_move, apply = world_move(taught)
            kept = gives.gather(-1, taught_move[:, :, None, None].expand(B, N, P, 1))[..., 0]
            choice = torch.where(gives.any(-1) & ~kept, gives.float().argmax(-1), taught_move[:, :, None])
            base = taught
        chosen = px.gather(2, choice[:, :, None, :, None].expand(B, N, 1, P, C))[:, :, 0].reshape(B, N, d)
        return torch.where(apply[..., None], chosen.to(base.dtype), base)

    def pick_recall_lag(self, feat, still, recalled: RecallRead, truth=None) -> RecallRead:
        """``recalled`` with each patch's pixels those of one of its options: the mean over
        the lags (option 0) or one lag (1..L), the found option the learnt pick ranks first
        (``recall_lag_pick``; the mean +LAG_PICK_DEFAULT). ``still``: the patch's own
        previous pixels (B, N, d). Training (``truth``: the true tokens) takes the first
        option that gives the patch (error under RECALL_GIVES; the model's own pick where
        none does) and keeps for the loss the logits ``lag_pick_logits`` (B, N, 1 + L),
        which options give the patch ``lag_pick_gives`` and where the pick has something to
        learn ``lag_pick_telling`` (B, N). The found stays the mean's (recall's choice and
        sampling's bias read it as before)."""
        B, N, d = recalled.pixels.shape
        options = torch.cat([recalled.pixels[:, None], recalled.lag_pixels], 1).transpose(1, 2)  # (B, N, O, d)
        mass = torch.cat([recalled.found[:, None], recalled.lag_found], 1).transpose(1, 2)  # (B, N, O)
        found = torch.cat([(recalled.found >= RECALL_FOUND)[:, None], recalled.lag_found >= LAG_FOUND],
                          1).transpose(1, 2)
        O = options.shape[2]
        lags = (RECALL_LAGS + ROUND_TRIP_LAGS)[:O - 1]  # the read's lags, round trips' last
        lag = torch.tensor((0,) + lags, dtype=torch.float32, device=options.device) / RECALL_LAGS[-1]
        # only where two found options differ is there a pick to make (most patches: none)
        high = options.masked_fill(~found[..., None], -2.0).amax(2)
        low = options.masked_fill(~found[..., None], 2.0).amin(2)
        differ = (found.sum(-1) >= 2) & ((high - low).amax(-1) > 1e-4)
        rows = differ.nonzero(as_tuple=True)
        R = rows[0].numel()
        logits = torch.zeros(B, N, O, device=options.device)
        if R:
            inputs = torch.cat([feat.reshape(B, N, -1)[rows][:, None].expand(R, O, -1),
                                options[rows].to(feat.dtype), still[rows][:, None].expand(R, O, -1).to(feat.dtype),
                                mass[rows][..., None].to(feat.dtype),
                                lag.view(1, O, 1).expand(R, O, 1).to(feat.dtype)], -1)
            logits[rows] = LAG_PICK_GAIN * self.recall_lag_pick(inputs)[..., 0].float()
        logits[..., 0] += LAG_PICK_DEFAULT
        logits = logits.masked_fill(~found, -1e4)
        choice = logits.argmax(-1)  # (B, N)
        if truth is not None:
            err = (options.float() - truth.float()[:, :, None]).pow(2).mean(-1)
            gives = (err < RECALL_GIVES) & found
            choice = torch.where(gives.any(-1), gives.float().argmax(-1), choice)
            self.lag_pick_logits, self.lag_pick_gives = logits, gives
            self.lag_pick_telling = differ & gives.any(-1) & (gives != found).any(-1)
        pixels = options.gather(2, choice[:, :, None, None].expand(B, N, 1, d))[:, :, 0]
        return recalled._replace(pixels=pixels)

    @staticmethod
    def match(moved: torch.Tensor, x: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
        """How well each displacement ``moved`` (B, N, K, d) explains each token ``x``
        (B, N, d): a softmin over the displacements of the mean squared difference. On a
        clean frame it is one-hot on the displacements that give the patch exactly; on a
        noisy one it spreads as the noise hides the answer."""
        err = (moved - x[:, :, None].to(moved.dtype)).pow(2).mean(-1)
        return (-(err - err.amin(-1, keepdim=True)) / temperature).softmax(-1)

    # -- pixels <-> tokens ------------------------------------------------
    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, S, S, 3) in [-1, 1] -> (B, T * tokens_per_frame, patch_dim)."""
        B, T, S, _, C = frames.shape
        g, p = self.cfg.side, self.cfg.patch
        x = frames.reshape(B, T, g, p, g, p, C).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, T * g * g, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        g, p, C = self.cfg.side, self.cfg.patch, self.cfg.channels
        x = x.reshape(B, -1, g, g, p, p, C).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, -1, g * p, g * p, C)

    def decode(self, tokens: torch.Tensor, frames: torch.Tensor | None = None) -> np.ndarray:
        """uint8 video frames (T, 32, 32, 3) of batch element 0 of ``tokens``."""
        img = self.unpatchify(tokens)[0].clamp(-1, 1)
        return ((img + 1) * 127.5).round().to(torch.uint8).cpu().numpy()

    # -- conditioning ------------------------------------------------------
    @property
    def carries_motion(self) -> bool:
        """The condition carries the scene's motion and ``one_motion`` (a model that picks a
        displacement per patch): three trailing numbers after the prompt's embedding."""
        return bool(self.cfg.motion_reach and self.cfg.motion_pick and not self.cfg.motion_per_pixel)

    def embed_condition(self, cond_ids: torch.Tensor, motion: torch.Tensor | None = None,
                        one_motion: bool | None = None) -> torch.Tensor:
        """(B, len(CONDITION_VOCAB)) ids from ``SceneSpec.condition_ids`` -> (B, width);
        (B, T, ...) ids (a prompt per frame) -> (B, T, width). A model that picks
        displacements (``carries_motion``) also gets the scene's motion (B, 2) from
        ``measure_motion`` and whether picks keep to it (``one_motion``; None: the card's)
        as three trailing numbers, and with ``scene_torus`` a fourth: whether the scene's
        objects leave the view (read from the ids). Recall needs the motion; without it
        others get (0, 0) and no restriction."""
        e = sum(emb(cond_ids[..., i]) for i, emb in enumerate(self.cond_embed))
        if not self.carries_motion:
            return e
        one = self.cfg.one_motion if one_motion is None else bool(one_motion)
        if motion is None:
            if self.cfg.recall or one_motion:  # asked for what cannot be done without it
                raise ValueError("this model recalls along or keeps to the scene's motion: pass "
                                 "embed_condition(ids, motion) with motion = measure_motion(the two "
                                 "given frames' tokens)")
            motion, one = torch.zeros(cond_ids.shape[0], 2), False
        m = motion.to(e.device, e.dtype).view(-1, *([1] * (e.dim() - 2)), 2)
        extra = torch.cat([m, torch.full_like(m[..., :1], float(one))], -1).expand(*e.shape[:-1], 3)
        if self.cfg.scene_torus:
            leaves = (cond_ids[..., EXITS_ID] > 0).to(e.device, e.dtype)[..., None]
            extra = torch.cat([extra, leaves], -1)
        return torch.cat([e, extra], -1)

    def encode_prompt(self, prompt: str):
        raise TypeError("the tiny model is conditioned on a scene: use embed_condition(ids)")

    def token_positions(self, frames: torch.Tensor):
        """frame, row, col (T * tokens_per_frame,) of every token of ``frames`` (T,)."""
        g = self.cfg.side
        n = frames.numel()
        frame = frames.view(-1, 1).expand(n, g * g).reshape(-1)
        row = torch.arange(g).repeat_interleave(g).repeat(n)
        col = torch.arange(g).repeat(g * n)
        return frame, row, col

    def block_causal_mask(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, N) bool: True where a token may attend (same or earlier chunk)."""
        chunk = torch.div(frames, self.cfg.chunk_frames, rounding_mode="floor")
        tok_chunk = chunk.repeat_interleave(self.cfg.tokens_per_frame)
        return tok_chunk[:, None] >= tok_chunk[None, :]

    # -- the network --------------------------------------------------------
    def recall_inputs(self, h, x, meta, motion, mask, cache_layer, cos, sin, write=False, open_sides=None):
        """The recall block's fixed heads (query, key, value, pre-RoPE, each (B, RECALL_HEADS,
        N, d)) and what recall reads for each token (a ``RecallRead``), from the cache before this call (generation) or from the clip's earlier frames
        (``mask``: whole-clip training). h: the stream entering the block (B, F, n, w)."""
        B, N = x.shape[:2]
        H = RECALL_HEADS
        trust = torch.sigmoid(self.recall_trust(h.reshape(B, N, -1)))
        values = self.recall.values(x, trust.to(x.dtype))
        queries = self.recall.queries(*meta, motion, open_sides).to(x.device)
        if mask is not None:
            read = self.recall.gather(meta, motion, values, mask, open_sides)
        elif write:  # the cache-filling pass: its output is not used, only its keys and values
            read = nothing_read(x, len(self.recall.lags(open_sides)))
        elif cache_layer is not None and cache_layer.size:
            read = self.recall.read_cache(cache_layer, queries, meta[0], motion, open_sides)  # made once
        else:  # nothing cached: nothing to recall
            read = nothing_read(x, len(self.recall.lags(open_sides)))
        # the heads' own query (what hooks and policies see, and what the block's heads 0 and
        # 1 attend with): the mean of RECALL_LAGS' queries, so a round trip's lags, which
        # a batch has where any of its scenes leaves the view, change no other scene's
        q_pre = apply_rotation(queries[:, :len(RECALL_LAGS)].mean(1), cos, -sin)[:, None].expand(-1, H, -1, -1)
        return (q_pre, self.recall.key.to(x.device).expand(B, H, N, -1), values), read

    def forward(self, x, t, frames, cond, prev: torch.Tensor | None = None,
                cache: KVCache | None = None, write: bool = False,
                mask: torch.Tensor | None = None, phase: str = "train", step: int = -1,
                motion_index: torch.Tensor | None = None, return_motion_logits: bool = False,
                recall_target: torch.Tensor | None = None):
        """Clean-frame (or velocity, ``cfg.prediction``) prediction.

        x: (B, T * tokens_per_frame, patch_dim) noisy tokens of frames ``frames``
        t: (B, T) noise level of each frame, 1 = pure noise, 0 = clean
        frames: (T,) long absolute frame indices (they set the temporal RoPE)
        cond: (B, width) from ``embed_condition``, or (B, T, width): a prompt per frame
        prev: tokens like ``x`` of each frame's previous frame (ignored for frame 0,
        which has none); None = no previous frame for any token
        cache: read before this call's own keys; extended with them when ``write``
        mask: (N, N) bool block-causal mask for whole-clip training (no cache)
        motion_index: (B, N) displacement of each token under ``motion_pick`` (training
        passes the true one), (B, N, patch^2) one per pixel with ``motion_per_pixel``;
        None = the most likely. ``return_motion_logits`` also returns the motion head's
        logits (B, N, (2r+1)^2), or (B, N, patch^2, (2r+1)^2) per pixel; with ``recall`` one
        more, last: recall's (index (2r+1)^2 picks it).
        recall_target: training's true tokens like ``x``: where recall gives a token (error
        under RECALL_GIVES) better than its ``motion_index`` displacement, the pick is
        recall (``recall_used``).
        """
        B, N, _ = x.shape
        n_tok = self.cfg.tokens_per_frame
        ctx = self.hook_ctx
        dev = x.device
        meta = self.token_positions(frames.cpu())  # provenance on the host; the cache moves it
        ctx.token_frame, ctx.phase, ctx.step = meta[0], phase, step
        ctx.t = float(t.flatten()[0])  # before the move: reading a GPU tensor waits for it
        t = t.to(dev)
        cos, sin = (c.to(dev) for c in self.rope.cos_sin(*meta))  # float64 angles on the host
        cond, motion, one_motion, open_sides = self.split_condition(cond)  # the motion rides on it
        if self.cfg.recall and motion is None:
            raise ValueError("this model recalls along the scene's motion: its condition comes from "
                             "embed_condition(ids, motion)")
        per_frame = cond[:, None] if cond.dim() == 2 else cond  # one prompt, or one per frame
        e = self.time_embed(timestep_embedding(t, self.cfg.width)) + per_frame  # (B, T, w)
        mod = self.time_proj(e).view(B, -1, 6, self.cfg.width)
        h = self.patch_embed(x)
        first = None if prev is None else (meta[0] == 0).to(dev)[None, :, None]  # no previous frame
        if self.cfg.previous_frame_input:
            if prev is None:
                h = h + self.no_prev
            else:
                h = h + torch.where(first, self.no_prev, self.prev_embed(self.neighbourhood(prev, open_sides)))
        moved, memory = None, None
        if self.cfg.motion_reach and prev is not None:
            moved = self.displaced(prev.masked_fill(first, 0), open_sides)  # frame 0: nothing to move
            match = self.match(moved, x) if self.cfg.motion_match or self.cfg.motion_memory else None
            if self.cfg.motion_match:
                h = h + torch.where(first, 0.0, self.match_embed(match))
            if self.cfg.motion_memory:
                memory = self.memory_inputs(match, first, t)
        h = h.view(B, -1, n_tok, self.cfg.width)  # by frame, for the per-frame modulation
        if self.cfg.patch_position:
            h = h + POSITION_GAIN * self.position_embed
        recalled = None
        for i, block in enumerate(self.blocks):
            fixed = memory if i == 0 else None
            if self.cfg.recall and i == len(self.blocks) - 1:
                fixed, recalled = self.recall_inputs(h, x, meta, motion, mask,
                                                     cache[i] if cache is not None else None, cos, sin,
                                                     write, open_sides)
            h = block(h, mod, cos, sin, mask=mask, write=write, meta=meta,
                      cache_layer=cache[i] if cache is not None else None, memory=fixed)
        shift, scale = (e[:, :, None] + self.head_mod)[:, :, :, None].unbind(2)
        feat = self.head_norm(h) * (1 + scale) + shift
        out = self.head(feat).view(B, N, -1)
        if self.cfg.predict_change and prev is not None:
            base = prev.masked_fill(first, 0)  # frame 0 has nothing to change from
            if self.cfg.motion_reach:  # the previous frame moved, patch by patch (or pixel by pixel)
                K = moved.shape[2]
                logits = self.motion(feat).view(B, N, self.choices_per_token, K)
                if memory is not None:  # the motion read from the cache, as evidence (per patch)
                    read = self.blocks[0].attn.memory_read[..., :K]
                    evidence = K * read.float()
                    logits = logits + self.memory_scale * evidence[:, :, None]
                    if self.cfg.motion_refine:
                        logits = logits + self.motion_refine(
                            torch.cat([feat.reshape(B, N, -1), evidence], -1))[:, :, None]
                if not self.cfg.motion_per_pixel:
                    logits = logits[:, :, 0]
                candidates, recall_bias = moved, None
                if recalled is not None:  # recall: one more choice, after the displacements
                    self.recall_mean = recalled.pixels  # the trust-weighted mean (training teaches the trust on it)
                    if self.cfg.recall_lag_pick:  # its pixels: the mean over lags, or one lag's
                        recalled = self.pick_recall_lag(feat, moved[:, :, K // 2], recalled, recall_target)
                    pixels, found = recalled.pixels, recalled.found
                    choice = torch.cat([feat.reshape(B, N, -1), pixels.to(feat.dtype),
                                        moved[:, :, K // 2].to(feat.dtype), found[..., None].to(feat.dtype)], -1)
                    # where recall found nothing (a window that evicted the frames, the run's start)
                    # it is no choice: what it read is no content
                    recall_logit = self.recall_choice(choice).to(logits.dtype)
                    recall_logit = recall_logit.masked_fill(found[..., None] < RECALL_FOUND, -1e4)
                    # sampling adjusts the rare choice's prior where at least two frames were
                    # found along the motion (one frame found, as in a short window, is most
                    # often the pillar read as if it moved)
                    seen = found[..., None] >= (RECALL_BIAS_LAGS - 0.5) / len(RECALL_LAGS)
                    recall_bias = self.cfg.recall_bias * seen
                    logits = torch.cat([logits, recall_logit], -1)
                    candidates = torch.cat([moved, pixels[:, :, None].to(moved.dtype)], 2)
                    self.recall_pixels = pixels
                    if recall_target is not None and motion_index is not None:
                        err = lambda a: (a.float() - recall_target.float()).pow(2).mean(-1)
                        taught = moved.gather(2, motion_index[:, :, None, None].expand(-1, -1, 1, moved.shape[-1]))
                        # recall gives the patch (all but a stray pixel), better than the displacement
                        self.recall_used = ((err(pixels) < RECALL_GIVES) & (found >= RECALL_FOUND)
                                            & (err(pixels) < err(taught[:, :, 0]) - 1e-3))
                        motion_index = torch.where(self.recall_used, K, motion_index)
                if motion_index is None:
                    logits = self.sampling_logits(logits, recall_bias, motion, one_motion, moved)
                weights = self.hook_motion(logits.softmax(-1))
                if self.cfg.motion_pick:  # one displacement per patch, or per pixel (P of them)
                    index = weights.argmax(-1) if motion_index is None else motion_index
                    pixels = candidates.view(B, N, candidates.shape[2], self.choices_per_token, -1)
                    index = index.reshape(B, N, 1, -1, 1).expand(-1, -1, -1, -1, pixels.shape[-1])
                    base = pixels.gather(2, index)[:, :, 0].reshape(B, N, -1)
                    if self.cfg.pixel_moves and motion_index is None:
                        base = self.world_pixels(feat, moved, recalled, motion, base, one_motion)
                    elif self.cfg.pixel_moves:  # training: the pixels correct the pick sampling makes
                        own = self.sampling_logits(logits.detach(), recall_bias, motion, one_motion, moved)
                        picked = candidates.gather(2, own.argmax(-1)[..., None, None].expand(
                            -1, -1, 1, candidates.shape[-1]))[:, :, 0]
                        base = self.world_pixels(feat, moved, recalled, motion, picked, one_motion,
                                                 truth=recall_target, taught=base)
                else:
                    base = torch.einsum("bnk,bnkd->bnd", weights, moved)
            out = out + base
        if return_motion_logits:
            return out, logits if self.cfg.motion_reach and prev is not None else None
        return out

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.layers, self.cfg.tokens_per_frame, self.cfg.grid)
