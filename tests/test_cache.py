import pytest
import torch
import torch.nn.functional as F

from ffviz.cache import Decision, KVCache, LayerDecision
from ffviz.sampling import fill_cache
from tests.conftest import random_model


@pytest.mark.parametrize("chunk", [1, 2])
def test_cached_generation_equals_block_causal_forward(chunk):
    model = random_model(chunk_frames=chunk)
    T, n = 6, model.cfg.tokens_per_frame
    torch.manual_seed(1)
    x = torch.randn(1, T * n, model.cfg.patch_dim)
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long))
    frames = torch.arange(T)
    t = torch.full((1, T), 0.3)
    prev = torch.randn(1, T * n, model.cfg.patch_dim)  # each frame's previous-frame input
    with torch.no_grad():
        full = model(x, t, frames, cond, prev=prev, mask=model.block_causal_mask(frames))
        cache, outs = model.new_cache(), []
        for f in range(0, T, chunk):
            fr = torch.arange(f, f + chunk)
            sl = slice(f * n, (f + chunk) * n)
            outs.append(model(x[:, sl], t[:, fr], fr, cond, prev=prev[:, sl], cache=cache, write=True))
    cached = torch.cat(outs, 1)
    assert full.abs().mean() > 1e-2  # the comparison carries signal
    assert torch.allclose(cached, full, atol=3e-5), (cached - full).abs().max()


def test_cache_write_and_provenance(tiny_random):
    model = tiny_random
    cache = model.new_cache()
    n = model.cfg.tokens_per_frame
    cond = model.embed_condition(torch.zeros(1, len(model.cond_embed), dtype=torch.long))
    fill_cache(model, cache, torch.randn(1, 2 * n, model.cfg.patch_dim), torch.tensor([0, 1]), cond, 0.0)
    assert cache.size == 2 * n
    assert cache.frames() == [0, 1]
    layer = cache[0]
    assert layer.k.shape == (1, model.cfg.heads, 2 * n, model.cfg.head_dim)
    assert layer.row[0, 0, :n].tolist() == [i // 8 for i in range(64)]
    assert (layer.mass == 1).all() and layer.bias() is None


def _layer_with(k, v):
    cache = KVCache(1, tokens_per_frame=4, grid=(2, 2))
    N = k.shape[2]
    cache[0].append(k, v, torch.arange(N) // 4, (torch.arange(N) % 4) // 2, torch.arange(N) % 2)
    return cache


def test_merge_keeps_mass_and_mass_weighted_logit():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cache = _layer_with(k, v)
    cache[0].mass[:] = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 1.0])
    q = torch.randn(8)
    m = cache[0].mass.clone()
    before_logit = (m[0, 0, 1] * (k[0, 0, 1] @ q) + m[0, 0, 3] * (k[0, 0, 3] @ q)) / (m[0, 0, 1] + m[0, 0, 3])
    total = m.sum(-1)
    keep = torch.tensor([0, 1, 2, 4, 5]).expand(1, 2, 5)
    into = torch.full((1, 2, 6), -1)
    into[:, :, 3] = 1  # token 3 merges into token 1 in both heads
    cache.apply(Decision([LayerDecision(keep=keep, merge_into=into)]))
    assert torch.allclose(cache[0].mass.sum(-1), total)
    assert torch.allclose(cache[0].k[0, 0, 1] @ q, before_logit, atol=1e-6)
    assert cache[0].size == 5


def test_log_mass_bias_makes_merge_of_duplicates_exact():
    """Two identical tokens merged into one with mass 2 attend exactly as before."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    k[:, :, 4], v[:, :, 4] = k[:, :, 2], v[:, :, 2]
    q = torch.randn(1, 1, 3, 8)
    ref = F.scaled_dot_product_attention(q, k, v)
    cache = _layer_with(k, v)
    into = torch.full((1, 1, 5), -1)
    into[..., 4] = 2
    cache.apply(Decision([LayerDecision(keep=torch.arange(4).view(1, 1, 4), merge_into=into)]))
    bias = cache[0].bias()
    assert bias is not None
    out = F.scaled_dot_product_attention(q, cache[0].k, cache[0].v, attn_mask=bias.expand(1, 1, 3, 4))
    assert torch.allclose(out, ref, atol=1e-6)
    # without the bias the merged cache would attend differently
    assert not torch.allclose(F.scaled_dot_product_attention(q, cache[0].k, cache[0].v), ref, atol=1e-4)


def _random_cache(layers, seed):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(layers, tokens_per_frame=4, grid=(2, 2))
    N = 12
    for layer in cache.layers:
        layer.append(torch.randn(2, 3, N, 8, generator=g), torch.randn(2, 3, N, 8, generator=g),
                     torch.arange(N) // 4, (torch.arange(N) % 4) // 2, torch.arange(N) % 2)
        layer.mass[:] = torch.rand(2, 3, N, generator=g) * 3 + 0.5
    return cache


def test_all_layers_at_once_equals_layer_by_layer():
    """KVCache.apply merges every layer in one stacked pass; each layer's result must be
    what LayerCache.apply gives it alone (also with a layer that only drops)."""
    g = torch.Generator().manual_seed(1)
    batched, single = _random_cache(3, 0), _random_cache(3, 0)
    decisions = []
    for i in range(3):
        keep = torch.rand(2, 3, 12, generator=g).argsort(-1)[..., :7].sort(-1).values
        into = None
        if i != 1:  # layer 1 drops only
            into = keep.gather(-1, torch.randint(0, 7, (2, 3, 12), generator=g))
            into.scatter_(-1, keep, -1)  # kept tokens do not move
            into[..., 0] = -1
        decisions.append(LayerDecision(keep=keep, merge_into=into))
    assert batched._batchable(Decision(decisions))
    batched.apply(Decision(decisions))
    for layer, d in zip(single.layers, decisions):
        layer.apply(d)
    for a, b in zip(batched.layers, single.layers):
        for name in KVCache.FIELDS:
            assert torch.allclose(getattr(a, name).float(), getattr(b, name).float(), atol=1e-6), name
    assert batched.size == 7


def test_take_rows_equals_gather():
    from ffviz.cache import take_rows
    g = torch.Generator().manual_seed(0)
    for lead in [(1, 3), (2, 1, 3)]:
        t = torch.randn(*lead, 7, 5, generator=g)
        idx = torch.randint(0, 7, (*lead, 4), generator=g)
        want = t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, 5))
        assert torch.equal(take_rows(t, idx), want)
    expanded = torch.arange(7.0).view(1, 1, 7, 1).expand(2, 3, 7, 5)  # a non-contiguous view
    idx = torch.tensor([6, 0, 3]).expand(2, 3, 3)
    assert torch.equal(take_rows(expanded, idx)[..., 0], idx.float())
