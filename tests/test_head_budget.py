"""Per-head budgets: dead slots, the adaptive (AdaKV) allocation, and every scored
policy with head_budget=adaptive holding its budget."""
import pytest
import torch

from ffviz.cache import DEAD, Decision, KVCache, LayerDecision
from ffviz.generate import Controls, Observer, RunSettings, decision_log_entry, generate
from ffviz.kernels import reference
from ffviz.policies import POLICIES, PolicyError, make_policy
from ffviz.policies.head_budget import adaptive_counts, budget_shares, kept_per_head
from ffviz.policies.scored import ScoredPolicy, rank
from tests.conftest import random_model
from tests.test_policies import N_TOK, toy

ADAPTIVE = [n for n, cls in POLICIES.items() if issubclass(cls, ScoredPolicy)
            and "head_budget" in make_policy(n).params() and n != "oracle"]


def with_dead(cache: KVCache, keep_per_head=(3, 5)) -> KVCache:
    """Layer by layer, head h keeps its first ``keep_per_head[h]`` tokens, the rest of the
    widest head's width is dead."""
    for layer in cache.layers:
        with_dead_layer(layer, keep_per_head)
    return cache


def toy_with_dead(frames=6, keep_per_head=(18, 24)):
    """``toy``'s cache where, before the newest frame was written, head h kept only its
    first ``keep_per_head[h]`` tokens: dead slots between old tokens and the newest frame."""
    cache, ctx, pre = toy(frames=frames)
    for layer in cache.layers:
        newest = {name: getattr(layer, name)[:, :, -N_TOK:].clone() for name in ("k", "v", "frame", "row", "col")}
        with_dead_layer(layer, keep_per_head)
        layer.append(newest["k"], newest["v"], *(newest[n][0, 0] for n in ("frame", "row", "col")))
    return cache, ctx


def with_dead_layer(layer, keep_per_head):
    B, H, N = layer.mass.shape
    W = max(keep_per_head)
    keep = torch.arange(W).expand(B, H, W).clone()
    live = torch.arange(W).view(1, 1, W) < torch.tensor(keep_per_head).view(1, H, 1)
    layer.apply(LayerDecision(keep=keep, live=live.expand(B, H, W)))


def test_dead_slots_hold_nothing_and_count_nothing():
    cache, _, _ = toy(frames=2)
    with_dead(cache)
    layer = cache[0]
    assert layer.size == 5 and layer.tokens_per_head().tolist() == [[3, 5]]
    dead = ~layer.live
    assert dead[0, 0, 3:].all() and not dead[0, 1].any()
    assert (layer.mass[dead] == 0).all() and (layer.frame[dead] == DEAD).all()
    assert (layer.k[dead] == 0).all() and (layer.v[dead] == 0).all()
    assert cache.tokens() == 4 and cache.size == 5
    assert cache.within_budget(4) and not cache.within_budget(3)
    assert DEAD not in cache.frames()


def test_dead_slots_receive_exactly_zero_attention():
    g = torch.Generator().manual_seed(0)
    cache, _, _ = toy(frames=2, merged_mass=True)
    with_dead(cache)
    layer = cache[0]
    q = torch.randn(1, 2, 4, layer.k.shape[-1], generator=g)
    bias = layer.bias()[:, :, 0]
    out = reference.attention(q, layer.k, layer.v, bias)
    p = torch.softmax(q @ layer.k.transpose(-1, -2) / layer.k.shape[-1] ** 0.5 + bias[:, :, None], -1)
    assert (p[0, 0, :, 3:] == 0).all()  # exactly: exp(-inf)
    want = reference.attention(q[:, :1], layer.k[:, :1, :3], layer.v[:, :1, :3], bias[:, :1, :3])
    torch.testing.assert_close(out[:, :1], want, rtol=0, atol=1e-6)


def test_model_attends_through_dead_slots_as_if_they_were_gone():
    """The tiny model over a cache with dead slots equals it over the same tokens packed."""
    from ffviz.scenes import CONDITION_VOCAB
    model = random_model()
    cache = model.new_cache()
    g = torch.Generator().manual_seed(1)
    n = model.cfg.tokens_per_frame
    x = torch.randn(1, 2 * n, model.cfg.patch_dim, generator=g)
    cond = model.embed_condition(torch.zeros(1, len(CONDITION_VOCAB), dtype=torch.long))
    with torch.no_grad():
        model(x, torch.zeros(1, 2), torch.arange(2), cond, cache=cache, write=True, phase="cache")
    packed = model.new_cache()
    for full, small in zip(cache.layers, packed.layers):
        for name in KVCache.FIELDS:
            setattr(small, name, getattr(full, name)[:, :, n:].clone())  # frame 1 only
    keep = torch.arange(2 * n).expand(1, model.cfg.heads, 2 * n)
    live = (keep >= n)  # frame 0 dead, in every head
    cache.apply(Decision([LayerDecision(keep=keep, live=live) for _ in cache.layers]))
    y = torch.randn(1, n, model.cfg.patch_dim, generator=g)
    with torch.no_grad():
        a = model(y, torch.full((1, 1), 0.5), torch.tensor([2]), cond, cache=cache, phase="denoise")
        b = model(y, torch.full((1, 1), 0.5), torch.tensor([2]), cond, cache=packed, phase="denoise")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_padding_tokens_merge_and_their_slots_die():
    cache, _, _ = toy(frames=1)
    layer = cache[0]
    total = layer.mass.sum(-1)
    keep = torch.tensor([[[0, 1, 2], [0, 1, 2]]])
    live = torch.tensor([[[True, True, True], [True, False, False]]])
    into = torch.full((1, 2, N_TOK), -1)
    into[0, 1, 1], into[0, 1, 2], into[0, 0, 5] = 0, 0, 2  # head 1's padding tokens merge into 0
    layer.apply(LayerDecision(keep=keep, merge_into=into, live=live))
    assert layer.tokens_per_head().tolist() == [[3, 1]]
    assert layer.mass[0, 1].tolist() == [3.0, 0.0, 0.0] and layer.mass[0, 0, 2] == 2
    assert torch.isfinite(layer.k).all() and (layer.frame[0, 1, 1:] == DEAD).all()
    assert layer.mass[0, 1].sum() == total[0, 1] - 3  # three dropped, three merged into one


def test_rank_puts_dead_slots_last_without_a_warning():
    score = torch.tensor([[[float("nan"), 1.0, 5.0, 0.5]]])
    frame = torch.tensor([[[1, 1, DEAD, 2]]])
    dead = frame == DEAD
    with pytest.warns(RuntimeWarning):  # a real token's NaN still warns
        assert rank(score, 2, frame, dead=dead).tolist() == [[[1, 3, 0, 2]]]
    clean = torch.tensor([[[0.0, 1.0, float("nan"), 0.5]]])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rank(clean, 2, frame, dead=dead)[..., -1].item() == 2


def test_adaptive_counts_follow_the_scores_never_exceed_the_layer_and_keep_the_floor():
    g = torch.Generator().manual_seed(0)
    L, H, N, K = 3, 4, 40, 10
    for trial in range(20):
        # concentrated heads: a few high scores; spread heads: many medium ones
        sharp = torch.rand(L, 1, H, 1, generator=g) < 0.5
        score = torch.where(sharp, torch.rand(L, 1, H, N, generator=g) ** 8,
                            0.3 + 0.1 * torch.rand(L, 1, H, N, generator=g))
        protected = torch.zeros(L, 1, H, N, dtype=torch.bool)
        protected[..., -3:] = True
        real = torch.rand(L, 1, H, N, generator=g) > 0.1 if trial % 2 else torch.ones_like(protected)
        protected &= real
        order = rank(score, K, torch.zeros(L, 1, H, N, dtype=torch.long), protected, dead=~real)
        in_order = lambda t: t.gather(-1, order)
        floor = 0.3
        counts = adaptive_counts(in_order(score), in_order(protected), in_order(real), K, floor)
        assert (counts.sum(-1) <= H * K).all()
        assert (counts >= torch.minimum(protected.sum(-1).clamp_min(int(floor * K)), real.sum(-1))).all()
        assert (counts <= real.sum(-1)).all()
        if trial % 2 == 0:  # everything real: the whole layer budget is used, spread heads get more
            assert (counts.sum(-1) == H * K).all()
            spread = ~sharp.view(L, 1, H)
            if spread.any() and (~spread).any():
                assert counts[spread].float().mean() > counts[~spread].float().mean()


def test_adaptive_with_floor_1_is_uniform():
    cache, ctx, _ = toy(frames=5)
    uni = make_policy("future_forcing", tau=2.0).compress(cache, 3 * N_TOK, ctx)
    cache2, ctx2, _ = toy(frames=5)
    ada = make_policy("future_forcing", tau=2.0, head_budget="adaptive",
                      head_floor=1.0).compress(cache2, 3 * N_TOK, ctx2)
    for a, b in zip(uni.layers, ada.layers):
        assert torch.equal(a.keep, b.keep) and b.live is None
        assert torch.equal(a.merge_into, b.merge_into)


class BudgetCheck(Observer):
    """After each compression: within the budget (real tokens), the floor held, the log's
    kept counts agree with the cache (dead slots in the log: test_the_log_never_lists_dead_slots)."""

    def __init__(self, budget_frames, floor):
        self.budget, self.floor, self.shares = budget_frames, floor, []

    def after_write(self, cache, frames, ctx):
        self.before = [l.mass.clone() for l in cache.layers]

    def after_compress(self, cache, decision, ctx):
        K = self.budget * ctx.tokens_per_frame
        assert cache.within_budget(K)
        if decision is None:
            return
        counts = kept_per_head(decision, self.before)
        for layer, c in zip(cache.layers, counts):
            assert torch.equal(layer.tokens_per_head()[0], c)
            assert int(c.sum()) <= layer.mass.shape[1] * K
            assert (c >= min(int(self.floor * K), layer.tokens_per_head().min())).all()
        self.shares.append(budget_shares(decision, K, self.before))


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_holds_the_budget_in_generation(name):
    model = random_model()
    floor = 0.25
    check = BudgetCheck(3, floor)
    policy = make_policy(name, head_budget="adaptive", head_floor=floor)
    steps = list(generate(model, RunSettings("a red ball", frames=8, seed=1, steps=1),
                          Controls(policy, 3), observer=check))
    assert check.shares and all(s.cache_tokens <= 3 * model.cfg.tokens_per_frame for s in steps)
    assert any((s != 1).any() for s in check.shares)  # the budget moved between heads
    for s in steps[2:]:
        for layer in s.decision_log["layers"]:
            assert sum(h["kept"] for h in layer) <= model.cfg.heads * 3 * model.cfg.tokens_per_frame


def test_the_log_never_lists_dead_slots():
    cache, ctx = toy_with_dead()
    log = decision_log_entry(cache, make_policy("future_forcing", tau=0.0).compress(cache, 2 * N_TOK, ctx))
    for layer in log["layers"]:
        assert [h["kept"] for h in layer] == [12, 12]
        assert len(layer[0]["dropped"]) == 18 + 6 - 12 and len(layer[1]["dropped"]) == 24 + 6 - 12
        assert all(i >= 0 for h in layer for i in h["dropped"])


@pytest.mark.parametrize("name", ["window", "sink", "h2o", "snapkv", "deep_forcing", "future_forcing",
                                  "expected_attention"])
def test_every_policy_works_on_a_cache_with_dead_slots(name):
    """A live switch from an adaptive policy leaves dead slots: every policy copes."""
    cache, ctx = toy_with_dead()
    decision = make_policy(name).compress(cache, 3 * N_TOK, ctx)
    cache.apply(decision)
    assert cache.within_budget(3 * N_TOK) and torch.isfinite(cache[0].k).all()
    for layer in cache.layers:
        assert layer.tokens_per_head().tolist() == [[3 * N_TOK, 3 * N_TOK]]  # both had more
        assert (layer.frame[layer.live] >= 0).all() and (layer.frame[~layer.live] == DEAD).all()
        if decision.layers[0].merge_into is not None:  # nothing merged into or out of a dead slot
            assert (layer.mass[layer.live] >= 1).all()


@pytest.mark.parametrize("name,params,match", [
    ("future_forcing", {"head_budget": "per_head"}, "head_budget"),
    ("h2o", {"head_floor": 1.5}, "head_floor"),
    ("snapkv", {"head_floor": -0.1}, "head_floor"),
    ("sink", {"head_budget": "adaptive"}, "no parameter 'head_budget'"),
    ("deep_forcing", {"head_budget": "adaptive"}, "no parameter 'head_budget'"),
    ("forcing_kv", {"head_budget": "adaptive"}, "no parameter 'head_budget'"),
])
def test_bad_head_budget_parameters_are_policy_errors(name, params, match):
    with pytest.raises(PolicyError, match=match):
        make_policy(name, **params)


def test_adaptive_on_wan_holds_the_budget():
    from ffviz.models import load_model
    model = load_model("wan:tiny-random")
    n = model.cfg.tokens_per_frame
    check = BudgetCheck(3, 0.2)
    for name in ("future_forcing", "expected_attention"):
        steps = list(generate(model, RunSettings("a tree in the wind", frames=9, seed=1, steps=1),
                              Controls(make_policy(name, head_budget="adaptive"), 3), observer=check))
        assert all(s.cache_tokens <= 3 * n for s in steps) and steps[-1].decision is not None
