"""What the picking motion head would do if it knew how the newest frame had moved.

    python tools/momentum_probe.py W --seeds 0-3 --frames 64 --out /tmp/momentum

A probe, not a model: weights with ``motion_pick`` run the showcase (every setting,
teacher-forced included) with their motion weights multiplied by a prior, per patch:
the match of the newest frame against the frame before it (``TinyVideoModel.match``,
which displacement made the newest frame), averaged over the 3x3 patches around it,
weighted by how much each patch tells (a plain background patch tells nothing). That
is "keep moving as you moved", read here from the two frames directly; in a model
it would have to come from the newest frame's cached keys and values, which is the
design this probe sizes. ``--beta`` scales the prior (0: the weights alone).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.evaluate import parse_seeds  # noqa: E402
from ffviz.models.tiny import TinyVideoModel  # noqa: E402
from ffviz.showcase import parse_setting, showcase  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402


class MomentumProbe(TinyVideoModel):
    """The model, remembering the last two distinct previous frames it was given (the
    newest frame and the one before, as generation passes them) to build the prior."""

    def __init__(self, cfg, beta: float):
        super().__init__(cfg)
        self.beta, self.newest, self.older, self.prior = beta, None, None, None
        self.hook_motion.fns.append(lambda w, hp: self._with_prior(w))

    def _with_prior(self, weights):
        if self.prior is None or self.prior.shape[:2] != weights.shape[:2]:
            return weights
        return (weights.clamp_min(1e-9).log() + self.beta * (self.prior + 1e-3).log()).softmax(-1)

    def _update_prior(self, prev):
        self.older, self.newest, self.prior = self.newest, prev.clone(), None
        if self.older is None:
            return
        match = self.match(self.displaced(self.older), self.newest)  # (B, n, K)
        tells = (match.amax(-1) - match.amin(-1))[..., None]
        g = self.cfg.side
        grid = lambda a: a.view(a.shape[0], g, g, -1).permute(0, 3, 1, 2)
        flat = lambda a: a.permute(0, 2, 3, 1).reshape(a.shape[0], g * g, -1)
        num = flat(F.avg_pool2d(grid(match * tells), 3, 1, 1))
        den = flat(F.avg_pool2d(grid(tells), 3, 1, 1))
        self.prior = torch.where(den > 1e-3, num / den.clamp_min(1e-6), 1.0 / match.shape[-1])

    def forward(self, x, t, frames, cond, prev=None, **kw):
        if int(frames.min()) < self.cfg.given_frames + 1:  # a new run
            self.newest = self.older = self.prior = None
        if prev is not None and x.shape[1] == self.cfg.tokens_per_frame:
            if self.newest is None or not torch.equal(self.newest, prev):
                self._update_prior(prev)
        return super().forward(x, t, frames, cond, prev=prev, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--seeds", default="0-3")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    trained, card = load_tiny(args.weights)
    if not trained.cfg.motion_pick:
        raise SystemExit(f"{args.weights} has no picking motion head (TinyConfig.motion_pick)")
    if trained.cfg.motion_per_pixel:
        raise SystemExit(f"{args.weights} picks per pixel (TinyConfig.motion_per_pixel); this probe reads "
                         "per-patch choices")
    model = MomentumProbe(trained.cfg, args.beta)
    model.load_state_dict(trained.state_dict())
    summary = showcase(model.eval(), parse_seeds(args.seeds), args.frames, args.out,
                       also=[parse_setting("teacher-forced:4")])
    print(json.dumps({name: {k: round(v, 3) for k, v in s.items() if isinstance(v, float)}
                      for name, s in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
