"""How an attention head spreads its attention over key frames.

For the queries of one chunk (post-RoPE, as the model attends), the attention each
source frame receives in each head, summed over the queries (``frame_attention``),
and what a lab reads from it (``head_measures``), per head:

  score         Forcing-KV's (arXiv 2605.09681): the attention on the newest
                ``recent`` key frames over the attention on every key frame after
                the sink. score >= threshold (0.8) makes a head static: it looks at
                what was just made and needs no memory beyond it.
  entropy       the attention's entropy per query over log(keys it sees): 0 = on one
                key, 1 = spread evenly; the mean over the queries
  sink_share    the share of the attention on the sink frames (frame < sink)
  chunk_share   ... on the chunk's own frames (the queries' frames)
  recent_share  ... on the newest frame before the chunk (not a sink frame)
  older_share   ... on every other frame (the memory a head reaches back for)

The four shares sum to 1. The measures say something about memory only where the
keys reach past the sink and the newest ``recent`` frames (``informative``): on a
shorter context every head would look static.
Shapes: H heads, n queries, N keys, d head dim, F source frames.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ffviz.cache import DEAD

MEASURES = ("score", "entropy", "sink_share", "chunk_share", "recent_share", "older_share")
STATIC_THRESHOLD = 0.8  # Forcing-KV's
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # logits per piece of queries, by device


def default_recent(chunk_frames: int) -> int:
    """The score's newest key frames: the chunk and the frame before it, what a static
    head keeps (Forcing-KV's "last 4 key frames" on 3-frame chunks)."""
    return chunk_frames + 1


@dataclasses.dataclass
class FrameAttention:
    """mass (H, F) float64: attention per source frame summed over the queries (each
    query gives 1 in all); entropy (H,) float64: the mean normalised entropy; queries: n."""
    mass: torch.Tensor
    entropy: torch.Tensor
    queries: int


@torch.no_grad()
def frame_attention(q: torch.Tensor, keys: torch.Tensor, key_frame: torch.Tensor,
                    log_mass: torch.Tensor | None = None) -> FrameAttention:
    """q (H, n, d) post-RoPE queries; keys (H, N, d) post-RoPE keys they see; key_frame
    (H, N) long, the keys' source frames (``DEAD`` for a dead slot, which gets
    nothing); log_mass (H, N) the cache's log-mass bias, or None."""
    H, n, d = q.shape
    N = keys.shape[1]
    dev = keys.device
    bias = torch.zeros(H, 1, N, device=dev) if log_mass is None else log_mass.float().unsqueeze(1)
    bias = bias.masked_fill((key_frame == DEAD).unsqueeze(1), -math.inf)
    frames = int(key_frame.max()) + 1
    slot = key_frame.clamp_min(0)
    mass = torch.zeros(H, frames, dtype=torch.float64, device=dev)
    entropy = torch.zeros(H, dtype=torch.float64, device=dev)
    step = max(1, CHUNK_ELEMENTS.get(dev.type, CHUNK_ELEMENTS["cpu"]) // max(1, H * N))
    kf = keys.float().transpose(-1, -2)
    for i in range(0, n, step):
        p = (q[:, i:i + step].float() @ kf / math.sqrt(d) + bias).softmax(-1)  # (H, m, N)
        p = torch.nan_to_num(p, nan=0.0)
        mass.scatter_add_(1, slot, p.sum(1).double())
        entropy += -(p * p.clamp_min(1e-30).log()).sum(-1).double().sum(-1)
    seen = (key_frame != DEAD).sum(-1).clamp_min(2).double().log()  # log(keys); one key: 0 / log 2
    return FrameAttention(mass, entropy / max(n, 1) / seen, n)


def informative(newest: int, sink: int, recent: int) -> bool:
    """Whether key frames up to ``newest`` reach past the sink and the newest ``recent``."""
    return newest - recent + 1 > sink


def head_measures(fa: FrameAttention, chunk_first: int, sink: int, recent: int) -> dict[str, torch.Tensor]:
    """The ``MEASURES`` of every head (H,) float64 from one chunk's ``frame_attention``;
    the chunk's frames start at ``chunk_first`` and end at the newest key frame."""
    mass = fa.mass
    F = mass.shape[1]
    frame = torch.arange(F, device=mass.device)
    newest = F - 1
    total = mass.sum(-1).clamp_min(1e-30)
    on = lambda where: (mass * where).sum(-1)
    after_sink = on(frame >= sink)
    sink_mass = on((frame < sink) & (frame < chunk_first))
    chunk_mass = on(frame >= chunk_first)
    recent_mass = on((frame == chunk_first - 1) & (frame >= sink))
    return {
        "score": on(frame > newest - recent) / after_sink.clamp_min(1e-30),
        "entropy": fa.entropy,
        "sink_share": sink_mass / total,
        "chunk_share": chunk_mass / total,
        "recent_share": recent_mass / total,
        "older_share": (total - sink_mass - chunk_mass - recent_mass).clamp_min(0) / total,
    }
