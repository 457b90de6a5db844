"""The KV cache: per layer, post-RoPE keys, values, mass and provenance.

Layout per layer (batch B, heads H, cached tokens N, head dim d):
  k, v            (B, H, N, d)   keys are stored AFTER RoPE, as Wan/Self-Forcing do
  mass            (B, H, N)      original tokens a cached token stands for (1 unless merged)
  frame, row, col (B, H, N)      where the token came from (a merged token keeps its target's)
  time            (B, H, N)      effective temporal RoPE position of the key: its frame
                                 unless a policy re-rotated it (Deep Forcing); a merged
                                 token keeps its target's

``aux`` holds per-token running quantities a policy keeps with the tokens (H2O's
accumulated attention): (B, H, N) tensors, zero for new tokens, gathered with
the tokens and summed when tokens merge.

Every layer and head holds the same number of slots (N), but not necessarily the
same tokens: policies decide per head. Attention adds ``log(mass)`` to each cached
key's logit (``bias``), so a merged token draws the attention of the tokens it
replaced (policies.md); with all masses 1 the bias is skipped and attention is
exactly the plain one.

Heads with budgets of their own (adaptive head budgets, Forcing-KV's static heads)
keep fewer tokens than the widest head; the rest of their slots are dead: mass 0,
so ``log(mass) = -inf`` and attention gives them exactly nothing, provenance
``DEAD`` (-1), zero keys and values. Dead slots are no tokens: ``LayerCache.live``
tells them apart, ``KVCache.tokens`` and ``within_budget`` count only real tokens,
and ``size`` counts slots.

A policy's ``Decision`` says, per layer and head, which tokens stay (``keep``)
and, for the others, which kept token each merges into (``merge_into``, -1 =
dropped). ``KVCache.apply`` carries it out.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ffviz import kernels

DEAD = -1  # frame, row, col and time of a dead slot (mass 0: no token)


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` (*lead, N, w) at ``idx`` (*lead, K) along the token axis ->
    (*lead, K, w): ``t.gather`` with the index expanded over w, done as one
    ``index_select`` on flattened rows (about 10x faster on CPU at cache shapes)."""
    lead, N = idx.shape[:-1], t.shape[-2]
    base = torch.arange(math.prod(lead), device=idx.device).view(*lead, 1) * N
    return t.reshape(-1, t.shape[-1]).index_select(0, (idx + base).view(-1)).view(
        *idx.shape, t.shape[-1])


@dataclasses.dataclass
class LayerDecision:
    """keep: (B, H, K) indices of tokens that stay, ascending.
    merge_into: (B, H, N) index of the kept token each token merges into, -1 for
    none (kept tokens and dropped ones); None when nothing merges.
    score, distance: (B, H, N) the policy's score and merge distance, for the log.
    k, time: optional replacements (B, H, N, d) / (B, H, N) for the keys and their
    effective temporal positions (a re-rotating policy), applied before merging
    and gathering.
    live: (B, H, K) bool, for heads that keep fewer than K tokens: False marks a slot
    left dead (its token, ``keep`` there, is evicted: it may merge like any other);
    None = every kept token stays. Live slots come first in each head.
    """
    keep: torch.Tensor
    merge_into: torch.Tensor | None = None
    score: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    k: torch.Tensor | None = None
    time: torch.Tensor | None = None
    live: torch.Tensor | None = None


@dataclasses.dataclass
class Decision:
    """Per layer, what stays and what merges. ``prepared``: the cache this decision
    leaves, computed already by the policy (``KVCache.prepared``, the CPU kernels'
    path), which ``KVCache.apply`` takes as it is when the cache has not changed since.
    ``info``: what the policy says about this decision in the log (e.g. where
    Forcing-KV's head roles came from), or None."""
    layers: list[LayerDecision]
    prepared: "PreparedApply | None" = dataclasses.field(default=None, repr=False)
    info: dict | None = None


@dataclasses.dataclass
class PreparedApply:
    """A cache's new arrays for a decision, and the arrays they were made from with
    their version counters (``KVCache.prepared``): valid while the cache still holds
    exactly those, unedited. Until applied it keeps both caches alive."""
    source: list[tuple]
    result: list[tuple]

    def made_from(self, cache: "KVCache") -> bool:
        return len(self.source) == len(cache.layers) and all(
            a is b and a._version == version for layer, arrays in zip(cache.layers, self.source)
            for a, (b, version) in zip((getattr(layer, name) for name in cache.FIELDS), arrays))


class LayerCache:
    def __init__(self):
        self.k = self.v = self.mass = self.frame = self.row = self.col = self.time = None
        self.aux: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        """Slots per head, dead ones included."""
        return 0 if self.k is None else self.k.shape[2]

    @property
    def live(self) -> torch.Tensor:
        """(B, H, N) bool: the slots that hold a token (mass > 0)."""
        return self.mass > 0

    def tokens_per_head(self) -> torch.Tensor:
        """(B, H) long: real tokens in each head (0 for an empty layer)."""
        if self.mass is None:
            return torch.zeros(1, 1, dtype=torch.long)
        return self.live.sum(-1)

    def has_dead(self) -> bool:
        return self.mass is not None and not bool(self.live.all())

    def append(self, k, v, frame, row, col) -> None:
        """Add tokens: k, v (B, H, n, d); frame, row, col (n,) long."""
        B, H, n, _ = k.shape
        meta = [t.to(k.device).view(1, 1, n).expand(B, H, n) for t in (frame, row, col)]
        mass = torch.ones(B, H, n, dtype=k.dtype, device=k.device)
        for name, t in self.aux.items():
            self.aux[name] = torch.cat([t, t.new_zeros(B, H, n)], 2)
        if self.k is None:
            self.k, self.v, self.mass = k, v, mass
            self.frame, self.row, self.col = (m.clone() for m in meta)
            self.time = self.frame.clone()
            return
        self.k = torch.cat([self.k, k], 2)
        self.v = torch.cat([self.v, v], 2)
        self.mass = torch.cat([self.mass, mass], 2)
        self.frame = torch.cat([self.frame, meta[0]], 2)
        self.row = torch.cat([self.row, meta[1]], 2)
        self.col = torch.cat([self.col, meta[2]], 2)
        self.time = torch.cat([self.time, meta[0]], 2)

    def bias(self) -> torch.Tensor | None:
        """log(mass) (B, H, 1, N), or None when no token is merged and no slot is dead
        (-inf for a dead slot: exactly no attention)."""
        if self.mass is None or bool((self.mass == 1).all()):
            return None
        return self.mass.log().unsqueeze(2)

    def apply(self, d: LayerDecision) -> None:
        dev = self.k.device  # a decision made elsewhere (host indices) is moved here
        if d.k is not None:
            self.k = d.k.to(dev)
        if d.time is not None:
            self.time = d.time.to(dev)
        idx = d.keep.to(dev)
        live = None if d.live is None else d.live.to(dev)
        gather3 = lambda t: t.gather(2, idx)
        self.frame, self.row, self.col, self.time = map(gather3, (self.frame, self.row, self.col, self.time))
        if d.merge_into is not None and bool((d.merge_into >= 0).any()):
            self._merge_into_kept(idx, d.merge_into.to(dev), live)
        else:
            self.k, self.v, self.mass = take_rows(self.k, idx), take_rows(self.v, idx), gather3(self.mass)
            self.aux = {name: gather3(t) for name, t in self.aux.items()}
        if live is not None:
            self._kill(~live)

    def _kill(self, dead: torch.Tensor) -> None:
        """Make the slots ``dead`` (B, H, N) dead: mass 0, provenance DEAD, zero keys,
        values and ``aux``."""
        self.mass = self.mass.masked_fill(dead, 0)
        self.frame, self.row, self.col, self.time = (
            t.masked_fill(dead, DEAD) for t in (self.frame, self.row, self.col, self.time))
        self.k, self.v = (t.masked_fill(dead.unsqueeze(-1), 0) for t in (self.k, self.v))
        self.aux = {name: t.masked_fill(dead, 0) for name, t in self.aux.items()}

    def _merge_into_kept(self, idx: torch.Tensor, into: torch.Tensor,
                         live: torch.Tensor | None = None) -> None:
        """Keep tokens ``idx`` (B, H, K); each evicted token with ``into >= 0`` adds to its
        target: mass summed, keys and values mass-weighted averages, ``aux`` summed.
        One row-wise index-add over all tokens into K + 1 slots per head (slot K collects
        the dropped); index_add_ on rows is several times faster than scatter_add_ on CPU.
        A token whose target is itself evicted is dropped with it (policies merge into
        kept tokens only). ``live`` (B, H, K): slots left dead; their tokens count as
        evicted (they may merge) and the slots receive nothing (mass 0)."""
        B, H, N = into.shape
        K = idx.shape[2]
        dev = idx.device
        slot = torch.full((B, H, N), K, dtype=torch.long, device=dev)
        positions = torch.arange(K, device=dev).expand(B, H, K)
        slot.scatter_(2, idx, positions if live is None else positions.masked_fill(~live, K))
        merging = (into >= 0) & (slot == K)  # a kept token never moves
        slot = torch.where(merging, slot.gather(2, into.clamp_min(0)), slot)
        rows = (slot + torch.arange(B * H, device=dev).view(B, H, 1) * (K + 1)).view(-1)
        add = lambda t: t.new_zeros(B * H * (K + 1), *t.shape[3:]).index_add_(
            0, rows, t.reshape(B * H * N, *t.shape[3:])).view(B, H, K + 1, *t.shape[3:])[:, :, :K]
        d = self.k.shape[-1]
        mass = add(self.mass)
        # a slot with mass 0 (dead) gets zero keys: 0 / tiny, not 0 / 0; mass >= 1 divides as it is
        kv = add(torch.cat([self.k, self.v], -1).mul_(self.mass.unsqueeze(-1))).div_(
            mass.clamp_min(torch.finfo(mass.dtype).tiny).unsqueeze(-1))
        self.k, self.v = kv[..., :d].contiguous(), kv[..., d:].contiguous()
        self.mass = mass
        self.aux = {name: add(t) for name, t in self.aux.items()}


class KVCache:
    """One ``LayerCache`` per layer plus the grid that token positions refer to."""

    def __init__(self, layers: int, tokens_per_frame: int, grid: tuple[int, int]):
        self.layers = [LayerCache() for _ in range(layers)]
        self.tokens_per_frame = tokens_per_frame
        self.grid = grid

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def size(self) -> int:
        """Slots per head (the same in every layer and head; dead slots included)."""
        return self.layers[0].size

    def tokens(self) -> int | float:
        """Real tokens per head, averaged over layers, heads and batch rows (the size
        per head of the cache packed without dead slots): ``size`` when no slot is
        dead; a float only where heads keep different numbers of tokens."""
        if self.layers[0].mass is None:
            return 0
        counts = torch.stack([layer.tokens_per_head() for layer in self.layers])
        mean = counts.double().mean().item()
        return int(mean) if mean.is_integer() else round(mean, 2)

    def within_budget(self, budget_tokens: int) -> bool:
        """Whether every layer holds at most heads x ``budget_tokens`` real tokens (in
        each batch row): the budget every policy holds, uniform per head or spread
        over the heads."""
        return all(int(layer.tokens_per_head().sum(-1).max()) <= layer.mass.shape[1] * budget_tokens
                   for layer in self.layers if layer.mass is not None)

    def has_dead(self) -> bool:
        """Whether any slot is dead (some head keeps fewer tokens than the widest)."""
        return any(layer.has_dead() for layer in self.layers)

    def frames(self) -> list[int]:
        """Source frames with at least one token in layer 0, head 0."""
        if self.layers[0].frame is None:
            return []
        return sorted(set(self.layers[0].frame[0, 0].tolist()) - {DEAD})

    FIELDS = ("k", "v", "mass", "frame", "row", "col", "time")

    def apply(self, decision: Decision) -> None:
        if len(decision.layers) != len(self.layers):
            raise ValueError(f"decision has {len(decision.layers)} layers, cache {len(self.layers)}")
        prepared, decision.prepared = decision.prepared, None  # once; not kept with the decision
        if prepared is not None and prepared.made_from(self):
            for layer, arrays in zip(self.layers, prepared.result):
                for name, t in zip(self.FIELDS, arrays):
                    setattr(layer, name, t)
            return
        if self._compilable(decision):
            return self._apply_compiled(decision)
        if self._batchable(decision):
            return self._apply_batched(decision)
        for layer, d in zip(self.layers, decision.layers):
            layer.apply(d)

    def _batchable(self, decision: Decision) -> bool:
        """Merges in layers of one shape, no re-rotation, no ``aux``: done in one go (a
        merge is ~20 small ops per layer; a plain gather is cheaper per layer than stacking)."""
        first = self.layers[0]
        return (first.k is not None and len(self.layers) > 1
                and any(d.merge_into is not None for d in decision.layers)
                and all(l.k is not None and l.k.shape == first.k.shape and l.k.device == first.k.device
                        and l.k.dtype == first.k.dtype and not l.aux for l in self.layers)
                and all(d.k is None and d.time is None and d.live is None
                        and d.keep.shape == decision.layers[0].keep.shape for d in decision.layers))

    def _compilable(self, decision: Decision) -> bool:
        """Merges on float32 CPU caches of one shape, no re-rotation, no ``aux``, no slot
        left dead: the numba kernel."""
        first, d0 = self.layers[0], decision.layers[0]
        return (first.k is not None
                and any(d.merge_into is not None for d in decision.layers)
                and all(l.k is not None and l.k.shape == first.k.shape == l.v.shape
                        and not l.aux for l in self.layers)
                and all(d.k is None and d.time is None and d.live is None and d.keep.shape == d0.keep.shape
                        and d.keep.shape[:2] == first.k.shape[:2] and d.keep.device.type == "cpu"
                        and (d.merge_into is None or d.merge_into.shape == first.mass.shape)
                        for d in decision.layers)
                and kernels.compiled_cpu(*(t for l in self.layers for t in (l.k, l.v, l.mass))))

    def prepared(self, k, v, mass, meta) -> PreparedApply | None:
        """The cache after a decision as the CPU kernels made it (``kernels.merge_apply``'s
        tensors, per layer first: k, v (L, B, H, K, d), mass (L, B, H, K), provenance
        (L, 4, B, H, K)) for the arrays the cache holds now, for ``apply`` to take as it
        is: a policy that scores and merges in one kernel call hands it over with its
        decision. None where ``apply`` must do the work itself (``aux`` quantities,
        which the kernels do not carry)."""
        if any(l.aux for l in self.layers):
            return None
        k, v, mass = (t.unbind(0) for t in (k, v, mass))  # views per layer
        meta = [m.unbind(0) for m in meta.unbind(0)]
        result = [(k[i], v[i], mass[i], *meta[i]) for i in range(len(self.layers))]
        source = [tuple((t, t._version) for t in (getattr(l, name) for name in self.FIELDS))
                  for l in self.layers]
        return PreparedApply(source=source, result=result)

    def _apply_compiled(self, decision: Decision) -> None:
        """Every layer's gather and merge in one numba call over the layers' own arrays
        (``kernels.merge_apply``: a merge's sums in the same order as
        ``_merge_into_kept``)."""
        B, H, N, _ = self.layers[0].k.shape
        none = torch.full((B, H, N), -1, dtype=torch.long)
        keep = torch.stack([d.keep for d in decision.layers])
        into = torch.stack([none if d.merge_into is None else d.merge_into for d in decision.layers])
        k, v, mass, meta = kernels.merge_apply(self.fields(), keep, into)  # IndexError: untouched
        for i, layer in enumerate(self.layers):
            layer.k, layer.v, layer.mass = k[i], v[i], mass[i]
            layer.frame, layer.row, layer.col, layer.time = meta[i]

    def fields(self) -> list[tuple[torch.Tensor, ...]]:
        """Per field of ``FIELDS``, the tensors of every layer (the CPU kernels' input)."""
        return [tuple(getattr(layer, name) for layer in self.layers) for name in self.FIELDS]

    def _apply_batched(self, decision: Decision) -> None:
        """Every layer at once: the layers are stacked along the batch axis, one
        ``LayerCache.apply`` runs on the stack (a handful of ops instead of a handful
        per layer: a compression's bookkeeping is op count, not bytes, on a small model),
        and each layer gets its slice back (views of the stacked result)."""
        L, (B, H, N, _) = len(self.layers), self.layers[0].k.shape
        dev = self.layers[0].k.device
        stacked = LayerCache()
        for name in self.FIELDS:
            setattr(stacked, name, torch.cat([getattr(l, name) for l in self.layers], 0))
        merges = [d.merge_into for d in decision.layers]
        into = None
        if any(m is not None for m in merges):
            none = torch.full((B, H, N), -1, dtype=torch.long, device=dev)
            into = torch.cat([none if m is None else m.to(dev) for m in merges], 0)
        stacked.apply(LayerDecision(keep=torch.cat([d.keep.to(dev) for d in decision.layers], 0),
                                    merge_into=into))
        for name in self.FIELDS:
            for layer, part in zip(self.layers, getattr(stacked, name).unflatten(0, (L, B)).unbind(0)):
                setattr(layer, name, part)

    def nbytes(self) -> int:
        n = 0
        for l in self.layers:
            for t in (l.k, l.v, l.mass, l.frame, l.row, l.col, l.time):
                if t is not None:
                    n += t.numel() * t.element_size()
        return n

    def kv_bytes(self) -> int:
        return sum(l.k.numel() * l.k.element_size() * 2 for l in self.layers if l.k is not None)
