"""The model interface, and the one place models are loaded by name.

Two models implement ``VideoModel``: the embedded ``TinyVideoModel``
(``models/tiny.py``, pixels, a scene grammar) and ``WanCausalModel``
(``models/wan.py``, Wan2.1 latents, free text). Everything else (generation, the
cache, the policies, the recorder, the app) uses only what is declared here.

``load_model(name)`` reads a name as the CLI's ``--model`` and the app's
``FFVIZ_MODELS`` give it: ``tiny``, ``tiny:PATH`` (other weights for the embedded
model) or ``wan:SPEC`` (see ``models.wan.load_wan``). Each family is imported only
when asked for: the tiny path never imports diffusers.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ffviz.cache import KVCache
    from ffviz.hooks import HookContext
    from ffviz.models.rope import Rope3D


class ModelError(RuntimeError):
    """A model that cannot be named, built or loaded (the message says why)."""


class ModelConfig(Protocol):
    """Geometry and sampling defaults (``TinyConfig``, ``WanConfig``)."""
    layers: int
    heads: int
    chunk_frames: int  # frames denoised together (the block-causal unit)
    given_frames: int  # frames rendered from the prompt's scene before generation (0: none)
    sample_steps: int
    shift: float
    context_noise: float
    prediction: str  # what the network predicts: "x0" (clean tokens) or "v" (velocity)
    snap: bool  # snap generated frames to the scene's palette (scene models only)

    @property
    def grid(self) -> tuple[int, int]: ...  # token rows, columns of a frame

    @property
    def tokens_per_frame(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def patch_dim(self) -> int: ...


class VideoModel(Protocol):
    """What generation and everything around it may use of a model."""
    cfg: ModelConfig
    name: str  # as a run's summary names it
    fps: int  # frame rate of its decoded video
    has_scenes: bool  # True: the prompt is the scene grammar (given frames, scene metrics)
    clamp_tokens: bool  # True: tokens are pixels and generated ones are clamped to [-1, 1]
    hook_ctx: HookContext  # what the hook points ``blocks.{i}.attn.hook_*`` report
    rope: Rope3D

    def new_cache(self) -> KVCache: ...

    def embed_condition(self, cond_ids: torch.Tensor) -> torch.Tensor:
        """Conditioning from scene ids (``SceneSpec.condition_ids``); scene models only."""

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Conditioning from free text; models without scenes only."""

    def patchify(self, frames: torch.Tensor) -> torch.Tensor: ...

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, frames: torch.Tensor | None = None) -> np.ndarray:
        """uint8 video frames (T', H, W, 3) of batch element 0 of ``tokens``."""

    def __call__(self, x, t, frames, cond, prev=None, cache=None, write=False, mask=None,
                 phase="train", step=-1) -> torch.Tensor: ...

    def parameters(self): ...


MODEL_NAMES_HELP = "tiny | tiny:PATH (other weights for the embedded model) | wan:SPEC"


def has_scenes(name: str) -> bool:
    """Whether the model ``name`` reads the scene grammar, known before loading it."""
    return name.partition(":")[0] == "tiny"


def load_model(name: str = "tiny") -> VideoModel:
    """The model behind ``name`` (see the module docstring), in eval mode."""
    kind, _, spec = name.partition(":")
    if kind == "tiny":
        from ffviz.weights import DEFAULT_WEIGHTS, load_tiny
        return load_tiny(Path(spec) if spec else DEFAULT_WEIGHTS)[0]
    if kind == "wan" and spec:
        from ffviz.models.wan import load_wan
        return load_wan(spec)
    raise ModelError(f"unknown model {name!r}: use {MODEL_NAMES_HELP} (e.g. wan:tiny-random)")
