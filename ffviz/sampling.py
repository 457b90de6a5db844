"""The few-step flow-matching sampler shared by generation and training rollouts.

Flow matching with velocity prediction: x_t = (1 - t) x_0 + t noise, v = noise - x_0,
so an Euler step from t to t' is x += (t' - t) v and the last step lands on x_0.
"""
from __future__ import annotations

import torch

from ffviz.cache import KVCache
from ffviz.models.tiny import sigma_schedule


@torch.no_grad()
def denoise_chunk(model, cache: KVCache, frames: torch.Tensor, cond: torch.Tensor,
                  noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """Denoise one chunk of frames ``frames`` (T,) from ``noise`` (B, T*n, patch_dim),
    reading the cache (not writing it). Returns clean tokens, same shape."""
    x = noise
    ts = sigma_schedule(steps, shift)
    if getattr(model, "hook_ctx", None) is not None:
        model.hook_ctx.steps = steps  # lets hooks tell the last denoising step
    B, T = noise.shape[0], frames.numel()
    for i in range(steps):
        t = torch.full((B, T), ts[i], device=noise.device)
        v = model(x, t, frames, cond, cache=cache, phase="denoise", step=i)
        x = x + (ts[i + 1] - ts[i]) * v
    return x


@torch.no_grad()
def fill_cache(model, cache: KVCache, x0: torch.Tensor, frames: torch.Tensor,
               cond: torch.Tensor, level: float, generator: torch.Generator | None = None) -> None:
    """Run the finished chunk once more at noise ``level`` to write its keys and values."""
    x = x0
    if level > 0:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = (1 - level) * x0 + level * noise
    t = torch.full((x0.shape[0], frames.numel()), float(level), device=x0.device)
    model(x, t, frames, cond, cache=cache, write=True, phase="cache")
