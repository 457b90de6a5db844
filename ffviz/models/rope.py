"""3D rotary position embedding with Wan2.1's split of the head dim.

The head dim ``d`` is cut into three parts, each a set of 2D planes made of
interleaved pairs ``(x[2i], x[2i+1])``: temporal first, then height, then width.
Wan2.1 gives the two spatial axes ``2 * (d // 6)`` dims each and the rest to
time (d=128 -> 44/42/42; d=32 -> 12/10/10). Plane ``i`` of an axis with ``n``
dims turns by ``pos * theta ** (-2i / n)``.

Rotations are orthogonal and compose per axis: ``R(a) R(b) = R(a + b)``.
This is what lets a cache store post-RoPE keys and still shift them in time
(``shift_time``), the re-rotation that Deep Forcing needs.
"""
from __future__ import annotations

import torch


def wan_split(head_dim: int) -> tuple[int, int, int]:
    """(temporal, height, width) dims of Wan2.1's 3D RoPE for ``head_dim``."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


class Rope3D:
    """Angles and rotations for positions ``(frame, row, col)``.

    Holds only the per-plane frequencies ``omega`` (d/2,) and which axis each
    plane belongs to; angles are computed on demand, so any frame index works
    (a 1000-frame run needs no table).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, theta_time: float | None = None):
        """``theta``: the base of every axis (Wan: 10000), or of the two spatial axes only
        when ``theta_time`` gives the temporal axis its own (a small grid wants a low
        spatial base, a long run a high temporal one)."""
        self.head_dim = head_dim
        self.split = wan_split(head_dim)
        bases = (theta if theta_time is None else theta_time, theta, theta)
        omegas, axes = [], []
        for axis, n in enumerate(self.split):
            # on the host whatever the default device (a model built under torch.device("cuda"))
            i = torch.arange(n // 2, dtype=torch.float64, device="cpu")
            omegas.append(bases[axis] ** (-2.0 * i / n))
            axes.append(torch.full((n // 2,), axis, dtype=torch.long, device="cpu"))
        self.omega = torch.cat(omegas)  # (d/2,) float64
        self.axis = torch.cat(axes)  # (d/2,) 0=time 1=row 2=col

    def angles(self, frame, row, col) -> torch.Tensor:
        """Plane angles (..., d/2) in float64 for broadcastable position tensors."""
        pos = torch.stack(torch.broadcast_tensors(
            torch.as_tensor(frame, dtype=torch.float64),
            torch.as_tensor(row, dtype=torch.float64),
            torch.as_tensor(col, dtype=torch.float64)), dim=-1)  # (..., 3)
        return pos[..., self.axis] * self.omega

    def cos_sin(self, frame, row, col, dtype=torch.float32):
        a = self.angles(frame, row, col)
        return a.cos().to(dtype), a.sin().to(dtype)

    def grid_cos_sin(self, frames, rows: int, cols: int, dtype=torch.float32):
        """cos/sin (T*rows*cols, d/2) for frames ``frames`` (list/1D) on a full grid,
        token order frame-major then row then column."""
        f = torch.as_tensor(frames, dtype=torch.float64).view(-1, 1, 1)
        y = torch.arange(rows, dtype=torch.float64).view(1, -1, 1)
        x = torch.arange(cols, dtype=torch.float64).view(1, 1, -1)
        c, s = self.cos_sin(f, y, x, dtype)
        return c.reshape(-1, c.shape[-1]), s.reshape(-1, s.shape[-1])

    def matrix(self, frame, row, col) -> torch.Tensor:
        """The (d, d) block-diagonal rotation R(p) for one position (float64)."""
        a = self.angles(frame, row, col)
        c, s = a.cos(), a.sin()
        m = torch.zeros(self.head_dim, self.head_dim, dtype=torch.float64)
        idx = torch.arange(self.head_dim // 2)
        m[2 * idx, 2 * idx] = c
        m[2 * idx, 2 * idx + 1] = -s
        m[2 * idx + 1, 2 * idx] = s
        m[2 * idx + 1, 2 * idx + 1] = c
        return m

    def shift_time(self, x: torch.Tensor, delta) -> torch.Tensor:
        """Rotate post-RoPE vectors (..., d) by ``delta`` frames (R(delta, 0, 0) x).

        ``delta`` broadcasts against ``x.shape[:-1]``.
        """
        c, s = self.cos_sin(delta, 0, 0, dtype=x.dtype)
        return apply_rotation(x, c, s)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., d) by angles given as cos/sin (..., d/2)."""
    x2 = x.unflatten(-1, (-1, 2))
    x0, x1 = x2[..., 0], x2[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
