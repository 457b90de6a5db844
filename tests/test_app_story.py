"""What the app review asked to build: the guided first view, the memory test,
quality over time (also against cache size, in A/B), every result tied to its
run, the reproduce line, strict JSON from the CLI. Through the app's handlers as
the page calls them (the browser tests drive the page itself)."""
from __future__ import annotations

import shlex

import numpy as np
import pytest

from ffviz.generate import RunSettings
from ffviz.policies import make_policy
from tests.conftest import strict_loads

PROMPT = "a red circle and a blue square on a green background"
LEAVING = "a big red circle and a small cyan square on a white background, leaving the view"


def test_hidden_spans_and_return_events_follow_the_scene():
    from ffviz.metrics import consistency, hidden_spans
    from ffviz.scenes import Scene, parse_prompt

    assert hidden_spans(np.array([5, 5, 0, 0, 0, 5, 0, 0, 5, 0, 0, 0])) == [(2, 5), (9, 12)]
    assert hidden_spans(np.array([0, 0, 0, 0, 5])) == []  # hidden from the start: never "left"
    scene = Scene(parse_prompt(LEAVING, 0)[0], 0)
    truth = scene.render(np.arange(2, 64))
    m = consistency(truth, scene, start=2)
    assert m["returns_count"] == len(m["return_events"]) >= 1
    assert all(e["recovered"] for e in m["return_events"])  # the truth brings everything back
    assert len(m["curves"]["tracking"]) == len(m["curves"]["consistency"]) == 62
    vis = scene.visible_area(np.arange(64))
    for e in m["return_events"]:
        assert vis[e["left"], e["object"]] < 1 and vis[e["back"], e["object"]] >= 1


def test_memory_test_runs_three_policies_until_every_object_is_back(app_module):
    from ffviz.app.memory_test import MEMORY_POLICIES, MemoryTest
    from ffviz.app.quality import hide_events

    test = MemoryTest(app_module.MODEL, 0, 4, app_module.MAX_FRAMES)
    assert [s.tag.policy for s in test.sessions] == list(MEMORY_POLICIES) == \
        ["full", "window", "future_forcing"]
    frames = test.settings.frames
    objects = {h["object"] for h in hide_events(test.sessions[0].job.spec, 0, app_module.MAX_FRAMES)}
    backs = {h["object"]: h["back"] for h in reversed(test.hides)}  # first return of each
    assert set(backs) == objects and max(backs.values()) < frames  # the truth decides the length
    for _ in test.run():
        pass
    assert all(len(s.frames) == frames for s in test.sessions)
    assert len({s.settings.seed for s in test.sessions}) == 1  # the same seed for all three
    verdict = test.verdict()
    for policy in MEMORY_POLICIES:
        assert policy in verdict
    assert verdict.count("| frames ") == len({(h["name"], h["left"]) for h in test.hides
                                             if h["back"] + 1 < frames})
    runs = test.runs()
    assert [r["policy"] for r in runs] == list(MEMORY_POLICIES)
    out = test.export(test.sessions[0].dir / "memory_test.json")
    data = strict_loads(open(out, encoding="utf-8").read())
    assert [r["tag"]["policy"] for r in data["runs"]] == list(MEMORY_POLICIES)
    test.close()


def test_memory_test_handler_streams_side_by_side_frames(app_module):
    outs = list(app_module.run_memory(0, 4, None, None, True))
    img = [o[app_module.mem_img] for o in outs if app_module.mem_img in o][-1]
    assert img.shape[1] > 3 * 224  # three frames side by side
    final = outs[-1]
    fig = final[app_module.mem_plot]
    assert final[app_module.quality_plot] is fig  # the headline plot shows it too
    shapes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert shapes  # where an object hides
    assert any(t.mode == "markers+text" for t in fig.data)  # back / lost marks per policy
    assert "full" in final[app_module.mem_verdict]
    assert any(f.endswith("memory_test.json") for f in final[app_module.mem_files])
    final[app_module.mem_state].close()


def test_quality_figures_draw_runs_hides_and_cache_size():
    from ffviz.viz.quality import quality_figure

    run = {"label": "r1 window", "policy": "window", "frames": [2, 3, 4, 5],
           "consistency": [1.0, 0.9, None, 0.8], "tracking": [1.0, 0.5, None, 0.0],
           "returns": [{"name": "red circle", "left": 3, "back": 5, "recovered": False}]}
    points = [{"run": "run r1", "policy": "window", "cache_tokens": 256, "consistency": 0.8,
               "tracking": 0.2}, {"run": "run r2", "policy": "window", "cache_tokens": 512,
                                  "consistency": 0.9, "tracking": 0.4}]
    fig = quality_figure([run], [{"name": "red circle", "left": 3, "back": 5}], points=points,
                         label="run r1 · window · 4 frames · 12:00:00")
    assert "run r1" in fig.layout.title.text
    assert "lost" in [t for tr in fig.data if tr.mode == "markers+text" for t in tr.text]
    assert fig.layout.xaxis2.title.text.startswith("peak cache")
    assert "press Generate" in str(quality_figure([]).layout.annotations[0].text)


def test_every_result_names_its_run(app_module):
    """Plots, the status, the oracle and A/B all carry run id, policy, budget and time."""
    params = [None] * len(app_module.SPECS)
    final = list(app_module.start_run(PROMPT, 0, 10, "window", 2, "L3", "H0", "frechet", "first",
                                      None, {}, None, *params))[-1]
    s = final[app_module.state]
    label = s.tag.text()
    assert label.startswith(f"run {s.tag.run_id} · window · 2 frames · ")
    for widget in (app_module.quality_plot, app_module.cache_plot, app_module.drift_plot,
                   app_module.proj_plot, app_module.scores_plot, app_module.timeline_plot,
                   app_module.metrics_plot):
        title = final[widget].layout.title.text
        assert s.tag.run_id in title, (widget, title)
    assert label in final[app_module.status]
    fig, msg, files = list(app_module.run_oracle(s, 2, "L3", "H0"))[-1]
    assert s.tag.run_id in fig.layout.title.text and msg.startswith(label)
    oracle = strict_loads(open([f for f in files if f.endswith("oracle.json")][0], encoding="utf-8").read())
    assert oracle["run"]["run_id"] == s.tag.run_id and oracle["steps"] >= 1
    html = (s.dir / "plots.html").read_text(encoding="utf-8")
    assert s.tag.run_id in html and "<h2>Oracle</h2>" in html
    s.close()


def test_ab_quality_against_cache_size_over_a_budget_sweep(app_module):
    params = [None] * len(app_module.SPECS)
    final = list(app_module.run_ab(PROMPT, 0, 8, "window", 2, "sink", "3, 4", None, None,
                                   *params))[-1]
    fig = final[app_module.ab_quality]
    against = [t for t in fig.data if t.xaxis == "x2"]
    xs = sorted({x for t in against for x in t.x})
    assert len(xs) >= 2  # several cache sizes
    names = {t.name for t in against}
    assert {"window consistency", "sink consistency"} <= names
    assert "A r" in fig.layout.title.text and "vs B r" in fig.layout.title.text
    assert "budget" in dict(final[app_module.ab_table][i][:2] for i in range(2))
    for s in final[app_module.ab_state]:
        s.close()


def test_reproduce_line_gives_the_same_run(app_module, tmp_path):
    """The summary's reproduce command, run through the CLI, makes the same frames."""
    from ffviz.__main__ import main

    params = [None] * len(app_module.SPECS)
    params[[k for k, s in enumerate(app_module.SPECS)
            if s.policy == "future_forcing" and s.name == "tau"][0]] = 2.0
    final = list(app_module.start_run(PROMPT, 3, 8, "future_forcing", 3, "L3", "H0", "frechet",
                                      "first", None, {}, None, *params, False))[-1]
    s = final[app_module.state]
    cmd = s.summary["reproduce"]
    assert "--policy-arg tau=2.0" in cmd and "--no-snap" in cmd and "--seed 3" in cmd
    argv = shlex.split(cmd)[3:] + ["--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    cli = np.load(tmp_path / "cli" / "frames.npz")["frames"]
    app = np.load(s.dir / "frames.npz")["frames"]
    assert np.array_equal(cli, app)
    summary = strict_loads((tmp_path / "cli" / "summary.json").read_text(encoding="utf-8"))  # strict from the CLI
    assert summary["reproduce"] == cmd and summary["frames"] == 8
    assert "reproduce" in final[app_module.reproduce]
    s.close()


def test_reproduce_line_names_live_switches():
    from ffviz.export import reproduce_command

    line = reproduce_command(RunSettings(PROMPT, frames=20, seed=1), make_policy("window"), 4,
                             "tiny", 20, [{"frame": 9, "policy": "sink", "budget_frames": 3}])
    assert line.startswith("python -m ffviz generate") and "frame 9 -> sink @ 3" in line


def test_story_picture_and_given_frames(app_module):
    from ffviz.viz.cacheview import filmstrip

    assert app_module.STORY.ndim == 3 and app_module.STORY.shape[1] > app_module.STORY.shape[0]
    strip = filmstrip(np.zeros((4, 32, 32, 3), np.uint8), first=0, given=2)
    assert strip.shape[0] == 64 + 14  # a caption row under the tiles


@pytest.mark.parametrize("snap", [True, False])
def test_snap_checkbox_reaches_the_run(app_module, snap):
    params = [None] * len(app_module.SPECS)
    final = list(app_module.start_run(PROMPT, 0, 5, "window", 2, "L3", "H0", "frechet", "first",
                                      None, {}, None, *params, snap))[-1]
    s = final[app_module.state]
    assert s.settings.snap is snap
    s.close()


@pytest.mark.parametrize("one_motion", [True, False])
def test_one_motion_checkbox_reaches_the_run(app_module, one_motion):
    params = [None] * len(app_module.SPECS)
    final = list(app_module.start_run(PROMPT, 0, 5, "window", 2, "L3", "H0", "frechet", "first",
                                      None, {}, None, *params, True, one_motion))[-1]
    s = final[app_module.state]
    assert s.settings.one_motion is one_motion and s.settings.snap is True
    s.close()
