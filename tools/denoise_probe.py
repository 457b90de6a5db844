"""One-step clean-frame error of a weights file at each noise level, from true frames.

    python tools/denoise_probe.py assets/tiny.safetensors [--seeds 100-107]

For each seed (the showcase's prompt of that seed) the given frames and frames 2-5 of
the true video are cached as generation caches them; frame 6 is noised to level t and
the model predicts it once, with frame 5 as its previous frame. The table is the mean
squared error of that prediction (pixels in [-1, 1]) at each t, beside copying frame 5:
at t = 1 (pure noise) it is what the model knows of the next frame from its context
alone; at small t, how well it denoises. A quick check of a recipe long before a
showcase can tell.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.sampling import fill_cache, previous_tokens  # noqa: E402
from ffviz.scenes import Scene, parse_prompt  # noqa: E402
from ffviz.showcase import showcase_prompt  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402

LEVELS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1)
TARGET = 6  # the predicted frame; frames before it are the context


@torch.no_grad()
def true_context(model, seed: int):
    """Frames 0 .. TARGET - 1 of seed ``seed``'s true video (the showcase's prompt)
    cached as generation caches them. Returns (cache, frame(f) -> tokens of true frame
    f, up to TARGET, the condition)."""
    n = model.cfg.tokens_per_frame
    spec = parse_prompt(showcase_prompt(seed), seed)[0]
    truth = torch.from_numpy(Scene(spec, seed).render(np.arange(TARGET + 1)))[None].float()
    tokens = model.patchify(truth / 127.5 - 1)
    frame = lambda f: tokens[:, f * n:(f + 1) * n]  # noqa: E731
    cond = model.embed_condition(torch.from_numpy(spec.condition_ids())[None])
    cache = model.new_cache()
    given = tokens[:, :2 * n]
    fill_cache(model, cache, given, torch.arange(2), cond, 0.0, prev=previous_tokens(None, given, n))
    for f in range(2, TARGET):
        fill_cache(model, cache, frame(f), torch.tensor([f]), cond, 0.0, prev=frame(f - 1))
    return cache, frame, cond


@torch.no_grad()
def probe(model, seed: int) -> dict:
    cache, frame, cond = true_context(model, seed)
    x0, prev = frame(TARGET), frame(TARGET - 1)
    gen = torch.Generator().manual_seed(seed)
    out = {"copy": ((prev - x0) ** 2).mean().item()}
    for t in LEVELS:
        xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=gen)
        pred = model(xt, torch.full((1, 1), t), torch.tensor([TARGET]), cond, prev=prev, cache=cache)
        out[t] = ((pred - x0) ** 2).mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--seeds", default="100-107")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, card = load_tiny(args.weights)
    rows = [probe(model, s) for s in parse_seeds(args.seeds)]
    print(f"{args.weights} (step {card.get('steps')}): one-step x0 error from true frames")
    for key in ("copy", *LEVELS):
        label = "copy frame 5" if key == "copy" else f"t = {key}"
        print(f"  {label:>12}: {np.mean([r[key] for r in rows]):.5f}")


if __name__ == "__main__":
    main()
