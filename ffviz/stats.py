"""Query statistics: streaming Gaussian fits of pre-RoPE queries per layer and head.

``QueryStats`` keeps, per layer and head, the mean and covariance of every
pre-RoPE query seen so far (Chan/Welford batch updates in float64, so a long run
does not lose precision), optionally with an exponential half-life in frames.
Policies read it (``mean``, ``cov``, ``top_eig``); degenerate inputs (no data,
rank-deficient or non-finite covariances) give finite answers and a warning,
never NaN.
"""
from __future__ import annotations

import math
import warnings

import torch


class QueryStats:
    def __init__(self, layers: int, heads: int, dim: int, half_life: float | None = None):
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life must be > 0 frames or None, got {half_life}")
        self.layers, self.heads, self.dim, self.half_life = layers, heads, dim, half_life
        self.weight = torch.zeros(layers, heads, dtype=torch.float64)
        self._mean = torch.zeros(layers, heads, dim, dtype=torch.float64)
        self._m2 = torch.zeros(layers, heads, dim, dim, dtype=torch.float64)
        self._last_frame = [None] * layers
        self.skipped = 0  # batches dropped because they held non-finite values

    @torch.no_grad()
    def update(self, layer: int, q: torch.Tensor, frame: int | None = None) -> None:
        """Add queries q (heads, n, dim) (or (1, heads, n, dim)) of frame ``frame``."""
        if q.dim() == 4:
            q = q[0]
        q = q.detach().double()
        if not torch.isfinite(q).all():
            self.skipped += 1
            warnings.warn("QueryStats: non-finite queries skipped", RuntimeWarning, stacklevel=2)
            return
        if self.half_life and frame is not None:
            last = self._last_frame[layer]
            if last is not None and frame > last:
                decay = 0.5 ** ((frame - last) / self.half_life)
                self.weight[layer] *= decay
                self._m2[layer] *= decay
            self._last_frame[layer] = frame if last is None else max(frame, last)
        n = q.shape[1]
        mb = q.mean(1)  # (H, d)
        centered = q - mb[:, None]
        m2b = centered.transpose(1, 2) @ centered  # (H, d, d)
        wa = self.weight[layer][:, None]
        tot = wa + n
        delta = mb - self._mean[layer]
        self._mean[layer] += delta * (n / tot)
        self._m2[layer] += m2b + (delta[:, :, None] * delta[:, None, :]) * (wa * n / tot)[:, :, None]
        self.weight[layer] += n

    def mean(self, layer: int) -> torch.Tensor:
        """(heads, dim) float32."""
        return self._mean[layer].float()

    def cov(self, layer: int) -> torch.Tensor:
        """(heads, dim, dim) float32, symmetric PSD (zeros where no data yet)."""
        w = self.weight[layer].clamp_min(1.0)[:, None, None]
        c = self._m2[layer] / w
        return (0.5 * (c + c.transpose(1, 2))).float()

    def top_eig(self, layer: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues (heads, r) >= 0 and unit eigenvectors (heads, r, dim).

        Non-finite or failed decompositions fall back to zeros with a warning.
        """
        H, d = self.heads, self.dim
        if r <= 0:
            return torch.zeros(H, 0), torch.zeros(H, 0, d)
        r = min(r, d)
        c = self.cov(layer).double()
        if not torch.isfinite(c).all():
            warnings.warn("QueryStats: non-finite covariance; using rank 0", RuntimeWarning)
            return torch.zeros(H, r), torch.zeros(H, r, d)
        try:
            vals, vecs = torch.linalg.eigh(c)
        except RuntimeError:
            warnings.warn("QueryStats: eigendecomposition failed; using rank 0", RuntimeWarning)
            return torch.zeros(H, r), torch.zeros(H, r, d)
        vals = vals.flip(-1)[:, :r].clamp_min(0.0)
        vecs = vecs.flip(-1)[:, :, :r].transpose(1, 2)
        return vals.float(), vecs.float()

    def count(self, layer: int) -> torch.Tensor:
        return self.weight[layer].clone()
