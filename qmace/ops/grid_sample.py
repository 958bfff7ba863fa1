"""GridSample (ONNX opset 20+ semantics, N-d): samples X (N, C, *D) at the normalized locations of
``grid`` (N, *O, r), r = len(D), giving Y (N, C, *O). ``grid[..., 0]`` is the last (width) axis of X,
``grid[..., r - 1]`` the first spatial one, each in [-1, 1]; as onnx/reference:

- unnormalize (float32): ``x = (g + 1) / 2 * (d - 1)`` with ``align_corners=1``, else ``((g + 1) * d - 1) / 2``;
- ``mode`` nearest rounds x half to even first; a coordinate outside the border ([0, d - 1] with
  align_corners, else [-0.5, d - 0.5]) is clamped to [0, d - 1] (``padding_mode`` border; not in cubic
  mode, whose taps are clamped one by one instead, as ORT and PyTorch do) or reflected into the border
  (reflection);
- nearest reads ``X[trunc(x)]``; linear (opset 16's "bilinear") blends taps ``floor(x) + {0, 1}`` with
  weights ``1 - t, t`` (t = x - floor(x)); cubic ("bicubic") taps ``floor(x) + {-1, 0, 1, 2}`` with Keys'
  cubic weights (a = -0.75); separably over the spatial axes;
- a tap outside [0, d) reads 0 (zeros), the clamped index (border) or the reflected one (reflection).

No integer kernel (``Kernel.NONE``).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register

_F = np.float32
_MODES = {"bilinear": "linear", "bicubic": "cubic", "linear": "linear", "cubic": "cubic", "nearest": "nearest"}


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect ``x`` by the nearer border until it lies in [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    below, above = x < lo, x > hi
    dx = np.where(below, lo - x, np.where(above, x - hi, 0))
    n = np.trunc(dx / span)
    r = dx - n * span
    even = n % 2 == 0
    return np.where(below, np.where(even, lo + r, hi - r), np.where(above, np.where(even, hi - r, lo + r), x))


def _keys_cubic(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """Weights of taps -1, 0, 1, 2 at fraction ``t`` in [0, 1)."""
    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@register
class GridSample(Op):
    """Sample X at the normalized grid coordinates (module docstring for modes, padding and align_corners)."""
    op_type = "GridSample"
    defaults: ClassVar[dict[str, Any]] = {"align_corners": 0, "mode": "linear", "padding_mode": "zeros"}

    @classmethod
    def run(cls, node, inputs):
        x, grid = np.asarray(inputs[0]), np.asarray(inputs[1])
        dims = x.shape[2:]
        r = len(dims)
        if grid.ndim != r + 2 or grid.shape[-1] != r or grid.shape[0] != x.shape[0]:
            raise ValueError(f"GridSample node {node.name!r}: grid of shape {grid.shape} for input {x.shape}")
        mode = _MODES.get(cls.attr(node, "mode"))
        padding = cls.attr(node, "padding_mode")
        if mode is None or padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"GridSample node {node.name!r}: unknown mode {cls.attr(node, 'mode')!r} "
                             f"or padding_mode {padding!r}")
        align = bool(int(cls.attr(node, "align_corners")))
        out_shape = grid.shape[1:-1]
        if x.size == 0 or grid.size == 0:
            return [np.zeros((*x.shape[:2], *out_shape), x.dtype)]
        taps_per_axis = []  # per spatial axis: list of (index array, weight array), arrays (N, *O)
        for i, d in enumerate(dims):
            g = grid[..., r - 1 - i].astype(_F)
            c = (g + _F(1)) / _F(2) * _F(d - 1) if align else ((g + _F(1)) * _F(d) - _F(1)) / _F(2)
            lo, hi = (0.0, d - 1.0) if align else (-0.5, d - 0.5)
            if mode == "nearest":
                c = np.rint(c)
            if padding == "border" and mode != "cubic":
                c = np.where((c < lo) | (c > hi), np.clip(c, 0, d - 1), c).astype(_F)
            elif padding == "reflection":
                c = _reflect(c, lo, hi).astype(_F)
            if mode == "nearest":
                taps = [(np.trunc(c).astype(np.int64), np.ones(c.shape))]
            else:
                base = np.floor(c)
                t = (c - base).astype(np.float64)
                base = base.astype(np.int64)
                if mode == "linear":
                    taps = [(base, 1 - t), (base + 1, t)]
                else:
                    taps = [(base + k, w) for k, w in zip((-1, 0, 1, 2), _keys_cubic(t))]
            fixed = []
            for idx, w in taps:
                if padding == "zeros":
                    w = np.where((idx >= 0) & (idx < d), w, 0.0)
                elif padding == "reflection":
                    idx = np.trunc(_reflect(idx.astype(np.float64), lo, hi)).astype(np.int64)
                fixed.append((np.clip(idx, 0, d - 1), w))
            taps_per_axis.append(fixed)
        n_index = np.arange(x.shape[0]).reshape(-1, *[1] * len(out_shape))
        y = np.zeros((x.shape[0], *out_shape, x.shape[1]))
        for combo in itertools.product(*taps_per_axis):
            weight = np.prod([w for _, w in combo], axis=0)
            vals = x[(n_index, slice(None), *[idx for idx, _ in combo])]  # (N, *O, C)
            y += vals.astype(np.float64) * weight[..., None]
        return [np.ascontiguousarray(np.moveaxis(y, -1, 1)).astype(x.dtype)]
