"""Where the embedded model's heads look in its cache, and a graft of local heads.

    python tools/local_heads.py W                      # measure: share of attention per lag
    python tools/local_heads.py W --graft 0:0,1:0 --gain 4 --out runs/exp/tiny.safetensors

Measure: frames 0-5 of each seed's true video are cached as generation caches them,
frame 6 (pure noise, t = 1) reads the cache once; for every layer and head the table
gives the share of its attention on the same patch of the newest cached frame (lag 1),
on the same patch of the frame before (lag 2), on any patch of those frames, and its
normalised entropy. A head that tells where an object was one frame ago looks at
lag 1, same patch.

Graft: the listed ``layer:head`` pairs of trained weights become local heads
(``make_local_heads``: content-free queries and keys whose RoPE dot
product peaks at the same patch ``lag`` frames back; ``gain`` sets the sharpness).
Values and the output projection keep their weights; training then makes the heads
content-aware. The card keeps the steps, so ``train --out`` continues from there
(fresh optimizer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.models.tiny import local_query_key  # noqa: E402
from ffviz.weights import load_tiny, save_weights, training_progress  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise_probe import TARGET, true_context  # noqa: E402


@torch.no_grad()
def attention_by_lag(model, seed: int) -> np.ndarray:
    """(layers, heads, 5): lag-1 same patch, lag-2 same patch, lag 1 any, lag 2 any, entropy."""
    n = model.cfg.tokens_per_frame
    cache, frame, cond = true_context(model, seed)
    queries = []
    hooks = [b.attn.hook_q_post.fns for b in model.blocks]
    for fns in hooks:
        fns.append(lambda q, hp: queries.append(q))
    x = torch.randn(frame(TARGET).shape, generator=torch.Generator().manual_seed(seed))
    model(x, torch.ones(1, 1), torch.tensor([TARGET]), cond, prev=frame(TARGET - 1), cache=cache)
    for fns in hooks:
        fns.pop()
    own_row = torch.arange(n) // model.cfg.side
    own_col = torch.arange(n) % model.cfg.side
    out = np.zeros((model.cfg.layers, model.cfg.heads, 5))
    for i, (block, q) in enumerate(zip(model.blocks, queries)):
        layer = cache[i]
        keys = layer.k  # (1, H, Nc, d): frames 0..5, this call not written
        logits = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5  # (1, H, n, Nc)
        w = logits.softmax(-1)[0]  # (H, n, Nc); the frame's own keys are left out
        lag = TARGET - layer.frame[0]  # (H, Nc)
        same = (layer.row[0][:, None, :] == own_row[None, :, None]) & \
               (layer.col[0][:, None, :] == own_col[None, :, None])  # (H, n, Nc)
        for j, (mask_lag, need_same) in enumerate(((1, True), (2, True), (1, False), (2, False))):
            m = (lag[:, None, :] == mask_lag) & (same if need_same else True)
            out[i, :, j] = (w * m).sum(-1).mean(-1).numpy()
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1) / np.log(w.shape[-1])
        out[i, :, 4] = ent.mean(-1).numpy()
    return out


@torch.no_grad()
def make_local_heads(model, pairs, lag: int = 1, gain: float = 8.0) -> None:
    """Give heads ``(layer, head)`` content-free queries and keys whose RoPE dot product
    peaks at the same patch ``lag`` frames back: every key plane is (1, 0), the query's
    spatial planes too, its temporal planes turned by -omega * lag, so
    q . R(dt, dy, dx) k = sum cos(omega (dt - lag)) + sum cos(omega dy) + sum cos(omega dx).
    ``gain`` (the heads' q/k norm weights) sets the sharpness: 8 puts about half of a
    head's attention on that patch (q/k norm spans all heads, so the others' content
    scales it). Values and outputs keep their weights."""
    d, w = model.cfg.head_dim, model.cfg.width
    query, key = local_query_key(model.rope, d, lag, gain=1.0)
    for layer, head in pairs:
        attn = model.blocks[layer].attn
        for part, vec, norm in ((0, query, attn.norm_q), (1, key, attn.norm_k)):
            rows = slice(part * w + head * d, part * w + (head + 1) * d)
            attn.qkv.weight[rows] = 0.0
            attn.qkv.bias[rows] = vec
            norm.weight[head * d:(head + 1) * d] = gain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--seeds", default="100-103")
    p.add_argument("--graft", default="", help="layer:head pairs, comma-separated")
    p.add_argument("--lag", type=int, default=1)
    p.add_argument("--gain", type=float, default=4.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, card = load_tiny(args.weights)
    if args.graft:
        pairs = [tuple(int(v) for v in s.split(":")) for s in args.graft.split(",")]
        make_local_heads(model, pairs, args.lag, args.gain)
    table = np.mean([attention_by_lag(model, s) for s in parse_seeds(args.seeds)], 0)
    print(f"{args.weights} (step {card.get('steps')}{', grafted ' + args.graft if args.graft else ''})")
    print("layer head  lag1-same lag2-same lag1-any lag2-any entropy")
    for i in range(table.shape[0]):
        for h in range(table.shape[1]):
            print(f"{i:5d} {h:4d}  " + " ".join(f"{v:9.3f}" for v in table[i, h]))
    if args.out:
        keep = training_progress(card)
        save_weights(model, args.out, {**keep, "grafted": args.graft, "graft_gain": args.gain})
        print("wrote", args.out)


if __name__ == "__main__":
    main()
