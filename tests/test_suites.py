"""The scenario suites: held-out and tuning parts kept apart, and scenes where a small
window cannot remember (every hidden span outlasts it, and fits the run)."""
import numpy as np
import pytest

from ffviz.evaluate import EvalConfig, EvalError, parse_seeds
from ffviz.metrics import RETURN_WINDOW, consistency, hidden_spans
from ffviz.sampling import TRAIN_SEED_BASE
from ffviz.scenes import parse_prompt, scene_from_prompt
from ffviz.suites import HELD_OUT_SEED_BASE, SUITES, get_suite, held_out_parts


def scored_spans(scene, frames: int, start: int = 2) -> list[int]:
    """Frames each return that ``metrics.consistency`` scores was hidden."""
    vis = scene.visible_area(np.arange(start, frames))
    due = vis >= 6
    return [back - left for i in range(vis.shape[1]) for left, back in hidden_spans(vis[:, i])
            if back < len(vis) and due[back:back + RETURN_WINDOW, i].any()]


@pytest.mark.parametrize("name", ["memory", "memory-unnamed", "memory-tuning"])
def test_memory_suites_hide_objects_longer_than_a_small_window(name):
    suite = SUITES[name]
    assert len(suite.seeds) >= 16
    for prompt in suite.prompts:
        spec, notes = parse_prompt(prompt)
        unnamed = name == "memory-unnamed"
        assert all(o.named != unnamed for o in spec.objects), prompt
        assert all("no colour" in n for n in notes) if unnamed else notes == [], prompt
        assert spec.exits or spec.wide_pillar, prompt
        assert all(o.size == "small" for o in spec.objects)  # a wide pillar hides them whole
        for seed in suite.seeds:
            scene, _ = scene_from_prompt(prompt, seed)
            spans = scored_spans(scene, suite.frames)
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
    unnamed = SUITES["memory-unnamed"]
    assert not set(unnamed.prompts) & set(tuning.prompts) and unnamed.seeds == held.seeds
    assert "memory-unnamed" in held_out_parts(EvalConfig(prompts=list(unnamed.prompts), seeds=[0]))
    with pytest.raises(EvalError, match="unknown suite"):
        get_suite("nope")


def test_seed_lists_and_ranges():
    assert parse_seeds("1000-1003") == [1000, 1001, 1002, 1003]
    assert parse_seeds("0,3, 5") == [0, 3, 5]
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    for bad in ("a-b", "1-", "x"):
        with pytest.raises(EvalError, match="seeds must"):
            parse_seeds(bad)
