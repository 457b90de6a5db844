import numpy as np
import torch

from ffviz.generate import Controls, RunSettings, generate
from ffviz.hooks import Hooks, QueryRecorder


def test_every_hook_point_fires_with_head_shapes(tiny_random):
    model = tiny_random
    seen = {}
    hooks = Hooks(model)
    names = [f"blocks.{i}.attn.hook_{w}" for i in range(model.cfg.layers)
             for w in ("q_pre", "q_post", "k_pre", "k_post")]
    assert set(names) <= set(hooks.points)
    def note(x, hook):
        seen[hook.name] = tuple(x.shape)
    for name in names:
        hooks.add(name, note)
    list(generate(model, RunSettings("a red circle", frames=3, record=False), Controls("window", 2)))
    hooks.remove()
    cfg = model.cfg
    assert seen == {n: (1, cfg.heads, cfg.tokens_per_frame, cfg.head_dim) for n in names}


def test_hook_can_replace_a_tensor(tiny_random):
    model = tiny_random
    hooks = Hooks(model)
    s = RunSettings("a red circle", frames=3, record=False, snap=False)  # raw outputs
    base = np.concatenate([st.frames for st in generate(model, s, Controls("full", 3))])
    hooks.add("blocks.0.attn.hook_q_post", lambda x, hook: torch.zeros_like(x))
    changed = np.concatenate([st.frames for st in generate(model, s, Controls("full", 3))])
    hooks.remove()
    assert (base != changed).any()


def test_recorder_statistics_match_direct_computation():
    rec = QueryRecorder(layers=1, heads=2, head_dim=4, max_frames=8, reservoir=16)
    torch.manual_seed(0)
    q = torch.randn(2, 10, 4)
    frames = torch.tensor([3] * 6 + [4] * 4)
    rec.observe(0, "pre", q, frames)
    rec.observe(0, "post", q * 2, frames)
    assert rec.frames.tolist() == [3, 4]
    assert np.allclose(rec.mean("pre")[0, 0], q[:, :6].mean(1).numpy(), atol=1e-6)
    assert np.allclose(rec.var("pre")[1, 0], q[:, 6:].var(1, unbiased=False).numpy(), atol=1e-5)
    assert np.allclose(rec.mean("post")[1, 0], 2 * q[:, 6:].mean(1).numpy(), atol=1e-6)
    # the reservoir pairs pre and post samples of the same tokens
    assert np.allclose(rec.sample["post"][0], 2 * rec.sample["pre"][0].astype(np.float32), atol=1e-2)


def test_recorder_memory_is_bounded_for_1000_frames():
    rec = QueryRecorder(layers=4, heads=4, head_dim=32, max_frames=64, reservoir=32)
    start = rec.nbytes()
    q = torch.randn(4, 64, 32)
    for f in range(1000):
        for layer in range(4):
            rec.observe(layer, "pre", q, torch.full((64,), f))
            rec.observe(layer, "post", q, torch.full((64,), f))
    assert rec.nbytes() == start  # nothing grows with the run
    assert rec.n_slots <= 64 and rec.stride == 16
    assert rec.frames[0] == 0 and rec.frames[-1] >= 1000 - 16
    assert (np.diff(rec.frames) == 16).all()
    assert rec._seen[0] == 64 * 1000 and (rec.sample_frame >= 0).all()


def test_reservoir_is_uniform_over_the_run():
    rec = QueryRecorder(layers=1, heads=1, head_dim=2, max_frames=8, reservoir=256, seed=1)
    q = torch.zeros(1, 64, 2)
    for f in range(1000):
        q[0, :, 0] = f
        rec.observe(0, "pre", q, torch.full((64,), f))
        rec.observe(0, "post", q, torch.full((64,), f))
    frames = rec.sample_frame[0, 0]
    assert abs(frames.mean() - 499.5) < 60  # uniform: mean 499.5, sd of the mean ~18
    assert (frames < 250).sum() > 30 and (frames >= 750).sum() > 30
    # the stored vectors are those of the frames they claim
    assert np.allclose(rec.sample["pre"][0, 0, :, 0].astype(np.float32), frames, atol=0.5)


def test_recorder_listens_to_the_last_denoising_step_or_all(tiny_random):
    counts = {}
    for steps in ("last", "all"):
        cfg = tiny_random.cfg
        rec = QueryRecorder(cfg.layers, cfg.heads, cfg.head_dim, steps=steps).attach(tiny_random)
        list(generate(tiny_random, RunSettings("a red circle", frames=5, record=False), Controls()))
        rec.detach()
        assert rec.frames.tolist() == [2, 3, 4]  # generated frames only
        counts[steps] = rec._count[: rec.n_slots, 0]
    n = tiny_random.cfg.tokens_per_frame
    assert (counts["last"] == n).all()
    assert (counts["all"] == n * tiny_random.cfg.sample_steps).all()


def test_run_copy_shares_weights_and_keeps_hooks_apart(tiny_random):
    """The app gives every run a copy: own hook points and call state, same weights."""
    from ffviz.hooks import Hooks, run_copy
    a, b = run_copy(tiny_random), run_copy(tiny_random)
    for pa, pb, pt in zip(a.parameters(), b.parameters(), tiny_random.parameters()):
        assert pa is pt and pb is pt  # no weight memory per run
    assert a.hook_ctx is not tiny_random.hook_ctx and a.blocks[0].attn.hook_q_pre is not \
        tiny_random.blocks[0].attn.hook_q_pre
    seen = []
    Hooks(a).add("blocks.0.attn.hook_q_pre", lambda q, hook: seen.append(q.shape))
    x = torch.randn(1, 64, tiny_random.cfg.patch_dim)
    args = (torch.zeros(1, 1), torch.arange(1), torch.zeros(1, tiny_random.cfg.width))
    with torch.no_grad():
        ref = tiny_random(x, *args)
        out_b = b(x, *args)
        assert not seen  # a's hook fires in a's runs only
        out_a = a(x, *args)
    assert len(seen) == 1
    torch.testing.assert_close(out_a, ref)
    torch.testing.assert_close(out_b, ref)


def test_run_copy_of_wan_shares_the_transformer():
    from ffviz.hooks import run_copy
    from ffviz.models.wan import build_tiny_random
    model = build_tiny_random()
    c = run_copy(model)
    assert all(p is q for p, q in zip(c.parameters(), model.parameters()))
    assert c._state is not model._state
    # the attention processors point at the copy's own hook points, not the template's
    proc = c.transformer.blocks[0].attn1.processor
    assert proc.hooks is c.blocks[0].attn


def test_run_copy_shares_modules_held_by_helper_objects(tiny_random):
    """A VAE inside a streaming decoder (a plain object) is shared too, not duplicated."""
    from ffviz.hooks import run_copy

    class Helper:  # like StreamingVAEDecoder: state of its own, a module inside
        def __init__(self, module):
            self.module, self.first = module, True

    tiny_random.helper = Helper(torch.nn.Linear(3, 3))
    try:
        c = run_copy(tiny_random)
        assert c.helper is not tiny_random.helper  # its state is the run's own
        assert c.helper.module.weight is tiny_random.helper.module.weight
    finally:
        del tiny_random.helper
