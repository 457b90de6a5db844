"""The numba CPU kernels (ffviz/kernels/cpu_kernels.py) against the PyTorch path they
replace: the same decisions, the same cache, the same errors."""
import math
import os

import numpy as np
import pytest
import torch

from ffviz import kernels
from ffviz.cache import Decision, KVCache, LayerDecision
from ffviz.policies import PolicyError, make_policy
from ffviz.policies.scored import rank
from ffviz.kernels import cpu_kernels, reference
from tests.test_policies import N_TOK, toy

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not importable")


def both(monkeypatch, run):
    """``run()`` on the PyTorch path, then on the compiled one."""
    out = []
    for mode in ("reference", "auto"):
        monkeypatch.setenv("FFVIZ_KERNELS", mode)
        out.append(run())
    return out


def assert_same_cache(ref, got, rtol):
    """Provenance equal, keys, values and masses close (and of the same shape and dtype)."""
    for r, g in zip(ref.layers, got.layers):
        for name in ("frame", "row", "col", "time"):
            assert torch.equal(getattr(r, name), getattr(g, name)), name
        for name in ("k", "v", "mass"):
            torch.testing.assert_close(getattr(g, name), getattr(r, name), rtol=rtol, atol=1e-6)
        assert g.k.shape == r.k.shape and g.k.dtype == r.k.dtype


def test_compiled_only_for_float32_cpu_in_auto_mode(monkeypatch):
    x = torch.zeros(2)
    assert kernels.compiled_cpu(x) and not kernels.compiled_cpu(x.double())
    assert not kernels.compiled_cpu() and kernels.compiled_cpu_enabled()
    monkeypatch.setenv("FFVIZ_KERNELS", "reference")
    assert not kernels.compiled_cpu(x) and not kernels.compiled_cpu_enabled()


FF_PARAMS = [{}, {"rank": 2}, {"tau": 0.0}, {"value_norm": True}, {"rank": 0, "n_sink": 0},
             {"horizon": 2, "stride": 1, "rank": 3, "tau": 1.0},
             {"n_sink": 0, "n_recent": 2, "tau": 100.0}]


@pytest.mark.parametrize("params", FF_PARAMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("merged_mass", [False, True])
def test_future_forcing_compiled_decides_as_pytorch(monkeypatch, params, seed, merged_mass):
    def run():
        cache, ctx, _ = toy(frames=6, L=2, H=3, seed=seed, merged_mass=merged_mass)
        compiled = os.environ["FFVIZ_KERNELS"] == "auto"
        assert kernels.compiled_cpu(cache[0].k) == compiled
        return make_policy("future_forcing", **params).compress(cache, 3 * N_TOK, ctx)

    ref, got = both(monkeypatch, run)
    for r, g in zip(ref.layers, got.layers):
        assert torch.equal(r.keep, g.keep)
        torch.testing.assert_close(g.score, r.score, rtol=1e-5, atol=1e-8)
        assert (r.merge_into is None) == (g.merge_into is None) == (params.get("tau") == 0.0)
        if r.merge_into is not None:
            assert torch.equal(r.merge_into, g.merge_into)
            # the compiled distance of the winner is summed directly; PyTorch's expansion
            # loses ~1e-6 to cancellation
            torch.testing.assert_close(g.distance, r.distance, rtol=1e-4, atol=1e-5)


def test_future_forcing_compiled_through_later_calls(monkeypatch):
    """Calls after the first take the subspace-iteration step (compiled: Gram-Schmidt
    instead of QR, the same span): decisions stay those of the PyTorch path."""
    def run():
        pol = make_policy("future_forcing", eig_every=4)
        decisions = []
        for seed in range(5):
            cache, ctx, _ = toy(frames=6, L=2, H=3, seed=seed)
            ctx.frame += seed  # a later frame: no restart of the eigenpairs
            decisions.append(pol.compress(cache, 3 * N_TOK, ctx))
        return decisions

    ref, got = both(monkeypatch, run)
    for dr, dg in zip(ref, got):
        for r, g in zip(dr.layers, dg.layers):
            assert torch.equal(r.keep, g.keep) and torch.equal(r.merge_into, g.merge_into)
            torch.testing.assert_close(g.score, r.score, rtol=1e-4, atol=1e-7)


def step(u, cov):
    """The kernel's subspace step on a covariance given as QueryStats-style sums."""
    return cpu_kernels.subspace_step(u.numpy(), np.asarray(cov, np.float64),
                                     np.ones(cov.shape[0]))


def test_subspace_step_spans_what_qr_spans():
    g = torch.Generator().manual_seed(0)
    X, r, d = 5, 3, 8
    a = torch.randn(X, d, 2 * d, generator=g)
    cov = a @ a.transpose(1, 2) / (2 * d)
    u = torch.linalg.qr(torch.randn(X, d, r, generator=g)).Q.transpose(1, 2).contiguous()
    basis, lam, residual = (torch.from_numpy(t) for t in step(u, cov))
    want, _, want_residual = reference.subspace_step(u, torch.ones(X, dtype=torch.float64), cov.double())
    proj = lambda b: b.transpose(1, 2) @ b  # the projector onto the span
    torch.testing.assert_close(proj(basis), proj(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ basis.transpose(1, 2), torch.eye(r).expand(X, r, r), atol=1e-5, rtol=0)
    torch.testing.assert_close(lam, ((basis @ cov) * basis).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(residual, want_residual, rtol=1e-4, atol=1e-6)
    # degenerate statistics (a zero covariance): the old vectors stay, eigenvalues 0
    basis0, lam0, residual0 = step(u, np.zeros((X, d, d)))
    assert np.array_equal(basis0, u.numpy()) and not lam0.any() and not residual0.any()
    # one degenerate head: every head keeps its vectors, as the PyTorch path does
    some = cov.clone()
    some[2] = 0
    basis1, lam1, _ = step(u, some)
    assert np.array_equal(basis1, u.numpy())
    torch.testing.assert_close(torch.from_numpy(lam1), ((u @ some) * u).sum(-1), rtol=1e-5, atol=1e-6)


def test_covariances_are_cov_all():
    """The kernel forms QueryStats' covariances from its sums as ``cov_all`` does."""
    from ffviz.stats import QueryStats
    g = torch.Generator().manual_seed(1)
    stats = QueryStats(2, 3, 8)
    for layer in range(2):
        for _ in range(3):
            stats.update(layer, torch.randn(3, 20, 8, generator=g) * 3 + 1)
    weight, _, m2 = stats.moments()
    got = cpu_kernels.covariances(m2.view(6, 8, 8).numpy(), weight.view(6).numpy())
    torch.testing.assert_close(torch.from_numpy(got).view(2, 3, 8, 8), stats.cov_all(),
                               rtol=1e-6, atol=0)


def test_select_is_ranks_order_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        N, K = 24, int(torch.randint(1, 24, (1,), generator=g))
        s = torch.randint(0, 4, (N,), generator=g).double()  # many ties
        protected = torch.zeros(N, dtype=torch.bool)
        protected[torch.randint(0, N, (min(K, 3),), generator=g)] = True
        frame = torch.randint(0, 6, (N,), generator=g)
        if trial % 2:
            frame = frame.sort().values  # cache order = frame order, as appended
        order = rank(s.float()[None], K, frame[None], protected[None])[0]
        keep, gone = cpu_kernels._select(s.masked_fill(protected, math.inf).numpy(),
                                         frame.numpy(), K)
        assert keep.tolist() == order[:K].sort().values.tolist()
        assert sorted(gone.tolist()) == sorted(order[K:].tolist())


def test_select_with_nothing_to_keep():
    keep, gone = cpu_kernels._select(np.arange(30.0), np.zeros(30, np.int64), 0)
    assert keep.size == 0 and gone.tolist() == list(range(30))


def test_exp_matches_float64_exp():
    z = np.concatenate([-np.logspace(-8, np.log10(87), 5000), [0.0]]).astype(np.float32)
    got = z.copy()
    cpu_kernels._exp_nonpositive(got, np.empty(z.size, np.int32))
    want = np.exp(z.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 1e-7
    low = np.array([-87.5, -1e4, -np.inf], np.float32)
    cpu_kernels._exp_nonpositive(low, np.empty(3, np.int32))
    assert np.all((low > 0) & (low < 2e-38))  # clamped at e^-87: negligible, never NaN


def random_cache(seed, L=3, B=2, H=2, frames=4, n=3, d=4):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(L, n, (1, n))
    for layer in cache.layers:
        for f in range(frames):
            layer.append(torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g),
                         torch.full((n,), f), torch.zeros(n, dtype=torch.long), torch.arange(n))
        layer.mass = 1 + 3 * torch.rand(layer.mass.shape, generator=g)
        layer.time = layer.time + 100  # a re-rotated time, to see it travel
    return cache


def random_decision(cache, K, seed):
    """Random kept sets; each evicted token merges into a kept one, into an evicted one
    (then it is dropped), or nowhere."""
    g = torch.Generator().manual_seed(seed)
    B, H, N = cache[0].mass.shape
    layers = []
    for _ in cache.layers:
        keep = torch.stack([torch.randperm(N, generator=g)[:K].sort().values
                            for _ in range(B * H)]).view(B, H, K)
        into = torch.randint(-1, N, (B, H, N), generator=g)
        into.scatter_(-1, keep, -1)
        layers.append(LayerDecision(keep=keep, merge_into=into))
    return Decision(layers)


@pytest.mark.parametrize("seed", range(4))
def test_merge_apply_makes_the_pytorch_cache(monkeypatch, seed):
    def run():
        cache = random_cache(seed)
        dec = random_decision(cache, 5, seed)
        assert cache._compilable(dec) == (os.environ["FFVIZ_KERNELS"] == "auto")
        cache.apply(dec)
        return cache

    ref, got = both(monkeypatch, run)
    assert_same_cache(ref, got, rtol=1e-6)


def test_merge_apply_rejects_indices_out_of_range():
    for field, bad in (("keep", 12), ("merge_into", 12), ("merge_into", -2)):
        cache = random_cache(1)
        before = [l.k.clone() for l in cache.layers]
        dec = random_decision(cache, 5, 1)
        t = getattr(dec.layers[1], field)
        t.view(-1)[t.numel() - 1] = bad
        assert cache._compilable(dec)
        with pytest.raises(IndexError, match="out of range"):
            cache.apply(dec)
        assert all(torch.equal(l.k, b) for l, b in zip(cache.layers, before))


def test_merge_apply_copies_untouched_tokens_exactly():
    cache = random_cache(7)
    before = [(l.k.clone(), l.v.clone(), l.mass.clone()) for l in cache.layers]
    dec = random_decision(cache, 5, 7)
    cache.apply(dec)
    for layer, d, (k, v, m) in zip(cache.layers, dec.layers, before):
        into = d.merge_into
        fed = torch.zeros_like(d.keep, dtype=torch.bool)
        for b in range(into.shape[0]):
            for h in range(into.shape[1]):
                targets = set(into[b, h][into[b, h] >= 0].tolist())
                fed[b, h] = torch.tensor([int(j) in targets for j in d.keep[b, h]])
        idx = d.keep.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        assert torch.equal(layer.k[~fed], k.gather(2, idx)[~fed])
        assert torch.equal(layer.mass[~fed], m.gather(2, d.keep)[~fed])


def test_compiled_paths_raise_as_pytorch(monkeypatch):
    """More protected tokens in a head than the budget (frames of more tokens than the
    context says): the same PolicyError on both paths, nothing applied."""
    def run():
        cache, ctx, _ = toy(frames=5)
        ctx.tokens_per_frame = 1  # the protected frames "fit" by count, not by tokens
        with pytest.raises(PolicyError, match="protected tokens in one head exceed"):
            make_policy("future_forcing", n_sink=1, n_recent=1).compress(cache, 8, ctx)
        return cache.size

    assert both(monkeypatch, run) == [5 * N_TOK, 5 * N_TOK]


@pytest.mark.parametrize("token", [7, 27])  # evicted / kept (the newest frame is protected)
def test_nan_key_gives_the_same_decision(monkeypatch, token):
    def run():
        cache, ctx, _ = toy(frames=5, seed=3)
        cache[0].k[0, 1, token, 0] = float("nan")
        return make_policy("future_forcing").compress(cache, 3 * N_TOK, ctx)

    ref, got = both(monkeypatch, run)
    for r, g in zip(ref.layers, got.layers):
        assert torch.isfinite(g.score).all()
        assert torch.equal(r.keep, g.keep) and torch.equal(r.merge_into, g.merge_into)
        torch.testing.assert_close(g.score, r.score, rtol=1e-5, atol=1e-8)
    into = got.layers[0].merge_into[0, 1]
    if token == 27:  # a kept NaN key: no merges in its head, as PyTorch's NaN distances
        assert not (into >= 0).any()
    else:  # an evicted NaN key merges nowhere; the others still do
        assert into[token] == -1 and (into >= 0).any()


def test_generation_with_compiled_future_forcing_matches(monkeypatch, tiny_random):
    from ffviz.generate import Controls, RunSettings, generate

    def run():
        settings = RunSettings("a red circle on a blue background", frames=9, seed=0, record=False)
        steps = list(generate(tiny_random, settings, Controls(make_policy("future_forcing"), 3)))
        return steps

    ref, got = both(monkeypatch, run)
    first = next(i for i, s in enumerate(ref) if s.decision is not None)
    for r, g in zip(ref[first].decision.layers, got[first].decision.layers):
        assert torch.equal(r.keep, g.keep) and torch.equal(r.merge_into, g.merge_into)
    frames = lambda steps: np.concatenate([s.frames for s in steps]).astype(int)
    assert np.abs(frames(ref) - frames(got)).max() <= 2  # float rounding, not a different run


def test_nearest_kept_in_bounded_blocks():
    """More candidates x kept tokens than one block (CHUNK_ELEMENTS): the search runs
    block by block and finds what a brute-force search finds."""
    rng = np.random.default_rng(0)
    K = 2048
    G = cpu_kernels.CHUNK_ELEMENTS // K + 50  # two blocks
    y = rng.standard_normal((6, K + G)).astype(np.float32)
    perm = rng.permutation(K + G)
    keep, gone = np.sort(perm[:K]), perm[K:]
    dmin, at = cpu_kernels._nearest_kept(y, keep, gone, 0.5)
    a, b = y[:, gone].T.astype(np.float64), y[:, keep].T.astype(np.float64)
    d = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    assert np.array_equal(at, d.argmin(1))
    np.testing.assert_allclose(dmin, 0.5 * d.min(1), rtol=1e-5)


def test_kernels_blas_runs_on_one_thread_and_numpys_keeps_its_own():
    """``warm`` ends with this: scipy's OpenBLAS (numba's ``np.dot``) on one thread (a
    spinning second one made compressions 16x slower on a busy machine); numpy's BLAS
    is not touched."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy
    home = os.path.dirname(os.path.abspath(scipy.__file__))
    mine = lambda info: os.path.abspath(info["filepath"]).startswith((home + os.sep, home + ".libs" + os.sep))
    before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
              if i["user_api"] == "blas"}
    cpu_kernels._one_blas_thread()
    after = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    ours = [i for i in after if mine(i)]
    if not ours:
        pytest.skip("scipy shares a system BLAS here; nothing is limited")
    assert all(i["num_threads"] == 1 for i in ours)
    assert all(i["num_threads"] == before[i["filepath"]] for i in after
               if not mine(i) and i["filepath"] in before)


FIELDS = KVCache.FIELDS


@pytest.mark.parametrize("params", [{}, {"rank": 2, "tau": 1.0}, {"tau": 0.0}])
@pytest.mark.parametrize("B", [1, 2])
def test_future_forcing_compiled_leaves_the_pytorch_cache(monkeypatch, params, B):
    """The cache the compression kernel hands over with its decision
    (``Decision.prepared``) is the cache the PyTorch path's ``apply`` makes: kept and
    merged keys, values and masses, and the provenance (frame, row, col, time)."""
    def run():
        cache, ctx, _ = toy(frames=6, L=2, H=3, seed=4, merged_mass=True)
        for layer in cache.layers:  # a batch of B rows, each its own keys
            for name in FIELDS:
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t] + [t.flip(2) if name in ("k", "v") else t
                                                      for _ in range(B - 1)]))
        decision = make_policy("future_forcing", **params).compress(cache, 3 * N_TOK, ctx)
        assert (decision.prepared is not None) == (os.environ["FFVIZ_KERNELS"] == "auto")
        cache.apply(decision)
        assert decision.prepared is None  # used once, not kept with the decision
        return cache

    ref, got = both(monkeypatch, run)
    assert_same_cache(ref, got, rtol=1e-5)


def test_prepared_cache_is_taken_only_by_the_cache_it_was_made_from(monkeypatch):
    """``apply`` takes the kernel's cache only while the cache holds the very tensors it
    was made from, unedited; otherwise (another cache, a replaced or an edited tensor)
    it carries the decision out itself, and the results agree. A cache with ``aux``
    quantities (left by H2O after a switch) gets none: the kernel does not carry them."""
    monkeypatch.setenv("FFVIZ_KERNELS", "auto")

    def fresh():
        cache, ctx, _ = toy(frames=6, L=2, H=3, seed=5)
        return cache, ctx

    cache, ctx = fresh()
    decision = make_policy("future_forcing").compress(cache, 3 * N_TOK, ctx)
    assert decision.prepared is not None
    prepared = decision.prepared
    twin = fresh()[0]  # equal values, other tensors
    assert not prepared.made_from(twin)
    cache[1].v = cache[1].v.clone()  # replaced
    assert not prepared.made_from(cache)
    cache, ctx = fresh()
    decision = make_policy("future_forcing").compress(cache, 3 * N_TOK, ctx)
    cache[0].v[0, 0, 0] += 1.0  # edited in place
    assert not decision.prepared.made_from(cache)
    want = fresh()[0]
    want[0].v[0, 0, 0] += 1.0
    want.apply(Decision(decision.layers))  # the same decision, carried out by apply
    cache.apply(decision)  # falls back: the edit is in the result
    for w, g in zip(want.layers, cache.layers):
        for name in FIELDS:
            torch.testing.assert_close(getattr(g, name), getattr(w, name))
    cache, ctx = fresh()
    for layer in cache.layers:
        layer.aux["acc"] = torch.rand(layer.mass.shape)
    decision = make_policy("future_forcing").compress(cache, 3 * N_TOK, ctx)
    assert decision.prepared is None
    cache.apply(decision)
    assert cache.size == 3 * N_TOK and cache[0].aux["acc"].shape == cache[0].mass.shape


def test_nearest_kept_takes_the_first_of_equal_candidates():
    """Duplicate kept tokens (a static background): the search names the first in keep
    order, as the PyTorch path's argmin does."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 4)).astype(np.float32)
    y = np.concatenate([base, base, base + 0.01, base[:, :2]], axis=1)  # (5, 14)
    keep = np.arange(12)  # tokens 0-3 equal 4-7; 8-11 are near them
    gone = np.array([12, 13])  # equal to tokens 0 and 1 (and 4 and 5)
    dmin, at = cpu_kernels._nearest_kept(y, keep, gone, 1.0)
    assert at.tolist() == [0, 1] and dmin.tolist() == [0.0, 0.0]
