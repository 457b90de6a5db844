"""A user's run in the app: one model copy, one ``Run``, what the views need of it.

``RunSession`` is the only mutable object the app keeps per user (in a
``gr.State``). It owns a copy of the loaded model because hooks are attached to
the model object (the recorder and generate's query taps): two users sharing one
model would record each other's queries. The copy shares the weights and takes
milliseconds (``hooks.run_copy``).

``RunSession.run()`` is a generator over its ``ffviz.run.Run``: the app pulls one
chunk at a time, so a cancelled or abandoned generator stops the work at once,
and the run's end always detaches hooks and closes (or, on failure, removes) the
files. Live steering goes through ``Controls`` (read before every chunk).
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ffviz.app.cache_history import CacheHistory, capture
from ffviz.app.provenance import RunTag
from ffviz.app.quality import hide_events
from ffviz.cache import KVCache
from ffviz.export import FrameSpool, OutputError
from ffviz.generate import Controls, GenerationError, Observer, PromptSwitch, RunSettings, Step
from ffviz.heads import HeadMeter, head_view
from ffviz.hooks import QueryRecorder, run_copy
from ffviz.policies import Policy, PolicyError
from ffviz.run import Run
from ffviz.scenes import PromptError

APP_MAX_FRAMES = 256  # a CPU Space's cap on one interactive run
ORACLE_MAX_STEPS = 128  # steps whose cache keys are kept for the offline oracle (~0.3 MB each)

InputError = (GenerationError, PromptError, PolicyError)


def check_inputs(prompt, frames, budget, seed, max_frames: int = APP_MAX_FRAMES,
                 scenes: bool = True, snap: bool | None = None,
                 one_motion: bool | None = None) -> RunSettings:
    """Settings from raw widget values; raises one of ``InputError`` with a message
    a user can act on (empty prompt, budget 0 or beyond the run, frames over the cap).
    ``scenes``: the model's ``has_scenes`` (False: free text, no scene grammar);
    ``snap``: snap frames to the palette, ``one_motion``: picks keep to the scene's motion
    (None: the model card's setting)."""
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
    settings = RunSettings(str(prompt), frames=frames_i, seed=seed_i,
                           snap=None if snap is None else bool(snap),
                           one_motion=None if one_motion is None else bool(one_motion))
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
                if src >= 0:  # -1: a dead slot, no token
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
    cache = KVCache(1, n, cfg.grid)  # one layer is enough to check parameters
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


def warm_up(model, policy: Policy, prompt: str = "a red circle on a blue background",
            frames: int = 8, budget: int = 3) -> np.ndarray:
    """One short run at start-up: the first call of several torch ops is slow, and
    the first user's first frame should not pay for it. Returns its frames (the
    first view's picture is drawn from them)."""
    m = run_copy(model)
    preflight(m, policy, budget)
    run = Run(m, RunSettings(prompt, frames=frames, seed=0, record=True), Controls(policy, budget))
    return np.array(run.finish().frames.all())


class RunSession:
    """One interactive run. Build it (inputs are checked), iterate ``run()``."""

    def __init__(self, template, settings: RunSettings, policy: Policy, budget_frames: int,
                 keep_oracle_keys: bool = True, kind: str = "run"):
        self.settings = settings
        self.tag = RunTag.new(policy, budget_frames, kind)  # on every result of this run
        self.template = template  # the shared model (the oracle's reference run copies it)
        self.model = run_copy(template)  # hooks attach here, never to the shared model
        self.cfg = self.model.cfg
        self.controls = Controls(policy, budget_frames)
        self.dir = self.new_dir()
        self._tap = _Tap(keep_oracle_keys)
        self.heads = HeadMeter(self.model, last_step_only=True)  # the Heads tab, live
        self.job = Run(self.model, settings, self.controls, self.dir,
                       observers=[self._tap, self.heads])
        self.view = {"layer": self.cfg.layers - 1, "head": 0}  # the user's layer/head choice
        self.steps: list[StepRecord] = []
        self.timeline: list[tuple[int, dict]] = []  # (newest frame, share kept per source frame)
        self.snapshot: CacheSnapshot | None = None  # the newest chunk's, by reference
        self.cache_history = CacheHistory()  # every compression step, compact (the scrubber)
        self.oracle_steps: list[dict] = []  # per step: keys, mass, provenance, score, budget
        self.oracle_result: dict | None = None  # set by the Oracle view after the run
        self.oracle_controls: Controls | None = None  # the oracle's reference run (Stop ends it)
        self.running = False
        self.done = False
        self.error: str | None = None
        self.started = 0.0

    # -- what the run keeps ----------------------------------------------------------
    @functools.cached_property
    def hides(self) -> list[dict]:
        """When each object of the scene is hidden over the planned frames: the scene's
        truth, fixed for the run, so worked out once (every plot refresh draws it)."""
        spec = self.job.spec
        return hide_events(spec, self.settings.seed, self.settings.frames) if spec else []

    @property
    def frames(self) -> FrameSpool:
        return self.job.frames

    @property
    def recorder(self) -> QueryRecorder | None:
        return self.job.recorder

    @property
    def switches(self) -> list[dict]:
        """Live switches in frame order: policy or budget changes, and prompt switches."""
        return sorted(self.job.switches + self.job.stats.prompt_switches, key=lambda s: s["frame"])

    @property
    def summary(self) -> dict | None:
        return self.job.summary

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

    def switch_prompt(self, prompt: str, recache: str = "none") -> None:
        """Follow ``prompt`` from the next chunk; a prompt the model cannot read, or an
        unknown re-cache mode, is an error here and the run goes on unchanged."""
        frame = max(len(self.frames), 1)  # where it can apply at the earliest
        PromptSwitch(frame, str(prompt), recache).check(self.template.has_scenes, self.settings.seed,
                                                        1, frame + 1)
        self.controls.switch_prompt(str(prompt), recache)

    def stop(self) -> None:
        self.controls.stop()
        if self.oracle_controls is not None:
            self.oracle_controls.stop()

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
        elif self.model is not None:  # the live cache is within the budget now (just
            # compressed); the next chunk's write will put it over: try one frame over
            preflight(self.model, policy, budget_frames)

    @staticmethod
    def new_dir() -> Path:
        return Path(tempfile.mkdtemp(prefix="ffviz-run-"))

    # -- the run ---------------------------------------------------------
    def run(self) -> Iterator[Step]:
        """Yield each chunk's ``Step`` after recording what the views need. Files
        (video.mp4, record.npz, decisions.jsonl, summary.json) are written when
        the run ends, also when it is stopped or abandoned; a run that fails
        leaves none."""
        self.running, self.started = True, time.perf_counter()
        steps = iter(self.job)
        try:
            try:
                for step in steps:
                    self._record(step)
                    yield step
            finally:
                steps.close()  # abandoned: the run ends now (files written, hooks off)
        except OutputError as e:  # a full disk must not hide the run's own outcome
            self.error = str(e)
        except Exception as e:  # the app tells why; the run removed its files
            self.error = f"the run failed: {e}"
            raise
        finally:
            self.running, self.done = False, True
            self.heads.remove()  # its hooks are on this run's model copy
            self.model = None  # the run let go of it too

    def _record(self, step: Step) -> None:
        n = self.cfg.tokens_per_frame
        now = time.perf_counter() - self.started
        kv = step.cache_tokens * self.cfg.layers * self.cfg.heads * self.cfg.head_dim * 2 * 4
        self.steps.append(StepRecord(
            index=step.index, frame=step.frame_indices[-1], n_frames=len(step.frame_indices),
            policy=step.policy, budget_frames=step.budget_frames, switched=step.switched,
            tokens_peak=step.cache_tokens_peak, tokens=step.cache_tokens, kv_bytes=kv,
            policy_ms=1000 * step.seconds["policy"], seconds=step.seconds["total"], elapsed=now))
        self.timeline.append((step.frame_indices[-1], dict(self._tap.survivors)))
        self.snapshot = CacheSnapshot(step.index, step.frame_indices[-1], self._tap.before,
                                      step.decision, step.budget_frames * n)
        if step.decision is not None:
            self.cache_history.add(capture(self.snapshot))
        stride = -(-self.settings.frames // ORACLE_MAX_STEPS)  # long runs: every stride-th step
        if self._tap.keys is not None and step.decision is not None and step.index % stride == 0 \
                and len(self.oracle_steps) < ORACLE_MAX_STEPS:
            self.oracle_steps.append({
                "frame": step.frame_indices[-1], "keys": self._tap.keys,
                "provenance": self._tap.before, "budget_tokens": step.budget_frames * n,
                "score": [None if d.score is None else d.score[0].float() for d in step.decision.layers]})

    def head_measures(self) -> dict:
        """The Heads tab's layer x head arrays: the measures so far, the roles in force
        and, at the newest compression, each head's share of the uniform budget."""
        snap = self.snapshot
        policy, _, _ = self.controls.snapshot()
        decision = snap.decision if snap is not None else None
        masses = [p["mass"][None] for p in snap.provenance] if decision is not None else None
        return head_view(self.heads, policy, decision, snap.budget_tokens if snap else 0, masses)

    def files(self) -> list[str]:
        names = ("video.mp4", "record.npz", "decisions.jsonl", "summary.json", "plots.html",
                 "oracle.json")
        return [str(self.dir / n) for n in names if (self.dir / n).exists()]

    def close(self) -> None:
        """Free everything (the app calls it when the user's session ends)."""
        self.stop()
        self.model = None
        self.oracle_steps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)  # the frame spool has no name: it goes with us


def query_arrays(session: RunSession | None):
    """(frames, mean_pre, var_pre, mean_post, var_post) of the recorded queries so
    far, or None before anything was recorded. Means/vars are (F, L, H, d)."""
    rec = None if session is None else session.recorder
    if rec is None or rec.n_slots == 0:
        return None
    return rec.frames, rec.mean("pre"), rec.var("pre"), rec.mean("post"), rec.var("post")


def interleave(sessions: list[RunSession]) -> Iterator[None]:
    """Run several sessions chunk by chunk in turn (A/B, the memory test): one yield
    per round. Each run's end (also when it is abandoned) closes its files."""
    runs = [s.run() for s in sessions]
    live = list(runs)
    try:
        while live:
            for r in list(live):
                try:
                    next(r)
                except StopIteration:
                    live.remove(r)
            yield
    finally:
        for r in runs:
            r.close()
