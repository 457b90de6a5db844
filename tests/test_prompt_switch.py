"""Prompt switching mid-run: scheduled and live switches, the KV re-cache, the query
statistics at a switch, and the scene truth that grades frames against the prompt in force."""
import json

import numpy as np
import pytest
import torch

from ffviz.__main__ import main
from ffviz.generate import Controls, GenerationError, PromptSwitch, RunSettings
from ffviz.metrics import consistency, story_consistency
from ffviz.policies import make_policy
from ffviz.recache import ChunkMemory, recache
from ffviz.run import Run
from ffviz.sampling import fill_cache, previous_tokens
from ffviz.scenes import PromptError, Scene, parse_prompt, scene_story
from ffviz.stats import QueryStats
from tests.conftest import random_model

RED_ON_BLACK = "a red circle on a black background"
RED_ON_WHITE = "a red circle on a white background"


def test_switch_parses_and_refuses_what_cannot_work():
    s = PromptSwitch.parse("16:a red circle on a white background", "recent")
    assert (s.frame, s.prompt, s.recache) == (16, RED_ON_WHITE, "recent")
    for text in ("a red circle", "x:a red circle", ":a red circle"):
        with pytest.raises(GenerationError, match="FRAME:PROMPT"):
            PromptSwitch.parse(text)
    for switch, err, msg in ((PromptSwitch(48, RED_ON_WHITE), GenerationError, "outside the run"),
                             (PromptSwitch(0, RED_ON_WHITE), GenerationError, "outside the run"),
                             (PromptSwitch(8, "hello"), PromptError, "no object"),
                             (PromptSwitch(8, RED_ON_WHITE, "some"), GenerationError, "recache must be")):
        with pytest.raises(err, match=msg):
            RunSettings(RED_ON_BLACK, frames=48, switches=(switch,)).validate()
    with pytest.raises(GenerationError, match="two prompt switches"):
        RunSettings(RED_ON_BLACK, frames=48, switches=(PromptSwitch(8, RED_ON_WHITE),
                                                       PromptSwitch(8, RED_ON_BLACK))).validate()


def test_cli_records_the_switch_and_refuses_bad_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--prompt", RED_ON_BLACK, "--frames", "12", "--no-record",
                 "--switch-prompt", f"6:{RED_ON_WHITE}", "--recache", "recent",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    (switch,) = summary["prompt_switches"]
    assert (switch["frame"], switch["prompt"], switch["recache"]) == (6, RED_ON_WHITE, "recent")
    assert switch["rerun_chunks"] >= 1
    segments = summary["metrics"]["segments"]
    assert [s["from_frame"] for s in segments] == [0, 6]
    assert "white background" in segments[1]["prompt"]
    for s in segments:  # each prompt graded on its own frames
        assert 0 <= s["background"] <= 1 and 0 <= s["consistency"] <= 1
    marks = [json.loads(line) for line in (out / "decisions.jsonl").read_text(encoding="utf-8").splitlines()
             if "prompt_switch" in line]
    assert len(marks) == 1 and marks[0]["prompt_switch"]["frame"] == 6
    for bad in ("40:" + RED_ON_WHITE, "6:hello world", "six:" + RED_ON_WHITE):
        bad_out = tmp_path / "bad"
        assert main(["generate", "--frames", "12", "--switch-prompt", bad, "--out", str(bad_out)]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and not bad_out.exists()


def test_the_switch_shows_the_new_background(tmp_path):
    """The issue's command on the committed weights: the switch is recorded at frame 16
    and the frames after it, graded against the new prompt, show its white background
    (1.0 measured; a model that ignored the switch would keep black, near 0)."""
    out = tmp_path / "run"
    assert main(["generate", "--prompt", RED_ON_BLACK, "--frames", "48", "--no-record",
                 "--switch-prompt", f"16:{RED_ON_WHITE}", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [s["frame"] for s in summary["prompt_switches"]] == [16]
    before, after = summary["metrics"]["segments"]
    assert after["from_frame"] == 16 and "white" in after["prompt"]
    assert after["background"] >= 0.8 and before["background"] >= 0.8


def _filled(model, frames, cond):
    """A cache of ``frames`` clean frames written one chunk at a time under ``cond``,
    the given ones together, and its chunk memory."""
    torch.manual_seed(3)
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    x = torch.rand(1, frames * n, model.cfg.patch_dim) * 2 - 1
    cache, memory = model.new_cache(), ChunkMemory()
    chunks = [torch.arange(g)] + [torch.tensor([f]) for f in range(g, frames)]
    last = None
    for fr in chunks:
        tok = x[:, int(fr[0]) * n:(int(fr[-1]) + 1) * n]
        prev = previous_tokens(last, tok, n)
        fill_cache(model, cache, tok, fr, cond, 0.0, prev=prev)
        memory.add(fr, tok, prev)
        last = tok[:, -n:]
    return cache, memory


def test_recache_rewrites_the_cache_as_if_written_under_the_new_prompt():
    model = random_model()
    ids = lambda prompt: torch.from_numpy(parse_prompt(prompt)[0].condition_ids())[None]
    old, new = model.embed_condition(ids(RED_ON_BLACK)), model.embed_condition(ids(RED_ON_WHITE))
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    with torch.no_grad():
        reference, _ = _filled(model, 6, new)
        for mode in ("none", "recent", "all"):
            cache, memory = _filled(model, 6, old)
            before = [layer.k.clone() for layer in cache.layers]
            rerun = recache(model, cache, memory, mode, new, old, g, 0.0)
            assert rerun == {"none": 0, "recent": 4, "all": 5}[mode]
            for layer, k0, ref in zip(cache.layers, before, reference.layers):
                given, rest = slice(0, g * n), slice(g * n, None)
                if mode == "none":
                    assert torch.equal(layer.k, k0)
                elif mode == "all":
                    torch.testing.assert_close(layer.k, ref.k, atol=1e-5, rtol=0)
                else:  # the given frames keep their keys; the rest are re-written
                    assert torch.equal(layer.k[:, :, given], k0[:, :, given])
                    assert not torch.allclose(layer.k[:, :, rest], k0[:, :, rest])


def test_recache_keeps_each_tokens_place_after_evictions():
    model = random_model()
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long))
    other = model.embed_condition(torch.ones(1, len(model.cond_embed), dtype=torch.long))
    n, g = model.cfg.tokens_per_frame, model.cfg.given_frames
    with torch.no_grad():
        cache, memory = _filled(model, 7, cond)
        from ffviz.policies.base import keep_newest
        cache.apply(keep_newest(cache, 3 * n))  # frames 4, 5, 6 remain
        memory.prune(cache.frames())
        assert sorted(memory.chunks) == [4, 5, 6]
        meta = [(layer.frame.clone(), layer.mass.clone()) for layer in cache.layers]
        recache(model, cache, memory, "all", other, cond, g, 0.0)
        for layer, (frame, mass) in zip(cache.layers, meta):
            assert torch.equal(layer.frame, frame) and torch.equal(layer.mass, mass)
            assert torch.isfinite(layer.k).all()


def test_a_live_switch_applies_from_the_next_chunk():
    model = random_model()
    controls = Controls("window", 3)
    run = Run(model, RunSettings(RED_ON_BLACK, frames=10, record=False), controls)
    seen = []
    for step in run:
        if step.index == 3:
            controls.switch_prompt(RED_ON_WHITE, "all")
        seen.append(step.prompt_switch)
    switched = [s for s in seen if s]
    assert len(switched) == 1 and switched[0]["frame"] == 5 and switched[0]["recache"] == "all"
    assert run.summary["prompt_switches"][0]["prompt"] == RED_ON_WHITE


@pytest.mark.parametrize("rule", ["carry", "reset", "decay"])
def test_statistics_carry_reset_or_decay_at_a_switch(rule):
    stats = QueryStats(1, 2, 4)
    stats.update(0, torch.randn(2, 10, 4), frame=0)
    w = stats.weight.clone()
    make_policy("future_forcing", on_switch=rule, switch_half_life=4.0).prompt_switched(stats)
    if rule == "reset":
        assert (stats.weight == 0).all() and (stats.mean(0) == 0).all()
    else:
        assert torch.equal(stats.weight, w)
        assert stats.half_life == (4.0 if rule == "decay" else None)
    with pytest.raises(Exception, match="on_switch"):
        make_policy("expected_attention", on_switch="forget")


def test_frames_are_graded_against_the_prompt_in_force():
    scene = Scene(parse_prompt(RED_ON_BLACK)[0], 0)
    story = scene_story(scene, [{"frame": 20, "prompt": RED_ON_WHITE}], 0)
    truth = np.concatenate([sc.render(np.arange(a, b)) for sc, (a, b) in
                            zip(story, ((2, 20), (20, 40)))])
    graded = story_consistency(truth, story, start=2)
    assert graded["background"] > 0.99 and graded["consistency"] > 0.97
    assert consistency(truth, scene, start=2)["background"] < 0.6  # against the first prompt only
    stale = scene.render(np.arange(2, 40))  # a video that ignored the switch
    stale_graded = story_consistency(stale, story, start=2)
    assert stale_graded["background"] < 0.6
    before, after = stale_graded["segments"]  # the segment after the switch tells
    assert before["background"] > 0.99 and after["background"] < 0.01


def test_bench_times_each_recache_mode(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--recache", "--frames", "10", "--budget", "3", "--repeats", "1",
                 "--out", str(out)]) == 0
    modes = json.loads(out.read_text(encoding="utf-8"))["modes"]
    assert set(modes) == {"none", "recent", "all"}
    assert modes["none"]["rerun_chunks"] == 0 and modes["all"]["rerun_chunks"] >= 3
    assert all(m["recache_over_step"] >= 0 for m in modes.values())
