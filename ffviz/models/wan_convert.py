"""Original Wan2.1 key names -> diffusers' ``WanTransformer3DModel`` key names.

Self-Forcing-family checkpoints (Self-Forcing, CausVid, LongLive, Rolling- and
Reward-Forcing) save the generator as a plain state dict in the ORIGINAL Wan
names (``wan/modules/model.py``), usually under ``generator_ema`` and/or
``generator`` and with a ``model.`` prefix (their wrapper holds the Wan model as
``self.model``). This module renames them, one explicit rule per parameter
family, so that every key is either mapped or reported, never silently kept:

    original (per block i)            diffusers
    patch_embedding.{weight,bias}     patch_embedding.*            (Conv3d 1x2x2, same shape)
    text_embedding.0 / .2             condition_embedder.text_embedder.linear_1 / linear_2
    time_embedding.0 / .2             condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                 condition_embedder.time_proj
    blocks.i.self_attn.{q,k,v}        blocks.i.attn1.to_{q,k,v}
    blocks.i.self_attn.o              blocks.i.attn1.to_out.0
    blocks.i.self_attn.norm_{q,k}     blocks.i.attn1.norm_{q,k}    (RMSNorm over all heads)
    blocks.i.cross_attn.*             blocks.i.attn2.*             (same sub-names as above)
    blocks.i.norm3                    blocks.i.norm2               (the cross-attention norm:
                                                                    Wan calls it norm3, diffusers norm2)
    blocks.i.ffn.0 / .2               blocks.i.ffn.net.0.proj / ffn.net.2
    blocks.i.modulation               blocks.i.scale_shift_table   (1, 6, dim)
    head.head                         proj_out
    head.modulation                   scale_shift_table            (1, 2, dim)

Wan's ``norm1``/``norm2`` of a block and the head's norm have no weights
(LayerNorm without affine), and its RoPE ``freqs`` table is recomputed, so none
of them appear. Tensors are renamed, never reshaped: Wan and diffusers store the
same shapes, and both rotate interleaved pairs (see ``ffviz/models/wan.py``).
"""
from __future__ import annotations

import re

# wrappers that training code puts in front of the Wan names, stripped in this order
PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "model.diffusion_model.", "model.")
IGNORED = ("freqs",)  # buffers some copies of Wan save; recomputed here

_ATTN = r"(?P<sub>q|k|v|o|norm_q|norm_k)"
_ATTN_SUB = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0",
             "norm_q": "norm_q", "norm_k": "norm_k"}

RULES: list[tuple[re.Pattern, object]] = [
    (re.compile(r"^patch_embedding\.(weight|bias)$"), r"patch_embedding.\1"),
    (re.compile(r"^text_embedding\.0\.(weight|bias)$"), r"condition_embedder.text_embedder.linear_1.\1"),
    (re.compile(r"^text_embedding\.2\.(weight|bias)$"), r"condition_embedder.text_embedder.linear_2.\1"),
    (re.compile(r"^time_embedding\.0\.(weight|bias)$"), r"condition_embedder.time_embedder.linear_1.\1"),
    (re.compile(r"^time_embedding\.2\.(weight|bias)$"), r"condition_embedder.time_embedder.linear_2.\1"),
    (re.compile(r"^time_projection\.1\.(weight|bias)$"), r"condition_embedder.time_proj.\1"),
    (re.compile(rf"^blocks\.(?P<i>\d+)\.(?P<kind>self_attn|cross_attn)\.{_ATTN}\.(?P<p>weight|bias)$"),
     lambda m: (f"blocks.{m['i']}.{'attn1' if m['kind'] == 'self_attn' else 'attn2'}."
                f"{_ATTN_SUB[m['sub']]}.{m['p']}")),
    (re.compile(r"^blocks\.(\d+)\.norm3\.(weight|bias)$"), r"blocks.\1.norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.0\.(weight|bias)$"), r"blocks.\1.ffn.net.0.proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.2\.(weight|bias)$"), r"blocks.\1.ffn.net.2.\2"),
    (re.compile(r"^blocks\.(\d+)\.modulation$"), r"blocks.\1.scale_shift_table"),
    (re.compile(r"^head\.head\.(weight|bias)$"), r"proj_out.\1"),
    (re.compile(r"^head\.modulation$"), "scale_shift_table"),
]


def strip_prefix(key: str) -> str:
    """Remove the training wrappers' prefixes (``model.``, ``module.``, ...)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def convert_key(key: str) -> str | None:
    """The diffusers name of original Wan key ``key`` (prefix allowed), or None
    when no rule knows it."""
    k = strip_prefix(key)
    for pattern, repl in RULES:
        m = pattern.match(k)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def convert_state_dict(state: dict) -> tuple[dict, list[str]]:
    """Rename a state dict in original Wan names to diffusers names.

    Returns (converted, unknown): ``unknown`` lists the original keys that no
    rule maps (a wrong checkpoint, or a variant with extra modules), in order.
    Raises ValueError when two keys map to the same name (e.g. a checkpoint that
    holds both ``model.x`` and ``x``).
    """
    out, unknown, source = {}, [], {}
    for key, value in state.items():
        if strip_prefix(key) in IGNORED:
            continue
        new = convert_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"keys {source[new]!r} and {key!r} both map to {new!r}")
        out[new], source[new] = value, key
    return out, unknown


def pick_generator(checkpoint: dict, prefer_ema: bool = True) -> tuple[dict, str]:
    """The generator's state dict in a Self-Forcing-family checkpoint file.

    Looks for ``generator_ema`` then ``generator`` (the other order with
    ``prefer_ema=False``); a checkpoint that is already a flat state dict of
    tensors (e.g. a .safetensors export) is returned as is. Returns (state,
    where) with ``where`` naming the entry used. Raises ValueError otherwise.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint is a {type(checkpoint).__name__}, not a dict of weights")
    order = ("generator_ema", "generator") if prefer_ema else ("generator", "generator_ema")
    for name in order:
        if isinstance(checkpoint.get(name), dict):
            return checkpoint[name], name
    for name in ("state_dict", "model"):
        if isinstance(checkpoint.get(name), dict):
            return pick_generator(checkpoint[name], prefer_ema)[0], name
    if checkpoint and all(hasattr(v, "shape") for v in checkpoint.values()):
        return checkpoint, "top level"
    raise ValueError("no generator weights found: expected a 'generator_ema' or 'generator' "
                     f"entry, got top-level keys {sorted(checkpoint)[:8]}")
