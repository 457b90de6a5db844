"""ffviz: watch a KV cache decide. The Gradio app (and the Hugging Face Space entry point).

This file lays out widgets and wires them to plain functions in ``ffviz.app``
(the user's run session, views) and ``ffviz.viz`` (figures), all tested without
a browser. Importing it does nothing: ``build()`` loads the model, lays out the
page and warms up; ``launch()`` (what ``python app.py`` and the Space run) builds
and serves on ``GRADIO_SERVER_PORT`` (7860). Per-user state is one
``RunSession`` in a ``gr.State``: it owns a copy of the model (hooks attach to
the model object, so users must never share one), the run's ``Controls`` (live
steering) and everything the plots need.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from ffviz.app.params import build_policy, param_specs
from ffviz.app.session import (APP_MAX_FRAMES, InputError, RunSession, check_inputs, preflight,
                               query_arrays, warm_up)
from ffviz.app.views import (current_frame, live_views, plot_views, status_line, summary_table,
                             write_plots_html)
from ffviz.generate import Controls, GenerationError
from ffviz.hooks import run_copy
from ffviz.models import load_model
from ffviz.policies import POLICIES, PolicyError, make_policy
from ffviz.reference import fidelity, reference_run
from ffviz.run import run as run_once
from ffviz.scenes import EXAMPLE_PROMPTS
from ffviz.viz import figures as F
from ffviz.viz import rope_explainer as R
from ffviz.viz.projections import projection_figure, warm_up_umap

SPECS = param_specs()
# offline policies need a reference run first (the oracle): not in the live list
OFFLINE = {n for n, c in POLICIES.items() if getattr(c, "offline", n == "oracle")}
LIVE_POLICIES = [n for n in POLICIES if n not in OFFLINE]
DEFAULT_POLICY = "future_forcing" if "future_forcing" in LIVE_POLICIES else "window"
DEFAULT_FRAMES, DEFAULT_BUDGET = 48, 4
PLOT_EVERY_S = 1.0  # plots refresh at most this often during a run; the frame every chunk

CSS = """
#frame img {image-rendering: pixelated}
.legend span {padding: 1px 6px; border-radius: 3px; color: white; margin-right: 4px}
"""
LEGEND = ("<div class='legend'>"
          "<span style='background:#1b9e77'>kept</span>"
          "<span style='background:#d95f02'>merged (line to its target)</span>"
          "<span style='background:#9e9e9e'>dropped</span> brighter = higher score; "
          "black dot = a token standing for several; empty cells = evicted earlier</div>")


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
    warm_up(app.MODEL, make_policy(DEFAULT_POLICY))  # first-call costs paid before the first user
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
        self.demo = self._layout()
        self.demo.queue(default_concurrency_limit=4, max_size=64)

    def get_model(self, name=None):
        """The template for ``name`` (one of MODEL_NAMES), loaded once and cached."""
        name = name or self.MODEL_NAMES[0]
        if name not in self.MODEL_NAMES:
            raise gr.Error(f"model {name!r} is not offered here (FFVIZ_MODELS: "
                           f"{', '.join(self.MODEL_NAMES)})")
        with self._models_lock:  # one load per model, also when several users pick it at once
            if name not in self.models:
                try:
                    self.models[name] = load_model(name)
                except Exception as e:
                    raise gr.Error(f"could not load model {name!r}: {e}") from None
            return self.models[name]

    def _split(self, params):
        """The policy parameter values and the model (the last input when the model
        choice is offered)."""
        params = list(params)
        n = len(SPECS)
        return params[:n], self.get_model(params[n] if len(params) > n else None)

    # -- handlers -----------------------------------------------------------------

    def start_run(self, prompt, seed, frames, policy, budget, layer, head, metric, reference, old,
                  *params):
        """Generate, streaming one frame update per chunk (plots at most every PLOT_EVERY_S)."""
        _trace("click received")
        params, model = self._split(params)
        try:
            settings = check_inputs(prompt, frames, budget, seed, self.MAX_FRAMES, model.has_scenes)
            pol = _policy(policy, params)
            preflight(model, pol, int(budget))
        except InputError as e:
            raise gr.Error(str(e), title="Cannot start") from None
        if old is not None:
            old.close()  # this user's previous run: its files were served already
        session = RunSession(model, settings, pol, int(budget))
        session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
        last_plot, plot_cost = -1e9, 0.0
        steps = session.run()
        try:
            for step in steps:
                out = {self.state: session, self.status: status_line(session),
                       **self._live_outputs(session)}
                if step.index > 0 and time.perf_counter() - last_plot > max(PLOT_EVERY_S, 3 * plot_cost):
                    t = time.perf_counter()  # plots cost more than a chunk: refresh them less
                    out.update(self._plot_outputs(session, metric, reference))
                    last_plot, plot_cost = time.perf_counter(), time.perf_counter() - t
                if step.index == 0:
                    _trace("first frame ready")
                yield out
        except InputError as e:  # e.g. a policy whose parameters do not fit the budget
            gr.Warning(f"the run stopped: {e}")
        finally:  # also when the user cancels or leaves: hooks off, files closed, run freed
            steps.close()
        out = {self.state: session,
               self.status: status_line(session) + (" - " + session.error if session.error else "")}
        if len(session.frames):
            out.update(self._plot_outputs(session, metric, reference))
            out.update(self._live_outputs(session))
        if (session.dir / "summary.json").exists():  # the run wrote its files (a failed one left none)
            write_plots_html(session, session.dir / "plots.html")
            out.update({self.video: str(session.dir / "video.mp4"), self.downloads: session.files(),
                        self.summary_json: session.summary})
        yield out

    def _live_outputs(self, session) -> dict:
        live = live_views(session)
        return {self.frame_img: live["frame"], self.strip_img: live["strip"],
                self.cache_img: live["cache"]}

    def _plot_outputs(self, session, metric, reference) -> dict:
        p = plot_views(session, metric, reference)
        return {self.drift_plot: p["drift"], self.proj_plot: p["projections"],
                self.scores_plot: p["scores"], self.timeline_plot: p["timeline"],
                self.metrics_plot: p["metrics"]}

    def steer(self, session, policy, budget, *params):
        """Live steering: takes effect at the next chunk of the running generation."""
        if session is None or not session.running:
            return
        try:
            pol = _policy(policy, params)
            budget = int(budget)
            if budget < 1:
                raise GenerationError(f"budget must be at least 1 frame (got {budget})")
            session.try_policy(pol, budget)
            if not session.steer(pol, budget):
                return  # nothing changed (e.g. a parameter box lost focus)
        except InputError as e:
            gr.Warning(f"not switched: {e}")
            return
        except Exception as e:  # a policy that fails on this cache: keep the old one
            gr.Warning(f"not switched: {policy} failed on the current cache: {e}")
            return
        gr.Info(f"switching to {pol.name}, budget {budget} frames, at the next chunk")

    def stop_run(self, session, ab_sessions):
        for s in [session, *(ab_sessions or [])]:
            if s is not None:
                s.stop()

    def set_view(self, session, layer, head, metric, reference):
        """Layer/head/drift settings changed: re-render (a running generation picks the
        new view up at its next chunk through ``session.view``)."""
        if session is None:
            return {}
        session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
        out = self._plot_outputs(session, metric, reference)
        out[self.cache_img] = live_views(session)["cache"]
        if session.oracle_result is not None:
            out[self.oracle_plot] = F.oracle_figure(session.oracle_result,
                                                    *_layer_head(layer, head, session.cfg))
        return out

    def show_umap(self, session, layer, head):
        if session is None or session.recorder is None:
            raise gr.Error("run something first: UMAP maps the run's recorded queries")
        return projection_figure(session.recorder, *_layer_head(layer, head, session.cfg),
                                 method="umap")

    def run_oracle(self, session, horizon, layer, head):
        """Offline: a full-cache reference run, then proxy vs true future attention."""
        if session is None or not len(session.frames):
            raise gr.Error("finish a run first: the oracle compares that run's scores with the truth")
        if session.running:
            raise gr.Error("the run is still going: stop it or wait until it ends")
        yield F.empty("Oracle", "running the full-cache reference..."), "reference run..."
        ref = reference_run(session.template, session.settings, int(horizon))
        result = fidelity(session.oracle_steps, ref, int(horizon))
        session.oracle_result = result
        msg = (f"{result['steps']} compression steps compared" if result["steps"] else result["message"])
        yield F.oracle_figure(result, *_layer_head(layer, head, session.cfg)), msg

    def run_ab(self, prompt, seed, frames, policy, budget, policy_b, old_ab, *params):
        """Two policies, same prompt/seed/budget, chunk by chunk side by side."""
        for s in old_ab or []:
            s.close()
        params, model = self._split(params)
        try:
            settings = check_inputs(prompt, frames, budget, seed, self.MAX_FRAMES, model.has_scenes)
            pa = _policy(policy, params)
            pb = _policy(policy_b, [None] * len(SPECS))  # B runs with its defaults
            preflight(model, pa, int(budget))
            preflight(model, pb, int(budget))
        except InputError as e:
            raise gr.Error(str(e), title="Cannot start A/B") from None
        a = RunSession(model, settings, pa, int(budget), keep_oracle_keys=False)
        b = RunSession(model, settings, pb, int(budget), keep_oracle_keys=False)
        runs = [a.run(), b.run()]
        try:
            while runs:
                for r in list(runs):
                    try:
                        next(r)
                    except StopIteration:
                        runs.remove(r)
                yield {self.ab_state: [a, b], self.ab_img_a: current_frame(a),
                       self.ab_img_b: current_frame(b),
                       self.ab_status: f"A `{pa.name}`: {len(a.frames)} frames - "
                                       f"B `{pb.name}`: {len(b.frames)} frames"}
        except InputError as e:
            gr.Warning(f"A/B stopped: {e}")
        finally:
            for r in runs:
                r.close()
        ta, tb = dict(summary_table(a.summary)), dict(summary_table(b.summary))
        rows = [[k, ta.get(k, ""), tb.get(k, "")] for k in {**ta, **tb}]
        video = lambda s: str(s.dir / "video.mp4") if (s.dir / "video.mp4").exists() else None
        yield {self.ab_table: rows, self.ab_plot: F.ab_figure(a.steps, b.steps, pa.name, pb.name),
               self.ab_video_a: video(a), self.ab_video_b: video(b), self.ab_status: "done"}

    def rope_views(self, session, frame, row, col, plane, layer, head):
        """The RoPE explainer, on the run's own recorded queries when there is a run."""
        plane = int(plane)
        tm = session.template if session is not None else self.MODEL
        layer, head = _layer_head(layer, head, tm.cfg)
        q = query_arrays(session)
        if q is not None and len(q[0]) >= 2:
            frames, mean_pre, _, mean_post, _ = q
            query, source = mean_pre[-1, layer, head], f"this run's queries, L{layer} H{head}"
            drift = R.drift_explainer_figure(tm.rope, mean_pre[:, layer, head],
                                             mean_post[:, layer, head], frames, plane, source)
        else:
            frames, pre, post = R.synthetic_means(self.MODEL.rope)
            query = pre[0]
            drift = R.drift_explainer_figure(self.MODEL.rope, pre, post, frames, plane,
                                             "a synthetic stationary query (run something to see yours)")
        rot = R.rotation_figure(tm.rope, query, int(frame), int(row), int(col), plane,
                                max_frame=max(int(frame), 24))
        return rot, drift

    def api_generate(self, prompt, policy, budget_frames, frames, seed, model_name=None):
        """/generate: one complete run; returns the mp4 and the summary."""
        model = self.get_model(model_name)
        try:
            settings = check_inputs(prompt, frames, budget_frames, seed, self.MAX_FRAMES,
                                    model.has_scenes)
            pol = _policy(policy, [None] * len(SPECS))
            preflight(model, pol, int(budget_frames))
        except InputError as e:
            raise gr.Error(str(e)) from None
        out = Path(RunSession.new_dir())
        try:
            summary = run_once(run_copy(model), settings, Controls(pol, int(budget_frames)), out)
        except InputError as e:
            raise gr.Error(str(e)) from None
        return str(out / "video.mp4"), summary

    def budget_info(self, budget, model_name=None):
        b = int(budget or 0)
        model = self.MODEL if model_name is None else self.get_model(model_name)
        return f"budget = **{b} frames = {b * model.cfg.tokens_per_frame} tokens** per layer and head"

    def model_views(self, name):
        """The model choice changed: layer/head choices follow the model's shape."""
        cfg = self.get_model(name).cfg
        return (gr.Dropdown([f"L{i}" for i in range(cfg.layers)], value=f"L{cfg.layers - 1}"),
                gr.Dropdown([f"H{i}" for i in range(cfg.heads)], value="H0"),
                gr.Slider(info=f"1 frame = {cfg.tokens_per_frame} tokens"))

    def show_params(self, policy):
        return [gr.Group(visible=(name == policy)) for name in POLICIES
                if any(s.policy == name for s in SPECS)]

    # -- layout ---------------------------------------------------------------------

    def _layout(self) -> gr.Blocks:
        cfg, max_frames = self.MODEL.cfg, self.MAX_FRAMES
        tokens = cfg.tokens_per_frame
        with gr.Blocks(title="ffviz - watch a KV cache decide", delete_cache=(1800, 3600)) as demo:
            self.state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
            self.ab_state = gr.State(None, delete_callback=lambda ss: [s.close() for s in ss] if ss else None)
            gr.Markdown("## ffviz - watch a KV cache decide\nAn autoregressive video model generates "
                        "frame by frame; its KV cache is squeezed to a budget by a policy you pick and "
                        f"can change mid-run. Model: embedded tiny model ({cfg.layers} layers, "
                        f"{cfg.heads} heads, {tokens} tokens per frame), CPU"
                        + (", or another model picked below (loaded on first use)."
                           if self.MULTI_MODEL else "."))
            with gr.Row():
                prompt = gr.Textbox(EXAMPLE_PROMPTS[0], label="prompt", scale=4, elem_id="prompt")
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
            self.param_widgets, groups = [], []
            with gr.Accordion("policy parameters (change them mid-run: they apply at the next chunk)",
                              open=False):
                for name in POLICIES:
                    specs = [s for s in SPECS if s.policy == name]
                    if not specs:
                        continue
                    with gr.Group(visible=(name == DEFAULT_POLICY)) as g:
                        with gr.Row():
                            for s in specs:
                                self.param_widgets.append(_param_widget(s))
                    groups.append(g)
            with gr.Row():
                go_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            self.status = gr.Markdown("press **Generate**", elem_id="status")
            with gr.Row():
                with gr.Column(scale=2):
                    self.frame_img = gr.Image(label="current frame", elem_id="frame", height=300,
                                              interactive=False, format="png")
                    self.strip_img = gr.Image(label="newest frames", height=80, interactive=False,
                                              format="png")
                    self.video = gr.Video(label="video (when the run ends)", height=200,
                                          interactive=False)
                with gr.Column(scale=3):
                    with gr.Row():
                        layer = gr.Dropdown([f"L{i}" for i in range(cfg.layers)],
                                            value=f"L{cfg.layers - 1}", label="layer")
                        head = gr.Dropdown([f"H{i}" for i in range(cfg.heads)], value="H0", label="head")
                    self.cache_img = gr.Image(
                        label="cache view: the tokens the policy saw at the newest chunk, on their "
                              "source frames", interactive=False, format="png", elem_id="cacheview",
                        height=330)
                    gr.HTML(LEGEND)
            with gr.Tabs():
                with gr.Tab("Drift"):
                    with gr.Row():
                        metric = gr.Radio(["frechet", "kl", "cosine"], value="frechet", label="distance")
                        reference = gr.Radio(["first", "running"], value="first", label="against")
                    self.drift_plot = gr.Plot(F.empty("Query drift", "no run yet"))
                with gr.Tab("Projections"):
                    umap_btn = gr.Button("UMAP (same map for pre and post)")
                    self.proj_plot = gr.Plot(F.empty("Query projections", "no run yet"))
                with gr.Tab("Scores"):
                    self.scores_plot = gr.Plot(F.empty("Proxy scores", "no run yet"))
                with gr.Tab("Cache timeline"):
                    self.timeline_plot = gr.Plot(F.timeline_figure([]))
                with gr.Tab("Metrics"):
                    self.metrics_plot = gr.Plot(F.metrics_figure([]))
                    self.summary_json = gr.JSON(label="run summary")
                with gr.Tab("Oracle"):
                    gr.Markdown("Offline, after a run: a full-cache reference run gives the real "
                                "future queries; each compression step's proxy scores are ranked "
                                "against the true future attention share (Spearman, top-B recall, "
                                "B = budget).")
                    with gr.Row():
                        horizon = gr.Slider(1, 8, value=2, step=1, label="horizon (future frames)")
                        oracle_btn = gr.Button("Run oracle")
                    oracle_status = gr.Markdown()
                    self.oracle_plot = gr.Plot(F.oracle_figure(None, 0, 0))
                with gr.Tab("A/B"):
                    with gr.Row():
                        policy_b = gr.Dropdown(LIVE_POLICIES, value="window" if DEFAULT_POLICY != "window"
                                               else LIVE_POLICIES[0], label="policy B (default parameters)")
                        ab_btn = gr.Button("Run A/B (A = the policy above)")
                    self.ab_status = gr.Markdown()
                    with gr.Row():
                        self.ab_img_a = gr.Image(label="A", height=220, interactive=False, format="png")
                        self.ab_img_b = gr.Image(label="B", height=220, interactive=False, format="png")
                    with gr.Row():
                        self.ab_video_a = gr.Video(label="A video", height=200, interactive=False)
                        self.ab_video_b = gr.Video(label="B video", height=200, interactive=False)
                    self.ab_table = gr.Dataframe(headers=["metric", "A", "B"], label="metrics")
                    self.ab_plot = gr.Plot(F.ab_figure([], [], "A", "B"))
                with gr.Tab("RoPE 101") as rope_tab:
                    gr.Markdown("3D RoPE turns each 2D plane of a query by (frame, row or column) x "
                                "omega. A query that never changes before RoPE draws a circle after "
                                "it: that is why post-RoPE statistics drift and pre-RoPE ones stay.")
                    rows, cols = cfg.grid
                    with gr.Row():
                        r_frame = gr.Slider(0, 63, value=8, step=1, label="frame")
                        r_row = gr.Slider(0, rows - 1, value=2, step=1, label="row")
                        r_col = gr.Slider(0, cols - 1, value=5, step=1, label="column")
                        r_plane = gr.Dropdown(R.planes(self.MODEL.rope), value=0, label="frequency plane")
                    with gr.Row():
                        rope_plot = gr.Plot()
                        rope_drift_plot = gr.Plot()
                with gr.Tab("Export"):
                    gr.Markdown("video.mp4, record.npz (query statistics), decisions.jsonl (every "
                                "compression), summary.json and plots.html, after a run.")
                    self.downloads = gr.File(label="downloads", file_count="multiple", interactive=False)
            # hidden: the /generate API endpoint's outputs
            api_btn = gr.Button(visible=False)
            api_video = gr.File(visible=False)
            api_summary = gr.JSON(visible=False)

            # -- wiring ---------------------------------------------------------------
            model_in = [self.model_choice] if self.MULTI_MODEL else []  # unset: the API stays as it was
            run_inputs = [prompt, seed, frames, policy, budget, layer, head, metric, reference,
                          self.state, *self.param_widgets, *model_in]
            run_outputs = [self.state, self.status, self.frame_img, self.strip_img, self.cache_img,
                           self.drift_plot, self.proj_plot, self.scores_plot, self.timeline_plot,
                           self.metrics_plot, self.video, self.downloads, self.summary_json]
            go_btn.click(self.start_run, run_inputs, run_outputs, concurrency_id="run",
                         concurrency_limit=4, api_name="run")
            stop_btn.click(self.stop_run, [self.state, self.ab_state], None, concurrency_limit=None,
                           api_name="stop")
            steer_inputs = [self.state, policy, budget, *self.param_widgets]
            private = {"concurrency_limit": None, "api_visibility": "private"}
            policy.change(self.steer, steer_inputs, None, concurrency_limit=None, api_name="steer")
            policy.change(self.show_params, policy, groups, **private)
            budget.release(self.steer, steer_inputs, None, **private)
            budget.change(self.budget_info, [budget, *model_in], budget_tokens, **private)
            for w in self.param_widgets:
                events = [w.change] if isinstance(w, gr.Checkbox) else [w.submit, w.blur]
                for ev in events:
                    ev(self.steer, steer_inputs, None, **private)
            view_inputs = [self.state, layer, head, metric, reference]
            view_outputs = [self.cache_img, self.drift_plot, self.proj_plot, self.scores_plot,
                            self.timeline_plot, self.metrics_plot, self.oracle_plot]
            for w in (layer, head, metric, reference):
                w.change(self.set_view, view_inputs, view_outputs, **private)
            umap_btn.click(self.show_umap, [self.state, layer, head], self.proj_plot,
                           concurrency_limit=2, api_visibility="private")
            oracle_btn.click(self.run_oracle, [self.state, horizon, layer, head],
                             [self.oracle_plot, oracle_status], concurrency_id="run",
                             concurrency_limit=4, api_visibility="private")
            ab_btn.click(self.run_ab, [prompt, seed, frames, policy, budget, policy_b, self.ab_state,
                                       *self.param_widgets, *model_in],
                         [self.ab_state, self.ab_img_a, self.ab_img_b, self.ab_status, self.ab_table,
                          self.ab_plot, self.ab_video_a, self.ab_video_b],
                         concurrency_id="run", concurrency_limit=4, api_visibility="private")
            rope_inputs = [self.state, r_frame, r_row, r_col, r_plane, layer, head]
            rope_outputs = [rope_plot, rope_drift_plot]
            for w in (r_frame, r_row, r_col):
                w.release(self.rope_views, rope_inputs, rope_outputs, **private)
            r_plane.change(self.rope_views, rope_inputs, rope_outputs, **private)
            # rendered when the tab opens, not on page load: a 3D plot is costly to draw
            rope_tab.select(self.rope_views, rope_inputs, rope_outputs, **private)
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


def _param_widget(spec):
    """One box for a policy parameter, by the kind of its default."""
    label = f"{spec.name}" + (f" - {spec.doc}" if spec.doc else "")
    if spec.kind == "bool":
        return gr.Checkbox(bool(spec.default), label=label)
    if spec.kind in ("int", "float"):
        return gr.Number(spec.default, label=label, precision=0 if spec.kind == "int" else None)
    return gr.Textbox("" if spec.default is None else str(spec.default), label=label)


if __name__ == "__main__":
    launch()
