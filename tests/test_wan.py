"""The Wan path on CPU with ``wan:tiny-random``: diffusers parity, block-causal
cache equivalence, hooks, policies, the CLI, checkpoint conversion and loading."""
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the Wan path needs diffusers (see README, 'Real checkpoints')")
diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "WanTransformer3DModel"):
    pytest.skip("diffusers is too old to have WanTransformer3DModel", allow_module_level=True)

from ffviz.cache import Decision, LayerDecision  # noqa: E402
from ffviz.generate import Controls, RunSettings, generate  # noqa: E402
from ffviz.hooks import Hooks  # noqa: E402
from ffviz.models.rope import Rope3D  # noqa: E402
from ffviz.models import ModelError, load_model  # noqa: E402
from ffviz.models.wan import (WanLoadError, build_tiny_random, load_generator_weights,  # noqa: E402
                              load_wan)
from ffviz.models.wan_convert import convert_key, convert_state_dict, strip_prefix  # noqa: E402
from ffviz.policies import POLICIES, make_policy  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


def _reference(model):
    ref = diffusers.WanTransformer3DModel.from_config(model.transformer.config)
    ref.load_state_dict(model.transformer.state_dict())
    return ref.eval()


def test_forward_equals_diffusers_forward(model):
    """Patch embedding, time/text embedding, RoPE and output layout are diffusers' own."""
    T = 3
    torch.manual_seed(0)
    lat = torch.randn(1, 16, T, 8, 8)
    cond = model.encode_prompt("a fox in the snow")
    out = model(model.patchify(lat), torch.full((1, T), 0.6), torch.arange(T), cond)
    with torch.no_grad():
        ref = _reference(model)(lat, torch.tensor([600.0]), cond, return_dict=False)[0]
    assert ref.abs().mean() > 0.1
    assert torch.allclose(model.unpatchify(out), ref, atol=1e-5), (model.unpatchify(out) - ref).abs().max()


def test_rope_matches_diffusers_at_full_head_dim():
    """Rope3D (interleaved pairs, 44/42/42) is diffusers' Wan RoPE for d=128."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    cos_d, sin_d = WanRotaryPosEmbed(128, (1, 2, 2), 1024)(torch.zeros(1, 16, 5, 8, 12))
    cos, sin = Rope3D(128).grid_cos_sin(range(5), 4, 6)
    assert Rope3D(128).split == (44, 42, 42)
    assert torch.allclose(cos_d[0, :, 0, 0::2].float(), cos, atol=1e-6)
    assert torch.allclose(cos_d[0, :, 0, 1::2].float(), cos, atol=1e-6)  # pairs share an angle
    assert torch.allclose(sin_d[0, :, 0, 1::2].float(), sin, atol=1e-6)


def test_patchify_roundtrip(model):
    lat = torch.randn(2, 16, 4, 8, 8)
    x = model.patchify(lat)
    assert x.shape == (2, 4 * model.cfg.tokens_per_frame, model.cfg.patch_dim)
    assert torch.equal(model.unpatchify(x), lat)


@pytest.mark.parametrize("chunk", [3, 1])
def test_cached_generation_equals_block_causal_forward(chunk):
    model = build_tiny_random(chunk_frames=chunk)
    T, n = 6, model.cfg.tokens_per_frame
    torch.manual_seed(1)
    x = torch.randn(1, T * n, model.cfg.patch_dim)
    cond = model.encode_prompt("a red kite")
    frames = torch.arange(T)
    t = torch.linspace(0.1, 0.9, T)[None]  # a different noise level per frame
    full = model(x, t, frames, cond, mask=model.block_causal_mask(frames))
    cache, outs = model.new_cache(), []
    for f in range(0, T, chunk):
        fr = torch.arange(f, f + chunk)
        outs.append(model(x[:, f * n:(f + chunk) * n], t[:, fr], fr, cond, cache=cache, write=True))
    cached = torch.cat(outs, 1)
    assert full.abs().mean() > 1e-2
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
    assert cache.size == T * n and cache.frames() == list(range(T))
    assert cache[0].k.shape == (1, model.cfg.heads, T * n, model.cfg.head_dim)


def test_log_mass_bias_makes_merged_duplicates_exact(model):
    """Frame 0 entered twice, then each copy merged into its twin (mass 2): the
    processor's log(mass) bias gives the same output as the duplicated cache."""
    n, cond = model.cfg.tokens_per_frame, model.encode_prompt("x")
    torch.manual_seed(2)
    x0 = torch.randn(1, 3 * n, model.cfg.patch_dim)
    cache = model.new_cache()
    model(x0, torch.zeros(1, 3), torch.arange(3), cond, cache=cache, write=True)
    for layer in cache.layers:  # append a copy of frame 0's tokens
        layer.append(layer.k[:, :, :n], layer.v[:, :, :n], *(m[0, 0, :n] for m in
                                                             (layer.frame, layer.row, layer.col)))
    x1 = torch.randn(1, 3 * n, model.cfg.patch_dim)
    fr = torch.arange(3, 6)
    dup = model(x1, torch.full((1, 3), 0.5), fr, cond, cache=cache)
    N = cache.size
    into = torch.full((1, model.cfg.heads, N), -1)
    into[..., 3 * n:] = torch.arange(n)
    keep = torch.arange(3 * n).expand(1, model.cfg.heads, 3 * n)
    cache.apply(Decision([LayerDecision(keep=keep, merge_into=into)] * model.cfg.layers))
    assert cache[0].bias() is not None
    merged = model(x1, torch.full((1, 3), 0.5), fr, cond, cache=cache)
    assert torch.allclose(merged, dup, atol=1e-5), (merged - dup).abs().max()


def test_every_hook_fires_with_the_right_shapes(model):
    cfg, seen = model.cfg, {}
    hooks = Hooks(model)
    names = [f"blocks.{i}.attn.hook_{w}_{p}" for i in range(cfg.layers)
             for w in "qk" for p in ("pre", "post")]
    assert sorted(names) == sorted(hooks.points)
    for name in names:
        hooks.add(name, lambda x, hook: seen.setdefault(hook.name, []).append(
            (tuple(x.shape), hook.ctx.phase)))
    try:
        list(generate(model, RunSettings("a boat", frames=6, seed=0, steps=2), Controls("full", 6)))
    finally:
        hooks.remove()
    shape = (1, cfg.heads, cfg.chunk_frames * cfg.tokens_per_frame, cfg.head_dim)
    for name in names:
        calls = seen[name]
        assert len(calls) == 2 * (2 + 1)  # 2 chunks x (2 denoising steps + 1 cache pass)
        assert all(s == shape for s, _ in calls)
        assert [p for _, p in calls].count("cache") == 2


def test_a_hook_can_change_the_attention(model):
    cond, n = model.encode_prompt("y"), model.cfg.tokens_per_frame
    x = torch.randn(1, 3 * n, model.cfg.patch_dim)
    args = (x, torch.full((1, 3), 0.5), torch.arange(3), cond)
    base = model(*args)
    hooks = Hooks(model)
    hooks.add("blocks.0.attn.hook_k_post", lambda k, hook: torch.zeros_like(k))
    try:
        changed = model(*args)
    finally:
        hooks.remove()
    assert not torch.allclose(base, changed)
    assert torch.equal(model(*args), base)


def _future(model):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(16, model.cfg.layers, 1, model.cfg.heads, 8, model.cfg.head_dim, generator=g)
    return lambda frame, layer: table[frame, layer]


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_runs_and_holds_its_budget(model, name):
    n, budget = model.cfg.tokens_per_frame, 2
    params = {k: 1 for k in ("n_sink", "n_recent") if k in {f for f in
              make_policy(name).params()}}
    policy = make_policy(name, **params)
    steps = list(generate(model, RunSettings("a tree in the wind", frames=9, seed=1, steps=1),
                          Controls(policy, budget),
                          future_queries=_future(model) if name == "oracle" else None))
    assert [s.frame_indices for s in steps] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    for s in steps:
        assert s.frames.shape == (3, 8, 8, 3)
        if policy.holds_budget:
            assert s.cache_tokens <= budget * n
    if policy.holds_budget:
        assert steps[-1].cache_tokens == budget * n


def test_prompt_embedding_is_deterministic(model):
    a, b = model.encode_prompt("a cat"), model.encode_prompt("a cat")
    assert torch.equal(a, b) and not torch.equal(a, model.encode_prompt("a dog"))
    assert a.shape == (1, model.cfg.text_len, model.cfg.text_dim)


def test_cli_generate_writes_its_files(tmp_path):
    from ffviz.__main__ import main
    out = tmp_path / "run"
    assert main(["generate", "--model", "wan:tiny-random", "--frames", "6", "--policy",
                 "future_forcing", "--budget", "2", "--steps", "1", "--out", str(out),
                 "--prompt", "a corgi surfing at sunset"]) == 0
    for f in ("video.mp4", "frames.npz", "record.npz", "decisions.jsonl", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == "wan:tiny-random" and summary["frames"] == 6
    assert summary["metrics"]["computed"] is False
    assert summary["peak_cache_tokens"] <= (2 + 3) * 16


def test_cli_clear_errors(tmp_path, capsys):
    from ffviz.__main__ import main
    assert main(["generate", "--model", f"wan:{tmp_path / 'nope.pt'}", "--frames", "3",
                 "--budget", "1", "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["generate", "--model", "llama", "--frames", "3", "--budget", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown model" in capsys.readouterr().err


# -- checkpoint conversion ------------------------------------------------------------------

def original_wan_state(cfg, seed=0) -> dict:
    """A synthetic state dict in ORIGINAL Wan names (wan/modules/model.py) for ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    w, f, t = cfg.width, cfg.ffn_dim, cfg.text_dim
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {"patch_embedding.weight": r(w, 16, 1, 2, 2), "patch_embedding.bias": r(w),
          "text_embedding.0.weight": r(w, t), "text_embedding.0.bias": r(w),
          "text_embedding.2.weight": r(w, w), "text_embedding.2.bias": r(w),
          "time_embedding.0.weight": r(w, cfg.freq_dim), "time_embedding.0.bias": r(w),
          "time_embedding.2.weight": r(w, w), "time_embedding.2.bias": r(w),
          "time_projection.1.weight": r(6 * w, w), "time_projection.1.bias": r(6 * w),
          "head.head.weight": r(64, w), "head.head.bias": r(64), "head.modulation": r(1, 2, w)}
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                sd[f"{b}{attn}.{p}.weight"], sd[f"{b}{attn}.{p}.bias"] = r(w, w), r(w)
            sd[f"{b}{attn}.norm_q.weight"], sd[f"{b}{attn}.norm_k.weight"] = r(w), r(w)
        sd[f"{b}norm3.weight"], sd[f"{b}norm3.bias"] = r(w), r(w)
        sd[f"{b}ffn.0.weight"], sd[f"{b}ffn.0.bias"] = r(f, w), r(f)
        sd[f"{b}ffn.2.weight"], sd[f"{b}ffn.2.bias"] = r(w, f), r(w)
        sd[f"{b}modulation"] = r(1, 6, w)
    return sd


def test_convert_key_names():
    assert convert_key("model.blocks.3.self_attn.o.weight") == "blocks.3.attn1.to_out.0.weight"
    assert convert_key("blocks.0.cross_attn.norm_k.weight") == "blocks.0.attn2.norm_k.weight"
    assert convert_key("blocks.1.norm3.bias") == "blocks.1.norm2.bias"
    assert convert_key("blocks.1.ffn.0.weight") == "blocks.1.ffn.net.0.proj.weight"
    assert convert_key("blocks.12.modulation") == "blocks.12.scale_shift_table"
    assert convert_key("head.modulation") == "scale_shift_table"
    assert convert_key("time_projection.1.bias") == "condition_embedder.time_proj.bias"
    assert convert_key("blocks.0.self_attn.k_img.weight") is None  # i2v only: not for T2V
    assert strip_prefix("_orig_mod.model.head.head.weight") == "head.head.weight"


def test_load_synthetic_checkpoint_with_model_prefix():
    model = build_tiny_random()
    sd = original_wan_state(model.cfg)
    ckpt = {"generator": {f"model.{k}": v * 0 for k, v in sd.items()},
            "generator_ema": {f"model.{k}": v for k, v in sd.items()}, "step": torch.tensor(7)}
    assert load_generator_weights(model, ckpt) == "generator_ema"
    tr = model.transformer
    assert torch.equal(tr.blocks[1].attn1.to_out[0].weight, sd["blocks.1.self_attn.o.weight"])
    assert torch.equal(tr.blocks[0].norm2.weight, sd["blocks.0.norm3.weight"])
    assert torch.equal(tr.blocks[1].attn2.norm_q.weight, sd["blocks.1.cross_attn.norm_q.weight"])
    assert torch.equal(tr.scale_shift_table, sd["head.modulation"])
    assert torch.equal(tr.condition_embedder.text_embedder.linear_2.bias, sd["text_embedding.2.bias"])
    assert load_generator_weights(model, ckpt, prefer_ema=False) == "generator"
    assert tr.proj_out.weight.abs().sum() == 0
    converted, unknown = convert_state_dict(sd)
    assert not unknown and set(converted) == set(tr.state_dict())


def test_loader_names_missing_and_unexpected_keys(tmp_path):
    model = build_tiny_random()
    sd = original_wan_state(model.cfg)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.self_attn.k_img.weight"] = torch.zeros(1)
    sd["lora_A.weight"] = torch.zeros(1)
    with pytest.raises(WanLoadError) as e:
        load_generator_weights(model, {"generator_ema": sd})
    msg = str(e.value)
    assert "1 missing: blocks.1.ffn.net.2.bias" in msg
    assert "2 unexpected: blocks.0.self_attn.k_img.weight, lora_A.weight" in msg
    sd = original_wan_state(build_tiny_random(head_dim=12).cfg)  # other width
    with pytest.raises(WanLoadError, match="wrong shape: patch_embedding.weight"):
        load_generator_weights(model, {"generator": sd})
    with pytest.raises(WanLoadError, match="no generator weights"):
        load_generator_weights(model, {"optimizer": {"lr": 1}})
    path = tmp_path / "ckpt.pt"
    torch.save({"generator_ema": original_wan_state(model.cfg, seed=5)}, path)
    assert load_generator_weights(model, path) == "generator_ema"


def test_load_wan_errors(tmp_path, monkeypatch):
    with pytest.raises(WanLoadError, match="checkpoint not found"):
        load_wan(str(tmp_path / "missing.pt"))
    ckpt = tmp_path / "self_forcing_dmd.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.delenv("FFVIZ_WAN_BASE", raising=False)
    with pytest.raises(WanLoadError, match="text_encoder/, tokenizer/ and vae/"):
        load_wan(str(ckpt))
    for d in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WanLoadError, match="no GPU"):
        load_wan(str(ckpt))
    with pytest.raises(ModelError, match="unknown model"):
        load_model("wan:")


def test_streaming_vae_decode_equals_full_decode(model):
    """Chunk-by-chunk decoding keeps the causal VAE's state: same video as one decode."""
    from ffviz.models.wan import StreamingVAEDecoder
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    stream = StreamingVAEDecoder(vae)
    z = torch.randn(1, 16, 4, 4, 4)
    with torch.no_grad():
        full = vae.decode(z * stream.std + stream.mean, return_dict=False)[0]
    parts = [stream.decode(z[:, :, :2], restart=True), stream.decode(z[:, :, 2:], restart=False)]
    assert parts[0].shape[2] == 1 + 4 and parts[1].shape[2] == 8
    assert torch.allclose(torch.cat(parts, 2), full, atol=1e-5)
    again = stream.decode(z[:, :, :2], restart=True)  # a new video starts over
    assert torch.allclose(again, parts[0], atol=1e-6)


def _tiny_base(root):
    """A base folder shaped like Wan-AI/Wan2.1-T2V-1.3B-Diffusers, with tiny models."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=8, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)).save_pretrained(
        root / "text_encoder")
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).save_pretrained(root / "vae")


def test_checkpoint_path_end_to_end_on_a_tiny_wan(tmp_path):
    """load_wan's real path (checkpoint + text encoder + VAE from a base folder),
    with a tiny config on CPU, then a run: frames come out of the VAE."""
    from ffviz.models.wan import tiny_random_config
    from ffviz.run import run
    _tiny_base(tmp_path)
    cfg = tiny_random_config()
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in original_wan_state(cfg).items()}}, ckpt)
    model = load_wan(str(ckpt), device="cpu", dtype=torch.float32, cfg=cfg, allow_cpu=True)
    emb = model.encode_prompt("a cat")
    assert emb.shape == (1, cfg.text_len, cfg.text_dim)
    assert emb[0, 2:].abs().sum() == 0 and emb[0, :2].abs().sum() > 0  # zero after the prompt
    summary = run(model, RunSettings("a dog", frames=6, seed=0, steps=1), Controls("window", 3),
                  tmp_path / "run")
    frames = __import__("numpy").load(tmp_path / "run" / "frames.npz")["frames"]
    assert frames.shape == (1 + 4 * 5, 64, 64, 3)  # VAE: 1 + 4 (T - 1) frames at 8x latent size
    assert summary["frames"] == 21 and summary["metrics"]["computed"] is False


def test_deepcopy_keeps_processors_wired_to_the_copy(model):
    """The app runs every session on a deep copy: its hooks must be the copy's own."""
    import copy
    c = copy.deepcopy(model)
    proc = c.transformer.blocks[1].attn1.processor
    assert proc.hooks is c.blocks[1].attn and proc.state is c._state
    seen = []
    hooks = Hooks(c)
    hooks.add("blocks.1.attn.hook_q_pre", lambda x, hook: seen.append(x.shape))
    n = model.cfg.tokens_per_frame
    args = (torch.randn(1, 3 * n, model.cfg.patch_dim), torch.full((1, 3), 0.5), torch.arange(3),
            model.encode_prompt("z"))
    assert torch.equal(model(*args), c(*args)) and len(seen) == 1


# -- LoRA-only checkpoints (LongLive) ----------------------------------------------------

def _lora_for(sd, rank=3, seed=1, modules=None):
    """A peft-style LoRA state dict (LongLive's ``lora.pt`` layout) on every Linear of
    the attention blocks of ``sd`` (original Wan names)."""
    g = torch.Generator().manual_seed(seed)
    modules = modules or [k[:-len(".weight")] for k in sd if k.startswith("blocks.")
                          and k.endswith(".weight") and sd[k].dim() == 2]
    out = {}
    for m in modules:
        o, i = sd[f"{m}.weight"].shape
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, rank, generator=g)
    return out


def test_lora_merges_into_the_base_weights():
    from ffviz.models.wan_lora import merge_lora
    model = build_tiny_random()
    sd = original_wan_state(model.cfg)
    lora = _lora_for(sd, rank=3)
    n = sum(1 for k in lora if "lora_A" in k)
    assert n == model.cfg.layers * 10  # self/cross q, k, v, o and ffn.0, ffn.2 per block
    base = {f"model.{k}": v for k, v in sd.items()}
    where = load_generator_weights(model, {"generator": base}, lora={"generator_lora": lora},
                                   lora_alpha=6.0)
    assert where == f"generator + LoRA (generator_lora), {n} modules merged"
    A = lora["base_model.model.blocks.1.self_attn.q.lora_A.weight"]
    B = lora["base_model.model.blocks.1.self_attn.q.lora_B.weight"]
    want = sd["blocks.1.self_attn.q.weight"] + 2.0 * B @ A  # alpha / r = 6 / 3
    assert torch.allclose(model.transformer.blocks[1].attn1.to_q.weight, want, atol=1e-5)
    A = lora["base_model.model.blocks.0.ffn.2.lora_A.weight"]
    B = lora["base_model.model.blocks.0.ffn.2.lora_B.weight"]
    assert torch.allclose(model.transformer.blocks[0].ffn.net[2].weight,
                          sd["blocks.0.ffn.2.weight"] + 2.0 * B @ A, atol=1e-5)
    assert torch.equal(model.transformer.blocks[0].attn1.to_q.bias, sd["blocks.0.self_attn.q.bias"])
    merged, _ = merge_lora(sd, lora)  # default alpha = r: scale 1 (LongLive: rank 256, alpha 256)
    assert torch.allclose(merged["blocks.0.ffn.2.weight"], sd["blocks.0.ffn.2.weight"] + B @ A, atol=1e-5)
    assert merged["blocks.0.ffn.2.weight"] is not sd["blocks.0.ffn.2.weight"]  # the base is not modified


def test_a_peft_wrapped_checkpoint_is_merged_too():
    """A generator saved from a peft-wrapped model (base_layer + lora factors) loads as
    the merged model."""
    model = build_tiny_random()
    sd = original_wan_state(model.cfg)
    lora = _lora_for(sd, rank=2, modules=["blocks.0.self_attn.k"])
    wrapped = {("base_model.model." + k).replace("self_attn.k.weight", "self_attn.k.base_layer.weight"): v
               for k, v in sd.items()}
    wrapped.update(lora)
    assert "its own LoRA, 1 modules merged" in load_generator_weights(model, {"generator": wrapped})
    A, B = (lora[f"base_model.model.blocks.0.self_attn.k.lora_{f}.weight"] for f in "AB")
    assert torch.allclose(model.transformer.blocks[0].attn1.to_k.weight,
                          sd["blocks.0.self_attn.k.weight"] + B @ A, atol=1e-5)


def test_lora_errors_name_what_does_not_fit(tmp_path):
    model = build_tiny_random()
    sd = original_wan_state(model.cfg)
    lora = _lora_for(sd)
    with pytest.raises(WanLoadError, match="modules not in the base checkpoint: blocks.7.ffn.0"):
        load_generator_weights(model, {"generator": sd}, lora={
            **lora, "base_model.model.blocks.7.ffn.0.lora_A.weight": torch.zeros(3, 4),
            "base_model.model.blocks.7.ffn.0.lora_B.weight": torch.zeros(4, 3)})
    bad = dict(lora)
    bad["base_model.model.blocks.0.self_attn.q.lora_B.weight"] = torch.zeros(5, 3)
    with pytest.raises(WanLoadError, match="shapes that do not fit: blocks.0.self_attn.q"):
        load_generator_weights(model, {"generator": sd}, lora=bad)
    half = {k: v for k, v in lora.items() if "blocks.1.ffn.0.lora_B" not in k}
    with pytest.raises(WanLoadError, match="lack lora_A or lora_B: blocks.1.ffn.0"):
        load_generator_weights(model, {"generator": sd}, lora=half)
    with pytest.raises(WanLoadError, match="no LoRA weights found"):
        load_generator_weights(model, {"generator": sd}, lora={"optimizer": {"lr": 1}})
    with pytest.raises(WanLoadError, match="LoRA file not found"):
        load_wan(str(tmp_path / "base.pt") + "+" + str(tmp_path / "lora.pt"))


def test_base_plus_lora_end_to_end_on_a_tiny_wan(tmp_path):
    """wan:BASE+LORA through load_wan's real path, files on disk as LongLive ships them."""
    from ffviz.models.wan import tiny_random_config
    _tiny_base(tmp_path)
    cfg = tiny_random_config()
    sd = original_wan_state(cfg)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()},  # the LoRA's base (use_ema: false)
                "generator_ema": {f"model.{k}": v * 0 for k, v in sd.items()}}, tmp_path / "longlive_base.pt")
    lora = _lora_for(sd, rank=2)
    torch.save({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    model = load_wan(f"{tmp_path / 'longlive_base.pt'}+{tmp_path / 'lora.pt'}", device="cpu",
                     dtype=torch.float32, cfg=cfg, allow_cpu=True)
    assert model.name == "wan:longlive_base.pt+lora.pt"
    A, B = (lora[f"base_model.model.blocks.0.cross_attn.v.lora_{f}.weight"] for f in "AB")
    assert torch.allclose(model.transformer.blocks[0].attn2.to_v.weight,
                          sd["blocks.0.cross_attn.v.weight"] + B @ A, atol=1e-5)
