"""The few-step flow-matching sampler shared by generation and training rollouts,
and the rollout itself (a clip run as generation runs it, used by training and
the showcase's teacher-forced diagnostic).

Flow matching: x_t = (1 - t) x_0 + t noise and v = noise - x_0, so an Euler step
from t to t' is x += (t' - t) v and the last step lands on x_0. A model that
predicts the clean frame (``cfg.prediction == "x0"``) gives v = (x_t - x0) / t.

Palette snapping (``snap_tokens``): each generated frame of the embedded model is
snapped to its scene's colours before it enters the cache, so a small error
snaps back instead of compounding (as DIAMOND rounds frames to 8 bits).
"""
from __future__ import annotations

import numpy as np
import torch

from ffviz.cache import KVCache
from ffviz.policies.base import keep_newest

TRAIN_SEED_BASE = 1 << 20  # training scene seeds are >= this; user and eval seeds stay below


def shifted(u, shift: float):
    """Noise levels u in [0, 1] shifted towards high noise as in Wan/SD3:
    s u / (1 + (s - 1) u); numpy arrays or tensors (sampling and training share it)."""
    return shift * u / (1 + (shift - 1) * u)


def sigma_schedule(steps: int, shift: float) -> list[float]:
    """Noise levels from 1 to 0 for ``steps`` Euler steps, shifted (``shifted``)."""
    return shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


def velocity(model, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The flow velocity from a model output at level ``t``."""
    if model.cfg.prediction == "x0":
        return (x - out) / max(t, 1e-6)
    return out


@torch.no_grad()
def denoise_chunk(model, cache: KVCache, frames: torch.Tensor, cond: torch.Tensor,
                  noise: torch.Tensor, steps: int, shift: float,
                  prev: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise one chunk of frames ``frames`` (T,) from ``noise`` (B, T*n, patch_dim),
    reading the cache (not writing it). ``prev``: the previous frame's tokens, for a
    model with a previous-frame input. Returns clean tokens, same shape."""
    x = noise
    ts = sigma_schedule(steps, shift)
    model.hook_ctx.steps = steps  # lets hooks tell the last denoising step
    B, T = noise.shape[0], frames.numel()
    if prev is not None and prev.shape[1] != noise.shape[1]:
        # a chunk of several frames: each sees the newest frame before the chunk
        prev = prev.repeat(1, noise.shape[1] // prev.shape[1], 1)
    for i in range(steps):
        t = torch.full((B, T), ts[i], device=noise.device)
        out = model(x, t, frames, cond, prev=prev, cache=cache, phase="denoise", step=i)
        if ts[i + 1] == 0 and model.cfg.prediction == "x0":
            x = out  # the last step lands on the prediction itself
        else:
            x = x + (ts[i + 1] - ts[i]) * velocity(model, out, x, ts[i])
    return x


@torch.no_grad()
def fill_cache(model, cache: KVCache, x0: torch.Tensor, frames: torch.Tensor,
               cond: torch.Tensor, level: float, generator: torch.Generator | None = None,
               prev: torch.Tensor | None = None) -> None:
    """Run the finished chunk once more at noise ``level`` to write its keys and values."""
    x = x0
    if level > 0:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = (1 - level) * x0 + level * noise
    t = torch.full((x0.shape[0], frames.numel()), float(level), device=x0.device)
    model(x, t, frames, cond, prev=prev, cache=cache, write=True, phase="cache")


def previous_tokens(last: torch.Tensor | None, chunk: torch.Tensor, tokens_per_frame: int):
    """Each frame's previous frame for a chunk's cache pass: ``last`` (the frame before
    the chunk, tokens (B, n, d), or None before frame 0) then the chunk's own frames
    but its newest. Tokens (B, T*n, d) like ``chunk``."""
    n = tokens_per_frame
    head = torch.zeros_like(chunk[:, :n]) if last is None else last
    return torch.cat([head, chunk[:, :-n]], 1)


def snap_pixels(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Each pixel (B, ..., 3) replaced by its nearest colour of ``palette`` (B, P, 3)
    (same scale as the pixels)."""
    B = pixels.shape[0]
    flat = pixels.reshape(B, -1, 1, 3)
    d = (flat - palette[:, None]).pow(2).sum(-1)  # (B, pixels, P)
    idx = d.argmin(-1)
    out = torch.gather(palette, 1, idx[..., None].expand(-1, -1, 3))
    return out.reshape(pixels.shape)


def snap_tokens(model, tokens: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T*n, patch_dim) snapped to ``palette`` (B, P, 3) in [-1, 1]."""
    return model.patchify(snap_pixels(model.unpatchify(tokens), palette))


def palette_tensor(specs, device=None) -> torch.Tensor:
    """(B, P, 3) palettes in [-1, 1] of scene specs, padded with the background."""
    from ffviz.scenes import palette_rgb
    pals = [palette_rgb(s) for s in specs]
    P = max(len(p) for p in pals)
    out = np.stack([np.concatenate([p, np.repeat(p[:1], P - len(p), 0)]) for p in pals])
    return torch.from_numpy(out).float().div(127.5).sub(1).to(device)


@torch.no_grad()
def rollout(model, clip_tokens, cond, steps: int, window: int,
            generator: torch.Generator, palette: torch.Tensor | None = None, horizon: int = 0,
            frame_idx: torch.Tensor | None = None, before: torch.Tensor | None = None) -> torch.Tensor:
    """Run the model on a clip as generation does (previous-frame input, snapping to
    ``palette`` (B, P, 3) when given, a window cache of ``window`` frames); returns
    tokens like ``clip_tokens`` (B, T*n, d).

    The clip's frames are ``frame_idx`` (default 0..T-1). Its given frames are true and
    cached as one chunk; with ``before`` (the true frame before slot ``given``, tokens
    (B, n, d)) slot ``given`` is true too (a recent block after a gap). ``horizon`` 0:
    free-running from there. ``horizon`` h > 0: every h-th frame the TRUE frame goes
    into the cache (and the previous-frame input) instead of the generated one (h = 1:
    each frame a one-step prediction from true frames: the teacher-forced diagnostic)."""
    cfg, n = model.cfg, model.cfg.tokens_per_frame
    T = clip_tokens.shape[1] // n
    frame_idx = torch.arange(T) if frame_idx is None else frame_idx
    cache = model.new_cache()
    out = clip_tokens.clone()
    g = cfg.given_frames
    tok = lambda x, i: x[:, i * n:(i + 1) * n]
    fill_cache(model, cache, clip_tokens[:, :g * n], frame_idx[:g], cond, 0.0,
               prev=previous_tokens(None, clip_tokens[:, :g * n], n))
    last, first = tok(clip_tokens, g - 1), g
    if before is not None:
        fill_cache(model, cache, tok(clip_tokens, g), frame_idx[g:g + 1], cond, 0.0, prev=before)
        last, first = tok(clip_tokens, g), g + 1
    for i in range(first, T):
        fr = frame_idx[i:i + 1]
        noise = torch.randn(tok(out, i).shape, generator=generator).to(out.device)
        x = denoise_chunk(model, cache, fr, cond, noise, steps, cfg.shift, prev=last).clamp(-1, 1)
        if palette is not None:
            x = snap_tokens(model, x, palette)
        out[:, i * n:(i + 1) * n] = x
        anchor = horizon > 0 and (i - first) % horizon == horizon - 1
        written = tok(clip_tokens, i) if anchor else x
        fill_cache(model, cache, written, fr, cond, 0.0, prev=last)
        last = written
        if cache.size > window * n:  # a window cache: the window policy's own decision
            cache.apply(keep_newest(cache, window * n))
    return out
