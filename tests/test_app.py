"""The app through ``gradio_client`` against a launched server, plus its plain
functions (ffviz.viz) without a server. Runs are kept short (6-10 frames)."""
from __future__ import annotations

import gc
import json
import threading
import time

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from ffviz.policies import PolicyError, make_policy  # noqa: E402
from ffviz.scenes import PromptError  # noqa: E402
from ffviz.generate import GenerationError  # noqa: E402
from ffviz.weights import DEFAULT_WEIGHTS, read_card  # noqa: E402

PROMPT = "a red circle and a blue square on a green background"


def client(url) -> Client:
    return Client(url, verbose=False)


def run_args(frames=6, policy="window", budget=2, seed=0, prompt=PROMPT):
    # /run: prompt, seed, frames, policy, budget, layer, head, metric, reference, *params
    return (prompt, seed, frames, policy, budget, "L3", "H0", "frechet", "first")


def wait(job, timeout=240):
    t0 = time.time()
    while not job.done():
        if time.time() - t0 > timeout:
            raise TimeoutError("run did not finish")
        time.sleep(0.05)
    return job.outputs()


# -- through the server ------------------------------------------------------

def test_short_run_streams_frames_and_writes_files(server):
    c = client(server)
    job = c.submit(*run_args(frames=6), api_name="/run")
    outs = wait(job)
    # one update per chunk (2 given frames + 4 generated = 5 chunks) plus the final one
    assert len(outs) >= 5
    final = outs[-1]
    summary = final[-1]
    assert summary["frames"] == 6 and summary["policy"] == "window"
    assert summary["peak_cache_tokens"] <= 3 * 64
    names = sorted(p.rsplit("/", 1)[-1] for p in final[-2])
    for want in ("video.mp4", "record.npz", "decisions.jsonl", "plots.html", "summary.json"):
        assert want in names
    video = final[-3]  # an update: opened at the last frame (not frame 0)
    assert video["value"].endswith(".mp4") and video["playback_position"] > 0
    record = np.load([p for p in final[-2] if p.endswith("record.npz")][0])
    cfg = read_card(DEFAULT_WEIGHTS)["config"]  # the served model's
    assert record["mean_pre"].shape[1:] == (cfg["layers"], cfg["heads"], cfg["width"] // cfg["heads"])


def test_policy_change_mid_run_shows_in_record(server):
    c = client(server)
    # long enough (a chunk takes ~0.1 s) that the steer lands mid-run
    job = c.submit(*run_args(frames=60, policy="window", budget=3), api_name="/run")
    t0 = time.time()
    while len(job.outputs()) < 2:  # the run is going: steer it
        assert time.time() - t0 < 120 and not job.done()
        time.sleep(0.05)
    c.predict("sink", 3, api_name="/steer")
    final = wait(job)[-1]
    summary = final[-1]
    assert summary["policy"] == "sink"
    assert [s["policy"] for s in summary["switches"]] == ["sink"]
    switch_frame = summary["switches"][0]["frame"]
    assert 2 <= switch_frame < 60 and summary["frames"] == 60
    decisions = [json.loads(l) for l in
                 open([p for p in final[-2] if p.endswith("decisions.jsonl")][0], encoding="utf-8")]
    policies = {d["policy"] for d in decisions}
    assert policies == {"window", "sink"}
    assert all(d["policy"] == "sink" for d in decisions if d["frames"][0] >= switch_frame)


def test_generate_endpoint(server):
    c = client(server)
    video, summary = c.predict(PROMPT, "sink", 2, 6, 1, api_name="/generate")
    assert str(video).endswith(".mp4")
    with open(video, "rb") as f:
        assert len(f.read()) > 1000
    assert summary["frames"] == 6 and summary["policy"] == "sink" and summary["seed"] == 1
    assert summary["budget_frames"] == 2


@pytest.mark.parametrize("args, message", [
    (("", "window", 2, 6, 0), "prompt is empty"),
    (("the quick fox", "window", 2, 6, 0), "no object"),
    ((PROMPT, "window", 0, 6, 0), "minimum"),
    ((PROMPT, "window", 8, 6, 0), "beyond the run"),
    ((PROMPT, "window", 2, 100000, 0), "frames must be between"),
    ((PROMPT, "oracle", 2, 6, 0), "not in the list of choices"),
])
def test_bad_inputs_get_clear_errors(server, args, message):
    c = client(server)
    with pytest.raises(Exception) as err:
        c.predict(*args, api_name="/generate")
    assert message in str(err.value)


def test_incompatible_parameters_rejected_at_start(server, app_module):
    c = client(server)
    params = [None] * len(app_module.SPECS)
    i = [k for k, s in enumerate(app_module.SPECS) if s.policy == "sink" and s.name == "n_sink"][0]
    params[i] = 5
    with pytest.raises(Exception) as err:
        c.predict(*run_args(frames=8, policy="sink", budget=2), *params, api_name="/run")
    assert "do not fit the budget" in str(err.value)


def test_concurrent_users_are_isolated(server, app_module):
    """Four users at once all get answers, the same as alone, and the shared
    model never carries a hook (each run hooks its own copy)."""
    solo = client(server).predict(PROMPT, "window", 2, 6, 0, api_name="/generate")[1]
    other = "a big yellow triangle on a purple background with a gray pillar"
    results, seen_hooks = {}, []

    def user(name, prompt, seed):
        results[name] = client(server).predict(prompt, "window", 2, 6, seed,
                                               api_name="/generate")[1]

    threads = [threading.Thread(target=user, args=("a", PROMPT, 0)),
               threading.Thread(target=user, args=("b", other, 3)),
               threading.Thread(target=user, args=("c", PROMPT, 0)),
               threading.Thread(target=user, args=("d", other, 5))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen_hooks.append(sum(len(m.fns) for m in app_module.MODEL.modules() if hasattr(m, "fns")))
        time.sleep(0.05)
    assert max(seen_hooks) == 0
    assert len(results) == 4
    assert results["a"]["metrics"] == solo["metrics"] == results["c"]["metrics"]
    assert results["a"]["prompt"] == PROMPT and results["b"]["prompt"] == other
    # each got its own run: its own scene (metrics can coincide: both scenes held whole)
    assert results["a"]["scene"] == solo["scene"] != results["b"]["scene"]
    assert results["b"]["seed"] == 3 and results["d"]["seed"] == 5


def test_cancelled_run_frees_its_session(server):
    from ffviz.app.session import RunSession

    c = client(server)
    job = c.submit(*run_args(frames=200, budget=2), api_name="/run")
    t0 = time.time()
    while len(job.outputs()) < 2:
        assert time.time() - t0 < 120
        time.sleep(0.05)
    job.cancel()
    deadline = time.time() + 60
    while time.time() < deadline:
        gc.collect()
        live = [o for o in gc.get_objects() if isinstance(o, RunSession) and o.running]
        if not live:
            break
        time.sleep(0.5)
    assert not live, "a cancelled run kept generating"


# -- plain functions (no server) ----------------------------------------------

def test_check_inputs_messages():
    from ffviz.app.session import check_inputs

    with pytest.raises(PromptError, match="empty"):
        check_inputs("  ", 8, 2, 0)
    with pytest.raises(PromptError):
        check_inputs("nothing here", 8, 2, 0)
    with pytest.raises(GenerationError, match="at least 1"):
        check_inputs(PROMPT, 8, 0, 0)
    with pytest.raises(GenerationError, match="beyond the run"):
        check_inputs(PROMPT, 8, 9, 0)
    with pytest.raises(GenerationError, match="between 3 and"):
        check_inputs(PROMPT, 10_000, 2, 0)
    with pytest.raises(GenerationError, match="whole number"):
        check_inputs(PROMPT, 7.5, 2, 0)
    assert check_inputs(PROMPT, 8.0, 2, 1).frames == 8


def test_params_come_from_the_registry():
    from ffviz.policies import POLICIES
    from ffviz.app.params import build_policy, collect, param_specs

    specs = param_specs()
    names = {s.policy for s in specs}
    assert names <= set(POLICIES)
    for s in specs:  # every widget default builds a valid policy
        assert collect(s.policy, specs, [None] * len(specs))[s.name] == s.default
    if "sink" in POLICIES:
        vals = [None] * len(specs)
        vals[[k for k, s in enumerate(specs) if s.policy == "sink"][0]] = 2.0  # a float from a box
        assert build_policy("sink", specs, vals).params()["n_sink"] == 2
        vals[[k for k, s in enumerate(specs) if s.policy == "sink"][0]] = 1.5
        with pytest.raises(PolicyError, match="integer"):
            build_policy("sink", specs, vals)


def test_session_views_and_figures(app_module):
    from ffviz.viz import figures as F
    from ffviz.reference import fidelity, reference_run, true_share
    from ffviz.viz.projections import pca_common, projection_figure
    from ffviz.app.session import RunSession, check_inputs
    from ffviz.app.views import live_views, plot_views

    s = RunSession(app_module.MODEL, check_inputs(PROMPT, 7, 2, 0), make_policy("window"), 2)
    for step in s.run():
        if step.index == 2:
            assert not s.steer(make_policy("window"), 2)  # no change: no switch recorded
            assert s.steer(make_policy("sink"), 3)
    assert [w["policy"] for w in s.switches] == ["sink"]
    live = live_views(s)
    assert live["frame"].shape == (256, 256, 3) and live["strip"].ndim == 3
    plots = plot_views(s)
    assert set(plots) == {"quality", "cache", "drift", "projections", "scores", "timeline", "metrics",
                          "heads", "heads_table"}
    assert all(isinstance(plots[k], go.Figure) for k in plots if k != "heads_table")
    # the switch is marked on the timeline plots
    assert any("sink" in (a.text or "") for a in plots["timeline"].layout.annotations)
    a, b, ratio = pca_common(np.random.randn(20, 8), np.random.randn(20, 8))
    assert a.shape == (20, 2) and 0 < ratio.sum() <= 1
    assert isinstance(projection_figure(s.recorder, 3, 0), go.Figure)
    share = true_share(torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.ones(2, 7))
    assert np.allclose(share.sum(-1).numpy(), 1, atol=1e-5)
    ref = reference_run(app_module.MODEL, s.settings, horizon=2)
    res = fidelity(s.oracle_steps, ref, horizon=2)
    cfg = app_module.MODEL.cfg
    assert res["steps"] >= 1 and res["spearman"].shape[1:] == (cfg.layers, cfg.heads)
    assert isinstance(F.oracle_figure(res, 3, 0), go.Figure)
    s.close()
    assert not s.dir.exists()


def test_rope_explainer(app_module):
    figs = app_module.rope_views(None, 5, 2, 3, 0, "L3", "H0")
    assert len(figs) == 3 and all(isinstance(f, go.Figure) for f in figs)


def test_ab_oracle_umap_handlers(app_module):
    """The A/B, Oracle and UMAP handlers, called as the app calls them."""
    app = app_module
    params = [None] * len(app.SPECS)
    outs = list(app.run_ab(PROMPT, 0, 6, "window", 2, "sink", "", None, None, *params))
    final = outs[-1]
    rows = final[app.ab_table]
    assert rows[0] == ["policy", "window", "sink"]
    assert final[app.ab_video_a]["value"].endswith(".mp4")
    assert final[app.ab_video_b]["value"].endswith(".mp4")
    a, b = outs[-2][app.ab_state]
    assert a.summary["frames"] == b.summary["frames"] == 6

    runs = list(app.start_run(PROMPT, 0, 7, "window", 2, "L3", "H0", "frechet", "first", None,
                              {}, None, *params))
    session = runs[-1][app.state]
    assert session.summary["frames"] == 7
    fig, msg, files = list(app.run_oracle(session, 2, "L3", "H0"))[-1]
    assert any(f.endswith("oracle.json") for f in files)
    assert isinstance(fig, go.Figure) and "compression steps compared" in msg
    assert session.oracle_result["recency"]  # window has no scores: recency stands in
    assert isinstance(app.show_umap(session, "L3", "H0"), go.Figure)
    session.close()


def test_closed_session_frees_its_run(app_module):
    """Gradio calls the State's delete_callback when a user's session ends: the
    run stops at its next chunk and its files go."""
    from ffviz.app.session import RunSession, check_inputs

    s = RunSession(app_module.MODEL, check_inputs(PROMPT, 50, 2, 0), make_policy("window"), 2)
    steps = s.run()
    next(steps)
    app_module.state.delete_callback(s)
    assert s.controls.stop_requested and not s.dir.exists()
    assert len(list(steps)) <= 1  # at most the chunk already under way
    assert not s.running


def test_policy_widgets_follow_the_registry(app_module):
    from ffviz.policies import POLICIES

    assert set(app_module.LIVE_POLICIES) == set(POLICIES) - app_module.OFFLINE
    assert len(app_module.param_widgets) == len(app_module.SPECS)
    assert "oracle" not in app_module.LIVE_POLICIES


# -- the model choice (FFVIZ_MODELS) --------------------------------------------

def test_model_choice_hidden_by_default(app_module):
    import os

    if os.environ.get("FFVIZ_MODELS"):
        pytest.skip("FFVIZ_MODELS is set in this environment")
    assert app_module.MODEL_NAMES == ["tiny"] and not app_module.MULTI_MODEL
    assert app_module.model_choice.visible is False
    assert app_module.get_model(None) is app_module.MODEL
    with pytest.raises(Exception, match="not offered"):
        app_module.get_model("wan:tiny-random")


def test_check_inputs_without_scenes():
    from ffviz.app.session import check_inputs

    assert check_inputs("the quick fox", 8, 2, 0, scenes=False).prompt == "the quick fox"
    with pytest.raises(PromptError, match="empty"):
        check_inputs(" ", 8, 2, 0, scenes=False)
    with pytest.raises(PromptError):
        check_inputs("the quick fox", 8, 2, 0)


MODEL_CHOICE_SCRIPT = r"""
import json
import ffviz.viz.projections as P
P._warm_started = True  # no background UMAP warm-up (numba) competing for the CPU: no UMAP here
import app as entry
app = entry.build()
assert app.MULTI_MODEL and app.model_choice.visible is not False
params = [None] * len(app.SPECS)
outs = list(app.start_run("a cat surfing a wave at dusk", 0, 6, "window", 2, "L3", "H0",
                          "frechet", "first", None, {}, None, *params, False, None, "wan:tiny-random"))
final = outs[-1]
s = final[app.state]
assert final[app.frame_img]["value"].shape == (256, 256, 3) and final[app.cache_plot] is not None
assert final[app.video]["value"].endswith(".mp4")
views = app.set_view(s, "L3", "H1", "kl", "running", None, False)  # beyond wan's 2 layers/heads: clamped
assert (s.view["layer"], s.view["head"]) == (1, 1) and len(views) >= 6
rows = entry.summary_table(s.summary)
assert "32 tokens" in app.budget_info(2, "wan:tiny-random")
assert "128 tokens" in app.budget_info(2, "tiny")
# the endpoints take the model as their last input
fns = {f.api_name: f for f in app.demo.fns.values()}
for name in ("run", "generate"):
    assert fns[name].inputs[-1] is app.model_choice, name
_, api_summary = app.api_generate("a dog", "sink", 2, 6, 1, "wan:tiny-random")
print("RESULT " + json.dumps({"summary": s.summary, "rows": rows, "chunks": len(outs),
                              "api": api_summary, "cached": sorted(app.models)}))
s.close()
"""


def test_model_choice_runs_a_model_without_scenes():
    """FFVIZ_MODELS lists two models: the dropdown shows, and a run on
    wan:tiny-random (free-text prompt, other grid) gives frames and a summary
    without scene metrics. A subprocess: the app reads FFVIZ_MODELS when it is built."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "FFVIZ_MODELS": "tiny,wan:tiny-random", "FFVIZ_TORCH_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", MODEL_CHOICE_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    summary = out["summary"]
    assert summary["frames"] == 6 and summary["model"] == "wan:tiny-random"
    assert summary["scene"] is None and summary["metrics"]["computed"] is False
    assert summary["tokens_per_frame"] == 16 and out["chunks"] >= 2
    assert ["scene metrics", "not computed (this model has no scenes)"] in out["rows"]
    assert out["api"]["frames"] == 6 and out["api"]["metrics"]["computed"] is False
    assert out["cached"] == ["tiny", "wan:tiny-random"]


@pytest.mark.parametrize("kernels_mode", ["auto", "reference"])
def test_steering_dry_run_works_for_every_online_policy(monkeypatch, kernels_mode):
    """``try_policy`` (the app's check before a live switch) runs each policy on a copy
    of the live cache; every policy that needs no look-ahead must pass it on both
    kernel paths (the copy once lacked the keys' temporal positions, which Future
    Forcing's CPU kernels and Deep Forcing's re-rotation read)."""
    from ffviz.generate import RunSettings
    from ffviz.policies import POLICIES
    from ffviz.app.session import RunSession
    from tests.conftest import random_model

    monkeypatch.setenv("FFVIZ_KERNELS", kernels_mode)
    s = RunSession(random_model(), RunSettings("a red circle on a blue background", frames=8, seed=0),
                   make_policy("window"), 3)
    steps = s.run()
    for _ in range(4):
        next(steps)
    for name in POLICIES:
        if name != "oracle":  # offline: it needs the look-ahead run
            s.try_policy(make_policy(name), 2)
    s.stop()
    for _ in steps:
        pass
    s.close()


def test_prompt_edited_mid_run_switches_it(server):
    """Enter in the prompt box mid-run: the run follows the new prompt from the next chunk,
    the switch is in the summary (with its re-cache mode), and a bad prompt is refused."""
    c = client(server)
    job = c.submit(*run_args(frames=60, policy="window", budget=3), api_name="/run")
    t0 = time.time()
    while len(job.outputs()) < 2:
        assert time.time() - t0 < 120 and not job.done()
        time.sleep(0.05)
    c.predict("hello world", "all", api_name="/switch_prompt")  # refused with a warning
    c.predict("a red circle and a blue square on a white background", "recent",
              api_name="/switch_prompt")
    summary = wait(job)[-1][-1]
    (switch,) = summary["prompt_switches"]
    assert switch["prompt"].endswith("white background") and switch["recache"] == "recent"
    assert 2 <= switch["frame"] < 60 and summary["frames"] == 60
    assert [s["from_frame"] for s in summary["metrics"]["segments"]] == [0, switch["frame"]]


def test_heads_tab_shows_roles_and_shares_and_picks_a_head(app_module):
    """The Heads tab: a layer x head figure and table, live for the run; the budget
    share per head under adaptive budgets; a click on a cell picks that layer and head."""
    from types import SimpleNamespace

    from ffviz.app.session import RunSession, check_inputs
    from ffviz.app.views import plot_views
    app = app_module
    s = RunSession(app.MODEL, check_inputs(PROMPT, 10, 3, 0),
                   make_policy("future_forcing", head_budget="adaptive"), 3)
    for _ in s.run():
        pass
    views = plot_views(s)
    rows = views["heads_table"]
    cfg = app.MODEL.cfg
    assert [r[0] for r in rows] == [f"L{l}" for l in range(cfg.layers)]
    assert all(len(r) == cfg.heads + 1 for r in rows)
    assert all(c.split()[0] in ("static", "dynamic") and c.endswith("x") for r in rows for c in r[1:])
    shares = [float(c.rsplit(", ", 1)[1][:-1]) for r in rows for c in r[1:]]
    assert abs(sum(shares) / len(shares) - 1) < 0.05 and max(shares) > min(shares)  # adaptive
    assert isinstance(views["heads"], go.Figure) and views["heads"].data
    assert app.pick_head(s, SimpleNamespace(index=(2, 3))) == ("L2", "H2")
    skipped = app.pick_head(s, SimpleNamespace(index=(1, 0)))  # the layer column picks nothing
    assert all(not isinstance(x, str) for x in skipped)
    s.close()
