"""Recall's lag pick (TinyConfig.recall_lag_pick): recall gives one of its reads per patch,
the mean over its lags or a single lag's, as a learnt pick ranks them."""
import numpy as np
import torch

from ffviz.models.recall import RECALL_LAGS, RecallRead
from ffviz.models.tiny import LAG_PICK_DEFAULT
from ffviz.scenes import Scene, parse_prompt
from ffviz.train import lag_pick_loss
from tests.test_recall import (PILLAR, cached, drawn_batch_loss, full_cache_frames, gathered_and_dense, grafted,
                               read_at, recall_model, tokens)


def test_each_lag_reads_its_own_frame():
    """With two frames cached, each lag's read is what that frame alone gives, and the
    mean is their trust-weighted mean."""
    model = recall_model()
    scene = Scene(parse_prompt(PILLAR, 5)[0], 5)
    t = 30
    truth = tokens(model, scene.render(np.arange(t + 1)))
    motion = model.measure_motion(truth[:, :128])
    near, far = RECALL_LAGS.index(4), RECALL_LAGS.index(12)
    both = read_at(model, cached(model, truth, motion, [t - 12, t - 4]), t, motion)
    for lag, i in ((4, near), (12, far)):
        alone = read_at(model, cached(model, truth, motion, [t - lag]), t, motion)
        seen = alone.found > 0.05
        assert seen.float().mean() > 0.5
        assert torch.allclose(both.lag_found[:, i], alone.lag_found[:, i], atol=1e-5)
        assert (both.lag_pixels[:, i] - alone.pixels).abs().amax(-1)[seen].max() < 1e-4
    others = [j for j in range(len(RECALL_LAGS)) if j not in (near, far)]
    assert both.lag_found[:, others].max() < 1e-3
    mean = (both.lag_pixels[:, near] + both.lag_pixels[:, far]) / 2  # one trust (0.5) everywhere
    seen = (both.lag_found[:, near] > 0.4) & (both.lag_found[:, far] > 0.4)
    assert (both.pixels - mean).abs().amax(-1)[seen].max() < 1e-4


def test_training_gathers_each_lag_as_the_cache_reads_it():
    gathered, dense = gathered_and_dense(recall_model(), torch.tensor([[1, -2]]))
    assert torch.allclose(gathered.lag_found, dense.lag_found, atol=1e-3)  # the dense read leaks ~2e-4
    seen = dense.lag_found > 0.05
    assert seen.float().mean() > 0.3
    assert (gathered.lag_pixels - dense.lag_pixels).abs().amax(-1)[seen].max() < 0.02


def lag_pick_model():
    """A random recall model with its lag pick as a graft starts it (output zero)."""
    model = recall_model(recall_lag_pick=True)
    with torch.no_grad():
        model.recall_lag_pick[2].weight.zero_()
        model.recall_lag_pick[2].bias.zero_()
    return model


def rank_longest_lag_first(model):
    """Set ``model``'s pick to rank the longer lags first and the mean (lag 0) last."""
    with torch.no_grad():
        for layer in (model.recall_lag_pick[0], model.recall_lag_pick[2]):
            layer.weight.zero_()
            layer.bias.zero_()
        model.recall_lag_pick[0].weight[:, -1] = 10.0  # the option's lag, over the longest
        model.recall_lag_pick[2].weight.fill_(1.0)


def disagreeing_read(N=5, d=48, right=3):
    """A read of N patches whose lags all found their place and disagree: lag ``right``
    (an index into RECALL_LAGS) holds the truth (zeros), the others and the mean do not."""
    lag_pixels = torch.rand(1, len(RECALL_LAGS), N, d) * 0.5 + 0.5
    lag_pixels[:, right] = 0.0
    read = RecallRead(lag_pixels.mean(1), torch.ones(1, N), lag_pixels, torch.ones(1, len(RECALL_LAGS), N))
    return read, torch.zeros(1, N, d)


def test_the_pick_starts_on_the_mean_and_is_taught_the_lag_that_gives_the_patch():
    model = lag_pick_model()
    read, truth = disagreeing_read()
    feat, still = torch.randn(1, 5, model.cfg.width), torch.full((1, 5, 48), -1.0)
    sampled = model.pick_recall_lag(feat, still, read)
    assert torch.equal(sampled.pixels, read.pixels) and torch.equal(sampled.found, read.found)
    taught = model.pick_recall_lag(feat, still, read, truth=truth)
    assert torch.equal(taught.pixels, truth)  # training: the lag that gives it
    assert model.lag_pick_telling.all()
    assert model.lag_pick_gives[..., 4].all() and model.lag_pick_gives.sum() == 5  # option 0 is the mean
    assert torch.allclose(model.lag_pick_logits[..., 0], torch.full((1, 5), LAG_PICK_DEFAULT))
    # where every found read agrees, or only one found anything, there is nothing to pick
    agree = read._replace(lag_pixels=truth[:, None].expand_as(read.lag_pixels), pixels=truth)
    model.pick_recall_lag(feat, still, agree, truth=truth)
    assert not model.lag_pick_telling.any()
    lone = read._replace(lag_found=torch.zeros_like(read.lag_found))
    model.pick_recall_lag(feat, still, lone, truth=truth)
    assert not model.lag_pick_telling.any()


def test_the_pick_learns_which_lag_gives_the_patch():
    """A few steps of its cross-entropy and sampling takes the lag that gives the patch."""
    torch.manual_seed(0)
    model = lag_pick_model()
    opt = torch.optim.Adam(model.recall_lag_pick.parameters(), lr=1e-2)
    feat, still = torch.randn(1, 5, model.cfg.width), torch.full((1, 5, 48), -1.0)
    for _ in range(60):
        read, truth = disagreeing_read()
        model.pick_recall_lag(feat, still, read, truth=truth)
        loss = lag_pick_loss(model, 0, torch.ones(1, 5, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    read, truth = disagreeing_read()
    with torch.no_grad():
        assert torch.equal(model.pick_recall_lag(feat, still, read).pixels, truth)
    assert float(loss.detach()) < 0.1


def test_a_lag_pick_model_trains_and_its_graft_starts_as_the_model_it_grew_from(tmp_path):
    model = recall_model(recall_lag_pick=True)
    loss, _ = drawn_batch_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.recall_lag_pick[2].weight.grad.abs().sum() > 0
    old = recall_model()
    with torch.no_grad():
        old.recall_choice[2].bias.fill_(20.0)  # recall chosen wherever it found something
    new, card = grafted(tmp_path, old, "--pick", "--lag-pick")
    assert new.cfg.recall_lag_pick and card["grafts"][-1]["added"] == ["pick", "lag-pick"]
    assert set(card["grafts"][-1]["parameters"]) == {n for n, _ in new.named_parameters()
                                                      if n.startswith("recall_lag_pick.")}
    assert np.array_equal(full_cache_frames(old, frames=30), full_cache_frames(new, frames=30))



def test_a_lag_pick_model_runs_with_recording_and_a_policy():
    from ffviz.generate import Controls, RunSettings
    from ffviz.policies import make_policy
    from ffviz.run import Run
    model = recall_model(recall_lag_pick=True)
    rank_longest_lag_first(model)
    run = Run(model, RunSettings(PILLAR, frames=14, seed=1, record=True),
              Controls(make_policy("future_forcing"), 3)).finish()
    assert np.array(run.frames.all()).shape == (14, 32, 32, 3)
