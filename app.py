"""ffviz: watch a KV cache decide. The Gradio app (and the Hugging Face Space entry point).

This file lays out widgets and wires them to plain functions in ``ffviz.app``
(the user's run session, views) and ``ffviz.viz`` (figures), all tested without
a browser. Importing it does nothing: ``build()`` loads the model, lays out the
page and warms up; ``launch()`` (what ``python app.py`` and the Space run) builds
and serves on ``GRADIO_SERVER_PORT`` (7860). Per-user state is one
``RunSession`` in a ``gr.State``: it owns a copy of the model (hooks attach to
the model object, so users must never share one), the run's ``Controls`` (live
steering) and everything the plots need. Beside it: the user's A/B runs, memory
test and ``QualityLog`` (finished runs, for quality against cache size), and a
small dict of view choices (the open tab: RoPE 101 follows a run only while open).

A Generate during a run stops that run and starts the new one after it (the click
first stops, then queues the run with ``trigger_mode="always_last"``).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from ffviz.app.memory_test import MemoryTest
from ffviz.app.params import build_policy, param_specs
from ffviz.app.provenance import plural
from ffviz.app.quality import QualityLog, curves
from ffviz.app.session import (APP_MAX_FRAMES, InputError, RunSession, check_inputs, interleave,
                               preflight, query_arrays, warm_up)
from ffviz.app.views import (cache_view, current_frame, frame_caption, live_views, oracle_summary,
                             plot_views, status_line, summary_table, write_json, write_plots_html)
from ffviz.evaluate import EvalError, parse_list
from ffviz.generate import Controls, GenerationError
from ffviz.recache import RECACHE_MODES
from ffviz.hooks import run_copy
from ffviz.models import load_model
from ffviz.policies import POLICIES, PolicyError, make_policy
from ffviz.reference import fidelity, reference_run
from ffviz.run import run as run_once
from ffviz.scenes import EXAMPLE_PROMPTS, PromptError, parse_prompt
from ffviz.viz import figures as F
from ffviz.viz import rope_explainer as R
from ffviz.viz.cacheview import side_by_side
from ffviz.viz.projections import projection_figure, warm_up_umap
from ffviz.viz.quality import quality_figure
from ffviz.viz.story import story_picture

SPECS = param_specs()
# offline policies need a reference run first (the oracle): not in the live list
OFFLINE = {n for n, c in POLICIES.items() if getattr(c, "offline", n == "oracle")}
LIVE_POLICIES = [n for n in POLICIES if n not in OFFLINE]
DEFAULT_POLICY = "future_forcing" if "future_forcing" in LIVE_POLICIES else "window"
DEFAULT_FRAMES, DEFAULT_BUDGET = 48, 4
PLOT_EVERY_S = 1.0  # plots refresh at most this often during a run; the frame every chunk

STORY_BUDGET = 3  # the first view's picture: frames its cache keeps
ROPE_TAB = "RoPE 101"
ROPE_DEFAULTS = (8, 2, 5, 0)  # frame, row, column, plane

CSS = """
#frame img, #memory-frames img {image-rendering: pixelated}
#prompt-notes .notes {color: #b35900}
"""


def _notes_md(notes) -> str:
    """The prompt's notes as a line next to it: words the scene grammar ignored, and
    what it assumed."""
    if not notes:
        return ""
    return ("<span class='notes'>understood differently: " + "; ".join(notes) +
            " (the scene grammar reads colours, shapes, sizes, a background, a pillar, speed "
            "and 'leaving the view')</span>")


def _reproduce_md(summary) -> str:
    cmd = (summary or {}).get("reproduce")
    return f"**reproduce this run from the command line:**\n```\n{cmd}\n```" if cmd else ""


def _budgets(sweep, budget: int, frames: int) -> list[int]:
    """The A/B budgets: the chosen one first, then the sweep's ("2,8"), each checked."""
    try:
        sweep = parse_list(str(sweep or "").replace(";", ","), int, "budget")
    except EvalError as e:
        raise GenerationError(str(e)) from None
    for b in sweep:
        if not 1 <= b <= frames:
            raise GenerationError(f"budget {b} is outside 1..{frames} (the run's frames)")
    return list(dict.fromkeys([budget, *sweep]))


def build() -> "App":
    """The app as ``python app.py`` and the Space serve it: settings from the environment,
    the embedded model loaded, first-call costs paid before the first user."""
    # One thread per run: the tiny model gains nothing from more, and concurrent users
    # (or any other busy process) on a 2-core box make multi-threaded ops stall in
    # their barriers (measured: 0.09 s/frame with 1 thread vs 1-4 s/frame with 2).
    torch.set_num_threads(int(os.environ.get("FFVIZ_TORCH_THREADS", "1")))
    # FFVIZ_MODELS="tiny,wan:tiny-random" (or wan:/path/ckpt.pt on a GPU) offers a model
    # choice; unset: the embedded tiny model only, and no model widget
    names = [n.strip() for n in os.environ.get("FFVIZ_MODELS", "tiny").split(",") if n.strip()]
    app = App(names or ["tiny"], int(os.environ.get("FFVIZ_MAX_FRAMES", APP_MAX_FRAMES)))
    warm_up_umap()  # numba compiles in the background, so the first UMAP click is not slow
    return app


def launch(**kwargs):
    """Build the app and serve it (see ``App.launch``)."""
    return build().launch(**kwargs)


def _trace(what: str) -> None:
    if os.environ.get("FFVIZ_TRACE"):
        print(f"ffviz trace {time.time():.3f} {what}", flush=True)


def _layer_head(layer, head, cfg=None) -> tuple[int, int]:
    """Widget values to indices, clamped to ``cfg`` (models differ in layers/heads)."""
    l, h = int(str(layer).lstrip("L") or 0), int(str(head).lstrip("H") or 0)
    if cfg is not None:
        l, h = min(max(l, 0), cfg.layers - 1), min(max(h, 0), cfg.heads - 1)
    return l, h


def _policy(name, values):
    if name in OFFLINE:
        raise PolicyError(f"the {name} policy is offline (it needs a full-cache reference run); "
                          "use the Oracle tab after a run")
    return build_policy(name, SPECS, list(values))


def _cannot_start(e: Exception, title: str = "Cannot start"):
    """An input error as the user sees it (no traceback in the server log: it is not a bug)."""
    return gr.Error(str(e), title=title, print_exception=False)


def _video(path: Path, frames: int, fps: int):
    """The run's video, opened at its last frame (the browser shows the opening frame
    before it plays: frame 0 would sit clean next to a noisier current frame)."""
    if not path.exists():
        return None
    return gr.update(value=str(path), playback_position=max(0.0, (frames - 1) / max(fps, 1)))


class App:
    """The page: its widgets (attributes) wired to its handlers (methods).

    ``model_names``: the models a user may pick (loaded on first use; the embedded
    tiny model is loaded now, it lays out the page); ``max_frames``: the cap on a run.
    """

    SPECS, OFFLINE, LIVE_POLICIES = SPECS, OFFLINE, LIVE_POLICIES

    def __init__(self, model_names: list[str], max_frames: int = APP_MAX_FRAMES):
        self.MODEL_NAMES = model_names
        self.MULTI_MODEL = len(model_names) > 1
        self.MAX_FRAMES = max_frames
        self.MODEL = load_model("tiny")  # read-only template: every run works on its own copy
        self.models = {"tiny": self.MODEL}  # name -> template, loaded on first use
        self._models_lock = threading.Lock()
        # first-call costs paid before the first user; the first view's picture is this run
        story = warm_up(self.MODEL, make_policy(DEFAULT_POLICY), EXAMPLE_PROMPTS[0], frames=8,
                        budget=STORY_BUDGET)
        self.STORY = story_picture(story, self.MODEL.cfg.given_frames, STORY_BUDGET)
        self.demo = self._layout()
        self.demo.queue(default_concurrency_limit=4, max_size=64)

    def get_model(self, name=None):
        """The template for ``name`` (one of MODEL_NAMES), loaded once and cached."""
        name = name or self.MODEL_NAMES[0]
        if name not in self.MODEL_NAMES:
            raise gr.Error(f"model {name!r} is not offered here (FFVIZ_MODELS: "
                           f"{', '.join(self.MODEL_NAMES)})", print_exception=False)
        with self._models_lock:  # one load per model, also when several users pick it at once
            if name not in self.models:
                try:
                    self.models[name] = load_model(name)
                except Exception as e:
                    raise gr.Error(f"could not load model {name!r}: {e}") from None
            return self.models[name]

    def _split(self, rest):
        """The policy parameter values, the snap and one-motion choices and the model (the
        last input when the model choice is offered) from the inputs after the named ones."""
        rest = list(rest)
        n = len(SPECS)
        snap, one_motion = (None if len(rest) <= i or rest[i] is None else bool(rest[i])
                            for i in (n, n + 1))
        model = self.get_model(rest[n + 2] if len(rest) > n + 2 else None)
        return rest[:n], snap, one_motion, model

    # -- the main run ------------------------------------------------------------------

    def request_stop(self, session):
        """A new Generate while a run goes on: that run stops (within a chunk) and the new
        one starts after it (the next event in the chain waits for it)."""
        if session is not None and session.running:
            session.stop()
            gr.Info("the running generation stops; the new one starts right after it")

    def start_run(self, prompt, seed, frames, policy, budget, layer, head, metric, reference, old,
                  ui, log, *rest):
        """Generate, streaming one frame update per chunk (plots at most every PLOT_EVERY_S)."""
        _trace("click received")
        ui = ui if ui is not None else {}
        log = log if log is not None else QualityLog()
        try:
            params, snap, one_motion, model = self._split(rest)
            settings = check_inputs(prompt, frames, budget, seed, self.MAX_FRAMES, model.has_scenes,
                                    snap, one_motion)
            pol = _policy(policy, params)
            preflight(model, pol, int(budget))
        except (*InputError, gr.Error) as e:
            yield {self.status: f"**cannot start** - {e}"}  # not the previous run's status
            raise e if isinstance(e, gr.Error) else _cannot_start(e) from None
        if old is not None:
            old.close()  # this user's previous run: its files were served already
        session = RunSession(model, settings, pol, int(budget))
        session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
        session.view["merges"] = ui.get("merges", False)
        last_plot, plot_cost = -1e9, 0.0
        steps = session.run()
        fresh = self._fresh_outputs(session)  # the previous run's results leave the screen
        try:
            for step in steps:
                out = {self.state: session, self.status: status_line(session),
                       **self._live_outputs(session), **fresh}
                fresh = {}
                if step.index > 0 and time.perf_counter() - last_plot > max(PLOT_EVERY_S, 3 * plot_cost):
                    t = time.perf_counter()  # plots cost more than a chunk: refresh them less
                    out.update(self._plot_outputs(session, metric, reference, log, ui))
                    last_plot, plot_cost = time.perf_counter(), time.perf_counter() - t
                if step.index == 0:
                    _trace("first frame ready")
                yield out
        except InputError as e:  # e.g. a policy whose parameters do not fit the budget
            gr.Warning(f"the run stopped: {e}")
        finally:  # also when the user cancels or leaves: hooks off, files closed, run freed
            steps.close()
        log.add(session)
        out = {self.state: session, self.log: log,
               self.status: status_line(session) + (" - " + session.error if session.error else "")}
        if len(session.frames):
            out.update(self._plot_outputs(session, metric, reference, log, ui))
            out.update(self._live_outputs(session))
        if (session.dir / "summary.json").exists():  # the run wrote its files (a failed one left none)
            write_plots_html(session, session.dir / "plots.html", log=log)
            out.update({self.video: _video(session.dir / "video.mp4", len(session.frames),
                                           session.template.fps),
                        self.downloads: session.files(), self.summary_json: session.summary,
                        self.reproduce: _reproduce_md(session.summary)})
        yield out

    def _fresh_outputs(self, session) -> dict:
        """At a run's start: results of the previous run that this run does not replace
        at once are cleared and say which run they will be about."""
        label = session.tag.text()
        return {self.oracle_plot: F.empty("Oracle: proxy vs true future attention",
                                          f"{label}: finish it, then press 'Run oracle'"),
                self.oracle_status: f"no oracle result for {label} yet",
                self.video: None, self.downloads: None, self.summary_json: None,
                self.reproduce: "", self.cache_step: gr.update(maximum=1, value=1),
                self.prompt_notes: _notes_md(session.job.prompt_notes)}

    def _live_outputs(self, session) -> dict:
        live = live_views(session)
        return {self.frame_img: gr.update(value=live["frame"], label=frame_caption(session)),
                self.strip_img: live["strip"]}

    def _plot_outputs(self, session, metric, reference, log=None, ui=None) -> dict:
        p = plot_views(session, metric, reference, log=log)
        n = len(session.cache_history)
        out = {self.quality_plot: p["quality"], self.cache_plot: p["cache"],
               self.drift_plot: p["drift"], self.proj_plot: p["projections"],
               self.scores_plot: p["scores"], self.timeline_plot: p["timeline"],
               self.metrics_plot: p["metrics"], self.heads_plot: p["heads"],
               self.heads_table: p["heads_table"]}
        if session.view.get("cache_step") is None:  # following the newest step
            out[self.cache_step] = gr.update(maximum=max(n - 1, 1), value=max(n - 1, 1))
        else:
            out[self.cache_step] = gr.update(maximum=max(n - 1, 1))
        if ui and ui.get("tab") == ROPE_TAB:  # the open RoPE tab follows the run
            out.update(zip(self.rope_plots, self.rope_views(session, *ui.get("rope", ROPE_DEFAULTS),
                                                           f"L{session.view['layer']}",
                                                           f"H{session.view['head']}", ui)))
        return out

    def steer(self, session, policy, budget, *params):
        """Live steering: takes effect at the next chunk of the running generation. A
        rejected change puts the controls back to what the run uses (a box must never
        show a value that is not in force, nor hand it to the next Generate)."""
        unchanged = [gr.skip()] * (2 + len(SPECS))
        if session is None or not session.running:
            return unchanged
        try:
            pol = _policy(policy, params)
            budget = int(budget)
            if budget < 1:
                raise GenerationError(f"budget must be at least 1 frame (got {budget})")
            session.try_policy(pol, budget)
            if not session.steer(pol, budget):
                return unchanged  # nothing changed (e.g. a parameter box lost focus)
        except InputError as e:
            gr.Warning(f"not switched: {e}")
            return self._controls_in_force(session)
        except Exception as e:  # a policy that fails on this cache: keep the old one
            gr.Warning(f"not switched: {policy} failed on the current cache: {e}")
            return self._controls_in_force(session)
        gr.Info(f"switching to {pol.name}, budget {plural(budget, 'frame')}, at the next chunk")
        return unchanged

    def _controls_in_force(self, session) -> list:
        """Policy, budget and the running policy's parameter boxes as the run has them."""
        pol, budget, _ = session.controls.snapshot()
        values = pol.params()
        return [pol.name, budget] + [values[s.name] if s.policy == pol.name and s.name in values
                                     else gr.skip() for s in SPECS]

    def stop_run(self, session, ab_sessions, memory):
        for s in [session, *(ab_sessions or []), *(memory.sessions if memory else [])]:
            if s is not None:
                s.stop()

    def set_view(self, session, layer, head, metric, reference, log, merges):
        """Layer/head/drift settings changed: re-render (a running generation picks the
        new view up at its next chunk through ``session.view``)."""
        if session is None:
            return {}
        session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
        session.view["merges"] = bool(merges)
        out = self._plot_outputs(session, metric, reference, log)
        if session.oracle_result is not None:
            out[self.oracle_plot] = F.oracle_figure(session.oracle_result,
                                                    *_layer_head(layer, head, session.cfg),
                                                    session.tag.text())
        return out

    def pick_head(self, session, evt: gr.SelectData):
        """A click on the Heads table: that cell's layer and head become the view's (the
        layer/head dropdowns change, and with them the cache view)."""
        row, col = evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, 0)
        cfg = session.cfg if session is not None else self.MODEL.cfg
        if col < 1 or not 0 <= row < cfg.layers:  # the layer column names the row
            return gr.skip(), gr.skip()
        return f"L{row}", f"H{col - 1}"

    def set_cache_step(self, session, index, merges, ui):
        """The scrubber: replay compression step ``index`` (the newest: follow the run)."""
        if ui is not None:
            ui["merges"] = bool(merges)
        if session is None:
            return cache_view(None)
        n = len(session.cache_history)
        index = int(index or 0)
        session.view["cache_step"] = None if index >= n - 1 else index
        session.view["merges"] = bool(merges)
        return cache_view(session)

    def show_umap(self, session, layer, head):
        if session is None or session.recorder is None:
            raise gr.Error("run something first: UMAP maps the run's recorded queries",
                           print_exception=False)
        return projection_figure(session.recorder, *_layer_head(layer, head, session.cfg),
                                 method="umap", label=session.tag.text())

    # -- the oracle ----------------------------------------------------------------------

    def run_oracle(self, session, horizon, layer, head, log=None):
        """Offline: a full-cache reference run over the frames the run made (Stop ends
        it), then proxy vs true future attention. The result goes into the export."""
        if session is None or not len(session.frames):
            raise gr.Error("finish a run first: the oracle compares that run's scores with the truth",
                           print_exception=False)
        if session.running:
            raise gr.Error("the run is still going: stop it or wait until it ends",
                           print_exception=False)
        label, n = session.tag.text(), len(session.frames)
        yield (F.empty("Oracle", f"{label}: running the full-cache reference over {n} frames..."),
               f"{label}: reference run of {n} frames... (Stop ends it)", gr.skip())
        session.oracle_controls = Controls("full", n)
        settings = dataclasses.replace(session.settings, frames=n)  # a stopped run: its own frames
        ref = reference_run(session.template, settings, int(horizon), controls=session.oracle_controls)
        if session.oracle_controls.stop_requested:
            yield (F.empty("Oracle", f"{label}: the reference run was stopped"),
                   f"{label}: oracle stopped before the reference run ended", gr.skip())
            return
        result = fidelity(session.oracle_steps, ref, int(horizon))
        session.oracle_result = result
        msg = (f"{result['steps']} compression steps compared" if result["steps"] else result["message"])
        figure = F.oracle_figure(result, *_layer_head(layer, head, session.cfg), label)
        if session.dir.exists():  # the export: oracle.json, and the figure in plots.html
            write_json(session.dir / "oracle.json", oracle_summary(result, session.tag))
            write_plots_html(session, session.dir / "plots.html", {"Oracle": figure}, log)
        yield figure, f"{label}: {msg}", session.files()

    # -- A/B ------------------------------------------------------------------------------

    def run_ab(self, prompt, seed, frames, policy, budget, policy_b, sweep, old_ab, log, *rest):
        """Two policies, same prompt/seed/budget, chunk by chunk side by side; then, for
        the budgets in ``sweep``, both again (quality against cache size)."""
        for s in old_ab or []:
            s.close()
        log = log if log is not None else QualityLog()
        try:
            params, snap, one_motion, model = self._split(rest)
            settings = check_inputs(prompt, frames, budget, seed, self.MAX_FRAMES, model.has_scenes,
                                    snap, one_motion)
            pa = _policy(policy, params)
            pb = _policy(policy_b, [None] * len(SPECS))  # B runs with its defaults
            budgets = _budgets(sweep, int(budget), settings.frames)
            for b in budgets:
                preflight(model, pa, b)
                preflight(model, pb, b)
        except (*InputError, gr.Error) as e:
            yield {self.ab_status: f"**cannot start A/B** - {e}"}
            raise e if isinstance(e, gr.Error) else _cannot_start(e, "Cannot start A/B") from None
        a = RunSession(model, settings, pa, int(budget), keep_oracle_keys=False, kind="A/B")
        b = RunSession(model, settings, pb, int(budget), keep_oracle_keys=False, kind="A/B")
        head = f"A = {a.tag.text()}, B = {b.tag.text()}"
        try:
            for _ in interleave([a, b]):
                yield {self.ab_state: [a, b], self.ab_img_a: current_frame(a),
                       self.ab_img_b: current_frame(b),
                       self.ab_status: f"**running** - A `{pa.name}`: {len(a.frames)} frames - "
                                       f"B `{pb.name}`: {len(b.frames)} frames  \n{head}"}
        except InputError as e:
            gr.Warning(f"A/B stopped: {e}")
        runs = [a, b]
        for extra in budgets[1:]:  # the sweep: no frames streamed, progress in the status
            if a.controls.stop_requested or b.controls.stop_requested:
                break
            yield {self.ab_status: f"**sweep** - budget {plural(extra, 'frame')}...  \n{head}"}
            pair = [RunSession(model, settings, p, extra, keep_oracle_keys=False, kind="A/B")
                    for p in (_policy(policy, params), _policy(policy_b, [None] * len(SPECS)))]
            for _ in interleave(pair):
                pass
            runs += pair
        for s in runs:
            log.add(s)
        yield self._ab_results(a, b, runs, head, log)

    def _ab_results(self, a, b, runs, head, log) -> dict:
        ta, tb = dict(summary_table(a.summary)), dict(summary_table(b.summary))
        rows = [[k, ta.get(k, ""), tb.get(k, "")] for k in {**ta, **tb}]
        stopped = [f"{side} stopped at frame {len(s.frames)}/{s.settings.frames}"
                   for side, s in (("A", a), ("B", b)) if len(s.frames) < s.settings.frames]
        state = ("**stopped** - " + ", ".join(stopped)) if stopped else "**done**"
        mine = {s.tag.text() for s in runs}
        points = [p for p in log.as_dicts() if p["run"] in mine]
        hides = a.hides
        ab = [c for c in (curves(a, f"A {a.tag.policy}"), curves(b, f"B {b.tag.policy}")) if c]
        label = f"A {a.tag.run_id} vs B {b.tag.run_id} · {a.tag.started}"
        files = [str(s.dir / "video.mp4") for s in (a, b) if (s.dir / "video.mp4").exists()]
        if a.dir.exists():
            files.append(write_json(a.dir / "ab.json", {
                "a": {"tag": a.tag.as_dict(), "summary": a.summary},
                "b": {"tag": b.tag.as_dict(), "summary": b.summary},
                "sweep": points}))
        return {self.ab_table: rows, self.ab_state: runs,
                self.ab_plot: F.ab_figure(a.steps, b.steps, a.tag.policy, b.tag.policy, label),
                self.ab_quality: quality_figure(ab, hides, points=points, label=label,
                                                title="A/B quality over time"),
                self.ab_video_a: _video(a.dir / "video.mp4", len(a.frames), a.template.fps),
                self.ab_video_b: _video(b.dir / "video.mp4", len(b.frames), b.template.fps),
                self.ab_files: files, self.log: log,
                self.ab_status: f"{state}  \n{head}"}

    # -- the memory test -----------------------------------------------------------------

    def run_memory(self, seed, budget, old, log, snap, one_motion=None):
        """Full, window and Future Forcing on the scene where objects leave and return,
        side by side; then which one brought each object back."""
        if old is not None:
            old.close()
        log = log if log is not None else QualityLog()
        try:
            test = MemoryTest(self.MODEL, seed, budget, self.MAX_FRAMES,
                              None if snap is None else bool(snap),
                              None if one_motion is None else bool(one_motion))
            for s in test.sessions:
                preflight(self.MODEL, s.controls.snapshot()[0], test.budget)
        except InputError as e:
            yield {self.mem_status: f"**cannot start the memory test** - {e}"}
            raise _cannot_start(e, "Cannot start the memory test") from None
        captions = [f"{s.tag.policy} ({s.tag.run_id})" for s in test.sessions]
        last_plot = -1e9
        try:
            for _ in test.run():
                frames = [s.frames.newest()[-1] if len(s.frames) else None for s in test.sessions]
                out = {self.mem_state: test, self.mem_status: test.status(),
                       self.mem_img: side_by_side(frames, captions, test.banner())}
                if time.perf_counter() - last_plot > PLOT_EVERY_S:
                    out[self.mem_plot] = quality_figure(test.runs(), test.hides,
                                                        label=test.sessions[0].tag.started,
                                                        title="Memory test: quality over time")
                    last_plot = time.perf_counter()
                yield out
        except InputError as e:
            gr.Warning(f"the memory test stopped: {e}")
        for s in test.sessions:
            log.add(s)
        files = [str(s.dir / "video.mp4") for s in test.sessions if (s.dir / "video.mp4").exists()]
        if test.sessions[0].dir.exists():
            files.append(test.export(test.sessions[0].dir / "memory_test.json"))
        label = " · ".join(s.tag.run_id for s in test.sessions) + " · " + test.sessions[0].tag.started
        figure = quality_figure(test.runs(), test.hides, label=label,
                                title="Memory test: quality over time")
        yield {self.mem_state: test, self.mem_status: test.status(), self.log: log,
               self.mem_plot: figure, self.quality_plot: figure,
               self.mem_verdict: test.verdict(), self.mem_files: files}

    # -- RoPE 101 -------------------------------------------------------------------------

    def rope_views(self, session, frame, row, col, plane, layer, head, ui=None):
        """The three steps of RoPE 101, on the run's own recorded queries when there is a run."""
        if ui is not None:
            ui["rope"] = (frame, row, col, plane)
        plane = int(plane)
        tm = session.template if session is not None else self.MODEL
        layer, head = _layer_head(layer, head, tm.cfg)
        q = query_arrays(session)
        if q is not None and len(q[0]) >= 2:
            frames, mean_pre, _, mean_post, _ = q
            pre, post = mean_pre[:, layer, head], mean_post[:, layer, head]
            query, source = pre[-1], f"{session.tag.text()}: this run's queries, L{layer} H{head}"
        else:
            frames, pre, post = R.synthetic_means(self.MODEL.rope)
            query, source = pre[0], "a synthetic stationary query (run something to see yours)"
        rot = R.rotation_figure(tm.rope, query, int(frame), int(row), int(col), plane,
                                max_frame=max(int(frame), 24))
        return (rot, R.mean_query_figure(tm.rope, pre, post, frames, plane, source),
                R.mean_distance_figure(pre, post, frames, source))

    # -- small handlers -------------------------------------------------------------------

    def switch_prompt(self, session, prompt, recache):
        """A prompt edited mid-run (Enter): the run follows it from the next chunk, the
        cache re-written as ``recache`` says; between runs it is just the next prompt."""
        if session is None or not session.running:
            return
        try:
            session.switch_prompt(prompt, recache)
        except InputError as e:
            gr.Warning(f"prompt not switched: {e}")
            return
        gr.Info(f"the run follows the new prompt from the next chunk (re-cache: {recache})")

    def read_prompt(self, prompt, seed):
        """What the scene grammar did not understand or assumed, shown next to the prompt."""
        if not str(prompt or "").strip() or self.MULTI_MODEL:
            return ""
        try:
            seed = int(float(seed or 0))
            _, notes = parse_prompt(str(prompt), max(seed, 0))
        except (PromptError, ValueError, OverflowError) as e:
            return f"<span class='notes'>not a scene yet: {e}</span>"
        return _notes_md(notes)

    def api_generate(self, prompt, policy, budget_frames, frames, seed, model_name=None):
        """/generate: one complete run; returns the mp4 and the summary."""
        model = self.get_model(model_name)
        try:
            settings = check_inputs(prompt, frames, budget_frames, seed, self.MAX_FRAMES,
                                    model.has_scenes)
            pol = _policy(policy, [None] * len(SPECS))
            preflight(model, pol, int(budget_frames))
        except InputError as e:
            raise _cannot_start(e) from None
        out = Path(RunSession.new_dir())
        try:
            summary = run_once(run_copy(model), settings, Controls(pol, int(budget_frames)), out)
        except InputError as e:
            raise _cannot_start(e) from None
        return str(out / "video.mp4"), summary

    def budget_info(self, budget, model_name=None):
        b = int(budget or 0)
        model = self.MODEL if model_name is None else self.get_model(model_name)
        return (f"budget = **{plural(b, 'frame')} = {b * model.cfg.tokens_per_frame} tokens** "
                "per layer and head")

    def model_views(self, name):
        """The model choice changed: layer/head choices follow the model's shape."""
        cfg = self.get_model(name).cfg
        return (gr.Dropdown([f"L{i}" for i in range(cfg.layers)], value=f"L{cfg.layers - 1}"),
                gr.Dropdown([f"H{i}" for i in range(cfg.heads)], value="H0"),
                gr.Slider(info=f"1 frame = {cfg.tokens_per_frame} tokens"))

    def show_params(self, policy):
        return [gr.Group(visible=(name == policy)) for name in POLICIES
                if any(s.policy == name for s in SPECS)]

    @staticmethod
    def _tab_opened(name):
        def opened(ui):
            if ui is not None:
                ui["tab"] = name
        return opened

    # -- layout ---------------------------------------------------------------------

    def _layout(self) -> gr.Blocks:
        cfg, max_frames = self.MODEL.cfg, self.MAX_FRAMES
        tokens, g = cfg.tokens_per_frame, cfg.given_frames
        private = {"concurrency_limit": None, "api_visibility": "private"}
        with gr.Blocks(title="ffviz - watch a KV cache decide", delete_cache=(1800, 3600)) as demo:
            self.state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
            self.ab_state = gr.State(None, delete_callback=lambda ss: [s.close() for s in ss] if ss else None)
            self.mem_state = gr.State(None, delete_callback=lambda m: m.close() if m is not None else None)
            self.log = gr.State(None)  # QualityLog: this user's finished runs
            self.ui = gr.State({"tab": "memory"})  # this user's open tab and view choices
            with gr.Row(equal_height=True, elem_id="story"):
                with gr.Column(scale=2, min_width=320):
                    gr.Markdown(
                        "## ffviz - watch a KV cache decide\n"
                        f"A video model draws each frame from the frames before it, held in a "
                        f"**KV cache**: frames 0-{g - 1} are **given** (drawn from your prompt), the "
                        "rest are **generated**, and when the cache is over its **budget** the "
                        "**policy** you pick decides which old frames the model may still look "
                        "at - press **Memory test** to see which policy brings back an object "
                        "that leaves the view." + (
                            " Other models can be picked below (loaded on first use)."
                            if self.MULTI_MODEL else ""),
                        elem_id="story-text")
                    mem_btn = gr.Button("Memory test: full vs window vs future_forcing",
                                        variant="primary", elem_id="memory-test")
                gr.Image(self.STORY, show_label=False, interactive=False, format="png",
                         elem_id="story-picture", scale=3, height=170,
                         buttons=[])
            with gr.Row():
                with gr.Column(scale=4):
                    prompt = gr.Textbox(EXAMPLE_PROMPTS[0], label="prompt", elem_id="prompt")
                    self.prompt_notes = gr.Markdown(self.read_prompt(EXAMPLE_PROMPTS[0], 0),
                                                    elem_id="prompt-notes")
                seed = gr.Number(0, label="seed", precision=0, scale=1)
                frames = gr.Number(DEFAULT_FRAMES, label=f"frames (max {max_frames})", precision=0,
                                   scale=1, elem_id="frames")
            gr.Examples(EXAMPLE_PROMPTS, inputs=prompt, label="examples (the scene grammar)")
            # only with FFVIZ_MODELS listing several models; a model without scenes takes any prompt
            self.model_choice = gr.Dropdown(
                self.MODEL_NAMES, value=self.MODEL_NAMES[0], label="model", visible=self.MULTI_MODEL,
                info="loaded on first use; the examples are the tiny model's scene grammar, other "
                     "models take any text", elem_id="model")
            with gr.Row():
                policy = gr.Dropdown(LIVE_POLICIES, value=DEFAULT_POLICY, label="policy",
                                     elem_id="policy")
                with gr.Column():
                    budget = gr.Slider(1, max_frames, value=DEFAULT_BUDGET, step=1,
                                       label="budget (frames)", info=f"1 frame = {tokens} tokens",
                                       elem_id="budget")
                    budget_tokens = gr.Markdown(self.budget_info(DEFAULT_BUDGET), elem_id="budget-tokens")
                with gr.Column(min_width=180):
                    snap = gr.Checkbox(bool(getattr(cfg, "snap", False)), label="snap to palette",
                                       info="snap each generated frame to the scene's colours (the "
                                            "model card's default)", elem_id="snap")
                    one_motion = gr.Checkbox(bool(getattr(cfg, "one_motion", False)), label="one motion",
                                             info="each patch moves with the scene or stands still (the "
                                                  "model card's default)", elem_id="one-motion")
                    recache = gr.Dropdown(list(RECACHE_MODES), value="none", elem_id="recache",
                                          label="re-cache at a prompt switch",
                                          info="edit the prompt mid-run and press Enter: none keeps "
                                               "the old prompt in the cache, recent / all re-write it")
                with gr.Column(min_width=200):
                    go_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            self.param_widgets, groups = [], []
            with gr.Accordion("policy parameters (change them mid-run: they apply at the next chunk)",
                              open=False):
                for name in POLICIES:
                    specs = [s for s in SPECS if s.policy == name]
                    if not specs:
                        continue
                    with gr.Group(visible=(name == DEFAULT_POLICY)) as g_:
                        with gr.Row(equal_height=False):
                            for s in specs:
                                self.param_widgets.append(_param_widget(s))
                    groups.append(g_)
            self.status = gr.Markdown("press **Generate**", elem_id="status")
            with gr.Row():
                with gr.Column(scale=2, min_width=280):
                    self.frame_img = gr.Image(label="current frame", elem_id="frame", height=280,
                                              interactive=False, format="png")
                    self.strip_img = gr.Image(label="newest frames", height=90,
                                              interactive=False, format="png", elem_id="strip")
                    self.video = gr.Video(label="video (when the run ends)", height=200,
                                          interactive=False, elem_id="video")
                with gr.Column(scale=5):
                    self.quality_plot = _plot(quality_figure([]), elem_id="quality")
                    with gr.Row():
                        layer = gr.Dropdown([f"L{i}" for i in range(cfg.layers)],
                                            value=f"L{cfg.layers - 1}", label="layer")
                        head = gr.Dropdown([f"H{i}" for i in range(cfg.heads)], value="H0", label="head")
            with gr.Tabs() as self.tabs:
                with gr.Tab("Memory test", id="memory") as t_memory, gr.Column(elem_id="memory-panel"):
                    gr.Markdown(
                        "The scene: two objects leave the view for a while and come back. Three "
                        "policies run it on the same seed and budget (the budget above): the "
                        "**full** cache keeps everything, the **window** keeps the newest frames "
                        "only, **future_forcing** keeps what it predicts future frames will look "
                        "at. Which one brings the objects back? Grey bands: an object is hidden; "
                        "*back* / *lost*: each policy's verdict at the return.")
                    self.mem_status = gr.Markdown(elem_id="memory-status")
                    self.mem_img = gr.Image(label="side by side (newest frame of each run)",
                                            interactive=False, format="png", elem_id="memory-frames",
                                            height=300)
                    self.mem_plot = _plot(elem_id="memory-quality")
                    self.mem_verdict = gr.Markdown(elem_id="memory-verdict")
                with gr.Tab("Cache view", id="cache") as t_cache:
                    self.cache_plot = _plot(cache_view(None), elem_id="cacheview")
                    with gr.Row():
                        self.cache_step = gr.Slider(0, 1, value=1, step=1, elem_id="cache-step",
                                                    label="compression step (drag to replay one; "
                                                          "rightmost follows the run)", scale=4)
                        merges = gr.Checkbox(False, label="merge lines", scale=1,
                                             info="a line from each merged token to its target")
                with gr.Tab("Drift", id="drift") as t_drift:
                    with gr.Row():
                        metric = gr.Radio(["frechet", "kl", "cosine"], value="frechet", label="distance")
                        reference = gr.Radio(["first", "running"], value="first", label="against")
                    self.drift_plot = _plot(F.empty("Query drift", "no run yet"), elem_id="drift")
                with gr.Tab("Projections", id="projections") as t_proj:
                    umap_btn = gr.Button("UMAP (same map for pre and post)")
                    self.proj_plot = _plot(F.empty("Query projections", "no run yet"))
                with gr.Tab("Scores", id="scores") as t_scores:
                    self.scores_plot = _plot(F.empty("Proxy scores", "no run yet"))
                with gr.Tab("Cache timeline", id="timeline") as t_timeline:
                    self.timeline_plot = _plot(F.timeline_figure([]))
                with gr.Tab("Heads", id="heads") as t_heads:
                    gr.Markdown("Which heads carry the scene across frames? Each head's share of "
                                "attention on the newest frames (Forcing-KV's score): a static head "
                                "looks only there, a dynamic one reaches back into the cache. With "
                                "`head_budget=adaptive` each head's share of the budget shows too. "
                                "Click a cell of the table to see that head in the cache view.")
                    self.heads_plot = _plot(F.heads_figure({}, 0, 0), elem_id="heads")
                    self.heads_table = gr.Dataframe(
                        headers=["layer", *[f"H{h}" for h in range(cfg.heads)]], interactive=False,
                        elem_id="heads-table", label="role and score per head (click to pick)")
                with gr.Tab("Metrics", id="metrics") as t_metrics:
                    self.metrics_plot = _plot(F.metrics_figure([]))
                    self.summary_json = gr.JSON(label="run summary", elem_id="run-summary")
                with gr.Tab("Oracle", id="oracle") as t_oracle:
                    gr.Markdown("Offline, after a run: a full-cache reference run over the frames "
                                "the run made gives the real future queries; each compression "
                                "step's proxy scores are ranked against the true future attention "
                                "share (Spearman, top-B recall, B = budget). Stop ends the "
                                "reference run.")
                    with gr.Row():
                        horizon = gr.Slider(1, 8, value=2, step=1, label="horizon (future frames)")
                        oracle_btn = gr.Button("Run oracle", elem_id="run-oracle")
                    self.oracle_status = gr.Markdown(elem_id="oracle-status")
                    self.oracle_plot = _plot(F.oracle_figure(None, 0, 0), elem_id="oracle-plot")
                with gr.Tab("A/B", id="ab") as t_ab:
                    with gr.Row():
                        policy_b = gr.Dropdown(LIVE_POLICIES, value="window" if DEFAULT_POLICY != "window"
                                               else LIVE_POLICIES[0], label="policy B (default parameters)")
                        sweep = gr.Textbox("", label="also at budgets (frames, e.g. 2,8)",
                                           info="quality against cache size: both policies again "
                                                "at each budget")
                        ab_btn = gr.Button("Run A/B (A = the policy above)")
                    self.ab_status = gr.Markdown(elem_id="ab-status")
                    with gr.Row():
                        self.ab_img_a = gr.Image(label="A", height=220, interactive=False, format="png")
                        self.ab_img_b = gr.Image(label="B", height=220, interactive=False, format="png")
                    self.ab_quality = _plot(elem_id="ab-quality")
                    with gr.Row():
                        self.ab_video_a = gr.Video(label="A video", height=200, interactive=False)
                        self.ab_video_b = gr.Video(label="B video", height=200, interactive=False)
                    self.ab_table = gr.Dataframe(headers=["metric", "A", "B"], label="metrics")
                    self.ab_plot = _plot(F.ab_figure([], [], "A", "B"))
                with gr.Tab(ROPE_TAB, id="rope") as t_rope:
                    rows, cols = cfg.grid
                    gr.Markdown("**Why does post-RoPE drift?** Three steps. 3D RoPE turns each 2D "
                                "plane of a query by (frame, row or column) x omega.")
                    with gr.Row():
                        r_frame = gr.Slider(0, 63, value=ROPE_DEFAULTS[0], step=1, label="frame")
                        r_row = gr.Slider(0, rows - 1, value=ROPE_DEFAULTS[1], step=1, label="row")
                        r_col = gr.Slider(0, cols - 1, value=ROPE_DEFAULTS[2], step=1, label="column")
                        r_plane = gr.Dropdown(R.planes(self.MODEL.rope), value=ROPE_DEFAULTS[3],
                                              label="frequency plane", elem_id="rope-plane")
                    gr.Markdown("**1.** One query, fixed before RoPE, turns with its position: a "
                                "helix over frames in a time plane.")
                    rope_rot = _plot(elem_id="rope-step1")
                    gr.Markdown("**2.** So the *mean* of the post-RoPE queries turns with the frame "
                                "too, while the pre-RoPE mean stays put (same axes left and right).")
                    rope_mean = _plot(elem_id="rope-step2")
                    gr.Markdown("**3.** So post-RoPE statistics drift and pre-RoPE ones do not: "
                                "the Drift tab shows it on every layer and head of your run.")
                    rope_dist = _plot(elem_id="rope-step3")
                    to_drift = gr.Button("See it on your run: the Drift tab", elem_id="to-drift")
                    self.rope_plots = [rope_rot, rope_mean, rope_dist]
                with gr.Tab("Export", id="export") as t_export:
                    gr.Markdown("The run: video.mp4, record.npz (query statistics), decisions.jsonl "
                                "(every compression), summary.json (with the command that "
                                "reproduces it), plots.html and, after the Oracle, oracle.json.")
                    self.reproduce = gr.Markdown(elem_id="reproduce")
                    self.downloads = gr.File(label="this run", file_count="multiple", interactive=False)
                    self.ab_files = gr.File(label="A/B: videos and ab.json", file_count="multiple",
                                            interactive=False)
                    self.mem_files = gr.File(label="memory test: videos and memory_test.json",
                                             file_count="multiple", interactive=False)
            # hidden: the /generate API endpoint's outputs
            api_btn = gr.Button(visible=False)
            api_video = gr.File(visible=False)
            api_summary = gr.JSON(visible=False)

            # -- wiring ---------------------------------------------------------------
            model_in = [self.model_choice] if self.MULTI_MODEL else []  # unset: the API stays as it was
            run_inputs = [prompt, seed, frames, policy, budget, layer, head, metric, reference,
                          self.state, self.ui, self.log, *self.param_widgets, snap, one_motion,
                          *model_in]
            run_outputs = [self.state, self.log, self.status, self.frame_img, self.strip_img,
                           self.quality_plot, self.cache_plot, self.cache_step, self.drift_plot,
                           self.proj_plot, self.scores_plot, self.timeline_plot, self.metrics_plot,
                           self.heads_plot, self.heads_table,
                           self.oracle_plot, self.oracle_status, self.prompt_notes, self.reproduce,
                           *self.rope_plots, self.video, self.downloads, self.summary_json]
            # a Generate during a run stops it, then starts the new one once it has ended
            go_btn.click(self.request_stop, [self.state], None, **private).then(
                self.start_run, run_inputs, run_outputs, concurrency_id="run", concurrency_limit=4,
                trigger_mode="always_last", api_name="run")
            stop_btn.click(self.stop_run, [self.state, self.ab_state, self.mem_state], None,
                           concurrency_limit=None, api_name="stop")
            steer_inputs = [self.state, policy, budget, *self.param_widgets]
            steer_outputs = [policy, budget, *self.param_widgets]
            policy.change(self.steer, steer_inputs, steer_outputs, concurrency_limit=None,
                          api_name="steer")
            policy.change(self.show_params, policy, groups, **private)
            budget.release(self.steer, steer_inputs, steer_outputs, **private)
            budget.change(self.budget_info, [budget, *model_in], budget_tokens, **private)
            for w in self.param_widgets:
                events = [w.change] if isinstance(w, gr.Checkbox) else [w.submit, w.blur]
                for ev in events:
                    ev(self.steer, steer_inputs, steer_outputs, **private)
            for w in (prompt, seed):
                w.change(self.read_prompt, [prompt, seed], self.prompt_notes, **private)
            prompt.submit(self.switch_prompt, [self.state, prompt, recache], None,
                          concurrency_limit=None, api_name="switch_prompt")
            view_inputs = [self.state, layer, head, metric, reference, self.log, merges]
            view_outputs = [self.quality_plot, self.cache_plot, self.cache_step, self.drift_plot,
                            self.proj_plot, self.scores_plot, self.timeline_plot, self.metrics_plot,
                            self.heads_plot, self.heads_table, self.oracle_plot]
            for w in (layer, head, metric, reference):
                w.change(self.set_view, view_inputs, view_outputs, **private)
            self.heads_table.select(self.pick_head, [self.state], [layer, head], **private)
            self.cache_step.release(self.set_cache_step, [self.state, self.cache_step, merges, self.ui],
                                    self.cache_plot, **private)
            merges.change(self.set_cache_step, [self.state, self.cache_step, merges, self.ui],
                          self.cache_plot, **private)
            umap_btn.click(self.show_umap, [self.state, layer, head], self.proj_plot,
                           concurrency_limit=2, api_visibility="private")
            oracle_btn.click(self.run_oracle, [self.state, horizon, layer, head, self.log],
                             [self.oracle_plot, self.oracle_status, self.downloads],
                             concurrency_id="run", concurrency_limit=4, api_visibility="undocumented",
                             api_name="oracle")
            ab_btn.click(self.run_ab, [prompt, seed, frames, policy, budget, policy_b, sweep,
                                       self.ab_state, self.log, *self.param_widgets, snap, one_motion,
                                       *model_in],
                         [self.ab_state, self.ab_img_a, self.ab_img_b, self.ab_status, self.ab_table,
                          self.ab_plot, self.ab_quality, self.ab_video_a, self.ab_video_b,
                          self.ab_files, self.log],
                         concurrency_id="run", concurrency_limit=4, api_visibility="undocumented",
                         api_name="ab")
            # the memory test's tab opens and scrolls into view (a script in the browser alone)
            mem_btn.click(None, None, None, js="() => { document.querySelector('#memory-status')"
                                               "?.scrollIntoView({behavior: 'smooth'}); }")
            mem_btn.click(lambda: gr.Tabs(selected="memory"), None, self.tabs, **private).then(
                self.run_memory, [seed, budget, self.mem_state, self.log, snap, one_motion],
                [self.mem_state, self.mem_status, self.mem_img, self.mem_plot, self.mem_verdict,
                 self.mem_files, self.log, self.quality_plot],
                concurrency_id="run", concurrency_limit=4, api_visibility="undocumented",
                api_name="memory_test")
            rope_inputs = [self.state, r_frame, r_row, r_col, r_plane, layer, head, self.ui]
            for w in (r_frame, r_row, r_col):
                w.release(self.rope_views, rope_inputs, self.rope_plots, **private)
            r_plane.change(self.rope_views, rope_inputs, self.rope_plots, **private)
            to_drift.click(lambda: gr.Tabs(selected="drift"), None, self.tabs, **private)
            tabs = {"memory": t_memory, "cache": t_cache, "drift": t_drift, "projections": t_proj,
                    "scores": t_scores, "timeline": t_timeline, "heads": t_heads, "metrics": t_metrics,
                    "oracle": t_oracle, "ab": t_ab, ROPE_TAB: t_rope, "export": t_export}
            for name, tab in tabs.items():
                tab.select(self._tab_opened(name), self.ui, None, **private)
            # rendered when the tab opens, not on page load: a 3D plot is costly to draw
            t_rope.select(self.rope_views, rope_inputs, self.rope_plots, **private)
            if self.MULTI_MODEL:
                self.model_choice.change(self.model_views, self.model_choice, [layer, head, budget],
                                         **private)
                self.model_choice.change(self.budget_info, [budget, self.model_choice], budget_tokens,
                                         **private)
            api_btn.click(self.api_generate, [prompt, policy, budget, frames, seed, *model_in],
                          [api_video, api_summary], concurrency_id="run", concurrency_limit=4,
                          api_name="generate")
        return demo

    # -- serving ----------------------------------------------------------------------

    def warm_queue(self, url: str) -> None:
        """Send one cheap event (/stop with no run) through the queue: a server's very
        first event costs ~1 s of one-time set-up, which the first user should not wait for."""
        try:
            from gradio_client import Client
            Client(url, verbose=False).predict(api_name="/stop")
        except Exception as e:  # never let a warm-up stop the app
            print(f"ffviz: queue warm-up skipped ({e})", flush=True)
        print("ffviz: ready", flush=True)

    def launch(self, **kwargs):
        """``demo.launch`` with the theme and CSS, then the queue warm-up."""
        block = not kwargs.pop("prevent_thread_lock", False)
        out = self.demo.launch(theme=gr.themes.Soft(), css=CSS, prevent_thread_lock=True, **kwargs)
        self.warm_queue(str(self.demo.local_url).replace("0.0.0.0", "127.0.0.1"))
        if block:
            self.demo.block_thread()
        return out


def _plot(value=None, elem_id=None):
    """A plot without a widget label: every figure has its own title."""
    return gr.Plot(value, show_label=False, elem_id=elem_id)


def _param_widget(spec):
    """One box for a policy parameter, by the kind of its default: its name as the label
    (never cut: a minimum width), its description under it."""
    kw = {"label": spec.name, "info": spec.doc or None, "min_width": 200}
    if spec.kind == "bool":
        return gr.Checkbox(bool(spec.default), **kw)
    if spec.kind in ("int", "float"):
        return gr.Number(spec.default, precision=0 if spec.kind == "int" else None, **kw)
    return gr.Textbox("" if spec.default is None else str(spec.default), **kw)


if __name__ == "__main__":
    launch()
