"""Query statistics: streaming Gaussian fits of pre-RoPE queries per layer and head.

``QueryStats`` keeps, per layer and head, the mean and covariance of every
pre-RoPE query seen so far (Chan/Welford batch updates in float64, so a long run
does not lose precision), optionally with an exponential half-life in frames.
Policies read it (``mean``, ``cov``, ``top_eig``); degenerate inputs (no data,
rank-deficient or non-finite covariances) give finite answers and a warning,
never NaN.

Below it, the distances the drift plots and the evaluation use:
``frechet_distance``, ``sym_kl_diag``, ``cosine``, ``drift`` (per-frame fits
against frame 0 or the running fit), ``spearman`` and ``topb_recall``
(proxy-vs-oracle fidelity).
"""
from __future__ import annotations

import warnings

import numpy as np
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
        # one batch's moments in float32 where the queries are (a GPU makes Wan's
        # 12 x 128 x 128 x 4,680 products per layer cheap); accumulated in float64 on the host
        q = q.detach().float()
        if not bool(torch.isfinite(q).all()):
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
        m2b = (centered.transpose(1, 2) @ centered).cpu().double()  # (H, d, d)
        mb = mb.cpu().double()
        wa = self.weight[layer][:, None]
        tot = wa + n
        delta = mb - self._mean[layer]
        self._mean[layer] += delta * (n / tot)
        self._m2[layer] += m2b + (delta[:, :, None] * delta[:, None, :]) * (wa * n / tot)[:, :, None]
        self.weight[layer] += n

    def prompt_switched(self, rule: str, half_life: float) -> None:
        """At a prompt switch: ``carry`` on, ``reset`` (forget every query so far) or
        ``decay`` (from now on, older frames' weight halves every ``half_life`` frames)."""
        if rule == "reset":
            self.weight.zero_()
            self._mean.zero_()
            self._m2.zero_()
        elif rule == "decay":
            self.half_life = float(half_life)
        elif rule != "carry":
            raise ValueError(f"unknown rule {rule!r} for the statistics at a prompt switch")

    def mean(self, layer: int) -> torch.Tensor:
        """(heads, dim) float32."""
        return self._mean[layer].float()

    def cov(self, layer: int) -> torch.Tensor:
        """(heads, dim, dim) float32, symmetric PSD (zeros where no data yet)."""
        w = self.weight[layer].clamp_min(1.0)[:, None, None]
        c = self._m2[layer] / w
        return (0.5 * (c + c.transpose(1, 2))).float()

    def top_eig(self, layer: int | None, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues (heads, r) >= 0 and unit eigenvectors (heads, r, dim);
        ``layer=None``: every layer at once, (layers, heads, r) and (layers, heads, r, dim)
        from one batched decomposition.

        Non-finite or failed decompositions fall back to zeros with a warning.
        """
        lead = (self.heads,) if layer is not None else (self.layers, self.heads)
        d = self.dim
        if r <= 0:
            return torch.zeros(*lead, 0), torch.zeros(*lead, 0, d)
        r = min(r, d)
        c = (self.cov(layer) if layer is not None else self.cov_all()).double()
        if not torch.isfinite(c).all():
            warnings.warn("QueryStats: non-finite covariance; using rank 0", RuntimeWarning)
            return torch.zeros(*lead, r), torch.zeros(*lead, r, d)
        try:
            vals, vecs = torch.linalg.eigh(c)
        except RuntimeError:
            warnings.warn("QueryStats: eigendecomposition failed; using rank 0", RuntimeWarning)
            return torch.zeros(*lead, r), torch.zeros(*lead, r, d)
        vals = vals.flip(-1)[..., :r].clamp_min(0.0)
        vecs = vecs.flip(-1)[..., :r].transpose(-1, -2)
        return vals.float(), vecs.float()

    def mean_all(self) -> torch.Tensor:
        """(layers, heads, dim) float32."""
        return self._mean.float()

    def cov_all(self) -> torch.Tensor:
        """(layers, heads, dim, dim) float32, symmetric PSD."""
        c = self._m2 / self.weight.clamp_min(1.0)[:, :, None, None]
        return (0.5 * (c + c.transpose(-1, -2))).float()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running sums themselves, float64, not copies (read them, never write):
        weight (layers, heads), mean (layers, heads, dim) and m2 (layers, heads, dim,
        dim), the covariance being m2 / weight (``cov_all``). The CPU kernels read these
        instead of a float32 copy per call."""
        return self.weight, self._mean, self._m2

    def count(self, layer: int) -> torch.Tensor:
        return self.weight[layer].clone()


# -- distances between Gaussian fits, drift, rank agreement -------------------
# numpy in, numpy out (torch CPU tensors are accepted too). Every function
# returns finite values: non-finite inputs are replaced (with a warning) and
# degenerate cases (zero vectors, constant rankings, zero variances) have a
# documented finite answer.


def _clean(name: str, x, fill: float = 0.0) -> np.ndarray:
    """float64 array; NaN/inf replaced by ``fill`` with a warning naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        warnings.warn(f"{name}: {int(bad.sum())} non-finite values replaced by {fill}",
                      RuntimeWarning, stacklevel=3)
        x = np.where(bad, fill, x)
    return x


def _var(name: str, v) -> np.ndarray:
    v = _clean(name, v)
    if (v < 0).any():
        warnings.warn(f"{name}: negative variances clamped to 0", RuntimeWarning, stacklevel=3)
        v = np.maximum(v, 0.0)
    return v


def frechet_distance(mu1, var1, mu2, var2) -> np.ndarray:
    """Frechet distance between diagonal Gaussians N(mu1, diag var1), N(mu2, diag var2).

    Arrays (..., d), broadcasting over the leading dims -> (...). Returned as the
    SQUARED 2-Wasserstein distance, as FID does:
    ``||mu1 - mu2||^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2``.
    """
    mu1, mu2 = _clean("frechet_distance mu1", mu1), _clean("frechet_distance mu2", mu2)
    s1 = np.sqrt(_var("frechet_distance var1", var1))
    s2 = np.sqrt(_var("frechet_distance var2", var2))
    return ((mu1 - mu2) ** 2).sum(-1) + ((s1 - s2) ** 2).sum(-1)


def sym_kl_diag(mu1, var1, mu2, var2, eps: float = 1e-6) -> np.ndarray:
    """Symmetric KL, KL(p||q) + KL(q||p), of diagonal Gaussians; arrays (..., d) -> (...).

    ``eps`` is added to every variance so zero variances stay finite:
    ``0.5 * sum_i [v1/v2 + v2/v1 - 2 + (mu1 - mu2)^2 (1/v1 + 1/v2)]``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    mu1, mu2 = _clean("sym_kl_diag mu1", mu1), _clean("sym_kl_diag mu2", mu2)
    v1 = _var("sym_kl_diag var1", var1) + eps
    v2 = _var("sym_kl_diag var2", var2) + eps
    dm2 = (mu1 - mu2) ** 2
    return 0.5 * (v1 / v2 + v2 / v1 - 2.0 + dm2 * (1.0 / v1 + 1.0 / v2)).sum(-1)


def cosine(a, b) -> np.ndarray:
    """Cosine similarity over the last axis; (..., d) x (..., d) -> (...).

    A zero vector has no direction: its cosine is 0.0 (with a warning).
    """
    a, b = _clean("cosine a", a), _clean("cosine b", b)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    denom = na * nb
    zero = denom <= 1e-300
    if np.any(zero):
        warnings.warn("cosine: zero vector(s); cosine set to 0", RuntimeWarning, stacklevel=2)
    dot = (a * b).sum(-1)
    return np.where(zero, 0.0, dot / np.where(zero, 1.0, denom))


DRIFT_METRICS = ("frechet", "kl", "cosine")


def drift(mean, var, reference: str = "first", metric: str = "frechet") -> np.ndarray:
    """Drift of per-frame Gaussian fits; mean, var (F, L, H, d) -> (F, L, H).

    reference: "first" compares every frame's fit with frame 0's; "running"
        compares frame i with the fit of frames 0..i-1 pooled with equal weight
        per frame (the equal mixture's mean and variance; frame 0 has no earlier
        frames and is compared with itself, so its drift is 0).
    metric: "frechet" (``frechet_distance``), "kl" (``sym_kl_diag``) or
        "cosine" (``1 - cosine`` of the means, so 0 = no drift for every metric).
    """
    if reference not in ("first", "running"):
        raise ValueError(f"reference must be 'first' or 'running', got {reference!r}")
    if metric not in DRIFT_METRICS:
        raise ValueError(f"metric must be one of {', '.join(DRIFT_METRICS)}, got {metric!r}")
    mean, var = _clean("drift mean", mean), _var("drift var", var)
    if mean.shape != var.shape or mean.ndim != 4:
        raise ValueError(f"mean and var must both be (F, L, H, d), got {mean.shape} and {var.shape}")
    if mean.shape[0] == 0:
        return np.zeros(mean.shape[:3])
    if reference == "first":
        rm, rv = mean[:1], var[:1]
    else:
        n = np.arange(1, mean.shape[0] + 1, dtype=np.float64)[:, None, None, None]
        cm = np.cumsum(mean, 0) / n  # mean over frames 0..i
        csq = np.cumsum(var + mean ** 2, 0) / n
        cv = np.maximum(csq - cm ** 2, 0.0)
        rm = np.concatenate([mean[:1], cm[:-1]], 0)  # frames 0..i-1; frame 0: itself
        rv = np.concatenate([var[:1], cv[:-1]], 0)
    rm, rv = np.broadcast_to(rm, mean.shape), np.broadcast_to(rv, var.shape)
    if metric == "frechet":
        return frechet_distance(mean, var, rm, rv)
    if metric == "kl":
        return sym_kl_diag(mean, var, rm, rv)
    return 1.0 - cosine(mean, rm)


def average_ranks(x) -> np.ndarray:
    """Ranks 0..n-1 along the last axis, ties given their average rank; (..., n)."""
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]) if x.ndim else x.reshape(1, 1)
    M, n = x2.shape
    order = np.argsort(x2, axis=-1, kind="stable")
    s = np.take_along_axis(x2, order, -1)
    pos = np.broadcast_to(np.arange(n), (M, n))
    new = np.ones((M, n), bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)
    end = np.ones((M, n), bool)
    end[:, :-1] = new[:, 1:]
    last = np.minimum.accumulate(np.where(end, pos, n - 1)[:, ::-1], axis=-1)[:, ::-1]
    ranks = np.empty((M, n))
    np.put_along_axis(ranks, order, (first + last) / 2.0, -1)
    return ranks.reshape(shape)


def spearman(a, b):
    """Spearman rank correlation along the last axis; (..., n) x (..., n) -> (...).

    Ties get average ranks. A constant input (no ranking) gives 0.0 with a
    warning; NaN entries rank lowest (with a warning). A scalar result is a float.
    """
    a = _clean("spearman a", a, fill=-np.inf)
    b = _clean("spearman b", b, fill=-np.inf)
    a, b = np.broadcast_arrays(a, b)
    if a.ndim == 0 or a.shape[-1] < 2:
        warnings.warn("spearman: fewer than 2 items; correlation set to 0", RuntimeWarning, stacklevel=2)
        out = np.zeros(a.shape[:-1] if a.ndim else ())
        return float(out) if out.ndim == 0 else out
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    const = den <= 1e-12
    if np.any(const):
        warnings.warn("spearman: constant input; correlation set to 0", RuntimeWarning, stacklevel=2)
    out = np.where(const, 0.0, (ra * rb).sum(-1) / np.where(const, 1.0, den))
    out = np.clip(out, -1.0, 1.0)
    return float(out) if out.ndim == 0 else out


def topb_recall(scores, truth, b: int):
    """Share of the true top-``b`` items (by ``truth``) that are in the top-``b``
    by ``scores``; (..., n) x (..., n) -> (...) in [0, 1].

    ``b`` larger than n is clamped to n (recall 1). Ties are broken by index
    (lower first), the same way for both arrays; NaN ranks lowest.
    """
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"b must be an integer >= 1, got {b!r}")
    s = _clean("topb_recall scores", scores, fill=-np.inf)
    t = _clean("topb_recall truth", truth, fill=-np.inf)
    s, t = np.broadcast_arrays(s, t)
    n = s.shape[-1]
    b = min(int(b), n)
    top_s = np.argsort(-s, axis=-1, kind="stable")[..., :b]
    top_t = np.argsort(-t, axis=-1, kind="stable")[..., :b]
    hit_s = np.zeros(s.shape, bool)
    np.put_along_axis(hit_s, top_s, True, -1)
    found = np.take_along_axis(hit_s, top_t, -1).sum(-1)
    out = found / b
    return float(out) if out.ndim == 0 else out
