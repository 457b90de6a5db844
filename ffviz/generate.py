"""The autoregressive loop: one generator that yields a ``Step`` per chunk.

For every chunk: read the ``Controls`` (policy and budget may have changed),
denoise the chunk over the cache, run it once more to write its keys and
values, and let the policy bring the cache back to the budget. The first step
carries the ``given_frames`` frames rendered from the prompt's scene (the model
is image-to-video); they enter the cache like generated ones.

Memory is bounded by the budget (plus one chunk) and by the recorder's own
bound; frames are handed to the caller step by step, never kept here
(``ffviz.run.Run`` drives this loop for every user and keeps what they need).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Iterator

import numpy as np
import torch

from ffviz import kernels
from ffviz.cache import Decision, KVCache
from ffviz.hooks import QueryTap
from ffviz.models import VideoModel
from ffviz.policies import Policy, PolicyContext, PolicyError, make_policy
from ffviz.sampling import denoise_chunk, fill_cache, palette_tensor, previous_tokens, snap_tokens
from ffviz.recache import RECACHE_MODES, ChunkMemory, cached_frames, recache
from ffviz.scenes import Scene, SceneSpec, parse_prompt
from ffviz.stats import QueryStats

MAX_FRAMES = 1024  # documented cap on one run's length
DEFAULT_POLICY, DEFAULT_BUDGET = "window", 4  # frames; what the CLI and app start with


class GenerationError(ValueError):
    """Settings a run cannot start with (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class PromptSwitch:
    """From ``frame`` on, the run follows ``prompt``; the cache is re-written under it
    as ``recache`` says (``ffviz.recache``: none, recent or all)."""
    frame: int
    prompt: str
    recache: str = "none"

    @classmethod
    def parse(cls, text: str, recache: str = "none") -> "PromptSwitch":
        """``"16:a red circle on a white background"`` (the CLI's ``--switch-prompt``)."""
        frame, sep, prompt = str(text).partition(":")
        if not sep or not frame.strip().isdigit():
            raise GenerationError(f"a prompt switch must look like FRAME:PROMPT, got {text!r}")
        return cls(int(frame), prompt.strip(), recache)

    def check(self, scenes: bool, seed: int, first: int, frames: int) -> None:
        """A clear error for a switch outside ``first..frames-1``, an unreadable prompt
        or an unknown re-cache mode."""
        if self.recache not in RECACHE_MODES:
            raise GenerationError(f"recache must be one of {', '.join(RECACHE_MODES)}, "
                                  f"got {self.recache!r}")
        if isinstance(self.frame, bool) or not isinstance(self.frame, (int, np.integer)) \
                or not first <= self.frame < frames:
            raise GenerationError(f"a prompt switch at frame {self.frame!r} is outside the run: "
                                  f"frames {first}..{frames - 1} are generated")
        if scenes:
            parse_prompt(self.prompt, seed)  # PromptError with the reason
        elif not isinstance(self.prompt, str) or not self.prompt.strip():
            raise GenerationError(f"the prompt switch at frame {self.frame} has an empty prompt")


class Controls:
    """Policy, budget and prompt switches, read before every chunk; safe to change from
    another thread while a run goes on (the app's live steering)."""

    def __init__(self, policy: Policy | str = DEFAULT_POLICY, budget_frames: int = DEFAULT_BUDGET):
        self._lock = threading.Lock()
        self.version = 0
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._budget = self._check_budget(budget_frames)
        self._prompt_switch: tuple[str, str] | None = None
        self.stop_requested = False

    @staticmethod
    def _check_budget(budget_frames) -> int:
        if isinstance(budget_frames, bool) or not isinstance(budget_frames, (int, np.integer)):
            raise GenerationError(f"budget must be a whole number of frames, got {budget_frames!r}")
        if budget_frames < 1:
            raise GenerationError(f"budget must be at least 1 frame, got {budget_frames}")
        return int(budget_frames)

    def set(self, policy: Policy | str | None = None, budget_frames: int | None = None) -> None:
        new_policy = make_policy(policy) if isinstance(policy, str) else policy
        new_budget = None if budget_frames is None else self._check_budget(budget_frames)
        with self._lock:
            if new_policy is not None:
                self._policy = new_policy
            if new_budget is not None:
                self._budget = new_budget
            self.version += 1

    def switch_prompt(self, prompt: str, recache: str = "none") -> None:
        """Follow ``prompt`` from the next chunk on (checked when it applies: call
        ``PromptSwitch.check`` first for an early error)."""
        with self._lock:
            self._prompt_switch = (prompt, recache)

    def take_prompt_switch(self) -> tuple[str, str] | None:
        with self._lock:
            pending, self._prompt_switch = self._prompt_switch, None
            return pending

    def stop(self) -> None:
        self.stop_requested = True

    def snapshot(self) -> tuple[Policy, int, int]:
        with self._lock:
            return self._policy, self._budget, self.version


@dataclasses.dataclass
class Step:
    """What one chunk produced. ``frames`` are uint8 (T, H, W, 3)."""
    index: int
    frame_indices: list[int]
    frames: np.ndarray
    seconds: dict
    cache_tokens_peak: int | float  # after writing the chunk, before the policy
    cache_tokens: int | float  # after the policy (real tokens per head: ``KVCache.tokens``)
    cache_frames: list[int]
    policy: str
    policy_params: dict
    budget_frames: int
    switched: bool
    decision: Decision | None = None
    decision_log: dict | None = None
    prompt_switch: dict | None = None  # {"frame", "prompt", "recache", "rerun_chunks"} at a switch


@dataclasses.dataclass
class RunSettings:
    prompt: str
    frames: int = 64
    seed: int = 0
    steps: int | None = None  # None: the model card's default
    context_noise: float | None = None
    record: bool = True
    snap: bool | None = None  # snap frames to the scene's palette; None: the model card's setting
    one_motion: bool | None = None  # picks keep to the scene's motion; None: the model card's setting
    switches: tuple[PromptSwitch, ...] = ()  # scheduled prompt switches

    def validate(self, scenes: bool = True) -> tuple[SceneSpec | None, list[str]]:
        """Check the settings; read the prompt's scene (``scenes=False``, for a
        model without the scene grammar such as Wan: any non-empty text, no spec)."""
        if isinstance(self.frames, bool) or not isinstance(self.frames, (int, np.integer)):
            raise GenerationError(f"frames must be a whole number, got {self.frames!r}")
        if self.frames < 1 or self.frames > MAX_FRAMES:
            raise GenerationError(f"frames must be in [1, {MAX_FRAMES}], got {self.frames}")
        if self.steps is not None and not 1 <= self.steps <= 50:
            raise GenerationError(f"steps must be in [1, 50], got {self.steps}")
        if self.context_noise is not None and not 0 <= self.context_noise < 1:
            raise GenerationError(f"context noise must be in [0, 1), got {self.context_noise}")
        for name in ("snap", "one_motion"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bool, np.bool_)):
                raise GenerationError(f"{name.replace('_', ' ')} must be true or false, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed < 2 ** 32:
            raise GenerationError(f"seed must be a whole number in [0, 2^32), got {self.seed!r}")
        frames_seen = [s.frame for s in self.switches]
        if len(set(frames_seen)) != len(frames_seen):
            raise GenerationError(f"two prompt switches at one frame: {sorted(frames_seen)}")
        for switch in self.switches:
            switch.check(scenes, self.seed, 1, self.frames)
        if not scenes:
            if not isinstance(self.prompt, str) or not self.prompt.strip():
                raise GenerationError("empty prompt: describe the video")
            return None, []
        return parse_prompt(self.prompt, self.seed)


LOG_MAX_TOKENS = 4096  # evicted tokens per head beyond which a head's entry is a summary


def decision_log_entry(cache: KVCache, decision: Decision, max_tokens: int = LOG_MAX_TOKENS) -> dict:
    """Per layer and head: the real tokens it keeps (``kept``), the tokens dropped,
    and merged (token, into, distance); the policy's ``info`` when it gave one.

    Tokens are named by id = frame * tokens_per_frame + row * grid_cols + col.
    Dead slots are no tokens: never listed, never counted. Must be called before
    the cache applies the decision. When a head evicts more than ``max_tokens``
    tokens (a full-size Wan evicts 4,680 per head and chunk, 1.7M over its 360
    heads), its entry is a summary: counts, the lowest kept score and the mean merge
    distance, so logging stays cheap and the file small.
    """
    cols = cache.grid[1]
    layers = []
    for layer, d in zip(cache.layers, decision.layers):
        ids = (layer.frame * cache.tokens_per_frame + layer.row * cols + layer.col)[0]  # (H, N)
        H, N = ids.shape
        dev = ids.device  # the cache's device (a CUDA cache: build the masks there too)
        real = layer.live[0]
        kept = torch.zeros(H, N, dtype=torch.bool, device=dev)
        kept.scatter_(1, d.keep[0].to(dev), True if d.live is None else d.live[0].to(dev))
        kept &= real
        into = (d.merge_into[0].to(dev) if d.merge_into is not None
                else torch.full((H, N), -1, device=dev))
        if N - d.keep.shape[-1] > max_tokens:
            layers.append(_summary_entries(kept, real, into, d))
            continue
        layers.append(_head_entries(ids, kept, real, into, d))
    entry = {"layers": layers}
    if decision.info:
        entry["info"] = decision.info
    return entry


def _head_entries(ids: torch.Tensor, kept: torch.Tensor, real: torch.Tensor, into: torch.Tensor,
                  d) -> list[dict]:
    """One layer's detailed per-head entries (see ``decision_log_entry``). The masks are
    formed for all heads at once and read per head in numpy: a loop of small torch ops
    per head cost ~2.5 ms a step on the tiny model, more than some policies."""
    host = lambda t: t.detach().cpu().numpy()
    ids_np, gone = host(ids), host(~kept & real)
    n_kept = host(kept.sum(1)).tolist()
    into_np = host(into)
    target_ids = host(ids.gather(1, into.clamp_min(0)))  # id of each token's merge target
    merging = gone & (into_np >= 0)
    dropping = gone & (into_np < 0)
    dist = None if d.distance is None else np.round(host(d.distance[0].double()), 5)
    low = None
    if d.score is not None:
        score = d.score[0].to(kept.device).double()
        low = host(torch.where(kept, score, torch.full_like(score, math.inf)).amin(1))
        low = [round(float(x), 6) if math.isfinite(x) else None for x in low]  # valid JSON
    heads = []
    for h in range(ids_np.shape[0]):
        entry = {"kept": n_kept[h], "dropped": ids_np[h, dropping[h]].tolist()}
        m = merging[h]
        if m.any():
            x = dist[h, m].tolist() if dist is not None else [None] * int(m.sum())
            entry["merged"] = [list(t) for t in zip(ids_np[h, m].tolist(), target_ids[h, m].tolist(), x)]
        if low is not None:
            entry["kept_score_min"] = low[h]
        heads.append(entry)
    return heads


def _summary_entries(kept: torch.Tensor, real: torch.Tensor, into: torch.Tensor, d) -> list[dict]:
    """One layer's per-head summaries (see ``decision_log_entry``), computed for all heads at once."""
    gone = ~kept & real
    merged = gone & (into >= 0)
    cols = {"kept": kept.sum(1), "dropped_count": (gone & (into < 0)).sum(1),
            "merged_count": merged.sum(1)}
    if d.score is not None:
        score = d.score[0].to(kept.device).float()
        cols["kept_score_min"] = torch.where(kept, score, torch.inf).amin(1)
    if d.distance is not None:
        dist = d.distance[0].to(kept.device).float()
        cols["merge_distance_mean"] = (dist * merged).sum(1) / merged.sum(1).clamp_min(1)
    rows = {name: t.tolist() for name, t in cols.items()}
    num = lambda x: x if isinstance(x, int) else (round(x, 6) if math.isfinite(x) else None)
    return [{name: num(v[h]) for name, v in rows.items()} for h in range(kept.shape[0])]


class PolicyInputs:
    """What the policies read of the queries, fed from the query hook points: the
    streaming pre-RoPE statistics (every denoising step) and the post-RoPE queries
    of the last denoising step of the current chunk."""

    def __init__(self, model):
        cfg = model.cfg
        self.stats = QueryStats(cfg.layers, cfg.heads, cfg.head_dim)
        self.chunk_queries: list = [None] * cfg.layers
        self.pre = QueryTap(model, self._on_pre, pre="all")
        self.post = QueryTap(model, self._on_post, post="last")

    def _on_pre(self, layer, kind, q, ctx):
        self.stats.update(layer, q[:1], int(ctx.token_frame[-1]))

    def _on_post(self, layer, kind, q, ctx):
        self.chunk_queries[layer] = q.detach()

    def remove(self) -> None:
        self.pre.remove()
        self.post.remove()


class Observer:
    """Optional callbacks into a run (``ffviz.run.Run`` passes its observers: the app's
    cache snapshots, eval's probes); all default to no-ops."""

    def after_write(self, cache: KVCache, frames: torch.Tensor, ctx: PolicyContext) -> None:
        """The chunk's keys are in the cache; the policy has not acted yet."""

    def after_compress(self, cache: KVCache, decision: Decision | None, ctx: PolicyContext) -> None:
        """The policy's decision was applied."""


def scene_motion(model, given: torch.Tensor | None) -> torch.Tensor | None:
    """The scene's motion (B, 2) for a model that picks displacements (``carries_motion``:
    it recalls along the motion or keeps to it), measured from the given frames' tokens;
    (0, 0) with fewer than two given frames (nothing is generated after them then); None
    for other models."""
    if not getattr(model, "carries_motion", False):
        return None
    n = model.cfg.tokens_per_frame
    if given is None or given.shape[1] < 2 * n:
        return torch.zeros(1, 2, dtype=torch.long)
    return model.measure_motion(given[:, -2 * n:])


def scene_condition(model, spec: SceneSpec, motion: torch.Tensor | None, one_motion: bool | None):
    """The condition of a scene model for ``spec``: with the scene's ``motion`` and, for a
    model that picks displacements, whether the picks keep to it (None: the card's)."""
    ids = torch.from_numpy(spec.condition_ids())[None]
    if getattr(model, "carries_motion", False):
        return model.embed_condition(ids, motion, one_motion)
    return model.embed_condition(ids)


def cuda_device(model) -> torch.device | None:
    """The CUDA device the model's weights are on, or None (CPU, or no weights)."""
    p = next(model.parameters(), None)
    return p.device if p is not None and p.is_cuda else None


def _clock(model):
    """perf_counter, after waiting for the GPU when the model runs on one (CUDA calls
    return before their work is done: a step's parts would be timed wrongly)."""
    dev = cuda_device(model)
    if dev is not None:
        return lambda: (torch.cuda.synchronize(dev), time.perf_counter())[1]
    return time.perf_counter


def generate(model: VideoModel, settings: RunSettings, controls: Controls,
             observer: Observer | None = None, future_queries=None) -> Iterator[Step]:
    """Run ``model`` on ``settings``; yield one ``Step`` per chunk.

    Raises ``GenerationError``/``PromptError``/``PolicyError`` before any work
    when the settings are bad. ``controls.stop()`` ends the run after the
    current chunk. ``future_queries(frame, layer)`` feeds the offline oracle.
    A recorder, if any, listens on the model's hook points on its own.
    """
    scenes = model.has_scenes  # False: free-text prompt, no given frames
    spec, _ = settings.validate(scenes)
    cfg, n = model.cfg, model.cfg.tokens_per_frame
    policy, budget, seen_version = controls.snapshot()
    if budget > settings.frames:
        raise GenerationError(f"budget of {budget} frames is larger than the run "
                              f"({settings.frames} frames)")
    steps = settings.steps or cfg.sample_steps
    level = cfg.context_noise if settings.context_noise is None else settings.context_noise
    g = min(cfg.given_frames, settings.frames)
    for switch in settings.switches:  # the given frames come from the first prompt's scene
        switch.check(scenes, settings.seed, max(g, 1), settings.frames)
    scheduled = {s.frame: (s.prompt, s.recache) for s in settings.switches}
    scene = Scene(spec, settings.seed) if scenes else None
    snap = scenes and (cfg.snap if settings.snap is None else settings.snap)
    device = next(model.parameters()).device
    palette = palette_tensor([spec], device) if snap else None
    gen = torch.Generator().manual_seed(settings.seed)
    cache = model.new_cache()
    if kernels.compiled_cpu(next(model.parameters())):  # the CPU kernels' first compile
        kernels.warm(len(cache.layers))  # (once per machine) is not a timed step
    inputs = PolicyInputs(model)
    memory = ChunkMemory()  # what a re-cache at a prompt switch re-runs
    clock = _clock(model)
    try:
        # no torch.no_grad() around the loop: a generator suspended inside it would leave
        # grad mode off in its caller's thread; the model calls below are no_grad themselves
        given = None
        if scenes and g:  # the frames given from the scene
            given = model.patchify(torch.from_numpy(scene.render(np.arange(g)))[None].float() / 127.5 - 1)
        motion = scene_motion(model, given)
        with torch.no_grad():
            cond = (scene_condition(model, spec, motion, settings.one_motion) if scenes
                    else model.encode_prompt(settings.prompt))
        f, index, last = 0, 0, None  # last: the newest frame's tokens (the previous-frame input)
        while f < settings.frames and not controls.stop_requested:
            t0 = clock()
            policy, budget, version = controls.snapshot()
            switched, seen_version = version != seen_version, version
            live = controls.take_prompt_switch()
            pending = scheduled.pop(f, None) or (live if f >= max(g, 1) else None)
            prompt_switch = None
            if pending is not None:  # the new prompt conditions this chunk and on
                new_prompt, mode = pending
                PromptSwitch(f, new_prompt, mode).check(scenes, settings.seed, max(g, 1), settings.frames)
                old_cond = cond
                with torch.no_grad():
                    if scenes:
                        spec = parse_prompt(new_prompt, settings.seed)[0]
                        cond = scene_condition(model, spec, motion, settings.one_motion)
                        palette = palette_tensor([spec], device) if snap else None
                    else:
                        cond = model.encode_prompt(new_prompt)
                rerun = recache(model, cache, memory, mode, cond, old_cond, g, level)
                policy.prompt_switched(inputs.stats)
                prompt_switch = {"frame": f, "prompt": new_prompt, "recache": mode,
                                 "rerun_chunks": rerun, "recache_seconds": round(clock() - t0, 4)}
            if f == 0 and g:  # the frames given from the scene
                frames, x0 = torch.arange(g), given
            else:
                frames = torch.arange(f, min(f + cfg.chunk_frames, settings.frames))
                noise = torch.randn(1, frames.numel() * n, cfg.patch_dim, generator=gen)
                x0 = denoise_chunk(model, cache, frames, cond, noise, steps, cfg.shift, prev=last)
                if model.clamp_tokens:  # pixels in [-1, 1]; not Wan's latents
                    x0 = x0.clamp(-1, 1)
                if palette is not None:  # errors snap back instead of compounding
                    x0 = snap_tokens(model, x0, palette)
            t1 = clock()
            prev = previous_tokens(last, x0, n)
            fill_cache(model, cache, x0, frames, cond, level, gen, prev=prev)
            memory.add(frames, x0, prev)
            last = x0[:, -n:]
            t2 = clock()
            peak, newest = cache.tokens(), int(frames[-1])
            ctx = PolicyContext(
                frame=newest, tokens_per_frame=n, chunk_frames=cfg.chunk_frames,
                grid=cache.grid, rope=model.rope, stats=inputs.stats,
                chunk_queries=list(inputs.chunk_queries) if f > 0 else None,
                future_queries=None if future_queries is None else
                (lambda layer, _f=newest: future_queries(_f, layer)))
            if observer:
                observer.after_write(cache, frames, ctx)
            t_policy = clock()
            decision = policy.compress(cache, budget * n, ctx)
            log, log_s = None, 0.0
            if decision is not None:
                t_log = clock()  # logging is the loop's cost, not the policy's
                log = decision_log_entry(cache, decision)
                log_s = clock() - t_log
                cache.apply(decision)
            if policy.holds_budget and not cache.within_budget(budget * n):
                raise PolicyError(f"policy {policy.name} left more than heads x {budget * n} "
                                  f"tokens in a layer ({cache.tokens()} per head on average)")
            memory.prune(cached_frames(cache))
            t3 = clock()
            if observer:
                observer.after_compress(cache, decision, ctx)
            yield Step(index=index, frame_indices=frames.tolist(), frames=model.decode(x0, frames),
                       seconds={"denoise": t1 - t0, "cache": t2 - t1,
                                "policy": t3 - t_policy - log_s, "log": log_s,
                                "total": t3 - t0},
                       cache_tokens_peak=peak, cache_tokens=cache.tokens(),
                       cache_frames=cache.frames(), policy=policy.name,
                       policy_params=policy.params(), budget_frames=budget,
                       switched=switched, decision=decision, decision_log=log,
                       prompt_switch=prompt_switch)
            f += frames.numel()
            index += 1
    finally:
        inputs.remove()
