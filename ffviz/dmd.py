"""Distribution matching on the model's own rollouts (``train --dmd``): Self-Forcing's
loss (Huang et al., 2025, after DMD, Yin et al., 2024) in miniature.

Regressing on the true next frame from a context the model generated itself teaches
it to hedge (README, "Where the model stands"): the true frame does not follow from a
context that has drifted. Distribution matching asks instead that the frames the
model generates, from its own context, look like frames of the data. Three copies of
the network:

* the generator (the model being trained) rolls a clip out from the given frames
  exactly as generation does (few-step sampler, full cache of its own clean frames),
  with gradients through each frame's last denoising step only (``generate_with_grad``);
* a frozen teacher (the weights the run started from, trained on true clips) scores
  noised versions of that clip: its clean-frame prediction says where data lies;
* a fake score, trained alongside on the generator's clips with the plain
  flow-matching loss, says where the generator's frames lie.

The generator moves each generated frame along (teacher prediction - fake
prediction), normalised by the teacher's mean error (DMD's rule), through the loss
0.5 ||x - stopgrad(x - g)||^2, whose gradient in x is g. Scenes give no data to this
loss beyond the given frames and the prompt: the teacher carries what the data
taught it.
"""
from __future__ import annotations

import torch

from ffviz.models.tiny import TinyVideoModel, shifted, sigma_schedule
from ffviz.sampling import fill_cache


def generate_with_grad(model: TinyVideoModel, given: torch.Tensor, cond: torch.Tensor,
                       frames: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """A clip of ``frames`` frames from the given frames' tokens ``given`` (B, g * n, p),
    as ``generate`` makes it (the same noise draws as ``train.rollout``): each frame
    denoised over the cache of the clean frames before it. Gradients flow through each
    frame's last denoising step; the earlier steps and the cache writes run without
    (the cache holds detached keys). Returns (B, frames * n, p); the generated frames
    are not clamped (a clamp would stop their gradients), the cache gets them clamped
    to [-1, 1] as generation does."""
    cfg, n = model.cfg, model.cfg.tokens_per_frame
    g, B, dev = cfg.given_frames, given.shape[0], given.device
    ts = sigma_schedule(steps, cfg.shift)
    cache = model.new_cache()
    with torch.no_grad():
        fill_cache(model, cache, given, torch.arange(g), cond, 0.0)
    out = [given]
    for f in range(g, frames, cfg.chunk_frames):
        fr = torch.arange(f, min(f + cfg.chunk_frames, frames))
        x = torch.randn((B, fr.numel() * n, cfg.patch_dim), generator=generator).to(dev)
        with torch.no_grad():
            for i in range(steps - 1):
                t = torch.full((B, fr.numel()), ts[i], device=dev)
                x = x + (ts[i + 1] - ts[i]) * model(x, t, fr, cond, cache=cache, phase="denoise", step=i)
        t = torch.full((B, fr.numel()), ts[steps - 1], device=dev)
        v = model(x, t, fr, cond, cache=cache, phase="denoise", step=steps - 1)
        x0 = x + (ts[steps] - ts[steps - 1]) * v  # the last Euler step lands on t = 0
        out.append(x0)
        with torch.no_grad():
            fill_cache(model, cache, x0.detach().clamp(-1, 1), fr, cond, 0.0)
    return torch.cat(out, 1)


def _noised(x: torch.Tensor, given: int, n: int, shift: float, generator: torch.Generator):
    """Per-frame levels (B, T) (0 for the given frames; the generated ones at a shifted
    uniform level in [0.02, 0.98], as training draws its targets), the noise and x_t."""
    B, T = x.shape[0], x.shape[1] // n
    u = torch.rand((B, T), generator=generator)
    levels = shifted(u, shift).clamp(0.02, 0.98).to(x.device)
    levels[:, :given] = 0.0
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    lv = levels.repeat_interleave(n, 1)[..., None]
    return levels, noise, (1 - lv) * x + lv * noise


def dmd_generator_loss(clip: torch.Tensor, teacher: TinyVideoModel, fake: TinyVideoModel,
                       frames: torch.Tensor, cond_ids: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """The generator's distribution-matching loss for a clip from ``generate_with_grad``
    (B, T * n, p): its gradient in each generated frame is (fake's clean prediction -
    teacher's) / mean |x - teacher's| per clip, both from one noised copy of the clip."""
    cfg, n = teacher.cfg, teacher.cfg.tokens_per_frame
    g = cfg.given_frames
    x = clip.detach()
    levels, _, x_t = _noised(x, g, n, cfg.shift, generator)
    lv = levels.repeat_interleave(n, 1)[..., None]
    with torch.no_grad():  # clean-frame predictions, each with its own prompt embedding
        real = x_t - lv * teacher(x_t, levels, frames, teacher.embed_condition(cond_ids), mask=mask)
        fake_x0 = x_t - lv * fake(x_t, levels, frames, fake.embed_condition(cond_ids), mask=mask)
        scale = (x - real)[:, g * n:].abs().mean((1, 2), keepdim=True).clamp_min(1e-6)
        step = torch.nan_to_num((fake_x0 - real) / scale)
    gen = clip[:, g * n:]
    return 0.5 * ((gen - (x - step)[:, g * n:]) ** 2).mean()


def fake_score_loss(clip: torch.Tensor, fake: TinyVideoModel, frames: torch.Tensor,
                    cond_ids: torch.Tensor, mask: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """The fake score's flow-matching loss on the generator's frames (the given frames
    are clean context, not targets)."""
    cfg, n = fake.cfg, fake.cfg.tokens_per_frame
    g = cfg.given_frames
    x = clip.detach()
    levels, noise, x_t = _noised(x, g, n, cfg.shift, generator)
    v = fake(x_t, levels, frames, fake.embed_condition(cond_ids), mask=mask)
    return ((v - (noise - x)) ** 2)[:, g * n:].mean()
