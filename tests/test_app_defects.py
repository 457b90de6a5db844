"""The ten defects of the app review ("The app tells its story"), one test each
(or more), through ``gradio_client`` against the served app where the defect is
visible there, else through the app's handlers as the page calls them. The
browser-only ones (a second Generate, the prompt notes, RoPE 101 following a run)
are in test_browser.py."""
from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import plotly.graph_objects as go
import pytest

pytest.importorskip("gradio_client")
from tests.conftest import strict_loads  # noqa: E402
from tests.test_app import PROMPT, client, run_args  # noqa: E402
from tests.test_app import wait as finish  # noqa: E402


def params_for(app, **values):
    """The flat parameter list with ``policy.name`` set (keys "policy__name")."""
    out = [None] * len(app.SPECS)
    for key, v in values.items():
        pol, name = key.split("__")
        out[[k for k, s in enumerate(app.SPECS) if s.policy == pol and s.name == name][0]] = v
    return out


def wait_for(job, n_outputs=2, timeout=120):
    t0 = time.time()
    while len(job.outputs()) < n_outputs:
        assert time.time() - t0 < timeout and not job.done(), "the run did not start"
        time.sleep(0.05)


def texts(outputs) -> list[str]:
    """Every string output of every update (the status lines, the oracle's message...)."""
    return [o for out in outputs for o in (out if isinstance(out, (list, tuple)) else [out])
            if isinstance(o, str)]


def run_id(text: str) -> str:
    return re.search(r"run (r\d+)", text).group(1)


# -- 2. a rejected live change puts its control back ---------------------------------------

def test_rejected_steer_puts_controls_back(server, app_module):
    c = client(server)
    # the longest run the app allows, so both steers land while it is running (a steer
    # after the end changes nothing and answers with skips)
    job = c.submit(*run_args(frames=256, policy="future_forcing", budget=4), api_name="/run")
    wait_for(job)
    # budget 1 cannot hold future_forcing's sink + recent frames: rejected, slider back to 4
    out = c.predict("future_forcing", 1, api_name="/steer")
    assert out[0] == "future_forcing" and out[1] == 4
    # n_sink=50 does not fit either: the box goes back to the running value (1)
    i = [k for k, s in enumerate(app_module.SPECS) if s.policy == "future_forcing" and s.name == "n_sink"][0]
    out = c.predict("future_forcing", 4, *params_for(app_module, future_forcing__n_sink=50),
                    api_name="/steer")
    assert not job.done(), "the run ended before the steer: nothing left to test"
    assert out[2 + i] == 1 and out[1] == 4, (out[:2], out[2 + i])
    c.predict(api_name="/stop")
    finish(job)
    assert "1 frame = 64 tokens" in app_module.budget_info(1)
    assert "1 frames" not in app_module.budget_info(1)


# -- 3. the oracle's result belongs to its run -----------------------------------------------

def test_new_run_clears_the_oracle_and_labels_it(server):
    c = client(server)
    first = finish(c.submit(*run_args(frames=8, policy="window"), api_name="/run"))
    run_a = run_id([t for t in texts(first) if t.startswith("**done**")][-1])
    fig, msg, _ = c.predict(2, "L3", "H0", api_name="/oracle")
    assert run_id(msg) == run_a and "compression steps compared" in msg
    assert run_a in json.dumps(fig)  # the figure carries the run's label too
    second = finish(c.submit(*run_args(frames=8, policy="sink"), api_name="/run"))
    run_b = run_id([t for t in texts(second) if t.startswith("**done**")][-1])
    assert run_b != run_a
    assert f"no oracle result for run {run_b}" in "\n".join(texts(second))


# -- 4. the oracle's reference covers the run's own frames, and Stop ends it ---------------

def test_oracle_reference_follows_a_stopped_run_and_stops(server):
    c = client(server)
    job = c.submit(*run_args(frames=250, policy="window", budget=2), api_name="/run")
    wait_for(job, 4)
    c.predict(api_name="/stop")
    final = finish(job)[-1]
    made = final[-1]["frames"]
    assert made < 250
    # the reference runs over the frames the run made (not 250): the oracle compares steps there
    _, msg, files = c.predict(2, "L3", "H0", api_name="/oracle")
    oracle = strict_loads(open([f for f in files if f.endswith("oracle.json")][0], encoding="utf-8").read())
    assert max(oracle["frames"]) < made
    # a long run, then Stop while the oracle's reference runs: it ends early
    job = c.submit(*run_args(frames=250, policy="window", budget=2), api_name="/run")
    finish(job)
    oracle_job = c.submit(2, "L3", "H0", api_name="/oracle")
    wait_for(oracle_job, 1)
    t0 = time.time()
    c.predict(api_name="/stop")
    outs = finish(oracle_job, timeout=60)
    assert time.time() - t0 < 15
    assert "stopped" in outs[-1][1]


# -- 5. RoPE 101 follows a run started while it is open (handler; the browser test too) -----

def test_rope_views_follow_the_run_when_open(app_module):
    params = [None] * len(app_module.SPECS)
    ui = {"tab": "RoPE 101"}
    final = list(app_module.start_run(PROMPT, 0, 8, "window", 2, "L3", "H0", "frechet", "first",
                                      None, ui, None, *params))[-1]
    session = final[app_module.state]
    step2 = final[app_module.rope_plots[1]]
    assert session.tag.run_id in step2.layout.title.text and "this run's queries" in step2.layout.title.text
    closed = list(app_module.start_run(PROMPT, 0, 8, "window", 2, "L3", "H0", "frechet", "first",
                                       session, {"tab": "Drift"}, None, *params))[-1]
    assert app_module.rope_plots[1] not in closed  # not drawn while nobody looks
    closed[app_module.state].close()


# -- 6. every JSON the app returns or exports is strict -------------------------------------

def test_generate_summary_is_strict_json(server):
    c = client(server)
    # a scene whose objects never leave: "returns" is undefined, so it must be null, not NaN
    video, summary = c.predict(PROMPT, "window", 2, 6, 0, api_name="/generate")
    text = json.dumps(summary, allow_nan=False)
    assert strict_loads(text)["metrics"]["returns"] is None
    assert summary["reproduce"].startswith("python -m ffviz generate")


def test_exported_files_are_strict_json(server, app_module):
    c = client(server)
    final = finish(c.submit(*run_args(frames=8), api_name="/run"))[-1]
    _, _, files = c.predict(2, "L3", "H0", api_name="/oracle")
    for name in ("summary.json", "oracle.json"):
        strict_loads(open([f for f in files if f.endswith(name)][0], encoding="utf-8").read())
    params = [None] * len(app_module.SPECS)
    out = list(app_module.run_ab(PROMPT, 0, 6, "window", 2, "sink", "3", None, None, *params))[-1]
    ab = [f for f in out[app_module.ab_files] if f.endswith("ab.json")][0]
    data = strict_loads(open(ab, encoding="utf-8").read())
    assert data["a"]["tag"]["policy"] == "window" and len(data["sweep"]) == 4
    for s in out[app_module.ab_state]:
        s.close()
    assert final[-1]["frames"] == 8


# -- 7. the prompt's notes next to the prompt (the browser test shows them on the page) -----

def test_prompt_notes_shown_next_to_the_prompt(server, app_module):
    notes = app_module.read_prompt("a red circle dancing under a purple moon at night", 0)
    assert "purple" in notes and "dancing" in notes
    assert app_module.read_prompt(PROMPT, 0) == ""
    c = client(server)
    outs = finish(c.submit(*run_args(frames=6, prompt="a red circle dancing under a purple moon"),
                           api_name="/run"))
    assert any("purple" in t and "understood differently" in t for t in texts(outs))


# -- 8. a failed Generate says so, and input errors print no traceback --------------------

def test_failed_generate_replaces_the_status_and_logs_no_traceback(server, capfd):
    c = client(server)
    finish(c.submit(*run_args(frames=6), api_name="/run"))
    capfd.readouterr()
    job = c.submit(*run_args(frames=6, prompt="the quick fox"), api_name="/run")
    with pytest.raises(Exception, match="no object"):
        job.result()
    statuses = [t for t in texts(job.outputs()) if t.startswith("**")]
    assert statuses and statuses[-1].startswith("**cannot start**") and "no object" in statuses[-1]
    with pytest.raises(Exception):
        c.predict("", "window", 2, 6, 0, api_name="/generate")
    time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err


# -- 9. the cache view scales, hovers and replays -------------------------------------------

def _tokens(n_frames: int, grid=(8, 8), seed=0):
    """One head's arrays as ``CacheStep.tokens`` gives them: every token of ``n_frames``
    frames, a third dropped, a third merged into the first kept token."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    n = n_frames * rows * cols
    state = rng.integers(0, 3, n).astype(np.int8)
    into = np.where(state == 1, int(np.argmax(state == 0)), -1)
    return {"frame": np.repeat(np.arange(n_frames), rows * cols), "row": np.arange(n) % (rows * cols) // cols,
            "col": np.arange(n) % cols, "mass": np.ones(n), "state": state, "into": into,
            "score": rng.normal(size=n), "step": 7, "frame_now": n_frames - 1,
            "budget_tokens": 256, "compressed": True}


def test_cache_view_scales_past_twenty_frames():
    from ffviz.viz.cacheview import IN_VIEW, cache_figure

    frames = np.zeros((40, 32, 32, 3), np.uint8)
    small = cache_figure(_tokens(4), frames, (8, 8), 3, 0)
    big = cache_figure(_tokens(40), frames, (8, 8), 3, 0)
    assert small.layout.height == big.layout.height  # cells keep their size
    x = big.layout.xaxis
    assert len(x.tickvals) == 40 and x.ticktext[0] == "f0" and x.rangeslider.visible
    shown = (x.range[1] - x.range[0]) / 9  # 8 columns + a gap per frame
    assert shown <= IN_VIEW + 0.5
    heat = [t for t in big.data if isinstance(t, go.Heatmap)][0]
    text = "\n".join(str(t) for row in heat.text for t in row)
    assert "score" in text and "merged into frame" in text and "token of frame" in text
    assert not any(isinstance(t, go.Scatter) and t.mode == "lines" for t in big.data)  # no tangle
    lines = cache_figure(_tokens(40), frames, (8, 8), 3, 0, merges=True)
    assert any(isinstance(t, go.Scatter) and t.mode == "lines" for t in lines.data)


def test_cache_view_replays_any_compression_step(app_module):
    params = [None] * len(app_module.SPECS)
    final = list(app_module.start_run(PROMPT, 0, 12, "window", 2, "L3", "H0", "frechet", "first",
                                      None, {}, None, *params))[-1]
    s = final[app_module.state]
    assert len(s.cache_history) >= 8  # every compression step, not only the newest
    first = app_module.set_cache_step(s, 0, False, {})
    assert f"step {s.cache_history[0].step}," in first.layout.title.text
    newest = app_module.set_cache_step(s, len(s.cache_history) - 1, False, {})
    assert s.view["cache_step"] is None  # the rightmost position follows the run
    assert f"step {s.cache_history[-1].step}," in newest.layout.title.text
    s.close()


# -- 10. the drift plot names its reference frame and its y-axis ---------------------------

def test_drift_title_names_the_real_reference_frame():
    from ffviz.viz.figures import drift_figure

    F, L, H, d = 5, 2, 2, 4
    rng = np.random.default_rng(0)
    m, v = rng.normal(size=(F, L, H, d)), np.ones((F, L, H, d))
    fig = drift_figure(np.arange(2, 2 + F), m, v, m, v, 0, 0)
    assert "vs frame 2" in fig.layout.title.text and "frame 0" not in fig.layout.title.text
    assert "distance" in fig.layout.yaxis.title.text


# -- the smaller ones ------------------------------------------------------------------------

def test_full_cache_has_no_budget_and_a_stopped_ab_says_so(app_module):
    from ffviz.app.views import summary_table

    rows = dict(summary_table({"policy": "full", "budget_frames": 4, "frames": 6, "fps": 1.0,
                               "peak_cache_tokens": 384, "policy_ms_per_step": 0.1, "metrics": {}}))
    assert rows["budget"] == "no budget (full cache)"
    params = [None] * len(app_module.SPECS)
    outs = app_module.run_ab(PROMPT, 0, 200, "window", 2, "full", "", None, None, *params)
    first = next(outs)
    a, b = first[app_module.ab_state]
    threading.Timer(0.3, lambda: app_module.stop_run(None, [a, b], None)).start()
    final = list(outs)[-1]
    assert "stopped" in final[app_module.ab_status] and "A stopped at frame" in final[app_module.ab_status]
    for s in final[app_module.ab_state]:
        s.close()


def test_rope_plane_names_match_and_axes_are_shared(app_module):
    from ffviz.viz import rope_explainer as R

    rope = app_module.MODEL.rope
    label, plane = R.planes(rope)[8]
    rot, mean, dist = app_module.rope_views(None, 5, 2, 3, plane, "L3", "H0")
    name = R.plane_name(rope, plane)
    assert label.startswith(name) and name in rot.layout.title.text and name in mean.layout.title.text
    assert mean.layout.xaxis2.matches == "x" and mean.layout.yaxis2.matches == "y"


def test_projection_panels_share_their_axes(app_module):
    from ffviz.app.session import RunSession, check_inputs
    from ffviz.policies import make_policy
    from ffviz.viz.projections import projection_figure

    s = RunSession(app_module.MODEL, check_inputs(PROMPT, 6, 2, 0), make_policy("window"), 2)
    for _ in s.run():
        pass
    fig = projection_figure(s.recorder, 3, 0)
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis2.matches == "y"
    s.close()


def test_metrics_speed_leaves_out_the_given_frames_and_names_both_speeds():
    from ffviz.app.session import StepRecord
    from ffviz.viz.figures import metrics_figure

    steps = [StepRecord(0, 1, 2, "window", 2, False, 128, 128, 1, 0.0, 0.001, 0.001)]
    steps += [StepRecord(i, i + 1, 1, "window", 2, False, 192, 128, 1, 1.0, 0.05, 0.2 * i)
              for i in range(1, 6)]
    fig = metrics_figure(steps)
    speed = [t for t in fig.data if t.xaxis == "x"]
    assert {t.name for t in speed} == {"per chunk (model + policy)",
                                       "whole run (wall clock, with the app's views)"}
    assert all(1 not in list(t.x) for t in speed)  # the given frames' chunk (frame 1) left out
    assert max(max(t.y) for t in speed) < 50


def test_policy_parameters_have_descriptions_and_short_labels(app_module):
    for w, spec in zip(app_module.param_widgets, app_module.SPECS):
        assert w.label == spec.name and w.min_width >= 200
    ff = {s.name: s.doc for s in app_module.SPECS if s.policy == "future_forcing"}
    assert ff["value_norm"] and ff["tau"] and ff["n_sink"]
