import numpy as np
import pytest
import torch

from ffviz.generate import MAX_FRAMES, Controls, GenerationError, RunSettings, generate
from ffviz.policies import PolicyError, make_policy, parse_policy_args
from ffviz.scenes import PromptError


def _run(model, frames=8, policy="window", budget=3, **kw):
    return list(generate(model, RunSettings("a red circle and a blue square", frames=frames,
                                            record=False, **kw), Controls(policy, budget)))


def test_window_holds_budget_and_keeps_newest_frames(tiny_random):
    steps = _run(tiny_random, frames=9, budget=3)
    n = tiny_random.cfg.tokens_per_frame
    assert sum(len(s.frame_indices) for s in steps) == 9
    for s in steps:
        assert s.cache_tokens <= 3 * n
        assert s.cache_tokens_peak <= (3 + tiny_random.cfg.chunk_frames) * n
        newest = s.frame_indices[-1]
        assert s.cache_frames == list(range(max(0, newest - 2), newest + 1))
    assert steps[-1].frames.dtype == np.uint8


def test_full_keeps_everything(tiny_random):
    steps = _run(tiny_random, frames=7, policy="full", budget=2)
    assert steps[-1].cache_frames == list(range(7))
    assert all(s.decision is None for s in steps)


def test_controls_change_takes_effect_at_next_chunk(tiny_random):
    controls = Controls("full", 2)
    seen = []
    for step in generate(tiny_random, RunSettings("a red circle", frames=8, record=False), controls):
        seen.append((step.policy, step.budget_frames, step.switched, step.cache_tokens))
        if step.index == 2:
            controls.set(policy="window", budget_frames=2)
    assert [s[0] for s in seen[:3]] == ["full"] * 3
    assert seen[3][:3] == ("window", 2, True)
    assert not any(s[2] for s in seen[4:])
    assert seen[-1][3] == 2 * tiny_random.cfg.tokens_per_frame


def test_stop_ends_the_run_after_the_current_chunk(tiny_random):
    controls = Controls("window", 2)
    steps = []
    for step in generate(tiny_random, RunSettings("a red circle", frames=20, record=False), controls):
        steps.append(step)
        if step.index == 3:
            controls.stop()
    assert len(steps) == 4


def test_same_seed_same_video(tiny_random):
    a = np.concatenate([s.frames for s in _run(tiny_random, seed=5)])
    b = np.concatenate([s.frames for s in _run(tiny_random, seed=5)])
    c = np.concatenate([s.frames for s in _run(tiny_random, seed=6)])
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("kw,err,msg", [
    ({"policy": "nope"}, PolicyError, "unknown policy"),
    ({"budget": 0}, GenerationError, "at least 1"),
    ({"budget": -3}, GenerationError, "at least 1"),
    ({"budget": 50}, GenerationError, "larger than the run"),
    ({"frames": 0}, GenerationError, "frames must be in"),
    ({"frames": MAX_FRAMES + 1}, GenerationError, "frames must be in"),
])
def test_bad_settings_are_clear_errors(tiny_random, kw, err, msg):
    with pytest.raises(err, match=msg):
        _run(tiny_random, **kw)


def test_unparsable_prompt_fails_before_any_work(tiny_random):
    with pytest.raises(PromptError):
        list(generate(tiny_random, RunSettings("just words"), Controls()))


def test_policy_arguments_are_validated():
    with pytest.raises(PolicyError, match="has no parameter"):
        parse_policy_args("window", ["size=3"])
    with pytest.raises(PolicyError, match="key=value"):
        parse_policy_args("window", ["oops"])
    with pytest.raises(PolicyError, match="has no parameter"):
        make_policy("full", rank=2)


def test_a_suspended_run_leaves_grad_mode_alone(tiny_random):
    run = generate(tiny_random, RunSettings("a red circle", frames=6, record=False), Controls())
    next(run)
    assert torch.is_grad_enabled()  # a generator paused mid-run must not switch autograd off
    run.close()
    assert torch.is_grad_enabled()


def test_decision_log_summarises_heads_that_evict_many_tokens():
    """Above ``max_tokens`` evicted tokens per head the entry is a summary that agrees
    with the detailed one (counts, lowest kept score, mean merge distance)."""
    from ffviz.generate import decision_log_entry
    from ffviz.policies import make_policy
    from tests.test_policies import toy
    cache, ctx, _ = toy()
    decision = make_policy("future_forcing").compress(cache, 2 * cache.tokens_per_frame, ctx)
    full = decision_log_entry(cache, decision)
    short = decision_log_entry(cache, decision, max_tokens=0)
    for heads_full, heads_short in zip(full["layers"], short["layers"]):
        for f, s in zip(heads_full, heads_short):
            merged = f.get("merged", [])
            assert s["dropped_count"] == len(f["dropped"]) and s["merged_count"] == len(merged)
            assert s["kept_score_min"] == pytest.approx(f["kept_score_min"], abs=1e-6)
            mean = sum(m[2] for m in merged) / max(1, len(merged))
            assert s["merge_distance_mean"] == pytest.approx(mean, rel=1e-4, abs=1e-5)
    assert any(s["merged_count"] for heads in short["layers"] for s in heads)
