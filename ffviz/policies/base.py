"""The policy interface: a small dataclass per policy over this base class.

A policy looks at the cache after a chunk was written and returns a
``Decision`` that brings every head down to ``budget_tokens`` tokens (or None
when the cache already fits). Parameters are dataclass fields, validated in
``__post_init__`` (the ``check_*`` helpers here) with a message that names the
parameter and its range.

Besides the interface, what several scores share: the softmax attention share
(``attention_share``), the future query positions and their rotations
(``future_positions``, ``rotate``, ``plane_matrix``), and ``keep_newest``.
Selection and protection live in ``scored``, merging in ``merge``.
Shapes: B batch (1 in generation), H heads, N cached tokens, K = budget, d head dim.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ffviz.cache import Decision, KVCache, LayerCache, LayerDecision
from ffviz.models.rope import apply_rotation


class PolicyError(ValueError):
    """A policy name or parameter that cannot be used."""


@dataclasses.dataclass
class PolicyContext:
    """What a policy may read besides the cache.

    frame: newest frame index in the cache (the chunk just written ends here)
    tokens_per_frame, grid (rows, cols), chunk_frames: the model's geometry
    rope: the model's ``Rope3D`` (rotate proxies to future positions, re-rotate keys)
    stats: ``QueryStats`` of pre-RoPE queries of every denoising step so far
        (this chunk included), per layer and head
    chunk_queries: per layer, post-RoPE queries (B, H, n, d) of the last
        denoising step of the chunk just generated (SnapKV, H2O, Deep Forcing)
    future_queries: for the offline oracle only: ``callable(layer) -> (B, H, m, d)``,
        the true post-RoPE queries of the next frames from a full-cache run
    """
    frame: int
    tokens_per_frame: int
    chunk_frames: int
    grid: tuple[int, int] = (8, 8)
    rope: object | None = None
    stats: object | None = None
    chunk_queries: list | None = None
    future_queries: object | None = None


@dataclasses.dataclass
class Policy:
    name: ClassVar[str] = "base"
    holds_budget: ClassVar[bool] = True  # False only for the full cache
    offline: ClassVar[bool] = False  # True when it needs a reference run (the oracle)

    def __post_init__(self):
        """Subclasses check their parameters here (``PolicyError`` naming the range)."""

    def compress(self, cache: KVCache, budget_tokens: int, ctx: PolicyContext) -> Decision | None:
        raise NotImplementedError

    def params(self) -> dict:
        """The parameters (init fields only; internal state is left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def report(self) -> dict | None:
        """What the policy found out during the run, for its summary (Forcing-KV: where
        its head roles came from); None when it has nothing to say."""
        return None

    def prompt_switched(self, stats) -> None:
        """The run's prompt changed (``ffviz.generate.PromptSwitch``); ``stats`` are the
        run's query statistics. Policies that read them decide what becomes of them
        (``StatisticsAtSwitch``); the rest have nothing to do."""


SWITCH_RULES = ("carry", "reset", "decay")


@dataclasses.dataclass
class StatisticsAtSwitch:
    """For policies that read the run's query statistics: at a prompt switch they
    carry on, reset (the new prompt's queries alone from then on) or decay (older
    frames' weight halves every ``switch_half_life`` frames from then on)."""
    on_switch: str = "carry"
    switch_half_life: float = 8.0

    def check_switch_rule(self) -> None:
        check_choice("on_switch", self.on_switch, SWITCH_RULES)
        check_range("switch_half_life", self.switch_half_life, 0.5, 10_000.0, kind=float)

    def prompt_switched(self, stats) -> None:
        if stats is not None:
            stats.prompt_switched(self.on_switch, self.switch_half_life)


# -- parameter and context checks ---------------------------------------------

def check_range(name: str, value, lo, hi=None, kind=int) -> None:
    """Raise ``PolicyError`` unless lo <= value (<= hi) and value is a ``kind``."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        kind_name = "a number" if kind is float else "an integer"
        raise PolicyError(f"{name} must be {kind_name}, got {value!r}")
    if not (value >= lo and (hi is None or value <= hi)):  # NaN fails too
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise PolicyError(f"{name} must be {rng}, got {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise PolicyError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise PolicyError(f"{name} must be true or false, got {value!r}")


def need(ctx: PolicyContext, name: str, *fields: str) -> None:
    """Raise ``PolicyError`` if the context lacks what policy ``name`` reads."""
    for f in fields:
        if getattr(ctx, f) is None:
            raise PolicyError(f"policy {name!r} needs ctx.{f}, which this run does not provide")


# -- what several policies share ----------------------------------------------

def keep_newest(cache: KVCache, budget_tokens: int) -> Decision:
    """Keep the newest ``budget_tokens`` tokens of every head (by source frame,
    then cache order; a dead slot's frame is the oldest), for every layer."""
    layers = []
    for layer in cache.layers:
        B, H, N = layer.frame.shape
        # order key: newer frames last; within a frame, cache order
        key = layer.frame.double() * (N + 1) + torch.arange(N, dtype=torch.float64,
                                                            device=layer.frame.device)
        keep = key.topk(budget_tokens, dim=-1).indices.sort(-1).values
        layers.append(LayerDecision(keep=keep))
    return Decision(layers)


def attention_share(q: torch.Tensor, layer: LayerCache, chunk: int = 4096) -> torch.Tensor:
    """Attention every cached token gets from queries q (B, H, m, d), post-RoPE,
    as the model computes it (softmax of q.k'/sqrt(d) + log mass over the cached
    tokens), summed over the m queries: (B, H, N) float32. 0 when m = 0."""
    d = layer.k.shape[-1]
    q = q.to(layer.k.device)
    logm = layer.mass.float().log().unsqueeze(-2)  # -inf for a dead slot: no share at all
    out = layer.k.new_zeros(layer.k.shape[:3], dtype=torch.float32)
    for i in range(0, q.shape[2], chunk):
        z = q[:, :, i:i + chunk].float() @ layer.k.float().transpose(-1, -2) / math.sqrt(d) + logm
        out += torch.nan_to_num(z.softmax(-1), nan=0.0).sum(-2)
    return out


def future_positions(ctx: PolicyContext, horizon: int, stride: int = 1):
    """Proxy positions (f, y, x), each (P,) long: the next ``horizon`` frames at every
    ``stride``-th row and column of the grid, starting at stride // 2 (stride 1 =
    every position; a stride past the grid leaves its centre)."""
    rows, cols = ctx.grid
    axis = lambda n: (torch.arange(stride // 2, n, stride) if stride // 2 < n
                      else torch.tensor([n // 2]))
    ys, xs = axis(rows), axis(cols)
    f = torch.arange(ctx.frame + 1, ctx.frame + 1 + horizon)
    f, y, x = torch.meshgrid(f, ys, xs, indexing="ij")
    return f.flatten(), y.flatten(), x.flatten()


def plane_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The (d, d) block-diagonal matrix with planes [[cos, -sin], [sin, cos]] from
    cos, sin (d/2,): ``x @ plane_matrix(c, s).T == apply_rotation(x, c, s)``, also
    for an average of rotations (Rbar), which is not a rotation."""
    h = cos.shape[-1]
    m = torch.zeros(2 * h, 2 * h, dtype=cos.dtype, device=cos.device)
    i = torch.arange(h, device=cos.device)
    m[2 * i, 2 * i], m[2 * i, 2 * i + 1] = cos, -sin
    m[2 * i + 1, 2 * i], m[2 * i + 1, 2 * i + 1] = sin, cos
    return m


def rotate(v: torch.Tensor, rope, f, y, x) -> torch.Tensor:
    """Pre-RoPE vectors v (..., d) at positions (P,) -> post-RoPE (..., P, d)."""
    cos, sin = rope.cos_sin(f, y, x, dtype=v.dtype)  # on the host (Rope3D)
    return apply_rotation(v.unsqueeze(-2), cos.to(v.device), sin.to(v.device))
