"""Wan2.1 checkpoints of the Self-Forcing family, driven block-causally over ffviz's cache.

``WanCausalModel`` wraps diffusers' ``WanTransformer3DModel`` as a ``VideoModel``
(``ffviz.models``: ``cfg``, ``patchify``/``unpatchify``, ``decode``, ``new_cache``,
``rope``, ``forward(x, t, frames, cond, cache, write, mask, phase, step)`` and the
hook points ``blocks.{i}.attn.hook_{q,k}_{pre,post}``), so ``ffviz.generate``, the
cache, the policies, the recorder and the UI run it unchanged.

How the pieces map:
  * A "frame" is a LATENT frame (16 channels, 1/8 of the pixel size; the VAE
    turns latent frame 0 into 1 video frame and every later one into 4). It is
    the unit of temporal RoPE, of chunks (3 latent frames for Self-Forcing) and
    of the cache budget. 480x832 video -> 60x104 latents -> 30x52 = 1,560 tokens.
  * Tokens: diffusers' 1x2x2 patch embedding (a Conv3d) applied as a linear map
    on patchified latents, features ordered (dy, dx, channel); ``proj_out``
    produces the same order, so the model predicts velocities in token space.
  * Noise levels: ffviz's t in [0, 1] is Wan's timestep t * 1000; every latent
    frame gets its own time embedding and modulation (as Self-Forcing's causal
    Wan does), and the velocity target is Wan's flow ``noise - clean``.
  * Self-attention runs through ``CausalWanAttnProcessor`` (a diffusers
    attention processor): q/k RMSNorm over all heads, head split, hooks on
    pre-RoPE q/k, ffviz's ``Rope3D`` at the absolute (frame, row, col) of each
    token (the frame offset of block-causal generation), hooks on post-RoPE q/k,
    then attention over [cache keys, own keys] with the cache's log(mass) bias,
    and a cache write on the clean pass. Cross-attention to the text keeps
    diffusers' own processor.
  * RoPE: diffusers' Wan (like original Wan's complex form) rotates INTERLEAVED
    pairs (x[2i], x[2i+1]) and splits the head dim as ffviz's ``wan_split``
    (44/42/42 for d=128) with the same frequencies, so ``Rope3D`` reproduces it
    exactly (tests/test_wan.py checks it against diffusers' forward).
  * Text: umT5-XXL embeddings (512 x 4096, zero-padded after the prompt) from a
    local ``text_encoder/`` + ``tokenizer/``. For ``wan:tiny-random`` the
    "embedding" is deterministic noise seeded by the prompt's SHA-256, so equal
    prompts give equal videos and different prompts different ones.
  * Decoding: diffusers' ``AutoencoderKLWan`` from a local ``vae/``, run as a
    stream (its causal conv cache is kept between chunks, so decoding chunk by
    chunk equals decoding the whole video); without a VAE (tiny-random) a preview
    shows latent channels 0-2 scaled to [0, 255] at latent resolution.

There is no scene grammar: ``has_scenes = False`` tells ``generate``/``run``
to take the prompt as free text, start from noise (text-to-video, no given
frames) and skip the scene consistency metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffviz import kernels
from ffviz.cache import KVCache
from ffviz.hooks import HookContext, HookPoint
from ffviz.models import ModelError
from ffviz.models.rope import Rope3D, apply_rotation, wan_split
from ffviz.models.wan_convert import convert_state_dict, pick_generator
from ffviz.models.wan_lora import LoraError, merge_lora, pick_lora, split_peft_model

TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"  # the full-size architecture, random weights: speed on a GPU
BASE_ENV = "FFVIZ_WAN_BASE"  # local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (text encoder, VAE)
MIN_GPU_GIB = 22  # transformer 2.8 GB + umT5-XXL 11 GB + VAE + a few-frame cache (README, "Real checkpoints")


class WanLoadError(ModelError):
    """A Wan model that cannot be built or loaded (the message says why and what to do)."""


def _diffusers():
    try:
        from diffusers import WanTransformer3DModel  # noqa: F401
    except Exception as e:  # ImportError, or a diffusers too old to have Wan
        raise WanLoadError("the Wan path needs diffusers with WanTransformer3DModel "
                           f"(pip install 'diffusers>=0.35' 'transformers>=4.51'): {e}") from None
    import diffusers
    return diffusers


@dataclasses.dataclass
class WanConfig:
    """Geometry and sampling defaults. The defaults are Wan2.1-T2V-1.3B at 480x832
    as Self-Forcing runs it (chunks of 3 latent frames, 4 steps, shift 5)."""
    layers: int = 30
    heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    latent_channels: int = 16
    latent_height: int = 60  # 480 / 8
    latent_width: int = 104  # 832 / 8
    chunk_frames: int = 3
    given_frames: int = 0  # text-to-video: the first chunk starts from noise
    sample_steps: int = 4
    shift: float = 5.0
    fps: int = 16  # Wan2.1's output frame rate (the video writer reads it)
    context_noise: float = 0.0
    rope_theta: float = 10000.0
    eps: float = 1e-6
    cache_dtype: str = "float32"  # keys/values in the cache (policies compute in float32)
    prediction: str = "v"  # the transformer predicts the flow velocity
    snap: bool = False  # no scene, no palette to snap to

    def __post_init__(self):
        wan_split(self.head_dim)  # even and >= 6
        if self.latent_height % 2 or self.latent_width % 2:
            raise ValueError(f"latent size must be even (1x2x2 patches), got "
                             f"{self.latent_height}x{self.latent_width}")

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def grid(self) -> tuple[int, int]:
        return self.latent_height // 2, self.latent_width // 2

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return 4 * self.latent_channels


def tiny_random_config(**kw) -> WanConfig:
    """A Wan of a few thousand parameters for tests and CPU demos: 2 layers,
    2 heads of dim 24 (RoPE 8/8/8), 8x8 latents -> 4x4 = 16 tokens per frame."""
    base = dict(layers=2, heads=2, head_dim=24, ffn_dim=96, text_dim=32, text_len=8, freq_dim=32,
                latent_height=8, latent_width=8, chunk_frames=3, sample_steps=4, shift=5.0)
    return WanConfig(**{**base, **kw})


class AttnHooks(nn.Module):
    """The four hook points of one self-attention layer (tensors (B, H, N, d))."""

    def __init__(self, ctx: HookContext):
        super().__init__()
        self.hook_q_pre, self.hook_q_post = HookPoint(ctx), HookPoint(ctx)
        self.hook_k_pre, self.hook_k_post = HookPoint(ctx), HookPoint(ctx)


class HookSite(nn.Module):
    """``blocks.{i}`` of the adapter: holds ``attn`` (the hook points) only; the
    weights stay in ``transformer.blocks.{i}``."""

    def __init__(self, ctx: HookContext):
        super().__init__()
        self.attn = AttnHooks(ctx)


@dataclasses.dataclass
class _CallState:
    """What the processors of one forward call share."""
    cache: KVCache | None = None
    write: bool = False
    mask: torch.Tensor | None = None  # (N, N) bool, True = may attend
    meta: tuple | None = None  # frame, row, col (N,)


class CausalWanAttnProcessor:
    """Self-attention of one Wan block over ffviz's cache (a diffusers attention
    processor: ``attn.set_processor(...)``; ``attn`` is diffusers' ``WanAttention``).

    ``rotary_emb`` is ffviz's (cos, sin), each (N, d/2), for the call's tokens.
    """

    def __init__(self, layer: int, hooks: AttnHooks, state: _CallState, cache_dtype: torch.dtype):
        self.layer, self.hooks, self.state, self.cache_dtype = layer, hooks, state, cache_dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("CausalWanAttnProcessor is for self-attention only")
        B, N, _ = hidden_states.shape
        H = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states))  # RMSNorm over all heads, before the split
        k = attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        split = lambda t: t.unflatten(2, (H, -1)).transpose(1, 2)  # (B, H, N, d)
        q, k, v = split(q), split(k), split(v)
        cos, sin = rotary_emb
        h = self.hooks
        rot = lambda t: apply_rotation(t.float(), cos, sin).to(t.dtype)
        q = h.hook_q_post(rot(h.hook_q_pre(q)))
        k = h.hook_k_post(rot(h.hook_k_pre(k)))
        st = self.state
        layer = st.cache[self.layer] if st.cache is not None else None
        bias = None
        if st.mask is not None:
            bias = torch.zeros(N, N, dtype=q.dtype, device=q.device).masked_fill(
                ~st.mask.to(q.device), float("-inf"))
        if layer is not None and layer.size:
            keys = torch.cat([layer.k.to(q.dtype), k], 2)
            vals = torch.cat([layer.v.to(v.dtype), v], 2)
            log_mass = layer.bias()  # (B, H, 1, Nc) or None
            if bias is not None:  # a mask and a cache together: the plain SDPA path
                past = (log_mass.to(q.dtype).expand(-1, -1, N, -1) if log_mass is not None
                        else q.new_zeros(B, H, N, layer.size))
                bias = torch.cat([past, bias.expand(B, H, N, N)], -1)
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=bias)
            else:  # the log-mass attention dispatch (SDPA unless FFVIZ_KERNELS=triton)
                if log_mass is not None:
                    log_mass = torch.cat([log_mass[:, :, 0].to(q.dtype), q.new_zeros(B, H, N)], -1)
                y = kernels.attention(q, keys, vals, log_mass)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if st.write:
            frame, row, col = st.meta
            layer.append(k.to(self.cache_dtype), v.to(self.cache_dtype), frame.to(k.device),
                         row.to(k.device), col.to(k.device))
        y = y.transpose(1, 2).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](y))


class WanCausalModel(nn.Module):
    """Wan2.1 transformer with ffviz's model interface (see the module docstring).

    transformer: a diffusers ``WanTransformer3DModel`` whose config matches ``cfg``
    text_encoder: callable prompt -> (1, text_len, text_dim), or None (prompt-seeded noise)
    vae: a diffusers ``AutoencoderKLWan``, or None (latent preview)
    """

    has_scenes = False  # free-text prompts, text-to-video, no scene metrics
    clamp_tokens = False  # tokens are normalised latents, not pixels in [-1, 1]
    name: str  # "wan:..." as loaded (``load_wan``)

    def __init__(self, cfg: WanConfig, transformer=None, text_encoder=None, vae=None, name="wan"):
        super().__init__()
        diffusers = _diffusers()
        self.cfg, self.name = cfg, name
        if transformer is None:
            transformer = diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                num_layers=cfg.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=cfg.eps)
        self.transformer = transformer
        self.hook_ctx = HookContext()
        self.blocks = nn.ModuleList(HookSite(self.hook_ctx) for _ in range(cfg.layers))
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta)
        self._state = _CallState()
        cache_dtype = getattr(torch, cfg.cache_dtype)
        for i, block in enumerate(transformer.blocks):
            block.attn1.set_processor(CausalWanAttnProcessor(i, self.blocks[i].attn, self._state,
                                                             cache_dtype))
        self.text_encoder = text_encoder
        self.vae = None if vae is None else StreamingVAEDecoder(vae)

    @property
    def fps(self) -> int:
        return self.cfg.fps

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    # -- latents <-> tokens -------------------------------------------------
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) latents -> (B, T * tokens_per_frame, 4 C), features (dy, dx, c)."""
        B, C, T, h, w = latents.shape
        x = latents.reshape(B, C, T, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1)
        return x.reshape(B, T * (h // 2) * (w // 2), 4 * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``: (B, T * n, 4 C) -> (B, C, T, h, w)."""
        B = x.shape[0]
        (gh, gw), C = self.cfg.grid, self.cfg.latent_channels
        x = x.reshape(B, -1, gh, gw, 2, 2, C).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(B, C, -1, 2 * gh, 2 * gw)

    # -- conditioning ---------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings (1, text_len, text_dim) for ``forward``'s ``cond``."""
        if self.text_encoder is not None:
            return self.text_encoder(prompt)
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, self.cfg.text_len, self.cfg.text_dim, generator=g)

    def embed_condition(self, cond_ids):
        raise TypeError("a Wan model is conditioned on text: use encode_prompt(prompt)")

    def token_positions(self, frames: torch.Tensor):
        """frame, row, col (T * tokens_per_frame,) of every token of ``frames`` (T,)."""
        gh, gw = self.cfg.grid
        n = frames.numel()
        frame = frames.cpu().view(-1, 1).expand(n, gh * gw).reshape(-1)
        row = torch.arange(gh).repeat_interleave(gw).repeat(n)
        col = torch.arange(gw).repeat(gh * n)
        return frame, row, col

    def block_causal_mask(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, N) bool: True where a token may attend (same or earlier chunk)."""
        chunk = torch.div(frames.cpu(), self.cfg.chunk_frames, rounding_mode="floor")
        tok_chunk = chunk.repeat_interleave(self.cfg.tokens_per_frame)
        return tok_chunk[:, None] >= tok_chunk[None, :]

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.layers, self.cfg.tokens_per_frame, self.cfg.grid)

    # -- the network ------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x, t, frames, cond, prev=None, cache: KVCache | None = None,
                write: bool = False, mask: torch.Tensor | None = None, phase: str = "train",
                step: int = -1):
        """Velocity prediction, as ``TinyVideoModel.forward``.

        x: (B, T * n, patch_dim) noisy latent tokens of latent frames ``frames`` (T,)
        t: (B, T) noise level per frame in [0, 1]; cond: (B, text_len, text_dim)
        prev: ignored (Wan has no previous-frame input: its past lives in the cache alone)
        Returns (B, T * n, patch_dim) float32 on x's device.
        """
        tr, cfg = self.transformer, self.cfg
        dev, dt = self.device, self.dtype
        B, N, _ = x.shape
        T, n = frames.numel(), cfg.tokens_per_frame
        if N != T * n:
            raise ValueError(f"{N} tokens for {T} frames of {n}")
        meta = self.token_positions(frames)
        ctx = self.hook_ctx
        ctx.token_frame, ctx.phase, ctx.step = meta[0], phase, step
        ctx.t = float(t.flatten()[0])
        cos, sin = (a.to(dev) for a in self.rope.cos_sin(*meta))
        if write and cache is None:
            raise ValueError("write=True needs a cache")
        self._state.cache, self._state.write, self._state.mask, self._state.meta = (
            cache, write, mask, meta)
        try:
            w = tr.patch_embedding.weight  # (width, C, 1, 2, 2) -> (width, 4C) in (dy, dx, c) order
            h = F.linear(x.to(dev, dt), w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1),
                         tr.patch_embedding.bias)
            emb = tr.condition_embedder
            ts = emb.timesteps_proj((t.to(dev).float() * 1000).flatten())  # (B*T, freq_dim)
            temb = emb.time_embedder(ts.to(next(emb.time_embedder.parameters()).dtype))
            temb = temb.to(dt).view(B, T, -1)  # (B, T, width)
            mod = emb.time_proj(emb.act_fn(temb)).view(B, T, 6, -1).repeat_interleave(n, 1)
            text = emb.text_embedder(cond.to(dev, dt))
            for block in tr.blocks:
                h = block(h, text, mod, (cos, sin))  # per-token modulation (B, N, 6, width)
            shift, scale = (tr.scale_shift_table.unsqueeze(0)
                            + temb.repeat_interleave(n, 1).unsqueeze(2)).unbind(2)
            h = (tr.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
            return tr.proj_out(h).float().to(x.device)
        finally:
            self._state.cache, self._state.mask, self._state.write = None, None, False

    # -- frames for people ----------------------------------------------------------
    def decode(self, tokens: torch.Tensor, frames: torch.Tensor | None = None) -> np.ndarray:
        """uint8 video frames (T', H, W, 3) of batch element 0 of ``tokens``.

        With a VAE, decoding streams: a chunk whose first frame is 0 (or
        ``frames`` None) starts a new video, later chunks continue it
        (T' = 1 + 4 (T - 1) for the first chunk, 4 T after). Without one, a
        preview: latent channels 0-2 at latent resolution, T' = T.
        """
        lat = self.unpatchify(tokens[:1].float())  # (1, C, T, h, w)
        if self.vae is not None:
            start = frames is None or int(frames.flatten()[0]) == 0
            video = self.vae.decode(lat.to(self.device), restart=start)  # (1, 3, T', H, W) [-1, 1]
        else:
            video = (lat[:, :3] / 2).clamp(-1, 1)
        img = video[0].permute(1, 2, 3, 0).float().cpu()
        return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


class StreamingVAEDecoder:
    """diffusers' ``AutoencoderKLWan`` decoding chunk by chunk.

    Wan's VAE decoder is causal in time and caches the last frames of every
    causal conv (``_feat_map``); ``AutoencoderKLWan._decode`` clears that cache
    per call. Here it is kept between calls, so decoding latent chunks in order
    equals decoding the whole latent video at once. Latents are the normalised
    ones the transformer sees: ``z * std + mean`` first (the VAE's config).
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, restart: bool) -> torch.Tensor:
        vae = self.vae
        p = next(vae.parameters())
        z = latents.to(p.device, torch.float32) * self.std.to(p.device) + self.mean.to(p.device)
        if restart:
            vae.clear_cache()
            self._first = True
        x = vae.post_quant_conv(z.to(p.dtype))
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            kw = {"first_chunk": True} if self._first else {}
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map,
                                    feat_idx=vae._conv_idx, **kw))
            self._first = False
        return torch.cat(outs, 2).clamp(-1, 1)


class UMT5Encoder:
    """umT5-XXL text embeddings as Wan uses them: tokenise to ``text_len``,
    encode, zero every position after the prompt's tokens."""

    def __init__(self, text_encoder_dir: Path, tokenizer_dir: Path, text_len: int, device, dtype):
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except Exception as e:
            raise WanLoadError(f"the Wan text encoder needs transformers (pip install "
                               f"'transformers>=4.51'): {e}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.model = UMT5EncoderModel.from_pretrained(str(text_encoder_dir), dtype=dtype).to(device).eval()
        self.text_len, self.device = text_len, device
        # runs share one encoder (hooks.run_copy); a fast tokenizer is not safe across threads
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        with self._lock:
            return self._encode(prompt)

    def _encode(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer([prompt], padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.model(ids, mask).last_hidden_state
        return out * mask.unsqueeze(-1).to(out.dtype)


# -- building and loading ----------------------------------------------------------------------

def build_tiny_random(seed: int = 0, **cfg) -> WanCausalModel:
    """``wan:tiny-random``: a random-weight Wan (every weight random, zero-init
    ones included, so every path carries signal) on CPU in float32."""
    torch.manual_seed(seed)
    model = WanCausalModel(tiny_random_config(**cfg), name="wan:tiny-random")
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


def build_full_random(device: str | None = None, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> WanCausalModel:
    """``wan:full-random``: Wan2.1-1.3B's architecture (``WanConfig()``) with diffusers'
    random initialisation, no text encoder or VAE: what a real checkpoint costs per
    step, without its files. Needs a CUDA GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise WanLoadError("wan:full-random is the full-size 1.3B architecture: it needs a CUDA GPU "
                           "(use wan:tiny-random on CPU)")
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanCausalModel(WanConfig(), name="wan:full-random")
    return model.to(device=device, dtype=dtype).eval()


def read_checkpoint(path) -> dict:
    """The raw object in a checkpoint file (.pt/.pth/.ckpt via torch.load, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise WanLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        try:  # mmap: a 5 GB checkpoint is not read into memory twice
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WanLoadError(f"cannot read checkpoint {path}: {e}") from None


def load_generator_weights(model: WanCausalModel, checkpoint, prefer_ema: bool = True,
                           lora=None, lora_alpha: float | None = None) -> str:
    """Load a Self-Forcing-family checkpoint (a dict as read from the file, or its
    path) into ``model.transformer``. Every key must be used and every weight
    filled: otherwise ``WanLoadError`` names exactly the keys missing (diffusers
    names) and unexpected (checkpoint names). ``lora``: a LoRA file (dict or path,
    e.g. LongLive's ``lora.pt``) merged into the generator first (``wan_lora``); a
    checkpoint saved from a peft-wrapped model carries its LoRA inside and is merged
    too. Returns which entry was used (and what was merged)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    try:
        state, where = pick_generator(checkpoint, prefer_ema)
        state, inner = split_peft_model(state)
        adapters = [(inner, "its own LoRA")] if inner else []
        if lora is not None:
            lora_state, lora_where = pick_lora(lora if isinstance(lora, dict) else read_checkpoint(lora))
            adapters.append((lora_state, f"LoRA ({lora_where})"))
        for adapter, label in adapters:
            state, n = merge_lora(state, adapter, lora_alpha)
            where += f" + {label}, {n} modules merged"
        converted, unknown = convert_state_dict(state)
    except LoraError as e:
        raise WanLoadError(f"cannot merge the LoRA: {e}") from None
    except ValueError as e:
        raise WanLoadError(f"wrong checkpoint: {e}") from None
    expected = model.transformer.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = list(unknown) + [k for k in converted if k not in expected]
    wrong_shape = [f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
                   for k, v in converted.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys)}")
        raise WanLoadError(f"wrong checkpoint for a {model.cfg.layers}-layer Wan of width "
                           f"{model.cfg.width} ({where}): " + "; ".join(parts))
    p = next(model.transformer.parameters())
    model.transformer.load_state_dict({k: v.to(p.device, p.dtype) for k, v in converted.items()})
    return where


def _base_dir(ckpt: Path, base) -> Path:
    base = base or os.environ.get(BASE_ENV)
    cand = [Path(base)] if base else [ckpt.parent, ckpt.parent / "Wan2.1-T2V-1.3B-Diffusers"]
    for c in cand:
        if (c / "vae").is_dir() and (c / "text_encoder").is_dir() and (c / "tokenizer").is_dir():
            return c
    where = str(cand[0]) if base else f"{cand[0]} or {cand[1]}"
    raise WanLoadError(f"Wan base files not found in {where}: need the folders text_encoder/, "
                       f"tokenizer/ and vae/ of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; set {BASE_ENV} "
                       "to the folder that holds them")


def load_wan(spec: str, base: str | None = None, device: str | None = None,
             dtype: torch.dtype = torch.bfloat16, prefer_ema: bool | None = None,
             min_gpu_gib: float = MIN_GPU_GIB, cfg: WanConfig | None = None,
             allow_cpu: bool = False, lora_alpha: float | None = None) -> WanCausalModel:
    """The model behind ``--model wan:SPEC``.

    ``tiny-random``: ``build_tiny_random()`` on CPU. Otherwise SPEC is the path of
    a Self-Forcing-family checkpoint (.pt/.safetensors), or ``BASE+LORA``: a base
    checkpoint and a LoRA file merged into it (LongLive's ``longlive_base.pt`` and
    ``lora.pt``; scale alpha / r, alpha = ``lora_alpha`` or r). ``prefer_ema``: which
    generator entry is read first; by default ``generator_ema``, but ``generator`` for
    BASE+LORA (LongLive's inference config reads the non-EMA generator, use_ema: false,
    and its LoRA belongs to that one); the text encoder,
    tokenizer and VAE come from ``base`` (or $FFVIZ_WAN_BASE, or the checkpoint's
    folder). A full-size model needs a CUDA GPU with ``min_gpu_gib`` GiB.
    ``cfg`` and ``allow_cpu`` exist for tests (a tiny Wan through the same path).
    """
    if spec == TINY_RANDOM:
        return build_tiny_random()
    if spec == FULL_RANDOM:
        return build_full_random(device, dtype)
    ckpt, lora = Path(spec).expanduser(), None
    if "+" in spec and not ckpt.is_file():  # BASE+LORA (a path with a '+' of its own still works)
        base_spec, lora_spec = spec.rsplit("+", 1)
        ckpt, lora = Path(base_spec).expanduser(), Path(lora_spec).expanduser()
        if not lora.is_file():
            raise WanLoadError(f"LoRA file not found: {lora} (wan:BASE+LORA merges LORA into BASE)")
    if not ckpt.is_file():
        raise WanLoadError(f"checkpoint not found: {ckpt} (give --model wan:PATH to a "
                           "Self-Forcing-family .pt/.safetensors file, wan:BASE+LORA for a "
                           "LoRA-only release like LongLive, or wan:tiny-random)")
    base_dir = _base_dir(ckpt, base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not allow_cpu:
        if not str(device).startswith("cuda"):
            raise WanLoadError("no GPU: a full-size Wan2.1-1.3B model needs a CUDA GPU with at "
                               f"least {min_gpu_gib} GiB (use wan:tiny-random to try the path on CPU)")
        if not torch.cuda.is_available():
            raise WanLoadError(f"device {device} asked for, but torch sees no CUDA GPU")
        gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 30
        if gib < min_gpu_gib:
            raise WanLoadError(f"GPU has {gib:.0f} GiB; a full-size Wan2.1-1.3B run needs about "
                               f"{min_gpu_gib} GiB")
    diffusers = _diffusers()
    cfg = cfg or WanConfig()
    with torch.device(device):
        model = WanCausalModel(cfg, name=f"wan:{ckpt.name}" + (f"+{lora.name}" if lora else ""))
    model.to(device=device, dtype=dtype)
    if prefer_ema is None:
        prefer_ema = lora is None
    load_generator_weights(model, ckpt, prefer_ema, lora=lora, lora_alpha=lora_alpha)
    try:
        vae = diffusers.AutoencoderKLWan.from_pretrained(str(base_dir / "vae"), torch_dtype=torch.float32)
        model.vae = StreamingVAEDecoder(vae.to(device).eval())
        model.text_encoder = UMT5Encoder(base_dir / "text_encoder", base_dir / "tokenizer",
                                         cfg.text_len, device, dtype)
    except WanLoadError:
        raise
    except Exception as e:  # missing or foreign files in the base folder
        raise WanLoadError(f"cannot load the Wan text encoder / VAE from {base_dir}: {e}") from None
    return model.eval()

