"""LoRA-only checkpoints (LongLive): the adapter is merged into the base generator.

LongLive ships its generator as two files: a base checkpoint (``longlive_base.pt``,
a Self-Forcing-family checkpoint like any other) and a LoRA file (``lora.pt``: a
peft state dict, under ``generator_lora`` or at the top level). Its adapter sits
on every Linear of every attention block (self- and cross-attention q, k, v, o;
ffn.0, ffn.2), and peft names the two factors of a module ``M`` as

    base_model.model.M.lora_A.weight   A (r, in)
    base_model.model.M.lora_B.weight   B (out, r)

The merged weight is ``W + (alpha / r) B A``. peft keeps ``alpha`` in its config,
not in the weights; LongLive trains rank 256 with alpha 256 (scale 1), the default
here (alpha = r). A file that stores alpha per module (``M.alpha``, kohya style)
uses it; ``alpha=`` overrides both. Merging happens on the ORIGINAL Wan names,
before ``wan_convert`` renames them, so the loader's key checks see the merged
state dict exactly as they see any other checkpoint.

A checkpoint saved from a peft-wrapped model as a whole (``M.base_layer.weight``
next to the LoRA factors) is merged the same way.
"""
from __future__ import annotations

import re

import torch

from ffviz.models.wan_convert import strip_prefix

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[A-Za-z_]\w*))?\.weight$")
ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")


class LoraError(ValueError):
    """A LoRA file that cannot be merged into the base weights."""


def _name(key: str) -> str:
    """A module path without peft's and the training wrappers' prefixes."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    return strip_prefix(key)


def is_lora_key(key: str) -> bool:
    return bool(LORA_KEY.match(key) or ALPHA_KEY.match(key))


def pick_lora(checkpoint) -> tuple[dict, str]:
    """The adapter's state dict in a LoRA file: the ``generator_lora`` entry (LongLive),
    or the file itself when its keys are LoRA factors. Raises ``LoraError`` otherwise."""
    if not isinstance(checkpoint, dict):
        raise LoraError(f"LoRA file holds a {type(checkpoint).__name__}, not a dict of weights")
    if isinstance(checkpoint.get("generator_lora"), dict):
        return checkpoint["generator_lora"], "generator_lora"
    if checkpoint and any(LORA_KEY.match(k) for k in checkpoint):
        return checkpoint, "top level"
    raise LoraError("no LoRA weights found: expected a 'generator_lora' entry or keys like "
                    f"'...lora_A.weight', got {sorted(checkpoint)[:8]}")


def lora_factors(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{module: (A, B, alpha or None)} from a peft-style state dict; ``LoraError`` for
    a factor without its partner, several adapters, or a key that is not LoRA."""
    parts: dict[str, dict] = {}
    adapters, stray = set(), []
    for key, value in state.items():
        m = LORA_KEY.match(key)
        if m:
            adapters.add(m["adapter"])
            parts.setdefault(_name(m["module"]), {})[m["factor"]] = value
            continue
        m = ALPHA_KEY.match(key)
        if m:
            parts.setdefault(_name(m["module"]), {})["alpha"] = float(torch.as_tensor(value).item())
            continue
        stray.append(key)
    if stray:
        raise LoraError(f"{len(stray)} keys are not LoRA factors: {', '.join(stray[:8])}")
    if len(adapters) > 1:
        raise LoraError(f"several adapters in one file ({', '.join(sorted(map(str, adapters)))}); "
                        "save one")
    half = [m for m, p in parts.items() if not ("A" in p and "B" in p)]
    if half:
        raise LoraError(f"{len(half)} modules lack lora_A or lora_B: {', '.join(sorted(half)[:8])}")
    return {m: (p["A"], p["B"], p.get("alpha")) for m, p in parts.items()}


def merge_lora(base: dict, lora: dict, alpha: float | None = None) -> tuple[dict, int]:
    """``base`` (original Wan names, any wrapper prefix) with ``W += (alpha / r) B A`` for
    every LoRA module in ``lora``; returns (merged state dict, modules merged).

    The merged tensors keep the base dtype (the product is formed in float32).
    ``LoraError`` names every module the base does not have and every shape that
    does not fit, so a LoRA for another model never half-applies.
    """
    factors = lora_factors(lora)
    if not factors:
        raise LoraError("the LoRA file has no factors")
    where = {_name(k): k for k in base}
    unknown, bad = [], []
    merged = dict(base)
    for module, (A, B, file_alpha) in sorted(factors.items()):
        key = where.get(f"{module}.weight")
        if key is None:
            unknown.append(module)
            continue
        W = base[key]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or (B.shape[0], A.shape[1]) != tuple(W.shape):
            bad.append(f"{module} (A {tuple(A.shape)}, B {tuple(B.shape)}, weight {tuple(W.shape)})")
            continue
        a = alpha if alpha is not None else (file_alpha if file_alpha is not None else r)
        delta = (a / r) * (B.float() @ A.float())
        merged[key] = (W.float() + delta.to(W.device)).to(W.dtype)
    if unknown or bad:
        parts = [f"{len(unknown)} modules not in the base checkpoint: {', '.join(unknown[:8])}"] if unknown else []
        parts += [f"{len(bad)} shapes that do not fit: {'; '.join(bad[:4])}"] if bad else []
        raise LoraError("LoRA does not fit the base generator: " + "; ".join(parts))
    return merged, len(factors)


def split_peft_model(state: dict) -> tuple[dict, dict]:
    """A state dict saved from a peft-wrapped model as a whole -> (base weights with
    ``base_layer`` folded back into the module names, LoRA factors). A plain state
    dict gives (itself, {})."""
    base, lora = {}, {}
    for key, value in state.items():
        if is_lora_key(key):
            lora[key] = value
        else:
            key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            base[key.replace(".base_layer.", ".")] = value
    return base, lora
