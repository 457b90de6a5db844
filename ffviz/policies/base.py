"""The policy interface: a small dataclass per policy over this base class.

A policy looks at the cache after a chunk was written and returns a
``Decision`` that brings every head down to ``budget_tokens`` tokens (or None
when the cache already fits). Parameters are dataclass fields, validated in
``__post_init__`` with a message that names the parameter and its range.

The shared plumbing lives here, once: the protected-frame mask (sink and recent
frames), top-k under the budget with protected tokens kept first, the merge
assignment of evicted tokens to their nearest kept token, the future query
positions and the softmax attention share that several scores use.
Shapes: B batch (1 in generation), H heads, N cached tokens, K = budget, d head dim.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch

from ffviz import kernels
from ffviz.cache import Decision, KVCache, LayerCache, LayerDecision, take_rows
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
        self.validate()

    def validate(self) -> None:
        """Raise ``PolicyError`` for a bad parameter value."""

    def compress(self, cache: KVCache, budget_tokens: int, ctx: PolicyContext) -> Decision | None:
        raise NotImplementedError

    def params(self) -> dict:
        """The parameters (init fields only; internal state is left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


# -- parameter checks ---------------------------------------------------------

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


def check_fits(what: str, frames: int, budget_tokens: int, tokens_per_frame: int) -> None:
    """A protected set of ``frames`` frames must fit the budget (``what`` names the parameters)."""
    if frames * tokens_per_frame > budget_tokens:
        raise PolicyError(f"{what} = {frames} protected frames do not fit the budget of "
                          f"{budget_tokens // tokens_per_frame} frames; lower them or raise "
                          f"the budget")


# -- selection and merging ----------------------------------------------------

def protected_mask(frame: torch.Tensor, ctx: PolicyContext, n_sink: int, n_recent: int,
                   budget_tokens: int | None = None, what: str = "n_sink + n_recent") -> torch.Tensor:
    """frame (..., N) source frames -> (..., N) True for tokens of the first
    ``n_sink`` frames and of the newest ``n_recent`` (frame > ctx.frame - n_recent).
    With ``budget_tokens``, first check that the protected frames fit (``check_fits``)."""
    if budget_tokens is not None:
        check_fits(what, n_sink + n_recent, budget_tokens, ctx.tokens_per_frame)
    return (frame < n_sink) | (frame > ctx.frame - n_recent)


def select(score: torch.Tensor, budget: int, frame: torch.Tensor,
           protected: torch.Tensor | None = None, what: str = "n_sink + n_recent") -> torch.Tensor:
    """Indices (..., K) ascending of the tokens to keep, K = min(budget, N).

    score, frame (source frames), protected: (..., N), e.g. (B, H, N) or stacked
    layers (L, B, H, N). Order: protected tokens first, then by ``score``, ties
    to the newer source frame, then the later cache slot. Non-finite scores rank last.
    """
    K = min(budget, score.shape[-1])
    return rank(score, budget, frame, protected, what)[..., :K].sort(-1).values


def rank(score: torch.Tensor, budget: int, frame: torch.Tensor,
         protected: torch.Tensor | None = None, what: str = "n_sink + n_recent") -> torch.Tensor:
    """Every token's cache index (..., N), best first in ``select``'s order: the first
    K = min(budget, N) are the kept ones, the rest the evicted ones (a policy that
    merges gets both from one sort). Raises when protected tokens exceed the budget."""
    N = score.shape[-1]
    K = min(budget, N)
    if protected is not None:
        most = int(protected.sum(-1).max())
        if most > K:
            raise PolicyError(f"{what}: {most} protected tokens in one head exceed the budget "
                              f"of {K}")
    s = score.float()
    if not torch.isfinite(s).all():
        warnings.warn("policy score had non-finite values; they rank last", RuntimeWarning)
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, -math.inf))
    if protected is not None:
        s = s.masked_fill(protected, math.inf)  # first; among them, the tie-break below
    stable_desc = lambda t: torch.sort(t, stable=True, dim=-1, descending=True).indices
    if bool((frame[..., 1:] >= frame[..., :-1]).all()):  # cache order is frame order (as appended)
        return (N - 1) - stable_desc(s.flip(-1))  # ties: the later slot first
    order = stable_desc(frame.double() * (N + 1)
                        + torch.arange(N, dtype=torch.float64, device=frame.device))
    return order.gather(-1, stable_desc(s.gather(-1, order)))


def merge_to_nearest(k: torch.Tensor, keep: torch.Tensor, metric: torch.Tensor | None,
                     tau: float, factor: torch.Tensor | None = None,
                     gone: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge assignment of every evicted token to its nearest kept token.

    k: (..., N, d) keys, e.g. (B, H, N, d) or stacked layers (L, B, H, N, d);
    keep: (..., K); metric: PSD matrices M (..., d, d) broadcasting against k's
    leading dims (None = identity). D(a, b) = (k_a - k_b)^T M (k_a - k_b) / d. A token merges
    into its nearest kept token when tau > 0, the head's median nearest-D over
    evicted tokens is > 0, and D <= tau * median. The search is the
    ``kernels.merge_neighbour`` dispatch (Triton on CUDA, PyTorch elsewhere).
    factor: F (..., R, d) with M = F^T F, instead of ``metric``. With R < d the
    search runs on the projections F k (R coordinates, identity metric): the same
    D = |F (k_a - k_b)|^2 / d for fewer operations.
    gone: the evicted indices (..., N - K) in any order, when the caller has them
    (``rank``); otherwise they are found from ``keep``.
    Returns merge_into (..., N) long (-1 = none) and distance (..., N): the
    nearest-D for evicted tokens, 0 for kept ones.
    """
    *lead, N, d = k.shape
    K = keep.shape[-1]
    dev = k.device
    keep = keep.to(dev)
    merge_into = torch.full((*lead, N), -1, dtype=torch.long, device=dev)
    distance = torch.zeros(*lead, N, dtype=k.dtype, device=dev)
    if K == N or K == 0:
        return merge_into, distance
    if gone is None:
        kept = torch.zeros(*lead, N, dtype=torch.bool, device=dev).scatter_(-1, keep, True)
        gone = torch.arange(N, device=dev).expand(*lead, N)[~kept].view(*lead, N - K)  # each head evicts N - K
    gone = gone.to(dev)
    if factor is not None and factor.shape[-2] < d:  # search in the R projected coordinates
        R = factor.shape[-2]
        y = k.float() @ factor.to(dev, torch.float32).transpose(-1, -2)  # (..., N, R), float32
        M = torch.eye(R, dtype=torch.float32, device=dev) * (R / d)  # the kernel divides by R
        M, x, width = M.expand(math.prod(lead), R, R), y, R
    else:
        if factor is not None:
            metric = factor.transpose(-1, -2) @ factor
        M = torch.eye(d, dtype=k.dtype, device=dev) if metric is None else metric.to(dev)
        M, x, width = M.expand(*lead, d, d).reshape(-1, d, d), k, d
    gather = lambda idx: take_rows(x, idx).reshape(-1, idx.shape[-1], width)
    dmin, j = kernels.merge_neighbour(gather(gone), gather(keep), M)
    dmin = torch.nan_to_num(dmin.view(*lead, N - K).to(k.dtype), nan=math.inf)
    nearest = keep.gather(-1, j.view(*lead, N - K))  # kept-list index -> cache index
    distance.scatter_(-1, gone, torch.nan_to_num(dmin, posinf=0.0))
    if tau > 0:
        med = dmin.median(-1, keepdim=True).values
        ok = (dmin <= tau * med) & (med > 0) & torch.isfinite(dmin)
        merge_into.scatter_(-1, gone, torch.where(ok, nearest, torch.full_like(nearest, -1)))
    return merge_into, distance


def keep_newest(cache: KVCache, budget_tokens: int) -> Decision:
    """Keep the newest ``budget_tokens`` tokens of every head (by source frame,
    then cache order), for every layer."""
    layers = []
    for layer in cache.layers:
        B, H, N = layer.frame.shape
        # order key: newer frames last; within a frame, cache order
        key = layer.frame.double() * (N + 1) + torch.arange(N, dtype=torch.float64,
                                                            device=layer.frame.device)
        keep = key.topk(budget_tokens, dim=-1).indices.sort(-1).values
        layers.append(LayerDecision(keep=keep))
    return Decision(layers)


# -- attention and future positions ---------------------------------------------

def attention_share(q: torch.Tensor, layer: LayerCache, chunk: int = 4096) -> torch.Tensor:
    """Attention every cached token gets from queries q (B, H, m, d), post-RoPE,
    as the model computes it (softmax of q.k'/sqrt(d) + log mass over the cached
    tokens), summed over the m queries: (B, H, N) float32. 0 when m = 0."""
    d = layer.k.shape[-1]
    q = q.to(layer.k.device)
    logm = layer.mass.float().clamp_min(1e-30).log().unsqueeze(-2)
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


def need(ctx: PolicyContext, name: str, *fields: str) -> None:
    """Raise ``PolicyError`` if the context lacks what policy ``name`` reads."""
    for f in fields:
        if getattr(ctx, f) is None:
            raise PolicyError(f"policy {name!r} needs ctx.{f}, which this run does not provide")
