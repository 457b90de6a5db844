"""One run: the generation loop with its recorder, its frames, its files and its summary.

``Run`` is the only driver of ``ffviz.generate.generate``: the CLI's ``generate``
and ``bench``, the app (live runs, the API endpoint, A/B), ``eval`` and
``showcase`` all iterate one::

    run = Run(model, settings, Controls("window", 4), out_dir="runs/demo")
    for step in run:        # one Step per chunk, as generate yields them
        ...
    run.summary             # summary.json's content

While it runs it keeps what every user measures (``RunStats``), the frames once
(``run.frames``, a ``FrameSpool``: on disk, the newest few in memory) and, when
``settings.record``, the query recorder. ``observers`` (``generate.Observer``) see
the cache around each policy decision: the app's cache snapshots, eval's probes.

How a run ends decides what is left on disk: at its last frame, at
``controls.stop()`` or when its consumer abandons it (closes the iterator) the
files are written; when it fails they are removed, and the error is raised.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

from ffviz.export import FrameSpool, OutputError, RunWriter, json_safe, reproduce_command
from ffviz.generate import Controls, Observer, RunSettings, Step, generate
from ffviz.hooks import QueryRecorder
from ffviz.metrics import story_consistency
from ffviz.models import VideoModel
from ffviz.scenes import Scene, scene_story


@dataclasses.dataclass
class RunStats:
    """The numbers every user of a run reads, summed over its chunks."""
    chunks: int = 0
    compressions: int = 0  # chunks where the policy returned a decision
    peak_tokens: int | float = 0  # most real tokens per head (after a write, before the policy)
    seconds: float = 0.0  # Step.seconds["total"], summed
    policy_seconds: float = 0.0  # Step.seconds["policy"], summed over every chunk
    compress_seconds: float = 0.0  # ... over the chunks with a decision
    switches: list = dataclasses.field(default_factory=list)  # where policy or budget changed
    prompt_switches: list = dataclasses.field(default_factory=list)  # where the prompt changed

    def add(self, step: Step) -> None:
        self.chunks += 1
        self.peak_tokens = max(self.peak_tokens, step.cache_tokens_peak)
        self.seconds += step.seconds["total"]
        self.policy_seconds += step.seconds["policy"]
        if step.decision is not None:
            self.compressions += 1
            self.compress_seconds += step.seconds["policy"]
        if step.switched:
            self.switches.append({"frame": step.frame_indices[0], "policy": step.policy,
                                  "params": step.policy_params, "budget_frames": step.budget_frames})
        if step.prompt_switch is not None:
            self.prompt_switches.append(step.prompt_switch)


class _Fanout(Observer):
    """Several observers as the one ``generate`` takes."""

    def __init__(self, observers: Sequence[Observer]):
        self.observers = list(observers)

    def after_write(self, cache, frames, ctx):
        for o in self.observers:
            o.after_write(cache, frames, ctx)

    def after_compress(self, cache, decision, ctx):
        for o in self.observers:
            o.after_compress(cache, decision, ctx)


class Run:
    """``generate`` on ``model``, with files in ``out_dir`` when given (see the module
    docstring). Raises ``GenerationError``/``PromptError``/``OutputError`` here,
    before any work, when the settings or the folder cannot work. Runs once."""

    def __init__(self, model: VideoModel, settings: RunSettings, controls: Controls,
                 out_dir: Path | None = None, observers: Sequence[Observer] = (),
                 future_queries=None):
        self.spec, self.prompt_notes = settings.validate(model.has_scenes)
        self.model, self.settings, self.controls = model, settings, controls
        self.cfg, self.model_name, self.has_scenes = model.cfg, model.name, model.has_scenes
        one = getattr(model.cfg, "one_motion", False) if settings.one_motion is None else settings.one_motion
        self.one_motion = bool(getattr(model, "carries_motion", False) and one)  # what the run does
        self.observer = _Fanout(observers) if observers else None
        self.future_queries = future_queries
        self.writer = RunWriter(out_dir, fps=model.fps) if out_dir is not None else None
        self.frames = FrameSpool(dir=self.writer.dir if self.writer else None)
        cfg = model.cfg
        self.recorder = QueryRecorder(cfg.layers, cfg.heads, cfg.head_dim) if settings.record else None
        self.stats = RunStats()
        self.seconds = 0.0  # wall time of the whole run, once it has ended
        self.started = self.ended = False
        self._first = controls.snapshot()[:2]  # (policy, budget) as the run started
        self._final = None  # (policy, budget) as the run ended
        self._summary: dict | None = None

    @property
    def switches(self) -> list[dict]:
        return self.stats.switches

    def __iter__(self) -> Iterator[Step]:
        if self.started:
            raise RuntimeError("a Run runs once: make a new one")
        self.started = True
        t0 = time.perf_counter()
        if self.recorder is not None:
            self.recorder.attach(self.model)
        completed = False
        try:
            for step in generate(self.model, self.settings, self.controls, self.observer,
                                 self.future_queries):
                self.frames.add(step.frames)
                if self.writer:
                    self.writer.add(step)
                self.stats.add(step)
                yield step
            completed = True
        except GeneratorExit:  # its consumer let go: a run stopped early, still written
            completed = True
            raise
        finally:
            self.seconds = time.perf_counter() - t0
            if self.recorder is not None:
                self.recorder.detach()
            policy, budget, _ = self.controls.snapshot()
            self._final = (policy, budget)
            self.ended, self.model = True, None  # the model (a user's copy, in the app) can go
            self._close_files(completed)

    def finish(self) -> "Run":
        """Run to the end (for callers that need no step)."""
        for _ in self:
            pass
        return self

    def _close_files(self, completed: bool) -> None:
        if self.writer is None:
            return
        if not completed:
            self.writer.abort()
            return
        try:
            self.writer.close(self.summary, self.frames.all(), self.recorder)
        except Exception as e:  # a full disk, a folder removed meanwhile
            self.writer.abort()
            raise OutputError(f"could not write the run's files: {e}") from e

    # -- what it measured ------------------------------------------------------------
    @property
    def metrics(self) -> dict:
        """Scene consistency of the generated frames (``ffviz.metrics.consistency``); NaN
        where undefined. Models without scenes have none."""
        if not self.has_scenes:
            return {"computed": False, "reason": "consistency metrics compare against the tiny "
                    "model's scene renderer; this model has no scenes"}
        g, video = self.cfg.given_frames, self.frames.all()
        if len(video) <= g:
            return {}
        story = scene_story(Scene(self.spec, self.settings.seed), self.stats.prompt_switches,
                            self.settings.seed)
        return story_consistency(video[g:], story, start=g)

    @property
    def summary(self) -> dict | None:
        """summary.json's content (strict JSON: NaN is null), once the run has ended."""
        if self._summary is None and self.ended:
            self._summary = self._summarize()
        return self._summary

    def _summarize(self) -> dict:
        policy, budget = self._final
        s, frames, g = self.stats, len(self.frames), self.cfg.given_frames
        return json_safe({
            "prompt": self.settings.prompt, "scene": self.spec.describe() if self.spec else None,
            "prompt_notes": self.prompt_notes, "model": self.model_name,
            "seed": self.settings.seed, "frames": frames, "given_frames": g,
            "snap": bool(self.has_scenes and (self.cfg.snap if self.settings.snap
                                              is None else self.settings.snap)),
            "one_motion": self.one_motion,
            "seconds": round(self.seconds, 3), "fps": round(frames / max(self.seconds, 1e-9), 2),
            "policy": policy.name, "policy_params": policy.params(), "budget_frames": budget,
            **({"policy_report": report} if (report := policy.report()) is not None else {}),
            "tokens_per_frame": self.cfg.tokens_per_frame,
            "peak_cache_tokens": s.peak_tokens,  # real tokens per head (KVCache.tokens)
            "policy_ms_per_step": round(1000 * s.policy_seconds / max(s.chunks, 1), 3),
            "recorder_bytes": self.recorder.nbytes() if self.recorder else 0,
            "switches": s.switches, "prompt_switches": s.prompt_switches,
            "stopped_early": frames < self.settings.frames,
            "metrics": self.metrics,
            "reproduce": reproduce_command(self.settings, *self._first, self.model_name, frames,
                                           s.switches),
        })


def run(model: VideoModel, settings: RunSettings, controls: Controls, out_dir: Path | None = None,
        progress=None) -> dict:
    """A whole run (files in ``out_dir`` when given); ``progress``: a tqdm-like
    ``update(frames)``. Returns the summary."""
    r = Run(model, settings, controls, out_dir)
    for step in r:
        if progress is not None:
            progress.update(len(step.frame_indices))
    return r.summary
