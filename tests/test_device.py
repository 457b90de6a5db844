"""Device audit without a GPU: the policies, ``KVCache.apply`` and the decision log
must keep everything that meets the cache on the cache's device.

``DeviceAudit`` is a ``TorchFunctionMode`` that plays a second device on the CPU.
Tensors "on the device" are tagged; a tagged tensor reports ``torch.device("meta")``
as its ``.device``, and a tensor created or moved with that device (``device=``,
``.to(dev)``) is a tagged CPU tensor (a copy, as a real move would make). Every
op's result is tagged when any input is. Any op that mixes a tagged tensor with an
untagged one of one or more dims (what CUDA refuses: host statistics, Rope3D's
cos/sin, ``torch.arange`` without ``device=``) is recorded as a violation.
``.cpu()`` / ``.to("cpu")`` brings a tensor back to the host (untagged). Scalars
(``bool``, ``.item()``, ``.tolist()``, 0-dim tensors) cross freely, as on CUDA.

The real numbers are computed on the CPU throughout, so the same test also checks
that the decisions equal the ones of a plain CPU run, bit for bit.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from ffviz.generate import decision_log_entry
from ffviz.policies import POLICIES, make_policy
from tests.test_policies import toy

FAKE = torch.device("meta")
HOST = torch.device("cpu")
_TAG = "_ffviz_on_device"


def _tagged(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tensors(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def _swap_device(x):
    """(x with the fake device replaced by the CPU, which device was named or None)."""
    if isinstance(x, torch.device):
        return (HOST, "device") if x == FAKE else (x, "host" if x.type == "cpu" else None)
    if isinstance(x, str) and x in ("meta", "cpu"):
        return (HOST, "device" if x == "meta" else "host")
    return x, None


class DeviceAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def tag(self, t: torch.Tensor) -> torch.Tensor:
        setattr(t, _TAG, True)
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if getattr(func, "__self__", None) is torch._C.TensorBase.device:  # t.device
            return FAKE if _tagged(args[0]) else HOST
        # which device the call names, if any
        named = None
        new_args = []
        for a in args:
            a2, n = _swap_device(a) if not isinstance(a, torch.Tensor) else (a, None)
            named = n or named
            new_args.append(a2)
        if "device" in kwargs:
            kwargs["device"], n = _swap_device(kwargs["device"])
            named = n or named
        if func in (torch.Tensor.cpu,):
            named = "host"
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], torch.Tensor):
            named = "device" if _tagged(args[1]) else "host"
        inputs = _tensors((new_args, kwargs), [])
        on_dev = [t for t in inputs if _tagged(t)]
        if named is None and on_dev:
            host = [t for t in inputs if not _tagged(t) and t.dim() > 0]
            if host:
                self.violations.append(
                    f"{name}: device tensors {[tuple(t.shape) for t in on_dev]} mixed with host "
                    f"tensors {[tuple(t.shape) for t in host]}")
        out = func(*new_args, **kwargs)
        if named is not None:  # a move or a creation on a named device: a fresh tensor there
            if isinstance(out, torch.Tensor):
                if any(out is t for t in inputs):
                    out = out.clone()
                if named == "device":
                    self.tag(out)
            return out
        if on_dev:
            for t in _tensors(out, []):
                self.tag(t)
        return out


def to_device(cache, ctx):
    """Tag the cache tensors and the chunk queries: they live on the model's device."""
    audit = DeviceAudit()
    for layer in cache.layers:
        for f in ("k", "v", "mass", "frame", "row", "col", "time"):
            setattr(layer, f, audit.tag(getattr(layer, f).clone()))
        layer.aux = {n: audit.tag(t.clone()) for n, t in layer.aux.items()}
    ctx.chunk_queries = [audit.tag(q.clone()) for q in ctx.chunk_queries]
    return audit


def test_audit_catches_host_tensors():
    cache, ctx, _ = toy()
    with to_device(cache, ctx) as audit:
        frame = cache[0].frame
        frame + torch.arange(frame.shape[-1])  # host arange: what CUDA refuses
        assert audit.violations
        audit.violations.clear()
        frame + torch.arange(frame.shape[-1], device=frame.device)
        ctx.stats.mean_all().to(frame.device) + frame[0, 0, :1, None].float()
        assert frame.device == FAKE and ctx.stats.mean_all().device == HOST
        assert not audit.violations


POLICY_CASES = [("window", {}), ("sink", {}), ("h2o", {}), ("snapkv", {}),
                ("snapkv", {"pooling": "avg"}), ("deep_forcing", {}),
                ("deep_forcing", {"rerotate": False}), ("expected_attention", {}),
                ("expected_attention", {"statistics": "historical", "value_norm": True}),
                ("future_forcing", {}), ("future_forcing", {"tau": 0.0, "value_norm": True}),
                ("future_forcing", {"head_budget": "adaptive"}),
                ("expected_attention", {"head_budget": "adaptive", "head_floor": 0.5}),
                ("h2o", {"head_budget": "adaptive"}), ("forcing_kv", {"threshold": 0.6}),
                ("forcing_kv", {"retention": 0.5, "stripes": 2}), ("oracle", {}), ("full", {})]


def _future(ctx, tagged, audit):
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(1, 2, 6, 12, generator=g) for _ in range(2)]
    if tagged:
        qs = [audit.tag(q) for q in qs]
    return lambda layer: qs[layer]


@pytest.mark.parametrize("name,params", POLICY_CASES)
@pytest.mark.parametrize("merged_mass", [False, True])
def test_policies_stay_on_the_cache_device(name, params, merged_mass, monkeypatch):
    assert set(POLICIES) == {n for n, _ in POLICY_CASES}
    # the PyTorch path on both sides, compared exactly (the CPU-only numba kernels are
    # compared with the PyTorch path in test_cpu_kernels)
    monkeypatch.setenv("FFVIZ_KERNELS", "reference")
    budget = 3 * 6  # 3 of 5 frames
    # the same policy twice (two compressions: buffers, cached eigenvectors), plain CPU
    ref_cache, ref_ctx, _ = toy(merged_mass=merged_mass)
    ref_ctx.future_queries = _future(ref_ctx, False, None)
    ref_policy = make_policy(name, **params)
    cache, ctx, _ = toy(merged_mass=merged_mass)
    policy = make_policy(name, **params)
    audit = to_device(cache, ctx)
    ctx.future_queries = _future(ctx, True, audit)
    for budget in (4 * 6, 3 * 6):
        ref = ref_policy.compress(ref_cache, budget, ref_ctx)
        ref_log = None if ref is None else decision_log_entry(ref_cache, ref)
        if ref is not None:
            ref_cache.apply(ref)
        with audit:
            got = policy.compress(cache, budget, ctx)
            log = None if got is None else decision_log_entry(cache, got)
            if got is not None:
                cache.apply(got)
        assert not audit.violations, "\n".join(audit.violations)
        assert (got is None) == (ref is None)
        if got is None:
            continue
        assert log == ref_log
        for dg, dr in zip(got.layers, ref.layers):
            for f in ("keep", "merge_into", "score", "distance", "k", "time", "live"):
                a, b = getattr(dg, f), getattr(dr, f)
                assert (a is None) == (b is None), f
                if a is not None:
                    assert _tagged(a), f"{name}: decision.{f} is not on the cache's device"
                    assert torch.equal(a, b), f"{name}: decision.{f} differs from the CPU run"
        for lg, lr in zip(cache.layers, ref_cache.layers):
            for f in ("k", "v", "mass", "frame", "row", "col", "time"):
                assert _tagged(getattr(lg, f)), f"{name}: cache.{f} left the device"
                assert torch.equal(getattr(lg, f), getattr(lr, f)), f
            for n in lg.aux:
                assert _tagged(lg.aux[n]) and torch.equal(lg.aux[n], lr.aux[n])


def test_append_moves_host_positions_to_the_cache_device():
    cache, ctx, _ = toy(frames=2)
    audit = to_device(cache, ctx)
    layer = cache[0]
    with audit:
        k = layer.k[:, :, :6].clone()
        layer.append(k, k.clone(), torch.full((6,), 2), torch.arange(6) // 3, torch.arange(6) % 3)
        assert layer.size == 18 and all(
            _tagged(getattr(layer, f)) for f in ("k", "v", "mass", "frame", "row", "col", "time"))
    assert not audit.violations, "\n".join(audit.violations)


def test_shared_helpers_on_the_device():
    from ffviz.policies.base import plane_matrix
    from ffviz.policies.merge import merge_to_nearest
    from ffviz.policies.scored import select
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 2, 10, 12, generator=g)
    frame = torch.tensor([3, 0, 1, 1, 2, 0, 4, 2, 3, 4]).expand(2, 2, 10)  # not in frame order
    score = torch.randn(2, 2, 10, generator=g)
    cos, sin = torch.randn(6, generator=g), torch.randn(6, generator=g)
    ref_keep = select(score, 6, frame, frame < 1)
    ref_merge = merge_to_nearest(k, ref_keep, None, 2.0)
    ref_plane = plane_matrix(cos, sin)
    audit = DeviceAudit()
    k, frame, score, cos, sin = (audit.tag(t.clone()) for t in (k, frame, score, cos, sin))
    with audit:
        keep = select(score, 6, frame, frame < 1)
        into, dist = merge_to_nearest(k, keep, None, 2.0)
        plane = plane_matrix(cos, sin)
    assert not audit.violations, "\n".join(audit.violations)
    assert all(_tagged(t) for t in (keep, into, dist, plane))
    assert torch.equal(keep, ref_keep) and torch.equal(plane, ref_plane)
    assert torch.equal(into, ref_merge[0]) and torch.equal(dist, ref_merge[1])


def test_oracle_with_host_future_queries():
    """The reference run may keep its recorded queries on the host."""
    cache, ctx, _ = toy()
    audit = to_device(cache, ctx)
    ctx.future_queries = _future(ctx, False, None)
    with audit:
        d = make_policy("oracle").compress(cache, 18, ctx)
        cache.apply(d)
    assert not audit.violations, "\n".join(audit.violations)
    assert _tagged(d.layers[0].score) and _tagged(cache[0].k)


def test_tiny_model_training_and_rollout_stay_on_the_device():
    """What ``python -m ffviz train`` runs on CUDA: the teacher-forcing forward with its
    mask and previous-frame input, and the rollout (sampler, snapping, cache, window)."""
    from ffviz.models.tiny import TinyConfig, TinyVideoModel
    from ffviz.sampling import previous_tokens
    from ffviz.train import layout, rollout

    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(width=32, layers=2, heads=2)).eval()
    audit = DeviceAudit()
    for p in list(model.parameters()) + list(model.buffers()):
        audit.tag(p)
    n, T = model.cfg.tokens_per_frame, 5
    x0 = audit.tag(torch.rand(2, T * n, model.cfg.patch_dim) * 2 - 1)
    cond_ids = audit.tag(torch.zeros(2, len(model.cond_embed), dtype=torch.long))
    palette = audit.tag(torch.tensor([[[-1.0, -1, -1], [1, 0, 0]]] * 2))
    with audit:
        frames, mask = layout(torch.arange(T), 2, n, torch.tensor([3, 4]))
        mask = mask.to(FAKE)
        x = torch.cat([x0, x0[:, 3 * n:]], 1)
        prev = previous_tokens(None, x, n)
        levels = torch.rand(2, T + 2, device=FAKE)
        v = model(x, levels, frames, model.embed_condition(cond_ids), prev=prev, mask=mask)
        out = rollout(model, x0, model.embed_condition(cond_ids), 2, 2,
                      torch.Generator().manual_seed(0), palette=palette)
    assert not audit.violations, "\n".join(audit.violations)
    assert _tagged(v) and _tagged(out) and out.shape == x0.shape


def test_query_statistics_reduce_on_the_device():
    """Only the per-batch moments cross to the host: the (heads, n, d) queries are
    reduced where they are (a full-size Wan's are 28 MB per layer and step)."""
    from ffviz.stats import QueryStats

    class MoveLog(DeviceAudit):
        moved: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.cpu, torch.Tensor.to) and _tagged(args[0]):
                self.moved.append(tuple(args[0].shape))
            return super().__torch_function__(func, types, args, kwargs)

    audit = MoveLog()
    q = torch.randn(1, 2, 50, 6)
    ref = QueryStats(1, 2, 6)
    ref.update(0, q)
    stats = QueryStats(1, 2, 6)
    with audit:
        stats.update(0, audit.tag(q.clone()))
    assert not audit.violations, "\n".join(audit.violations)
    assert audit.moved and all(50 not in shape for shape in audit.moved), audit.moved
    assert torch.equal(stats.mean(0), ref.mean(0)) and torch.equal(stats.cov(0), ref.cov(0))
