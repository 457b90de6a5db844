"""ffviz: watch a KV cache decide. The Gradio app (and the Hugging Face Space entry point).

This file only wires widgets to plain functions in ``ffviz.viz`` (tested
without a browser). Per-user state is one ``RunSession`` in a ``gr.State``:
it owns a deep copy of the model (hooks attach to the model object, so users
must never share one), the run's ``Controls`` (live steering) and everything
the plots need. ``python app.py`` serves on ``GRADIO_SERVER_PORT`` (7860).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from ffviz.generate import Controls, GenerationError
from ffviz.hooks import run_copy
from ffviz.policies import POLICIES, PolicyError, make_policy
from ffviz.run import run as run_once
from ffviz.scenes import EXAMPLE_PROMPTS
from ffviz.viz import figures as F
from ffviz.viz import rope_explainer as R
from ffviz.viz.oracle import fidelity, reference_queries
from ffviz.viz.params import build_policy, param_specs
from ffviz.viz.projections import projection_figure, warm_up_umap
from ffviz.viz.session import (APP_MAX_FRAMES, InputError, RunSession, check_inputs, preflight,
                               query_arrays, warm_up)
from ffviz.viz.views import live_views, plot_views, status_line, summary_table, write_plots_html
from ffviz.weights import load_tiny

# One thread per run: the tiny model gains nothing from more, and concurrent users
# (or any other busy process) on a 2-core box make multi-threaded ops stall in
# their barriers (measured: 0.09 s/frame with 1 thread vs 1-4 s/frame with 2).
torch.set_num_threads(int(os.environ.get("FFVIZ_TORCH_THREADS", "1")))
MODEL, CARD = load_tiny()  # read-only template: every run works on its own deep copy
CFG = MODEL.cfg
TOKENS = CFG.tokens_per_frame
SPECS = param_specs()
# offline policies need a reference run first (the oracle): not in the live list
OFFLINE = {n for n, c in POLICIES.items() if getattr(c, "offline", n == "oracle")}
LIVE_POLICIES = [n for n in POLICIES if n not in OFFLINE]
DEFAULT_POLICY = "future_forcing" if "future_forcing" in LIVE_POLICIES else "window"
DEFAULT_FRAMES, DEFAULT_BUDGET = 48, 4
PLOT_EVERY_S = 1.0  # plots refresh at most this often during a run; the frame every chunk
MAX_FRAMES = int(os.environ.get("FFVIZ_MAX_FRAMES", APP_MAX_FRAMES))
# FFVIZ_MODELS="tiny,wan:tiny-random" (or wan:/path/ckpt.pt on a GPU) offers a model
# choice; unset: the embedded tiny model only, and no model widget
MODEL_NAMES = [n.strip() for n in os.environ.get("FFVIZ_MODELS", "tiny").split(",") if n.strip()] \
    or ["tiny"]
MULTI_MODEL = len(MODEL_NAMES) > 1
_MODELS = {"tiny": MODEL}  # name -> read-only template, loaded on first use
_MODELS_LOCK = threading.Lock()


def get_model(name=None):
    """The template for ``name`` (one of MODEL_NAMES), loaded once and cached."""
    name = name or MODEL_NAMES[0]
    if name not in MODEL_NAMES:
        raise gr.Error(f"model {name!r} is not offered here (FFVIZ_MODELS: {', '.join(MODEL_NAMES)})")
    with _MODELS_LOCK:  # one load per model, also when several users pick it at once
        if name not in _MODELS:
            from ffviz.models.wan import load_model
            try:
                _MODELS[name] = load_model(name)
            except Exception as e:
                raise gr.Error(f"could not load model {name!r}: {e}") from None
        return _MODELS[name]


def _split(params):
    """The policy parameter values and the model name (the last input when the
    model choice is offered)."""
    params = list(params)
    n = len(SPECS)
    return params[:n], (params[n] if len(params) > n else None)


def _scenes(model) -> bool:
    return getattr(model, "has_scenes", True)


def _layer_head(layer, head, cfg=None) -> tuple[int, int]:
    """Widget values to indices, clamped to ``cfg`` (models differ in layers/heads)."""
    l, h = int(str(layer).lstrip("L") or 0), int(str(head).lstrip("H") or 0)
    if cfg is not None:
        l, h = min(max(l, 0), cfg.layers - 1), min(max(h, 0), cfg.heads - 1)
    return l, h


def _template(session):
    """The model a session was started from (the oracle's reference run uses it)."""
    return getattr(session, "template", None) or MODEL


def _policy(name, values):
    if name in OFFLINE:
        raise PolicyError(f"the {name} policy is offline (it needs a full-cache reference run); "
                          "use the Oracle tab after a run")
    return build_policy(name, SPECS, list(values))


# -- handlers -----------------------------------------------------------------

def start_run(prompt, seed, frames, policy, budget, layer, head, metric, reference, old, *params):
    """Generate, streaming one frame update per chunk (plots at most every PLOT_EVERY_S)."""
    _trace("click received")
    params, model_name = _split(params)
    model = get_model(model_name)
    try:
        settings = check_inputs(prompt, frames, budget, seed, MAX_FRAMES, _scenes(model))
        pol = _policy(policy, params)
        preflight(model, pol, int(budget))
    except InputError as e:
        raise gr.Error(str(e), title="Cannot start") from None
    if old is not None:
        old.close()  # this user's previous run: its files were served already
    session = RunSession(model, settings, pol, int(budget))
    session.template = model
    session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
    last_plot, plot_cost = -1e9, 0.0
    steps = session.run()
    try:
        for step in steps:
            out = {state: session, status: status_line(session)}
            live = live_views(session)
            out.update({frame_img: live["frame"], strip_img: live["strip"], cache_img: live["cache"]})
            if step.index > 0 and time.perf_counter() - last_plot > max(PLOT_EVERY_S, 3 * plot_cost):
                t = time.perf_counter()  # plots cost more than a chunk: refresh them less
                out.update(_plot_outputs(session, metric, reference))
                last_plot, plot_cost = time.perf_counter(), time.perf_counter() - t
            if step.index == 0:
                _trace("first frame ready")
            yield out
    except InputError as e:  # e.g. a policy whose parameters do not fit the budget
        gr.Warning(f"the run stopped: {e}")
    finally:  # also when the user cancels or leaves: hooks off, files closed, run freed
        steps.close()
    out = {state: session, status: status_line(session) + (" - " + session.error if session.error else "")}
    if session.frames:
        write_plots_html(session, session.dir / "plots.html")
        out.update(_plot_outputs(session, metric, reference))
        live = live_views(session)
        out.update({frame_img: live["frame"], strip_img: live["strip"], cache_img: live["cache"]})
        files = session.files()
        out.update({video: str(session.dir / "video.mp4"), downloads: files,
                    summary_json: session.summary})
    yield out


def _trace(what: str) -> None:
    if os.environ.get("FFVIZ_TRACE"):
        print(f"ffviz trace {time.time():.3f} {what}", flush=True)


def _plot_outputs(session, metric, reference) -> dict:
    p = plot_views(session, metric, reference)
    return {drift_plot: p["drift"], proj_plot: p["projections"], scores_plot: p["scores"],
            timeline_plot: p["timeline"], metrics_plot: p["metrics"]}


def steer(session, policy, budget, *params):
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


def stop_run(session, ab_sessions):
    for s in [session, *(ab_sessions or [])]:
        if s is not None:
            s.stop()


def set_view(session, layer, head, metric, reference):
    """Layer/head/drift settings changed: re-render (a running generation picks the
    new view up at its next chunk through ``session.view``)."""
    if session is None:
        return {}
    session.view["layer"], session.view["head"] = _layer_head(layer, head, session.cfg)
    out = _plot_outputs(session, metric, reference)
    out[cache_img] = live_views(session)["cache"]
    if session.oracle_result is not None:
        out[oracle_plot] = F.oracle_figure(session.oracle_result, *_layer_head(layer, head, session.cfg))
    return out


def show_umap(session, layer, head):
    if session is None or session.recorder is None:
        raise gr.Error("run something first: UMAP maps the run's recorded queries")
    return projection_figure(session.recorder, *_layer_head(layer, head, session.cfg), method="umap")


def run_oracle(session, horizon, layer, head):
    """Offline: a full-cache reference run, then proxy vs true future attention."""
    if session is None or not session.frames:
        raise gr.Error("finish a run first: the oracle compares that run's scores with the truth")
    if session.running:
        raise gr.Error("the run is still going: stop it or wait until it ends")
    yield F.empty("Oracle", "running the full-cache reference..."), "reference run..."
    ref = reference_queries(_template(session), session.settings)
    result = fidelity(session.oracle_steps, ref, int(horizon))
    session.oracle_result = result
    msg = (f"{result['steps']} compression steps compared" if result["steps"] else result["message"])
    yield F.oracle_figure(result, *_layer_head(layer, head, session.cfg)), msg


def run_ab(prompt, seed, frames, policy, budget, policy_b, old_ab, *params):
    """Two policies, same prompt/seed/budget, chunk by chunk side by side."""
    for s in old_ab or []:
        s.close()
    params, model_name = _split(params)
    model = get_model(model_name)
    try:
        settings = check_inputs(prompt, frames, budget, seed, MAX_FRAMES, _scenes(model))
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
            yield {ab_state: [a, b], ab_img_a: live_views(a)["frame"], ab_img_b: live_views(b)["frame"],
                   ab_status: f"A `{pa.name}`: {a.frame_count} frames - B `{pb.name}`: {b.frame_count} frames"}
    except InputError as e:
        gr.Warning(f"A/B stopped: {e}")
    finally:
        for r in runs:
            r.close()
    ta, tb = dict(summary_table(a.summary)), dict(summary_table(b.summary))
    rows = [[k, ta.get(k, ""), tb.get(k, "")] for k in {**ta, **tb}]
    yield {ab_table: rows, ab_plot: F.ab_figure(a.steps, b.steps, pa.name, pb.name),
           ab_video_a: str(a.dir / "video.mp4"), ab_video_b: str(b.dir / "video.mp4"),
           ab_status: "done"}


def rope_views(session, frame, row, col, plane, layer, head):
    """The RoPE explainer, on the run's own recorded queries when there is a run."""
    plane = int(plane)
    tm = _template(session)
    layer, head = _layer_head(layer, head, tm.cfg)
    q = query_arrays(session)
    if q is not None and len(q[0]) >= 2:
        frames, mean_pre, _, mean_post, _ = q
        query, source = mean_pre[-1, layer, head], f"this run's queries, L{layer} H{head}"
        drift = R.drift_explainer_figure(tm.rope, mean_pre[:, layer, head],
                                         mean_post[:, layer, head], frames, plane, source)
    else:
        frames, pre, post = R.synthetic_means(MODEL.rope)
        query = pre[0]
        drift = R.drift_explainer_figure(MODEL.rope, pre, post, frames, plane,
                                         "a synthetic stationary query (run something to see yours)")
    rot = R.rotation_figure(tm.rope, query, int(frame), int(row), int(col), plane,
                            max_frame=max(int(frame), 24))
    return rot, drift


def api_generate(prompt, policy, budget_frames, frames, seed, model_name=None):
    """/generate: one complete run; returns the mp4 and the summary."""
    model = get_model(model_name)
    try:
        settings = check_inputs(prompt, frames, budget_frames, seed, MAX_FRAMES, _scenes(model))
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


def budget_info(budget, model_name=None):
    b = int(budget or 0)
    tokens = TOKENS if model_name is None else get_model(model_name).cfg.tokens_per_frame
    return f"budget = **{b} frames = {b * tokens} tokens** per layer and head"


def model_views(name):
    """The model choice changed: layer/head choices follow the model's shape."""
    cfg = get_model(name).cfg
    return (gr.Dropdown([f"L{i}" for i in range(cfg.layers)], value=f"L{cfg.layers - 1}"),
            gr.Dropdown([f"H{i}" for i in range(cfg.heads)], value="H0"),
            gr.Slider(info=f"1 frame = {cfg.tokens_per_frame} tokens"))


def show_params(policy):
    return [gr.Group(visible=(name == policy)) for name in POLICIES if any(s.policy == name for s in SPECS)]


# -- layout -------------------------------------------------------------------

CSS = """
#frame img {image-rendering: pixelated}
.legend span {padding: 1px 6px; border-radius: 3px; color: white; margin-right: 4px}
"""
LEGEND = ("<div class='legend'>"
          "<span style='background:#1b9e77'>kept</span>"
          "<span style='background:#d95f02'>merged (line to its target)</span>"
          "<span style='background:#9e9e9e'>dropped</span> brighter = higher score; "
          "black dot = a token standing for several; empty cells = evicted earlier</div>")

with gr.Blocks(title="ffviz - watch a KV cache decide", delete_cache=(1800, 3600)) as demo:
    state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
    ab_state = gr.State(None, delete_callback=lambda ss: [s.close() for s in ss] if ss else None)
    gr.Markdown("## ffviz - watch a KV cache decide\nAn autoregressive video model generates "
                "frame by frame; its KV cache is squeezed to a budget by a policy you pick and "
                f"can change mid-run. Model: embedded tiny model ({CFG.layers} layers, "
                f"{CFG.heads} heads, {TOKENS} tokens per frame), CPU"
                + (", or another model picked below (loaded on first use)." if MULTI_MODEL else "."))
    with gr.Row():
        prompt = gr.Textbox(EXAMPLE_PROMPTS[0], label="prompt", scale=4, elem_id="prompt")
        seed = gr.Number(0, label="seed", precision=0, scale=1)
        frames = gr.Number(DEFAULT_FRAMES, label=f"frames (max {MAX_FRAMES})", precision=0, scale=1,
                           elem_id="frames")
    gr.Examples(EXAMPLE_PROMPTS, inputs=prompt, label="examples (the scene grammar)")
    # only with FFVIZ_MODELS listing several models; a model without scenes takes any prompt
    model_choice = gr.Dropdown(MODEL_NAMES, value=MODEL_NAMES[0], label="model", visible=MULTI_MODEL,
                               info="loaded on first use; the examples are the tiny model's scene "
                                    "grammar, other models take any text", elem_id="model")
    with gr.Row():
        policy = gr.Dropdown(LIVE_POLICIES, value=DEFAULT_POLICY, label="policy", elem_id="policy")
        with gr.Column():
            budget = gr.Slider(1, MAX_FRAMES, value=DEFAULT_BUDGET, step=1, label="budget (frames)",
                               info=f"1 frame = {TOKENS} tokens", elem_id="budget")
            budget_tokens = gr.Markdown(budget_info(DEFAULT_BUDGET), elem_id="budget-tokens")
    param_widgets, groups = [], []
    with gr.Accordion("policy parameters (change them mid-run: they apply at the next chunk)", open=False):
        for name in POLICIES:
            specs = [s for s in SPECS if s.policy == name]
            if not specs:
                continue
            with gr.Group(visible=(name == DEFAULT_POLICY)) as g:
                with gr.Row():
                    for s in specs:
                        label = f"{s.name}" + (f" - {s.doc}" if s.doc else "")
                        if s.kind == "bool":
                            w = gr.Checkbox(bool(s.default), label=label)
                        elif s.kind in ("int", "float"):
                            w = gr.Number(s.default, label=label, precision=0 if s.kind == "int" else None)
                        else:
                            w = gr.Textbox("" if s.default is None else str(s.default), label=label)
                        param_widgets.append(w)
            groups.append(g)
    with gr.Row():
        go_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
    status = gr.Markdown("press **Generate**", elem_id="status")
    with gr.Row():
        with gr.Column(scale=2):
            frame_img = gr.Image(label="current frame", elem_id="frame", height=300,
                                 interactive=False, format="png")
            strip_img = gr.Image(label="newest frames", height=80, interactive=False, format="png")
            video = gr.Video(label="video (when the run ends)", height=200, interactive=False)
        with gr.Column(scale=3):
            with gr.Row():
                layer = gr.Dropdown([f"L{i}" for i in range(CFG.layers)], value=f"L{CFG.layers - 1}",
                                    label="layer")
                head = gr.Dropdown([f"H{i}" for i in range(CFG.heads)], value="H0", label="head")
            cache_img = gr.Image(label="cache view: the tokens the policy saw at the newest chunk, "
                                       "on their source frames", interactive=False, format="png",
                                 elem_id="cacheview", height=330)
            gr.HTML(LEGEND)
    with gr.Tabs():
        with gr.Tab("Drift"):
            with gr.Row():
                metric = gr.Radio(["frechet", "kl", "cosine"], value="frechet", label="distance")
                reference = gr.Radio(["first", "running"], value="first", label="against")
            drift_plot = gr.Plot(F.empty("Query drift", "no run yet"))
        with gr.Tab("Projections"):
            umap_btn = gr.Button("UMAP (same map for pre and post)")
            proj_plot = gr.Plot(F.empty("Query projections", "no run yet"))
        with gr.Tab("Scores"):
            scores_plot = gr.Plot(F.empty("Proxy scores", "no run yet"))
        with gr.Tab("Cache timeline"):
            timeline_plot = gr.Plot(F.timeline_figure([]))
        with gr.Tab("Metrics"):
            metrics_plot = gr.Plot(F.metrics_figure([]))
            summary_json = gr.JSON(label="run summary")
        with gr.Tab("Oracle"):
            gr.Markdown("Offline, after a run: a full-cache reference run gives the real future "
                        "queries; each compression step's proxy scores are ranked against the true "
                        "future attention share (Spearman, top-B recall, B = budget).")
            with gr.Row():
                horizon = gr.Slider(1, 8, value=2, step=1, label="horizon (future frames)")
                oracle_btn = gr.Button("Run oracle")
            oracle_status = gr.Markdown()
            oracle_plot = gr.Plot(F.oracle_figure(None, 0, 0))
        with gr.Tab("A/B"):
            with gr.Row():
                policy_b = gr.Dropdown(LIVE_POLICIES, value="window" if DEFAULT_POLICY != "window"
                                       else LIVE_POLICIES[0], label="policy B (default parameters)")
                ab_btn = gr.Button("Run A/B (A = the policy above)")
            ab_status = gr.Markdown()
            with gr.Row():
                ab_img_a = gr.Image(label="A", height=220, interactive=False, format="png")
                ab_img_b = gr.Image(label="B", height=220, interactive=False, format="png")
            with gr.Row():
                ab_video_a = gr.Video(label="A video", height=200, interactive=False)
                ab_video_b = gr.Video(label="B video", height=200, interactive=False)
            ab_table = gr.Dataframe(headers=["metric", "A", "B"], label="metrics")
            ab_plot = gr.Plot(F.ab_figure([], [], "A", "B"))
        with gr.Tab("RoPE 101") as rope_tab:
            gr.Markdown("3D RoPE turns each 2D plane of a query by (frame, row or column) x omega. "
                        "A query that never changes before RoPE draws a circle after it: that is "
                        "why post-RoPE statistics drift and pre-RoPE ones stay.")
            with gr.Row():
                r_frame = gr.Slider(0, 63, value=8, step=1, label="frame")
                r_row = gr.Slider(0, CFG.grid - 1, value=2, step=1, label="row")
                r_col = gr.Slider(0, CFG.grid - 1, value=5, step=1, label="column")
                r_plane = gr.Dropdown(R.planes(MODEL.rope), value=0, label="frequency plane")
            with gr.Row():
                rope_plot = gr.Plot()
                rope_drift_plot = gr.Plot()
        with gr.Tab("Export"):
            gr.Markdown("video.mp4, record.npz (query statistics), decisions.jsonl (every "
                        "compression), summary.json and plots.html, after a run.")
            downloads = gr.File(label="downloads", file_count="multiple", interactive=False)
    # hidden: the /generate API endpoint's outputs
    api_btn = gr.Button(visible=False)
    api_video = gr.File(visible=False)
    api_summary = gr.JSON(visible=False)

    # -- wiring ---------------------------------------------------------------
    model_in = [model_choice] if MULTI_MODEL else []  # unset: the API stays as it was
    run_inputs = [prompt, seed, frames, policy, budget, layer, head, metric, reference, state,
                  *param_widgets, *model_in]
    run_outputs = [state, status, frame_img, strip_img, cache_img, drift_plot, proj_plot,
                   scores_plot, timeline_plot, metrics_plot, video, downloads, summary_json]
    go_btn.click(start_run, run_inputs, run_outputs, concurrency_id="run", concurrency_limit=4,
                 api_name="run")
    stop_btn.click(stop_run, [state, ab_state], None, concurrency_limit=None, api_name="stop")
    steer_inputs = [state, policy, budget, *param_widgets]
    policy.change(steer, steer_inputs, None, concurrency_limit=None, api_name="steer")
    policy.change(show_params, policy, groups, concurrency_limit=None, api_visibility="private")
    budget.release(steer, steer_inputs, None, concurrency_limit=None, api_visibility="private")
    budget.change(budget_info, [budget, *model_in], budget_tokens, concurrency_limit=None,
                  api_visibility="private")
    for w in param_widgets:
        events = [w.change] if isinstance(w, gr.Checkbox) else [w.submit, w.blur]
        for ev in events:
            ev(steer, steer_inputs, None, concurrency_limit=None, api_visibility="private")
    view_inputs = [state, layer, head, metric, reference]
    view_outputs = [cache_img, drift_plot, proj_plot, scores_plot, timeline_plot, metrics_plot,
                    oracle_plot]
    for w in (layer, head, metric, reference):
        w.change(set_view, view_inputs, view_outputs, concurrency_limit=None, api_visibility="private")
    umap_btn.click(show_umap, [state, layer, head], proj_plot, concurrency_limit=2,
                   api_visibility="private")
    oracle_btn.click(run_oracle, [state, horizon, layer, head], [oracle_plot, oracle_status],
                     concurrency_id="run", concurrency_limit=4, api_visibility="private")
    ab_btn.click(run_ab, [prompt, seed, frames, policy, budget, policy_b, ab_state, *param_widgets,
                          *model_in],
                 [ab_state, ab_img_a, ab_img_b, ab_status, ab_table, ab_plot, ab_video_a, ab_video_b],
                 concurrency_id="run", concurrency_limit=4, api_visibility="private")
    rope_inputs = [state, r_frame, r_row, r_col, r_plane, layer, head]
    for w in (r_frame, r_row, r_col):
        w.release(rope_views, rope_inputs, [rope_plot, rope_drift_plot], concurrency_limit=None,
                  api_visibility="private")
    r_plane.change(rope_views, rope_inputs, [rope_plot, rope_drift_plot], concurrency_limit=None,
                   api_visibility="private")
    # rendered when the tab opens, not on page load: a 3D plot is costly to draw
    rope_tab.select(rope_views, rope_inputs, [rope_plot, rope_drift_plot], concurrency_limit=None,
                    api_visibility="private")
    if MULTI_MODEL:
        model_choice.change(model_views, model_choice, [layer, head, budget], concurrency_limit=None,
                            api_visibility="private")
        model_choice.change(budget_info, [budget, model_choice], budget_tokens,
                            concurrency_limit=None, api_visibility="private")
    api_btn.click(api_generate, [prompt, policy, budget, frames, seed, *model_in],
                  [api_video, api_summary],
                  concurrency_id="run", concurrency_limit=4, api_name="generate")

demo.queue(default_concurrency_limit=4, max_size=64)
warm_up(MODEL, make_policy(DEFAULT_POLICY))  # first-call costs paid before the first user
warm_up_umap()  # numba compiles in the background, so the first UMAP click is not slow


def warm_queue(url: str) -> None:
    """Send one cheap event (/stop with no run) through the queue: a server's very
    first event costs ~1 s of one-time set-up, which the first user should not wait for."""
    try:
        from gradio_client import Client
        Client(url, verbose=False).predict(api_name="/stop")
    except Exception as e:  # never let a warm-up stop the app
        print(f"ffviz: queue warm-up skipped ({e})", flush=True)
    print("ffviz: ready", flush=True)


def launch(**kwargs):
    """``demo.launch`` with the theme and CSS, then the queue warm-up."""
    block = not kwargs.pop("prevent_thread_lock", False)
    out = demo.launch(theme=gr.themes.Soft(), css=CSS, prevent_thread_lock=True, **kwargs)
    warm_queue(str(demo.local_url).replace("0.0.0.0", "127.0.0.1"))
    if block:
        demo.block_thread()
    return out


if __name__ == "__main__":
    launch()
