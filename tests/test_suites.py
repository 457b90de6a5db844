"""The scenario suites: held-out and tuning parts kept apart, and scenes where a small
window cannot remember (every hidden span outlasts it, and fits the run)."""
import numpy as np
import pytest

from ffviz.evaluate import EvalConfig, EvalError, parse_seeds
from ffviz.metrics import consistency
from ffviz.sampling import TRAIN_SEED_BASE
from ffviz.scenes import parse_prompt, scene_from_prompt
from ffviz.suites import HELD_OUT_SEED_BASE, SUITES, get_suite, held_out_parts


def hidden_spans(scene, frames: int, start: int = 2) -> list[int]:
    """Frames each scored return was hidden (as ``metrics.consistency`` counts returns)."""
    vis = scene.visible_area(np.arange(start, frames))
    spans = []
    for i in range(vis.shape[1]):
        gone, due = vis[:, i] < 1, vis[:, i] >= 6
        t = 1
        while t < len(gone):
            if gone[t] and not gone[t - 1]:
                end = t
                while end < len(gone) and gone[end]:
                    end += 1
                if end - t >= 3 and end < len(gone) and due[end:end + 8].any():
                    spans.append(end - t)
                t = end
            t += 1
    return spans


@pytest.mark.parametrize("name", ["memory", "memory-tuning"])
def test_memory_suites_hide_objects_longer_than_a_small_window(name):
    suite = SUITES[name]
    assert len(suite.seeds) >= 16
    for prompt in suite.prompts:
        spec, notes = parse_prompt(prompt)
        assert notes == [] and (spec.exits or spec.wide_pillar), prompt
        assert all(o.size == "small" for o in spec.objects)  # a wide pillar hides them whole
        for seed in suite.seeds:
            scene, _ = scene_from_prompt(prompt, seed)
            spans = hidden_spans(scene, suite.frames)
            assert spans and min(spans) > 3, (prompt, seed, spans)  # outlast 3 frames, fit the run
            m = consistency(scene.render(np.arange(2, suite.frames)), scene, start=2)
            assert m["returns_count"] == len(spans)


def test_held_out_and_tuning_parts_do_not_meet():
    held, tuning = SUITES["memory"], SUITES["memory-tuning"]
    assert not set(held.prompts) & set(tuning.prompts)
    assert min(held.seeds) >= HELD_OUT_SEED_BASE > max(tuning.seeds)
    assert max(held.seeds) < TRAIN_SEED_BASE  # training scenes are drawn above
    assert EvalConfig().prompts == list(held.prompts) and EvalConfig().seeds == list(held.seeds)
    assert held_out_parts(EvalConfig(prompts=list(tuning.prompts), seeds=[0, 5])) == ""
    assert "seeds" in held_out_parts(EvalConfig(prompts=list(tuning.prompts), seeds=[0, 1000]))
    assert "prompts" in held_out_parts(EvalConfig(seeds=[0]))
    with pytest.raises(EvalError, match="unknown suite"):
        get_suite("nope")


def test_seed_lists_and_ranges():
    assert parse_seeds("1000-1003") == [1000, 1001, 1002, 1003]
    assert parse_seeds("0,3, 5") == [0, 3, 5]
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    for bad in ("a-b", "1-", "x"):
        with pytest.raises(EvalError, match="seeds must"):
            parse_seeds(bad)
