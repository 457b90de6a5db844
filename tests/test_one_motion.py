"""One motion (TinyConfig.one_motion): at sampling each patch's pick gives what moving with
the scene, standing still or recall gives, the only moves of the embedded model's world;
and recall's bias at sampling (TinyConfig.recall_bias)."""
import json

import numpy as np
import pytest
import torch

from ffviz.export import reproduce_command
from ffviz.generate import Controls, GenerationError, RunSettings
from ffviz.policies import make_policy
from ffviz.run import Run
from ffviz.scenes import Scene, parse_prompt
from tests.conftest import random_model

MOTION = dict(predict_change=True, motion_reach=2, motion_pick=True, motion_match=True,
              motion_memory=True, motion_refine=True, wrap=True)
PROMPT = "a red square and a blue circle on a black background with a gray pillar, fast"


def picks_of_a_run(model, one_motion, seed=3, frames=6):
    """Per sampling call: (the picks, each displacement's patch (B, N, K, d), recall's index)."""
    calls, keep = [], model.keep_to_motion
    K = model.displacement_length.numel()

    def recording(logits, motion, one, moved):
        kept = keep(logits, motion, one, moved)
        calls.append((kept.argmax(-1), moved))
        return kept
    model.keep_to_motion = recording
    try:
        Run(model, RunSettings(PROMPT, frames=frames, seed=seed, record=False, one_motion=one_motion),
            Controls(make_policy("full"), 1)).finish()
    finally:
        del model.keep_to_motion
    return calls, K


def scene_motion_index(model, seed=3):
    r = model.cfg.motion_reach
    vx, vy = Scene(parse_prompt(PROMPT, seed)[0], seed).vel[0]
    return (int(vy) + r) * (2 * r + 1) + int(vx) + r


def gives(moved, index):
    return moved.gather(2, index[..., None, None].expand(-1, -1, 1, moved.shape[-1]))[:, :, 0]


@pytest.mark.parametrize("recall", [False, True])
def test_picks_keep_to_the_scene_motion(recall):
    model = random_model(**MOTION, **({"layers": 3, "recall": True, "width": 64} if recall else {}))
    with torch.no_grad():  # a random choice: every displacement is picked somewhere
        torch.nn.init.normal_(model.motion.weight, std=1.0)
        model.motion.bias.zero_()
        if recall:
            model.recall_choice[2].bias.fill_(0.0)
    scene = scene_motion_index(model)
    assert scene != model.displacement_length.numel() // 2  # the scene moves
    K = model.displacement_length.numel()
    free = []
    model.hook_motion.fns.append(lambda weights, point: free.append(weights.argmax(-1).flatten()))
    try:
        assert picks_of_a_run(model, False)[0] == []  # nothing is kept without it
    finally:
        model.hook_motion.fns.clear()
    assert set(torch.cat(free).tolist()) - {K // 2, scene, K}  # ... and other displacements are picked
    calls, K = picks_of_a_run(model, True)
    assert calls
    for picks, moved in calls:
        ok = picks == K
        for way in (K // 2, scene):
            ok |= (gives(moved, picks.clamp_max(K - 1)) - moved[:, :, way]).abs().amax(-1) < 1e-4
        assert ok.all()


def test_only_the_scene_motion_and_standing_still_stay():
    model = random_model(**MOTION)
    K = model.displacement_length.numel()
    logits, moved = torch.randn(2, 64, K), torch.randn(2, 64, K, 48)  # every displacement differs
    motion, scene = torch.tensor([[1, -2], [0, 0]]), (1 + 2) * 5 + 0
    kept = model.keep_to_motion(logits, motion, torch.tensor([True, False]), moved)
    top2 = logits[0][:, [K // 2, scene]].argmax(-1)
    assert torch.equal(kept[0].argmax(-1), torch.tensor([K // 2, scene])[top2])  # the better of the two
    assert torch.equal(kept[1], logits[1])  # a run without it is untouched
    with_recall = torch.randn(1, 64, K + 1)
    with_recall[..., K] = 50.0
    kept = model.keep_to_motion(with_recall, motion[:1], torch.tensor([True]), moved[:1])
    assert (kept.argmax(-1) == K).all()  # recall stays a choice


def test_a_displacement_that_gives_what_standing_still_gives_is_kept():
    """Inside a plain pillar, or along its edge, a vertical shift gives what standing still
    gives: the model's pick of it is a pick of standing still, not replaced by the
    scene's motion."""
    model = random_model(**MOTION)
    K = model.displacement_length.numel()
    moved = torch.randn(1, 1, K, 48)
    moved[0, 0, 2] = moved[0, 0, K // 2]  # (dy, dx) = (-2, 0) gives the patch standing still gives
    logits = torch.full((1, 1, K), -10.0)
    logits[0, 0, 2], logits[0, 0, K // 2], logits[0, 0, 17] = 3.0, 0.0, 1.0  # scene motion (1, 0)
    kept = model.keep_to_motion(logits, torch.tensor([[1, 0]]), torch.tensor([True]), moved)
    assert kept[0, 0].argmax() == 2
    moved[0, 0, 2] = torch.randn(48)  # now it gives another patch: the better of the two moves
    kept = model.keep_to_motion(logits, torch.tensor([[1, 0]]), torch.tensor([True]), moved)
    assert kept[0, 0].argmax() == 17


def test_the_card_default_and_the_summary():
    model = random_model(**MOTION)
    assert model.carries_motion and not model.cfg.one_motion
    model.cfg.one_motion = True
    run = Run(model, RunSettings(PROMPT, frames=4, seed=1, record=False), Controls(make_policy("full"), 1))
    assert run.finish().summary["one_motion"] is True
    run = Run(model, RunSettings(PROMPT, frames=4, seed=1, record=False, one_motion=False),
              Controls(make_policy("full"), 1))
    assert run.finish().summary["one_motion"] is False


def test_bad_values_and_missing_motion_are_clear_errors():
    with pytest.raises(GenerationError, match="one motion must be true or false"):
        RunSettings(PROMPT, one_motion="yes").validate()
    model = random_model(**MOTION)
    ids = torch.zeros(1, len(model.cond_embed), dtype=torch.long)
    with pytest.raises(ValueError, match="pass embed_condition"):
        model.embed_condition(ids, None, one_motion=True)
    plain = model.embed_condition(ids)  # no motion: (0, 0) and no restriction
    assert plain.shape[-1] == model.cfg.width + 3 and plain[0, -3:].abs().sum() == 0


def test_the_exported_command_keeps_the_choice():
    settings = RunSettings(PROMPT, frames=4, seed=1, one_motion=False)
    assert "--no-one-motion" in reproduce_command(settings, make_policy("full"), 1, "tiny", 4)
    assert "one-motion" not in reproduce_command(RunSettings(PROMPT), make_policy("full"), 1, "tiny", 4)


def test_recall_bias_raises_recall_at_sampling_where_two_lags_found():
    from tests.test_recall import PILLAR, cached, recall_model, tokens
    model = recall_model()
    scene = Scene(parse_prompt(PILLAR, 3)[0], 3)
    truth = tokens(model, scene.render(np.arange(30)))
    motion = model.measure_motion(truth[:, :128])
    cache = cached(model, truth, motion, range(29))
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long), motion, False)
    x, t, frame = torch.randn(1, 64, 48), torch.full((1, 1), 0.5), torch.tensor([29])
    prev = truth[:, 28 * 64:29 * 64]
    K = model.displacement_length.numel()

    def logits(bias, index=None):
        model.cfg.recall_bias = bias
        return model(x, t, frame, cond, prev=prev, cache=cache, motion_index=index,
                     return_motion_logits=True)[1]
    base, raised = logits(0.0), logits(4.0)
    assert torch.allclose(raised[..., :K], base[..., :K])
    assert torch.allclose(raised[..., K] - base[..., K], torch.full_like(base[..., K], 4.0))
    index = torch.full((1, 64), K // 2)
    assert torch.equal(logits(4.0, index), logits(0.0, index))  # training's logits are the model's own
    cache = cached(model, truth, motion, [25])  # one frame along the motion (a short window)
    assert torch.equal(logits(4.0), logits(0.0))  # one lag found: no bias
    model.cfg.recall_bias = 0.0


def test_the_command_line_turns_it_off_and_on(tmp_path):
    from ffviz.__main__ import main
    for flag, expected in (("--no-one-motion", False), ("--one-motion", True)):
        out = tmp_path / flag
        assert main(["generate", "--prompt", PROMPT, "--frames", "4", flag, "--no-record",
                     "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["one_motion"] is expected
