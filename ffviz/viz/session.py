"""A user's run in the app: one model copy, one controls object, one recorder.

``RunSession`` is the only mutable object the app keeps per user (in a
``gr.State``). It owns a deep copy of the loaded model because hooks are
attached to the model object (the recorder and generate's query tap): two
users sharing one model would record each other's queries. The copy is ~4 MB
and takes milliseconds.

``RunSession.run()`` is a generator over ``ffviz.generate.generate``: the app
pulls one chunk at a time, so a cancelled or abandoned generator stops the
work at once, and ``finally`` always detaches hooks and closes the files.
Live steering goes through ``Controls`` (read by generate before every chunk).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ffviz.cache import KVCache
from ffviz.export import VIDEO_FPS, RunWriter
from ffviz.generate import Controls, GenerationError, Observer, RunSettings, Step, generate
from ffviz.hooks import run_copy
from ffviz.policies import Policy, PolicyError
from ffviz.run import make_recorder, summarize
from ffviz.scenes import PromptError

APP_MAX_FRAMES = 256  # a CPU Space's cap on one interactive run
ORACLE_MAX_STEPS = 128  # steps whose cache keys are kept for the offline oracle (~0.3 MB each)

InputError = (GenerationError, PromptError, PolicyError)


def check_inputs(prompt, frames, budget, seed, max_frames: int = APP_MAX_FRAMES,
                 scenes: bool = True) -> RunSettings:
    """Settings from raw widget values; raises one of ``InputError`` with a message
    a user can act on (empty prompt, budget 0 or beyond the run, frames over the cap).
    ``scenes``: the model's ``has_scenes`` (False: free text, no scene grammar)."""
    if prompt is None or not str(prompt).strip():
        raise PromptError("the prompt is empty: describe shapes and a background, "
                          "e.g. 'a red circle on a blue background'" if scenes else
                          "the prompt is empty: describe the video to generate")
    frames_i, budget_i, seed_i = (_whole(frames, "frames"), _whole(budget, "budget"),
                                  _whole(seed, "seed"))
    if frames_i < 3 or frames_i > max_frames:
        raise GenerationError(f"frames must be between 3 and {max_frames} in the app "
                              f"(got {frames_i}); the CLI allows longer runs")
    if budget_i < 1:
        raise GenerationError(f"budget must be at least 1 frame (got {budget_i})")
    if budget_i > frames_i:
        raise GenerationError(f"budget of {budget_i} frames is beyond the run ({frames_i} frames)")
    if seed_i < 0:
        raise GenerationError(f"seed must be >= 0 (got {seed_i})")
    settings = RunSettings(str(prompt), frames=frames_i, seed=seed_i)
    settings.validate(scenes)  # parses the prompt (scene models): PromptError with the reason
    return settings


def _whole(x, name: str) -> int:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a whole number, got {x!r}") from None
    if not np.isfinite(v) or v != int(v):
        raise GenerationError(f"{name} must be a whole number, got {x!r}")
    return int(v)


@dataclasses.dataclass
class StepRecord:
    """What the plots need from one chunk (small; kept for the whole run)."""
    index: int
    frame: int  # newest frame of the chunk
    n_frames: int
    policy: str
    budget_frames: int
    switched: bool
    tokens_peak: int
    tokens: int
    kv_bytes: int
    policy_ms: float
    seconds: float
    elapsed: float  # since the run started


@dataclasses.dataclass
class CacheSnapshot:
    """The cache as the policy saw it (after the chunk was written), and what it did.

    provenance: per layer, ``frame``/``row``/``col``/``mass`` (H, N) tensors
    decision: the policy's ``Decision`` (None: the cache fit, everything kept)
    """
    step: int
    frame: int
    provenance: list[dict]
    decision: object | None
    budget_tokens: int


class _Tap(Observer):
    """Keeps references to the cache tensors before the policy acts (the cache
    replaces, never edits, its tensors, so references stay valid) and the
    surviving token counts per source frame after it."""

    def __init__(self, keep_keys: bool):
        self.keep_keys = keep_keys
        self.before: list[dict] | None = None
        self.keys: list[torch.Tensor] | None = None
        self.survivors: dict[int, float] = {}
        self.cache_refs = None  # for a steering dry run (see ``trial_cache``)
        self.ctx = None

    def after_write(self, cache, frames, ctx):
        self.cache_refs = (cache.tokens_per_frame, cache.grid,  # every field, as the cache lists them
                           [({n: getattr(l, n) for n in cache.FIELDS}, dict(l.aux))
                            for l in cache.layers])
        self.ctx = ctx
        self.before = [{"frame": l.frame[0], "row": l.row[0], "col": l.col[0], "mass": l.mass[0]}
                       for l in cache.layers]
        self.keys = [l.k[0].to(torch.float16) for l in cache.layers] if self.keep_keys else None

    def after_compress(self, cache, decision, ctx):
        counts: dict[int, float] = {}
        total = 0
        for l in cache.layers:
            f = l.frame[0].flatten()
            total += 1
            for src, c in zip(*torch.unique(f, return_counts=True)):
                counts[int(src)] = counts.get(int(src), 0) + int(c)
        heads = cache.layers[0].frame.shape[1]
        denom = total * heads * cache.tokens_per_frame
        self.survivors = {k: v / denom for k, v in counts.items()}


def trial_cache(refs) -> KVCache:
    """A private copy of the cache as it was after the last write (the references
    the tap keeps are never edited in place, so this is consistent even while
    the run goes on in another thread)."""
    tpf, grid, layers = refs
    cache = KVCache(len(layers), tpf, grid)
    for lc, (fields, aux) in zip(cache.layers, layers):
        for name, t in fields.items():
            setattr(lc, name, t.clone())
        lc.aux = {n: t.clone() for n, t in aux.items()}
    return cache


def preflight(model, policy: Policy, budget_frames: int, seed: int = 0) -> None:
    """Try ``policy`` once on a synthetic cache one frame over the budget, with
    synthetic query statistics: parameters that cannot work with this budget
    (protected frames that do not fit, say) raise ``PolicyError`` before the
    run starts instead of at its first compression. Other failures are left
    to the real run."""
    from ffviz.policies import PolicyContext
    from ffviz.stats import QueryStats

    cfg = model.cfg
    n, H, d = cfg.tokens_per_frame, cfg.heads, cfg.head_dim
    frames = budget_frames + 1
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(1, n, model.new_cache().grid)  # one layer is enough to check parameters
    fr = torch.arange(frames).repeat_interleave(n)
    rows = torch.arange(n).repeat(frames) // cache.grid[1]
    cols = torch.arange(n).repeat(frames) % cache.grid[1]
    stats = QueryStats(1, H, d)
    for layer in cache.layers:
        layer.append(torch.randn(1, H, frames * n, d, generator=g),
                     torch.randn(1, H, frames * n, d, generator=g), fr, rows, cols)
    stats.update(0, torch.randn(H, n, d, generator=g), frames - 1)
    ctx = PolicyContext(frame=frames - 1, tokens_per_frame=n, chunk_frames=cfg.chunk_frames,
                        grid=cache.grid, rope=model.rope, stats=stats,
                        chunk_queries=[torch.randn(1, H, n * cfg.chunk_frames, d, generator=g)
                                       ])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy.compress(cache, budget_frames * n, ctx)
    except PolicyError:
        raise
    except Exception:  # not a parameter problem: the real run will tell
        pass


def warm_up(model, policy: Policy) -> None:
    """One tiny run at start-up: the first call of several torch ops is slow, and
    the first user's first frame should not pay for it."""
    m = run_copy(model)
    preflight(m, policy, 2)
    settings = RunSettings("a red circle on a blue background", frames=4, seed=0, record=True)
    recorder = make_recorder(m)
    try:
        for _ in generate(m, settings, Controls(policy, 2)):
            pass
    finally:
        recorder.detach()


class RunSession:
    """One interactive run. Build it (inputs are checked), iterate ``run()``."""

    def __init__(self, template, settings: RunSettings, policy: Policy, budget_frames: int,
                 keep_oracle_keys: bool = True):
        self.settings = settings
        self.model = run_copy(template)  # hooks attach here, never to the shared model
        self.cfg = self.model.cfg
        self.has_scenes = getattr(template, "has_scenes", True)  # Wan: free text, no scene metrics
        self.model_name = getattr(template, "name", "tiny")
        self.controls = Controls(policy, budget_frames)
        self.dir = self.new_dir()
        self.view = {"layer": self.cfg.layers - 1, "head": 0}  # the user's layer/head choice
        self.steps: list[StepRecord] = []
        self.frames: list[np.ndarray] = []
        self.timeline: list[tuple[int, dict]] = []  # (newest frame, share kept per source frame)
        self.switches: list[dict] = []
        self.snapshot: CacheSnapshot | None = None
        self.oracle_steps: list[dict] = []  # per step: keys, mass, provenance, score, budget
        self.recorder = None
        self.summary: dict | None = None
        self.oracle_result: dict | None = None  # set by the Oracle view after the run
        self.running = False
        self.done = False
        self.error: str | None = None
        self.started = 0.0
        self._tap = _Tap(keep_oracle_keys)

    # -- steering (called from other events while run() is being pulled) ----
    def steer(self, policy: Policy | None = None, budget_frames: int | None = None) -> bool:
        """Switch at the next chunk; False (and no switch recorded) when nothing changes."""
        if budget_frames is not None and budget_frames > self.settings.frames:
            raise GenerationError(f"budget of {budget_frames} frames is beyond the run "
                                  f"({self.settings.frames} frames)")
        cur, cur_budget, _ = self.controls.snapshot()
        same_policy = policy is None or (policy.name == cur.name and policy.params() == cur.params())
        if same_policy and (budget_frames is None or budget_frames == cur_budget):
            return False
        self.controls.set(policy=policy, budget_frames=budget_frames)
        return True

    def stop(self) -> None:
        self.controls.stop()

    def try_policy(self, policy: Policy, budget_frames: int) -> None:
        """Run ``policy.compress`` on a copy of the live cache (nothing is applied):
        an incompatible parameter raises here, while the old policy keeps running."""
        refs, ctx = self._tap.cache_refs, self._tap.ctx
        if refs is None or ctx is None:
            return
        cache = trial_cache(refs)
        budget = budget_frames * self.cfg.tokens_per_frame
        if cache.size > budget:
            policy.compress(cache, budget, ctx)

    @staticmethod
    def new_dir() -> Path:
        return Path(tempfile.mkdtemp(prefix="ffviz-run-"))

    @property
    def frame_count(self) -> int:
        return sum(len(f) for f in self.frames)

    def video(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros((0, 32, 32, 3), np.uint8)

    # -- the run ---------------------------------------------------------
    def run(self) -> Iterator[Step]:
        """Yield each chunk's ``Step`` after recording what the views need. Files
        (video.mp4, record.npz, decisions.jsonl, summary.json) are written when
        the run ends, also when it is stopped or abandoned."""
        self.running, self.started = True, time.perf_counter()
        self.recorder = make_recorder(self.model)
        writer = RunWriter(self.dir, fps=getattr(self.cfg, "fps", VIDEO_FPS))
        policy_s = 0.0
        try:
            for step in generate(self.model, self.settings, self.controls, observer=self._tap):
                writer.add(step)
                policy_s += step.seconds["policy"]
                self._record(step)
                yield step
        finally:
            self.recorder.detach()  # the model copy is ours, but keep it clean anyway
            self.running, self.done = False, True
            self.summary = self._summary(policy_s)
            try:
                writer.close(self.summary, self.recorder)
            except Exception as e:  # a full disk must not hide the run's own outcome
                self.error = f"could not write the run's files: {e}"

    def _record(self, step: Step) -> None:
        n = self.cfg.tokens_per_frame
        self.frames.append(step.frames)
        now = time.perf_counter() - self.started
        if step.switched:
            self.switches.append({"frame": step.frame_indices[0], "policy": step.policy,
                                  "params": step.policy_params, "budget_frames": step.budget_frames})
        kv = step.cache_tokens * self.cfg.layers * self.cfg.heads * self.cfg.head_dim * 2 * 4
        self.steps.append(StepRecord(
            index=step.index, frame=step.frame_indices[-1], n_frames=len(step.frame_indices),
            policy=step.policy, budget_frames=step.budget_frames, switched=step.switched,
            tokens_peak=step.cache_tokens_peak, tokens=step.cache_tokens, kv_bytes=kv,
            policy_ms=1000 * step.seconds["policy"], seconds=step.seconds["total"], elapsed=now))
        self.timeline.append((step.frame_indices[-1], dict(self._tap.survivors)))
        self.snapshot = CacheSnapshot(step.index, step.frame_indices[-1], self._tap.before,
                                      step.decision, step.budget_frames * n)
        stride = -(-self.settings.frames // ORACLE_MAX_STEPS)  # long runs: every stride-th step
        if self._tap.keys is not None and step.decision is not None and step.index % stride == 0 \
                and len(self.oracle_steps) < ORACLE_MAX_STEPS:
            self.oracle_steps.append({
                "frame": step.frame_indices[-1], "keys": self._tap.keys,
                "provenance": self._tap.before, "budget_tokens": step.budget_frames * n,
                "score": [None if d.score is None else d.score[0].float() for d in step.decision.layers]})

    def _summary(self, policy_s: float) -> dict:
        """``ffviz.run.summarize`` for a run driven chunk by chunk (same keys as the CLI's)."""
        policy, budget, _ = self.controls.snapshot()
        # the model copy may be gone (session closed mid-run): pass what was noted of it
        model = types.SimpleNamespace(cfg=self.cfg, has_scenes=self.has_scenes)
        return summarize(self.settings, model, self.video(), time.perf_counter() - self.started,
                         policy, budget, max((s.tokens_peak for s in self.steps), default=0),
                         policy_s, len(self.steps), self.recorder.nbytes() if self.recorder else 0,
                         self.switches, model_name=self.model_name)

    def files(self) -> list[str]:
        names = ("video.mp4", "record.npz", "decisions.jsonl", "summary.json", "plots.html")
        return [str(self.dir / n) for n in names if (self.dir / n).exists()]

    def close(self) -> None:
        """Free everything (the app calls it when the user's session ends)."""
        self.stop()
        self.model = None
        self.oracle_steps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def query_arrays(session: RunSession | None):
    """(frames, mean_pre, var_pre, mean_post, var_post) of the recorded queries so
    far, or None before anything was recorded. Means/vars are (F, L, H, d)."""
    rec = None if session is None else session.recorder
    if rec is None or rec.n_slots == 0:
        return None
    return rec.frames, rec.mean("pre"), rec.var("pre"), rec.mean("post"), rec.var("post")
