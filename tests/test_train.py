"""Training is deterministic and resumable (tiny settings)."""
import torch

from ffviz.models.tiny import TinyConfig
from ffviz.train import TrainConfig, train
from ffviz.weights import load_tiny

SMALL = TinyConfig(width=32, layers=1, heads=2)


def _cfg(steps):
    return TrainConfig(steps=steps, batch=2, clip_frames=4, warmup=2, rollout_after=1,
                       rollout_prob=1.0, save_every_s=1e9)


def test_training_is_deterministic_and_resumes(tmp_path):
    quiet = lambda s: None
    a = train(_cfg(3), SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    b = train(_cfg(3), SMALL, tmp_path / "b.safetensors", tmp_path / "b.pt", log=quiet)
    assert a["sha256"] == b["sha256"] and a["steps"] == 3
    # resuming from the saved state continues the same trajectory
    train(_cfg(2), SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    c = train(_cfg(3), SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    assert c["sha256"] == a["sha256"]
    model, card = load_tiny(tmp_path / "a.safetensors")
    assert card["clips_seen"] == 6 and model.cfg.width == 32
    # without a state file it starts from the weights file and its step count
    d = train(_cfg(4), SMALL, tmp_path / "a.safetensors", tmp_path / "none.pt", log=quiet)
    assert d["steps"] == 4


def test_worker_processes_draw_the_same_batches(tmp_path):
    quiet = lambda s: None
    a = train(_cfg(3), SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    cfg = _cfg(3)
    cfg.workers = 2
    b = train(cfg, SMALL, tmp_path / "b.safetensors", tmp_path / "b.pt", log=quiet)
    assert a["sha256"] == b["sha256"]


def test_object_weight_marks_foreground_patches_and_changes_the_loss(tmp_path):
    from ffviz.train import draw
    *_, foreground, _ = draw(0, 0, 4, 3, 2, TrainConfig(), 3.0)
    share = foreground.float().mean()
    assert 0 < share < 0.5  # objects (and pillars) are a minority of pixels
    quiet = lambda s: None
    a = train(_cfg(2), SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    cfg = _cfg(2)
    cfg.object_weight = 4.0
    b = train(cfg, SMALL, tmp_path / "b.safetensors", tmp_path / "b.pt", log=quiet)
    c = train(cfg, SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    assert a["sha256"] != b["sha256"] and b["sha256"] == c["sha256"]


def test_gen_context_sets_how_much_context_comes_from_the_rollout(tmp_path):
    import pytest

    from ffviz.__main__ import main
    quiet = lambda s: None
    a = train(_cfg(2), SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    cfg = _cfg(2)
    cfg.gen_context = 1.0
    b = train(cfg, SMALL, tmp_path / "b.safetensors", tmp_path / "b.pt", log=quiet)
    cfg.gen_context, cfg.rollout_prob = 0.0, 0.0  # no rollout context at all: plain training
    c = train(cfg, SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    assert len({a["sha256"], b["sha256"], c["sha256"]}) == 3
    with pytest.raises(SystemExit, match="--gen-context must be in"):
        main(["train", "--gen-context", "1.5", "--out", str(tmp_path / "x.safetensors")])


def test_rollout_horizon_puts_true_frames_into_the_rollout_cache():
    """horizon 0 free-runs (true frames after the given ones are never read); horizon 1
    caches every true frame, so changing true frame f changes the rollout's frame f + 1."""
    from ffviz.train import rollout
    from tests.conftest import random_model
    model = random_model(width=32, layers=1)
    n, T, g = model.cfg.tokens_per_frame, 5, model.cfg.given_frames
    x0 = torch.rand(1, T * n, model.cfg.patch_dim) * 2 - 1
    other = x0.clone()
    other[:, g * n:(g + 1) * n] = -x0[:, g * n:(g + 1) * n]  # true frame g differs
    cond = model.embed_condition(torch.zeros(1, 12, dtype=torch.long))
    run = lambda x, h: rollout(model, x, cond, T, 2, 3, torch.Generator().manual_seed(0), horizon=h)
    after = slice((g + 1) * n, None)
    assert torch.equal(run(x0, 0)[:, after], run(other, 0)[:, after])
    assert not torch.allclose(run(x0, 1)[:, after], run(other, 1)[:, after])
    assert torch.equal(run(x0, 2)[:, (g + 1) * n:(g + 2) * n], run(other, 2)[:, (g + 1) * n:(g + 2) * n])


def test_rope_theta_sets_a_new_models_base(tmp_path):
    import json

    import pytest

    from ffviz.__main__ import main
    out = tmp_path / "t.safetensors"
    args = ["train", "--steps", "1", "--batch", "1", "--clip-frames", "3", "--width", "32",
            "--layers", "1", "--out", str(out), "--state", str(tmp_path / "t.pt")]
    assert main([*args, "--rope-theta", "10", "--rope-theta-time", "10000"]) == 0
    cfg = json.loads(out.with_suffix(".json").read_text())["config"]
    assert cfg["rope_theta"] == 10 and cfg["rope_theta_time"] == 10000
    model, _ = load_tiny(out)
    from ffviz.models.rope import Rope3D
    assert torch.equal(model.rope.omega, Rope3D(model.cfg.head_dim, 10.0, 10000.0).omega)
    assert not torch.equal(model.rope.omega, Rope3D(model.cfg.head_dim, 10.0).omega)
    with pytest.raises(SystemExit, match="--rope-theta must be > 1"):
        main([*args, "--rope-theta", "1"])
    with pytest.raises(SystemExit, match="--rope-theta-time must be > 1"):
        main([*args, "--rope-theta-time", "0.5"])


def _dmd_cfg(steps):
    cfg = _cfg(steps)
    cfg.dmd, cfg.lr = True, 1e-4
    return cfg


def test_generate_with_grad_is_generation_with_gradients():
    """The DMD generator's rollout makes the frames ``rollout`` makes (same noise draws,
    full cache, clean context) and its generated frames carry gradients to the weights."""
    from ffviz.dmd import generate_with_grad
    from ffviz.train import rollout
    from tests.conftest import random_model
    model = random_model(width=32, layers=1)
    n, T, g = model.cfg.tokens_per_frame, 5, model.cfg.given_frames
    x0 = torch.rand(2, T * n, model.cfg.patch_dim) * 2 - 1
    cond = model.embed_condition(torch.zeros(2, 12, dtype=torch.long))
    want = rollout(model, x0, cond.detach(), T, 3, T, torch.Generator().manual_seed(0))
    got = generate_with_grad(model, x0[:, :g * n], cond, T, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.detach().clamp(-1, 1), want, rtol=0, atol=1e-6)
    assert got.requires_grad
    got[:, g * n:].square().sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert model.head.weight.grad.abs().sum() > 0


def test_dmd_moves_nothing_when_the_fake_score_is_the_teacher():
    """The generator's distribution-matching gradient is (fake - teacher) predictions:
    exactly zero while the fake score equals the teacher, non-zero once it differs."""
    import copy

    from ffviz.dmd import dmd_generator_loss, generate_with_grad
    from tests.conftest import random_model
    model = random_model(width=32, layers=1)
    teacher, fake = copy.deepcopy(model), copy.deepcopy(model)
    n, T, g = model.cfg.tokens_per_frame, 4, model.cfg.given_frames
    frames = torch.arange(T)
    mask = model.block_causal_mask(frames)
    ids = torch.zeros(1, 12, dtype=torch.long)
    given = torch.rand(1, g * n, model.cfg.patch_dim) * 2 - 1

    def grads():
        model.zero_grad()
        clip = generate_with_grad(model, given, model.embed_condition(ids), T, 2,
                                  torch.Generator().manual_seed(1))
        dmd_generator_loss(clip, teacher, fake, frames, ids, mask,
                           torch.Generator().manual_seed(2)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert torch.count_nonzero(grads()) == 0
    with torch.no_grad():
        fake.head.bias.add_(0.1)
    assert grads().abs().sum() > 0


def test_dmd_training_is_deterministic_and_resumes(tmp_path):
    """``train --dmd``: the teacher, the fake score and its optimizer are part of the
    resumable state; a resumed run continues the same trajectory."""
    import pytest

    from ffviz.__main__ import main
    quiet = lambda s: None
    a = train(_dmd_cfg(3), SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    plain = train(_cfg(3), SMALL, tmp_path / "p.safetensors", tmp_path / "p.pt", log=quiet)
    assert a["sha256"] != plain["sha256"]
    state = torch.load(tmp_path / "a.pt", weights_only=False)
    assert set(state["dmd"]) == {"teacher", "fake", "opt_fake"}
    train(_dmd_cfg(2), SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    c = train(_dmd_cfg(3), SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    assert c["sha256"] == a["sha256"]
    with pytest.raises(SystemExit, match="--dmd-fake-steps must be >= 1"):
        main(["train", "--dmd", "--dmd-fake-steps", "0", "--out", str(tmp_path / "x.safetensors")])


def test_recycled_context_scales_the_rollouts_errors_per_frame():
    from ffviz.train import recycled_context
    true = torch.zeros(1, 3 * 2, 4)
    rolled = torch.full((1, 3 * 2, 4), 0.2)
    rolled[:, 4:] = -0.5  # frame 2
    out = recycled_context(true, rolled, torch.tensor([[0.0, 1.0, 3.0]]), 2)
    assert torch.equal(out[:, :2], true[:, :2])  # scale 0: the true frame
    assert torch.equal(out[:, 2:4], rolled[:, 2:4])  # scale 1: the rollout's frame
    assert torch.allclose(out[:, 4:], torch.full((1, 2, 4), -1.0))  # 3 x -0.5, clamped to the pixel range
    out = recycled_context(true, rolled, torch.tensor([[0.5, 2.0, 0.0]]), 2)
    assert torch.allclose(out[:, :2], torch.full((1, 2, 4), 0.1))
    assert torch.allclose(out[:, 2:4], torch.full((1, 2, 4), 0.4))


def test_recycle_changes_training_and_stays_deterministic(tmp_path):
    import pytest

    from ffviz.__main__ import main
    quiet = lambda s: None
    cfg = _cfg(2)
    cfg.rollout_horizon = 1
    a = train(cfg, SMALL, tmp_path / "a.safetensors", tmp_path / "a.pt", log=quiet)
    cfg.recycle = 3.0
    b = train(cfg, SMALL, tmp_path / "b.safetensors", tmp_path / "b.pt", log=quiet)
    c = train(cfg, SMALL, tmp_path / "c.safetensors", tmp_path / "c.pt", log=quiet)
    assert a["sha256"] != b["sha256"] and b["sha256"] == c["sha256"]
    with pytest.raises(SystemExit, match="--recycle must be in"):
        main(["train", "--recycle", "-1", "--out", str(tmp_path / "x.safetensors")])
