"""Training the embedded model (``python -m ffviz train``).

Recipe (model.md explains why plain teacher forcing fails when free-running):

* Clips of procedural scenes (``ffviz.scenes``), prompt-conditioned, the first
  ``given_frames`` frames kept nearly clean as at generation (image-to-video).
* Per-frame noise levels told to the model (diffusion-forcing style): every
  frame carries a *context* level c ~ U(0, ctx_noise_max) (sometimes 0), and a
  random subset of frames are *targets* at a flow-matching level t. A target
  in the middle of a clip is bad context for the frames after it, which pushes
  them to look further back in their cache rather than only at the last frame.
* Self-rollout (Self-Forcing's idea, in a cheap form): after
  ``rollout_after`` steps, a share of batches replaces context frames by the
  model's own free-running output (no gradients), mixed with the true ones;
  targets stay the true frames, so the model learns to recover from its own
  errors. With ``--recycle R`` a context frame is instead the true frame plus the
  rollout's error scaled by U(0, R) (error recycling; with ``--rollout-horizon 1``
  the model's own one-step errors), so the true target still follows from it.
* Or, with ``--dmd``, distribution matching on the model's own rollouts instead of
  regression (``ffviz.dmd``: a frozen teacher, the starting weights, and a fake score
  trained alongside; experimental, meant for a GPU).
* AdamW, warm-up then constant learning rate, an EMA of the weights (what
  ships). Deterministic: batch ``s`` is drawn from ``seed`` and ``s`` alone.

Resumable: a local training state (``--state``) continues exactly; without one
the run starts from the committed weights (``--out``) and its card's step count.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ffviz import dmd
from ffviz.models.tiny import TinyConfig, TinyVideoModel, shifted
from ffviz.policies.base import keep_newest
from ffviz.sampling import denoise_chunk, fill_cache
from ffviz.scenes import COLORS, Scene, random_spec
from ffviz.weights import DEFAULT_WEIGHTS, WeightsError, load_tiny, save_weights

DATA_VERSION = 1  # bump when scenes.py changes what a clip looks like
TRAIN_SEED_BASE = 1 << 20  # training scene seeds are >= this; user and eval seeds stay below


@dataclasses.dataclass
class TrainConfig:
    steps: int = 6000  # total optimizer steps (a resumed run stops here too)
    minutes: float = 0.0  # wall-clock budget of this invocation; 0 = none
    batch: int = 8
    clip_frames: int = 20
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    ctx_noise_max: float = 0.6
    target_share: tuple = (0.15, 0.6)
    rollout_after: int = 1500
    rollout_prob: float = 0.3
    rollout_steps: int = 2  # denoising steps of the rollouts (generation uses the card's, 4)
    gen_context: float = 0.5  # share of a rolled-out clip's context frames taken from the rollout
    rollout_horizon: int = 0  # the rollout caches the TRUE frame every this many frames (0 = never)
    recycle: float = 0.0  # > 0: context = true + U(0, recycle) x (rollout - true) per frame
    seed: int = 0
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    workers: int = 0  # processes drawing batches ahead; 0 = in the training process
    object_weight: float = 1.0  # loss weight of patches showing an object or the pillar
    dmd: bool = False  # distribution matching on own rollouts instead of regression (ffviz.dmd)
    dmd_fake_steps: int = 2  # fake-score updates per generator update
    save_every_s: float = 300.0


def make_batch(rng: np.random.Generator, batch: int, frames: int):
    """Clips (B, T, 32, 32, 3) uint8, condition ids (B, C) and background colours (B, 3)."""
    clips, conds, backgrounds = [], [], []
    for _ in range(batch):
        spec = random_spec(rng)
        scene = Scene(spec, int(rng.integers(TRAIN_SEED_BASE, 1 << 31)))
        start = 0 if rng.random() < 0.5 else int(rng.integers(0, 96))
        clips.append(scene.render(np.arange(start, start + frames)))
        conds.append(spec.condition_ids())
        backgrounds.append(COLORS[spec.background])
    return (torch.from_numpy(np.stack(clips)), torch.from_numpy(np.stack(conds)),
            torch.tensor(backgrounds, dtype=torch.uint8))


def noise_levels(rng: np.random.Generator, batch: int, frames: int, given: int, cfg: TrainConfig,
                 shift: float):
    """Per-frame levels (B, T) and the target mask (B, T)."""
    ctx = rng.uniform(0, cfg.ctx_noise_max, size=(batch, frames))
    ctx[rng.random(batch) < 0.3] = 0.0  # clean context as at default generation
    share = rng.uniform(*cfg.target_share, size=(batch, 1))
    target = rng.random((batch, frames)) < share
    target[:, :given] = False
    none = ~target.any(1)
    target[none, rng.integers(given, frames, size=none.sum())] = True
    u = rng.random((batch, frames))
    t = shifted(u, shift)
    levels = np.where(target, t, ctx)
    return torch.from_numpy(levels).float(), torch.from_numpy(target)


def draw(seed: int, step: int, batch: int, frames: int, given: int, cfg: "TrainConfig",
         shift: float):
    """Everything random about batch ``step`` that lives on the host, from ``(seed, step)``
    alone: (generator seed, clips, condition ids, levels, target mask, rng state to go on
    with). Picklable both ways, so worker processes can prepare batches ahead."""
    rng = np.random.default_rng([seed, step])
    gen_seed = int(rng.integers(1 << 62))
    clip, cond_ids, background = make_batch(rng, batch, frames)
    levels, target = noise_levels(rng, batch, frames, given, cfg, shift)
    # patches showing anything but the background (objects, pillar): (B, T, S, S) -> per pixel
    foreground = (clip != background[:, None, None, None]).any(-1)
    return gen_seed, clip, cond_ids, levels, target, foreground, rng.bit_generator.state


def prefetch(pool, jobs, depth: int):
    """``draw(*job)`` for each job in order; with a pool, at most ``depth`` run ahead
    (a bounded queue: memory stays flat however fast the workers are)."""
    if pool is None:
        yield from (draw(*job) for job in jobs)
        return
    import collections
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(draw, job))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@torch.no_grad()
def rollout(model: TinyVideoModel, clip_tokens, cond, frames: int, steps: int, window: int,
            generator: torch.Generator, horizon: int = 0) -> torch.Tensor:
    """Run the model from the given frames; returns tokens like ``clip_tokens``.

    ``horizon`` 0: free-running, every frame built on the model's own output. ``horizon``
    h > 0: every h-th frame the TRUE frame goes into the cache instead of the generated
    one, so a generated frame is at most h frames of the model's errors away from the
    truth (h = 1: each is a one-step prediction from true frames). Short horizons give
    contexts that are off the data the way generation is, while the true next frame
    still follows from them."""
    cfg, n = model.cfg, model.cfg.tokens_per_frame
    cache = model.new_cache()
    out = clip_tokens.clone()
    g = cfg.given_frames
    fill_cache(model, cache, clip_tokens[:, : g * n], torch.arange(g), cond, 0.0)
    for f in range(g, frames, cfg.chunk_frames):
        fr = torch.arange(f, min(f + cfg.chunk_frames, frames))
        sl = slice(f * n, (f + fr.numel()) * n)
        noise = torch.randn(out[:, sl].shape, generator=generator).to(out.device)
        out[:, sl] = denoise_chunk(model, cache, fr, cond, noise, steps, cfg.shift).clamp(-1, 1)
        anchor = horizon > 0 and (f - g) % horizon == horizon - 1
        fill_cache(model, cache, (clip_tokens if anchor else out)[:, sl], fr, cond, 0.0)
        if cache.size > window * n:  # a window cache: the window policy's own decision
            cache.apply(keep_newest(cache, window * n))
    return out


def _worker_init():
    torch.set_num_threads(1)  # a worker only renders clips; many workers x many threads thrash


def train(cfg: TrainConfig, model_cfg: TinyConfig, out: Path, state_path: Path,
          log=print) -> dict:
    """Train and save; returns the weights' card. Worker processes and the TF32
    switch are undone however the run ends (an error or Ctrl-C included)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    pool = None
    try:
        if cfg.workers > 0:
            import multiprocessing as mp
            pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_worker_init)
        return _train(cfg, model_cfg, out, state_path, log, pool)
    finally:
        if pool is not None:
            pool.terminate()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _train(cfg: TrainConfig, model_cfg: TinyConfig, out: Path, state_path: Path, log, pool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ample for this model
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = TinyVideoModel(model_cfg)
    step, clips_seen, seconds, history = 0, 0, 0.0, []
    opt_state = ema_state = dmd_state = None
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        dmd_state = st.get("dmd")
        model = TinyVideoModel(TinyConfig(**st["model_cfg"]))
        model.load_state_dict(st["model"])
        ema_state, opt_state = st["ema"], st["opt"]
        step, clips_seen, seconds, history = st["step"], st["clips_seen"], st["seconds"], st["history"]
        log(f"resumed from {state_path} at step {step}")
    elif out.exists():
        try:
            model, card = load_tiny(out)
        except WeightsError as e:
            raise SystemExit(f"cannot resume: {e}")
        step, clips_seen = card.get("steps", 0), card.get("clips_seen", 0)
        seconds, history = card.get("train_seconds", 0.0), card.get("history", [])
        log(f"starting from committed weights {out} (step {step}); optimizer state is fresh")
    model_cfg = model.cfg
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    if ema_state:
        ema.load_state_dict(ema_state)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    if opt_state:
        opt.load_state_dict(opt_state)
    teacher = fake = opt_fake = None
    if cfg.dmd:  # the teacher: the weights the distribution matching started from
        teacher, fake = copy.deepcopy(model).eval(), copy.deepcopy(model).train()
        if dmd_state:
            teacher.load_state_dict(dmd_state["teacher"])
            fake.load_state_dict(dmd_state["fake"])
        for p in teacher.parameters():
            p.requires_grad_(False)
        opt_fake = torch.optim.AdamW(fake.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
        if dmd_state:
            opt_fake.load_state_dict(dmd_state["opt_fake"])
    warm_from = step if opt_state is None else 0  # a fresh optimizer warms up again
    n, T, g = model_cfg.tokens_per_frame, cfg.clip_frames, model_cfg.given_frames
    frames = torch.arange(T, device=device)
    mask = model.block_causal_mask(frames.cpu()).to(device)
    started, last_save, losses, fake_losses = time.time(), time.time(), [], []

    def save():
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "step": step, "clips_seen": clips_seen, "seconds": seconds, "history": history,
                 "model_cfg": dataclasses.asdict(model_cfg), "train_cfg": dataclasses.asdict(cfg)}
        if cfg.dmd:
            state["dmd"] = {"teacher": teacher.state_dict(), "fake": fake.state_dict(),
                            "opt_fake": opt_fake.state_dict()}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        cpu_ema = copy.deepcopy(ema).cpu()
        return save_weights(cpu_ema, out, {
            "steps": step, "clips_seen": clips_seen, "train_seconds": round(seconds, 1),
            "data_version": DATA_VERSION, "train_config": dataclasses.asdict(cfg),
            "device": device, "history": history[-200:],
            "command": "python -m ffviz train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        })

    # batches are drawn ahead by worker processes when asked (a GPU outruns one core)
    batches = prefetch(pool, ((cfg.seed, s, cfg.batch, T, g, cfg, model_cfg.shift)
                              for s in range(step, cfg.steps)), depth=2 * cfg.workers)
    while step < cfg.steps:
        t0 = time.time()
        gen_seed, clip, cond_ids, levels, target, foreground, rng_state = next(batches)
        rng = np.random.default_rng()
        rng.bit_generator.state = rng_state
        gen = torch.Generator().manual_seed(gen_seed)
        x0 = model.patchify(clip.to(device).float() / 127.5 - 1)
        cond_ids = cond_ids.to(device)
        levels, target = levels.to(device), target.to(device)
        lr = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        for group in opt.param_groups + (opt_fake.param_groups if cfg.dmd else []):
            group["lr"] = lr
        if cfg.dmd:
            loss, fake_loss = _dmd_step(cfg, model, teacher, fake, opt_fake, x0[:, :g * n],
                                        cond_ids, T, frames, mask, gen)
        else:
            loss, fake_loss = _regression_loss(cfg, model, x0, cond_ids, levels, target,
                                               foreground, frames, mask, rng, gen, step), None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))  # EMA warm-up
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        clips_seen += cfg.batch
        seconds += time.time() - t0
        losses.append(loss.item())
        if fake_loss is not None:
            fake_losses.append(fake_loss)
        if step % 50 == 0:
            entry = {"step": step, "loss": round(float(np.mean(losses)), 5),
                     "seconds": round(seconds, 1)}
            if fake_losses:
                entry["fake_loss"] = round(float(np.mean(fake_losses)), 5)
            history.append(entry)
            log(f"step {step} loss {np.mean(losses):.4f} {seconds / max(step, 1):.2f}s/step(avg) "
                f"last {time.time() - t0:.2f}s clips {clips_seen}")
            losses, fake_losses = [], []
        out_of_time = cfg.minutes and time.time() - started > cfg.minutes * 60
        if time.time() - last_save > cfg.save_every_s or out_of_time or step == cfg.steps:
            card = save()
            last_save = time.time()
            if out_of_time:
                break
    else:
        card = save()
    log(f"saved {out} at step {step} ({clips_seen} clips, {seconds / 60:.1f} min of training)")
    return card


def _dmd_step(cfg, model, teacher, fake, opt_fake, given, cond_ids, T, frames, mask, gen):
    """One distribution-matching step (``ffviz.dmd``) up to the generator's loss: a
    rollout with gradients, ``dmd_fake_steps`` updates of the fake score on it, then
    the generator's loss (its backward and step are the caller's)."""
    clip = dmd.generate_with_grad(model, given, model.embed_condition(cond_ids), T,
                                  model.cfg.sample_steps, gen)
    fake_loss = 0.0
    for _ in range(cfg.dmd_fake_steps):
        loss_f = dmd.fake_score_loss(clip, fake, frames, cond_ids, mask, gen)
        opt_fake.zero_grad(set_to_none=True)
        loss_f.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        opt_fake.step()
        fake_loss += loss_f.item() / cfg.dmd_fake_steps
    return dmd.dmd_generator_loss(clip, teacher, fake, frames, cond_ids, mask, gen), fake_loss


def recycled_context(true, rolled, scale, tokens_per_frame: int) -> torch.Tensor:
    """Context tokens: the true frames plus the rollout's errors times ``scale`` (B, T) per
    frame, in pixel range. Scale 0 keeps a true frame, 1 takes the rollout's, above 1
    amplifies its errors (as they compound when free-running) while the true next frame
    still follows from the context: error recycling, not a drifted context."""
    s = scale.repeat_interleave(tokens_per_frame, 1)[..., None]
    mixed = (true + s * (rolled - true)).clamp(-1, 1)
    return torch.where(s == 1, rolled, mixed)  # scale 1: the rollout's frame exactly


def _regression_loss(cfg, model, x0, cond_ids, levels, target, foreground, frames, mask, rng,
                     gen, step):
    """The flow-matching regression loss of one batch: noised true targets, context
    frames true or (after ``rollout_after``, for a share of batches) the model's own."""
    n, T, g = model.cfg.tokens_per_frame, cfg.clip_frames, model.cfg.given_frames
    device = x0.device
    context = x0
    if step >= cfg.rollout_after and rng.random() < cfg.rollout_prob:
        model.eval()
        with torch.no_grad():
            gen_tokens = rollout(model, x0.cpu() if device.type == "cpu" else x0,
                                 model.embed_condition(cond_ids), T, cfg.rollout_steps,
                                 int(rng.integers(2, T)), gen, cfg.rollout_horizon)
        model.train()
        use_gen = torch.from_numpy(rng.random((cfg.batch, T)) < cfg.gen_context).to(device)
        use_gen[:, :g] = False
        scale = use_gen.float()
        if cfg.recycle:  # the rollout's errors, rescaled per frame, on the true frames
            scale = scale * torch.from_numpy(rng.uniform(0, cfg.recycle, (cfg.batch, T))).float().to(device)
        context = recycled_context(x0, gen_tokens.to(device), scale, n)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    lv = levels.repeat_interleave(n, 1)[..., None]
    # targets are noised true frames; context frames may be the model's own
    x_t = (1 - lv) * torch.where(target.repeat_interleave(n, 1)[..., None], x0, context) + lv * noise
    cond = model.embed_condition(cond_ids)
    v = model(x_t, levels, frames, cond, mask=mask)
    w = torch.where(target, 1.0, 0.2).repeat_interleave(n, 1)
    if cfg.object_weight != 1.0:  # objects are few pixels: without this they are cheap to lose
        fg = model.patchify(foreground[..., None].float()).amax(-1).to(device)  # (B, T * n)
        w = w * (1 + (cfg.object_weight - 1) * fg)
    return (((v - (noise - x0)) ** 2).mean(-1) * w).sum() / w.sum()


def add_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps to reach")
    p.add_argument("--minutes", type=float, default=0.0, help="stop (and save) after this many minutes")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--clip-frames", type=int, default=d.clip_frames)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rollout-after", type=int, default=d.rollout_after)
    p.add_argument("--rollout-prob", type=float, default=d.rollout_prob,
                   help="share of batches whose context comes partly from the model's own rollout")
    p.add_argument("--rollout-steps", type=int, default=d.rollout_steps,
                   help="denoising steps of those rollouts")
    p.add_argument("--gen-context", type=float, default=d.gen_context,
                   help="share of a rolled-out clip's context frames taken from the rollout (the "
                        "rest stay true frames; 1 = all, as at generation)")
    p.add_argument("--rollout-horizon", type=int, default=d.rollout_horizon,
                   help="the rollout caches the TRUE frame every this many frames, so its "
                        "frames are at most this many steps of the model's errors from the "
                        "truth (0 = free-running rollouts)")
    p.add_argument("--recycle", type=float, default=d.recycle,
                   help="error recycling: a rolled-out clip's context is the true frames plus the "
                        "rollout's errors scaled per frame by U(0, this), so the target still "
                        "follows from the context (with --rollout-horizon 1: the model's own "
                        "one-step errors, amplified as they compound; 0 = the rollout's frames as they are)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="loss weight of patches that show an object (1 = plain)")
    p.add_argument("--dmd", action="store_true",
                   help="distribution matching on the model's own rollouts instead of regression "
                        "(ffviz/dmd.py; a frozen teacher, the starting weights, and a fake score; "
                        "experimental, meant for a GPU; use a small --lr, e.g. 1e-5)")
    p.add_argument("--dmd-fake-steps", type=int, default=d.dmd_fake_steps,
                   help="fake-score updates per generator update (--dmd)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw batches ahead (use several with a GPU)")
    p.add_argument("--save-every", type=float, default=d.save_every_s, help="seconds between checkpoints")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="weights file (safetensors + .json card)")
    p.add_argument("--state", type=Path, default=Path("runs/train/state.pt"),
                   help="local optimizer state for exact resumption (not committed)")
    p.add_argument("--width", type=int, default=TinyConfig.width)
    p.add_argument("--layers", type=int, default=TinyConfig.layers)
    p.add_argument("--rope-theta", type=float, default=TinyConfig.rope_theta,
                   help="RoPE base of a NEW model (a resumed one keeps its own): with 5 planes per "
                        "spatial axis and an 8x8 grid, 10000 leaves one plane that tells "
                        "neighbouring positions apart")
    p.add_argument("--rope-theta-time", type=float, default=None,
                   help="RoPE base of the temporal axis of a NEW model (default: --rope-theta); "
                        "e.g. --rope-theta 10 --rope-theta-time 10000: fine positions on the "
                        "grid, no temporal wrap-around within a long run")


def main(args: argparse.Namespace) -> int:
    for name in ("rollout_prob", "gen_context"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.rollout_steps < 1:
        raise SystemExit(f"--rollout-steps must be >= 1, got {args.rollout_steps}")
    if not 0 <= args.recycle <= 10:
        raise SystemExit(f"--recycle must be in [0, 10], got {args.recycle}")
    if args.rollout_horizon < 0:
        raise SystemExit(f"--rollout-horizon must be >= 0, got {args.rollout_horizon}")
    if args.dmd_fake_steps < 1:
        raise SystemExit(f"--dmd-fake-steps must be >= 1, got {args.dmd_fake_steps}")
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch=args.batch,
                      clip_frames=args.clip_frames, lr=args.lr, rollout_after=args.rollout_after,
                      rollout_prob=args.rollout_prob, rollout_steps=args.rollout_steps,
                      gen_context=args.gen_context, rollout_horizon=args.rollout_horizon,
                      recycle=args.recycle,
                      seed=args.seed, threads=args.threads, workers=args.workers,
                      object_weight=args.object_weight, dmd=args.dmd,
                      dmd_fake_steps=args.dmd_fake_steps, save_every_s=args.save_every)
    for name in ("rope_theta", "rope_theta_time"):
        value = getattr(args, name)
        if value is not None and not value > 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 1, got {value}")
    model_cfg = TinyConfig(width=args.width, layers=args.layers, rope_theta=args.rope_theta,
                           rope_theta_time=args.rope_theta_time)
    card = train(cfg, model_cfg, args.out, args.state, log=lambda s: print(s, flush=True))
    print(json.dumps({k: card[k] for k in ("steps", "clips_seen", "train_seconds", "sha256")}))
    return 0
