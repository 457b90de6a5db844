"""Named hook points, the query tap and the query recorder.

Every attention layer of a model calls four hook points, named by path as in
TransformerLens: ``blocks.{i}.attn.hook_q_pre`` / ``hook_q_post`` (queries before
and after RoPE) and ``hook_k_pre`` / ``hook_k_post``. Tensors are
(batch, heads, tokens, head_dim). A hook function gets ``(tensor, hook)`` and
may return a replacement tensor; ``hook.ctx`` tells which frames the tokens
belong to, the noise level and the phase ("denoise" or "cache"). A tiny model with a
motion head also calls ``hook_motion``: per patch, its weights (batch, tokens,
(2r+1)^2) over the previous frame's displacements, or per pixel (batch, tokens,
patch^2, (2r+1)^2) with ``motion_per_pixel`` (a picking head takes the most likely of
the weights the hook returns).

``QueryTap`` is how everything reads queries while the model denoises (the
policies' inputs in ``generate``, the recorder, the reference run of ``reference``).

The recorder keeps, per layer, head and frame, the mean and variance of pre-
and post-RoPE queries, plus a bounded reservoir of query vectors for
projections. By default it listens to the last denoising step of every frame
(the queries closest to the finished frame; ``steps="all"`` takes every step,
at about four times the cost). Memory is bounded by construction: at most ``max_frames`` frame
slots (when full, every other slot is dropped and the stride doubles) and
``reservoir`` vectors per layer and head.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class HookContext:
    """What a hook may want to know about the tensor it sees.

    token_frame: (tokens,) absolute frame index of each token of the current call
    t: noise level(s) of the call; phase: "denoise", "cache" or "train";
    step: denoising step index (-1 for the cache pass); steps: denoising steps per chunk.
    """
    token_frame: torch.Tensor | None = None
    t: float = 0.0
    phase: str = "train"
    step: int = -1
    steps: int = 0


class HookPoint(nn.Module):
    """Identity module with a name; functions attached to it see its tensor."""

    def __init__(self, ctx: HookContext):
        super().__init__()
        self.name = ""
        self.ctx = ctx
        self.fns: list[Callable] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    raise TypeError(f"hook on {self.name} must return None or a tensor of "
                                    f"shape {tuple(x.shape)}")
                x = out
        return x


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """All hook points of ``model`` by name (names are set here, from the module path)."""
    points = {}
    for name, m in model.named_modules():
        if isinstance(m, HookPoint):
            m.name = name
            points[name] = m
    return points


class Hooks:
    """Attach functions by hook name; ``remove()`` detaches all of them."""

    def __init__(self, model: nn.Module):
        self.points = hook_points(model)
        self._attached: list[tuple[HookPoint, Callable]] = []

    def add(self, name: str, fn: Callable) -> None:
        if name not in self.points:
            raise KeyError(f"no hook point named {name!r}; there are e.g. "
                           f"{', '.join(list(self.points)[:4])}")
        self.points[name].fns.append(fn)
        self._attached.append((self.points[name], fn))

    def remove(self) -> None:
        for point, fn in self._attached:
            if fn in point.fns:
                point.fns.remove(fn)
        self._attached.clear()


class QueryTap:
    """The queries of every attention layer while the model denoises, handed to
    ``fn(layer, kind, q, ctx)`` (``kind`` "pre" or "post" RoPE, ``q`` (B, H, N, d)).

    ``pre``/``post``: at which denoising steps of each chunk, "all" or "last", or
    None for not at all. The one reader of the query hook points: generation's
    policy inputs, the recorder and the reference run all listen through it.
    """

    def __init__(self, model: nn.Module, fn: Callable, pre: str | None = None,
                 post: str | None = None):
        self.hooks = Hooks(model)
        for kind, steps in (("pre", pre), ("post", post)):
            if steps not in (None, "all", "last"):
                raise ValueError(f"steps must be 'all', 'last' or None, got {steps!r}")
            for layer in range(model.cfg.layers) if steps else ():
                self.hooks.add(f"blocks.{layer}.attn.hook_q_{kind}",
                               self._listener(fn, layer, kind, last_only=steps == "last"))

    @staticmethod
    def _listener(fn: Callable, layer: int, kind: str, last_only: bool) -> Callable:
        def hook(q: torch.Tensor, point: HookPoint):
            ctx = point.ctx
            if ctx.phase == "denoise" and (not last_only or ctx.step == ctx.steps - 1):
                fn(layer, kind, q, ctx)
        return hook

    def remove(self) -> None:
        self.hooks.remove()


class QueryRecorder:
    """Per layer, head and frame statistics of pre- and post-RoPE queries.

    Arrays (slots = recorded frames, at most ``max_frames``):
      ``mean[kind]``, ``var[kind]``: (slots, layers, heads, head_dim) float32
      ``count``: (slots,) tokens summed per slot; ``frames``: (slots,) frame index
    Reservoir (uniform over the run): ``sample[kind]`` (layers, heads, reservoir,
    head_dim) float16 with ``sample_frame`` (layers, heads, reservoir).
    ``kind`` is "pre" or "post". Only batch element 0 is recorded.
    """

    KINDS = ("pre", "post")

    def __init__(self, layers: int, heads: int, head_dim: int, max_frames: int = 512,
                 reservoir: int = 256, steps: str = "last", seed: int = 0):
        if max_frames < 2 or reservoir < 1:
            raise ValueError("max_frames must be >= 2 and reservoir >= 1")
        self.L, self.H, self.d = layers, heads, head_dim
        if steps not in ("last", "all"):
            raise ValueError(f"steps must be 'last' or 'all', got {steps!r}")
        self.max_frames, self.reservoir, self.steps = max_frames, reservoir, steps
        self.stride = 1  # record every stride-th frame; doubles when slots run out
        shape = (max_frames, layers, heads, head_dim)
        self._sum = {k: np.zeros(shape, np.float64) for k in self.KINDS}
        self._sq = {k: np.zeros(shape, np.float64) for k in self.KINDS}
        self._count = np.zeros((max_frames, layers), np.int64)
        self._frame = np.full(max_frames, -1, np.int64)
        self.n_slots = 0
        self._slot_of: dict[int, int] = {}  # frame -> slot
        self.sample = {k: np.zeros((layers, heads, reservoir, head_dim), np.float16)
                       for k in self.KINDS}
        self.sample_frame = np.full((layers, heads, reservoir), -1, np.int64)
        self._seen = np.zeros(layers, np.int64)  # reservoir counter per layer
        self._next = np.full(layers, -1, np.int64)  # next token index taken (Algorithm L)
        self._w = np.zeros(layers)
        self._rng = np.random.default_rng(seed)
        self._pending_idx: dict[int, np.ndarray] = {}
        self._tap: QueryTap | None = None

    # -- wiring -----------------------------------------------------------
    def attach(self, model: nn.Module) -> "QueryRecorder":
        on_query = lambda layer, kind, q, ctx: self.observe(layer, kind, q[0], ctx.token_frame)
        self._tap = QueryTap(model, on_query, pre=self.steps, post=self.steps)
        return self

    def detach(self) -> None:
        if self._tap:
            self._tap.remove()

    # -- recording --------------------------------------------------------
    def _slot(self, frame: int) -> int | None:
        if frame % self.stride:
            return None
        hit = self._slot_of.get(frame)
        if hit is not None:
            return hit
        if self.n_slots == self.max_frames:
            self._halve()
            if frame % self.stride:
                return None
        self._frame[self.n_slots] = frame
        self._slot_of[frame] = self.n_slots
        self.n_slots += 1
        return self.n_slots - 1

    def _halve(self) -> None:
        """Keep every other recorded frame: memory stays fixed, resolution halves."""
        self.stride *= 2
        keep = np.nonzero(self._frame[: self.n_slots] % self.stride == 0)[0]
        n = keep.size
        for arrs in (self._sum, self._sq):
            for k in self.KINDS:
                arrs[k][:n] = arrs[k][keep]
                arrs[k][n:] = 0
        self._count[:n] = self._count[keep]
        self._count[n:] = 0
        self._frame[:n] = self._frame[keep]
        self._frame[n:] = -1
        self.n_slots = n
        self._slot_of = {int(f): i for i, f in enumerate(self._frame[:n])}

    @torch.no_grad()
    def observe(self, layer: int, kind: str, q: torch.Tensor, token_frame: torch.Tensor) -> None:
        """Add queries ``q`` (heads, tokens, d) whose frames are ``token_frame`` (tokens,)."""
        q = q.detach().float().cpu()  # the recorder's arrays live in host memory
        tf = token_frame.cpu().numpy()
        # the common case (one frame per call) takes no per-frame indexing
        groups = [(int(tf[0]), None)] if tf[0] == tf[-1] else \
            [(int(f), torch.from_numpy(np.nonzero(tf == f)[0])) for f in np.unique(tf)]
        for f, sel in groups:
            slot = self._slot(f)
            if slot is None:
                continue
            qf = q if sel is None else q[:, sel]  # (H, n, d)
            moments = torch.stack([qf.sum(1), (qf * qf).sum(1)]).numpy()  # float32 per call
            self._sum[kind][slot, layer] += moments[0]  # float64 across calls
            self._sq[kind][slot, layer] += moments[1]
            if kind == "pre":
                self._count[slot, layer] += qf.shape[1]
        self._reservoir(layer, kind, q, tf)

    def _reservoir(self, layer: int, kind: str, q: torch.Tensor, tf: np.ndarray) -> None:
        # Reservoir sampling over tokens with geometric skips (Li's Algorithm L):
        # once the reservoir is full, most calls only compare two counters. The pre
        # and post hooks of one call see the same tokens, so the "pre" call draws the
        # indices and the "post" call reuses them: the two samples stay paired.
        n = q.shape[1]
        if kind == "pre":
            seen, k = int(self._seen[layer]), self.reservoir
            src, dst = [], []
            for i in range(max(0, min(n, k - seen))):  # filling up
                src.append(i)
                dst.append(seen + i)
            if seen + n > k:
                if self._next[layer] < 0:  # just filled: draw the first skip
                    self._w[layer] = np.exp(np.log(self._rng.random()) / k)
                    self._next[layer] = k + self._skip(layer)
                while self._next[layer] <= seen + n:  # 1-based index of the next token taken
                    src.append(int(self._next[layer]) - seen - 1)
                    dst.append(int(self._rng.integers(k)))
                    self._w[layer] *= np.exp(np.log(self._rng.random()) / k)
                    self._next[layer] += self._skip(layer)
            self._pending_idx[layer] = (np.asarray(src, np.int64), np.asarray(dst, np.int64))
            self._seen[layer] += n
        src, dst = self._pending_idx.get(layer, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if src.size:  # rare once the reservoir is full: most calls end here
            # later duplicates in dst win, as sequential sampling would
            self.sample[kind][layer][:, dst] = q[:, torch.from_numpy(src)].numpy().astype(np.float16)
            if kind == "pre":
                self.sample_frame[layer][:, dst] = tf[src]

    def _skip(self, layer: int) -> int:
        return int(np.floor(np.log(self._rng.random()) / np.log1p(-self._w[layer]))) + 1

    # -- reading ----------------------------------------------------------
    @property
    def frames(self) -> np.ndarray:
        return self._frame[: self.n_slots].copy()

    def mean(self, kind: str) -> np.ndarray:
        c = np.maximum(self._count[: self.n_slots], 1)[:, :, None, None]
        return (self._sum[kind][: self.n_slots] / c).astype(np.float32)

    def var(self, kind: str) -> np.ndarray:
        c = np.maximum(self._count[: self.n_slots], 1)[:, :, None, None]
        m = self._sum[kind][: self.n_slots] / c
        return np.maximum(self._sq[kind][: self.n_slots] / c - m * m, 0).astype(np.float32)

    def nbytes(self) -> int:
        arrays = [*self._sum.values(), *self._sq.values(), self._count, self._frame,
                  *self.sample.values(), self.sample_frame]
        return int(sum(a.nbytes for a in arrays))

    def to_npz(self, path) -> None:
        """Write what was recorded; shapes as in the class docstring."""
        np.savez_compressed(
            path, frames=self.frames, stride=self.stride,
            mean_pre=self.mean("pre"), var_pre=self.var("pre"),
            mean_post=self.mean("post"), var_post=self.var("post"),
            tokens_per_slot=self._count[: self.n_slots],
            sample_pre=self.sample["pre"], sample_post=self.sample["post"],
            sample_frame=self.sample_frame)


def run_copy(model):
    """A copy of ``model`` for one run: its own hook points and per-call state (hooks
    of one user never fire in another's run), the template's weights shared, not
    copied. A real Wan checkpoint (2.8 GB transformer, 11 GB text encoder) stays in
    memory once however many runs use it; weights are only read at inference."""
    import copy
    memo = {}
    for m in _modules_within(model):
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            memo[id(t)] = t
    encoder = getattr(model, "text_encoder", None)
    if encoder is not None:  # tokenizer + encoder (thread-safe): no state between prompts
        memo[id(encoder)] = encoder
    run = copy.deepcopy(model, memo)
    copied = [n for m in _modules_within(run) for n, t in m.named_parameters(recurse=False)
              if id(t) not in memo]
    if copied:  # a module the walk above did not reach: its weights were duplicated
        raise RuntimeError(f"run_copy duplicated weights it should share: {copied[:5]}")
    return run


def _modules_within(obj, depth: int = 3, seen=None):
    """Every nn.Module reachable from ``obj``: its submodules, and modules held by
    plain helper objects in its attributes (e.g. a VAE inside a streaming decoder)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            seen.add(id(m))
            yield m
            for v in vars(m).values():
                if not isinstance(v, (nn.Module, torch.Tensor, dict, list, tuple)) and hasattr(v, "__dict__"):
                    yield from _modules_within(v, depth - 1, seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            if isinstance(v, nn.Module) or (hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)):
                yield from _modules_within(v, depth - 1, seen)
