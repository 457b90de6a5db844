"""Forcing-KV: static heads keep only what was just made, dynamic heads keep memory.

Forcing-KV (arXiv 2605.09681), from its paper's and public code's facts, as read
in docs/policies.md:
  * roles: a head whose attention on the newest ``recent`` key frames is at least
    ``threshold`` of its attention on every key frame after the sink is static
    (``ffviz.head_measures``), the others dynamic. Roles come from a heads.json
    (``python -m ffviz heads``) or are measured on the fly from the queries of the
    chunks before the first compression (the cache is still whole then), and hold
    for the rest of the run. Layer 0 is never split: it keeps the base model's
    cache, the sink and the newest frames of the whole budget.
  * static heads keep the sink frames and the newest frame (the last frame of the
    chunk just written; the next chunk attends to its own tokens besides): no scoring.
  * dynamic heads keep the sink, a recent ring of whole frames and a buffer of
    ``retention`` frames' worth of tokens: the most changed stripes of the frames
    leaving the ring (``stripes.StripeBuffer``), chosen once per compression in
    layer 1 (the first split layer) and shared by every later layer and dynamic head.
    The ring is the rest of the budget, budget - n_sink - retention frames, and at
    least the newest frame: a budget too small for all three shrinks the buffer
    (to nothing at n_sink + 1 frames), never the ring.
Hard selection: no merging, no re-rotation. Each head keeps at most the budget, a
static head much less: the cache holds fewer real tokens than the budget allows.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import torch

from ffviz.head_measures import (STATIC_THRESHOLD, default_recent, frame_attention, head_measures,
                                 informative)
from ffviz.policies.base import PolicyError, check_range
from ffviz.policies.scored import ScoredPolicy
from ffviz.policies.stripes import StripeBuffer

MEASURE = "measure"


def read_head_scores(path: str) -> tuple[torch.Tensor, str]:
    """(L, H) float64 Forcing-KV scores from a heads.json (``python -m ffviz heads``),
    and the model it was measured on; ``PolicyError`` saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        L, H = int(data["layers"]), int(data["heads_per_layer"])
        scores = torch.full((L, H), math.nan, dtype=torch.float64)
        for head in data["heads"]:
            scores[int(head["layer"]), int(head["head"])] = float(head["score"])
    except FileNotFoundError:
        raise PolicyError(f"roles_from: no heads.json at {path!r}; write one with "
                          f"`python -m ffviz heads --out DIR` or use roles_from=measure") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise PolicyError(f"roles_from: {path!r} is not a heads.json of `python -m ffviz heads` "
                          f"({type(e).__name__}: {e})") from None
    if torch.isnan(scores).any():
        raise PolicyError(f"roles_from: {path!r} lacks a score for some layer and head")
    return scores, str(data.get("model", "?"))


@dataclasses.dataclass
class ForcingKV(ScoredPolicy):
    """threshold: score at or above which a head is static, in [0, 1]; stripes: stripes
    per frame of the buffer (1-64, at most the grid's rows); recent: the newest key
    frames of the score (0 = the chunk and the frame before it, Forcing-KV's 4 on
    3-frame chunks; up to 64); retention: the dynamic heads' buffer in frames' worth
    of tokens (0-64; 0 = no buffer; less where the budget leaves less); roles_from:
    "measure" (on the fly, from the chunks before the first compression) or the
    path of a heads.json; n_sink: protected first frames. The recent ring of the
    dynamic heads is the rest of the budget."""
    name = "forcing_kv"
    n_sink: int = 1
    n_recent: int = dataclasses.field(default=0, init=False, repr=False)  # the ring: budget's rest
    head_budget: str = dataclasses.field(default="roles", init=False, repr=False)  # set by roles
    head_floor: float = dataclasses.field(default=0.0, init=False, repr=False)
    threshold: float = STATIC_THRESHOLD
    stripes: int = 6
    recent: int = 0
    retention: float = 1.0
    roles_from: str = MEASURE
    protected_names: ClassVar[str] = "n_sink + one ring frame"
    _file_scores: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False,
                                                          compare=False)
    _file_model: str = dataclasses.field(default="", init=False, repr=False, compare=False)
    _state: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # the budget of the compression in progress: ``scores`` (no budget argument) needs the ring
    _budget: int = dataclasses.field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_range("n_sink", self.n_sink, 0)
        check_range("threshold", self.threshold, 0.0, 1.0, kind=float)
        check_range("stripes", self.stripes, 1, 64)
        check_range("recent", self.recent, 0, 64)
        check_range("retention", self.retention, 0.0, 64.0, kind=float)
        if not isinstance(self.roles_from, str) or not self.roles_from.strip():
            raise PolicyError(f"roles_from must be {MEASURE!r} or the path of a heads.json, "
                              f"got {self.roles_from!r}")
        if self.roles_from != MEASURE:
            self._file_scores, self._file_model = read_head_scores(self.roles_from)

    # -- the run's state: roles, their measurement, the buffer ------------------------

    def _reset(self) -> None:
        self._state = {"last_frame": -1, "static": None, "source": None, "first_report": False,
                       "score_sum": None, "score_n": None, "measured": [], "buffer": None}

    def observe(self, cache, ctx):
        """A new run (the frame went back) starts over; until the roles are fixed, the
        chunk's queries are measured (roles_from=measure)."""
        if not self._state or ctx.frame < self._state["last_frame"]:
            self._reset()
        self._state["last_frame"] = ctx.frame
        if self._state["static"] is None and self.roles_from == MEASURE and ctx.chunk_queries:
            self._measure(cache, ctx)

    def _recent(self, ctx) -> int:
        return self.recent or default_recent(ctx.chunk_frames)

    def _measure(self, cache, ctx) -> None:
        """Add the chunk's Forcing-KV scores (per layer and head) when the cache reaches
        past the sink and the recent frames."""
        if not informative(ctx.frame, self.n_sink, self._recent(ctx)):
            return
        scores = []
        for layer, q in zip(cache.layers, ctx.chunk_queries):
            if q is None:
                return
            fa = frame_attention(q[0], layer.k[0], layer.frame[0], layer.mass[0].float().log())
            first = ctx.frame - q.shape[2] // ctx.tokens_per_frame + 1
            scores.append(head_measures(fa, first, self.n_sink, self._recent(ctx))["score"].cpu())
        score = torch.stack(scores)  # (L, H)
        st = self._state
        st["score_sum"] = score if st["score_sum"] is None else st["score_sum"] + score
        st["score_n"] = (st["score_n"] or 0) + 1
        st["measured"].append(ctx.frame)

    def _fix_roles(self, L: int, H: int) -> None:
        """Static heads (L, H) bool from the file or the measurement; layer 0 never."""
        st = self._state
        if self._file_scores is not None:
            if tuple(self._file_scores.shape) != (L, H):
                raise PolicyError(f"roles_from: {self.roles_from!r} was measured on "
                                  f"{self._file_model} with {tuple(self._file_scores.shape)} "
                                  f"layers x heads; this model has ({L}, {H})")
            score, st["source"] = self._file_scores, f"read from {self.roles_from}"
        elif st["score_n"]:
            score = st["score_sum"] / st["score_n"]
            st["source"] = (f"measured on frames {st['measured'][0]}-{st['measured'][-1]} "
                            f"({st['score_n']} chunks) before the first compression")
        else:
            score = torch.zeros(L, H, dtype=torch.float64)
            st["source"] = ("not measured: no chunk before the first compression reached past "
                            "n_sink + recent frames; every head is dynamic")
        static = score >= self.threshold
        static[0] = False  # layer 0 is never split
        st["static"] = static

    def report(self) -> dict | None:
        """Where the roles came from, which heads are static and their share of the split
        layers' heads (1 and up), and the buffer's stripes (frame, stripe); None before
        any compression."""
        st = self._state
        if not st or st.get("static") is None:
            return None
        static = st["static"]
        split = static[1:]
        return {"roles": st["source"], "static_heads": static.nonzero().tolist(),
                "static_share": round(float(split.double().mean()), 4) if split.numel() else 0.0,
                "layer0": "never split: sink + newest frames of the whole budget",
                "buffer_stripes": sorted([f, s] for _, f, s in st["buffer"].held)}

    # -- the decision -----------------------------------------------------------------

    def ring_frames(self, budget_tokens: int, ctx) -> int:
        """Whole frames of the dynamic heads' recent ring: the budget's rest after the sink
        and the buffer, at least 1."""
        retention = round(self.retention * ctx.tokens_per_frame)
        return max(1, (budget_tokens - retention) // ctx.tokens_per_frame - self.n_sink)

    def buffer_tokens(self, budget_tokens: int, ctx) -> int:
        """The buffer's capacity: ``retention`` frames' worth, or what the sink and the
        ring leave of the budget when that is less."""
        left = budget_tokens - (self.n_sink + self.ring_frames(budget_tokens, ctx)) * ctx.tokens_per_frame
        return max(0, min(round(self.retention * ctx.tokens_per_frame), left))

    def must_evict(self, cache, budget_tokens, ctx):
        if not super().must_evict(cache, budget_tokens, ctx):
            return False
        if (self.n_sink + 1) * ctx.tokens_per_frame > budget_tokens:
            raise PolicyError(f"{self.protected_names} = {self.n_sink + 1} frames do not fit the "
                              f"budget of {budget_tokens // ctx.tokens_per_frame} frames; lower "
                              f"n_sink or raise the budget")
        return True

    def scores(self, cache, ctx):
        """(L, B, H, N): -1, and for the buffer's tokens in dynamic heads their stripe's
        change (>= 0). The roles are fixed and the buffer updated here, once per
        compression."""
        L, (B, H, N) = len(cache.layers), cache.layers[0].frame.shape
        st = self._state
        if st["static"] is None:
            self._fix_roles(L, H)
            st["first_report"] = True
        dynamic = ~st["static"]
        budget = self._budget
        if st["buffer"] is None:
            st["buffer"] = StripeBuffer(self.stripes, 0, ctx.grid, offered_upto=self.n_sink - 1)
        st["buffer"].capacity = self.buffer_tokens(budget, ctx)  # the budget may change live
        choice = next((l for l in range(1, L) if bool(dynamic[l].any())), None)
        if choice is not None:  # the frames leaving the ring, judged in the first split layer
            st["buffer"].offer(cache.layers[choice], self.n_sink,
                               ctx.frame - self.ring_frames(budget, ctx) + 1, dynamic[choice])
        score = torch.full((L, B, H, N), -1.0, device=cache.layers[0].k.device)
        table = st["buffer"].held_table(score.device)  # once, not per layer
        for l in range(1, L):
            change = st["buffer"].token_change(cache.layers[l], table)
            held = ~torch.isnan(change) & dynamic[l].to(change.device).view(1, H, 1)
            score[l] = torch.where(held, change, score[l])
        return score

    def compress(self, cache, budget_tokens, ctx):
        self._budget = budget_tokens
        decision = super().compress(cache, budget_tokens, ctx)
        if decision is not None and self._state.get("first_report"):
            decision.info = self.report()  # the log says once where the roles came from
            self._state["first_report"] = False
        return decision

    def protected(self, frame, budget_tokens, ctx):
        """(L, B, H, N): the sink; in layer 0 the newest frames of the rest of the budget,
        in dynamic heads the ring, in static heads the newest frame."""
        L, H = frame.shape[0], frame.shape[2]
        dynamic = (~self._state["static"]).to(frame.device).view(L, 1, H, 1)
        ring = ctx.frame - self.ring_frames(budget_tokens, ctx) + 1
        whole = ctx.frame - (budget_tokens // ctx.tokens_per_frame - self.n_sink) + 1
        first = torch.where(dynamic, ring, ctx.frame).expand(L, 1, H, 1).clone()
        first[0] = whole
        return (frame >= 0) & ((frame < self.n_sink) | (frame >= first))

    def head_counts(self, score, order, protected, dead, budget_tokens, ctx):
        """Protected tokens and, in dynamic heads, the buffer's: each head keeps exactly those."""
        real = torch.ones_like(protected) if dead is None else ~dead
        return (protected | ((score >= 0) & real)).sum(-1)
