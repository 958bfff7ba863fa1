"""Pooling (ONNX opset 19+ semantics): MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool; 1-D/2-D/3-D.

Output size per spatial axis, with ``eff = (k - 1) * d + 1`` and ``pb``/``pe`` the begin/end pads:
``out = floor((in + pb + pe - eff) / s) + 1`` (``ceil`` instead of ``floor`` when ``ceil_mode``; a window
that would start past ``in + pb`` — i.e. wholly in the end padding — is dropped). ``auto_pad`` SAME_* pads
to ``out = ceil(in / s)`` (extra pad at the end for SAME_UPPER, at the begin for SAME_LOWER); VALID pads 0.

- MaxPool: ``y[o] = max_k x_pad[o*s + k*d]``; pads and the ceil-mode overhang hold the lowest value of the
  dtype (-inf, or the lowest integer code), so they never win. The optional Indices output holds where
  each maximum came from (``MaxPool._with_indices``). On 8-bit codes max commutes with the
  monotone dequantization, hence ``Kernel.COPY`` (exact).
- AveragePool: ``y[o] = sum_k x_pad[o*s + k*d] / count[o]`` with pads 0; ``count`` is the number of taps
  inside the data (count_include_pad=0) or inside data + explicit pads (count_include_pad=1; the ceil-mode
  overhang is never counted), as ONNX Runtime. ``Kernel.FLOAT`` (QLinearAveragePool in ORT); on uint8 codes
  its rounding (zero point added before rounding), and a window over the whole unpadded input is a global mean
  on codes (below).
- GlobalAveragePool / GlobalMaxPool: mean / max over all spatial axes, keeping them as size 1. On uint8 codes
  the mean is ONNX Runtime's QLinearGlobalAveragePool arithmetic (``_global_mean_codes``: exact integer sum,
  one float32 multiplier, round half to even), which ORT also runs for a global-window AveragePool.
Loops run over kernel taps only; each tap is one strided numpy slice over all pixels.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import numpy as np

from qmace import qmath
from qmace.ir import Node
from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.qlinear import uint8_per_tensor
from qmace.ops.util import conv_pads, is_torch


def _lowest(dtype: np.dtype):
    return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


def _geometry(op: type[Op], node: Node, x: np.ndarray):
    """Kernel, strides, dilations, begin pads and output size for each spatial axis of ``x`` (N, C, *S)."""
    spatial = x.shape[2:]
    nd = len(spatial)
    kernel = tuple(int(k) for k in op.attr(node, "kernel_shape"))
    if len(kernel) != nd:
        raise ValueError(f"{op.op_type} node {node.name!r}: kernel_shape {kernel} for {nd} spatial axes")
    strides = tuple(op.attr(node, "strides") or [1] * nd)
    dilations = tuple(op.attr(node, "dilations") or [1] * nd)
    pads = conv_pads(spatial, kernel, strides, dilations, op.attr(node, "pads"), op.attr(node, "auto_pad"))
    ceil_mode = bool(op.attr(node, "ceil_mode"))
    out = []
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        span = size + pads[i] + pads[i + nd] - ((k - 1) * d + 1)
        o = (math.ceil(span / s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= size + pads[i]:
            o -= 1
        out.append(o)
    return kernel, strides, dilations, pads, tuple(out)


def _padded(x: np.ndarray, kernel, strides, dilations, pads, out, value, end_value=None) -> np.ndarray:
    """x padded with ``value`` by ``pads`` and then with ``end_value`` (default ``value``) up to the extent
    the output windows read (the ceil-mode overhang), or cropped where they read less."""
    nd = len(kernel)
    width = [(0, 0)] * (x.ndim - nd)
    extra = []
    for i in range(nd):
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        have = x.shape[x.ndim - nd + i] + pads[i] + pads[i + nd]
        width.append((pads[i], max(0, pads[i + nd])))
        extra.append(need - have)
    xp = _pad(x, width, value) if any(w != (0, 0) for w in width) else x
    if any(e > 0 for e in extra):
        w2 = [(0, 0)] * (x.ndim - nd) + [(0, max(e, 0)) for e in extra]
        xp = _pad(xp, w2, value if end_value is None else end_value)
    return xp


def _pad(x, width: list[tuple[int, int]], value):
    """Constant padding by ``width`` (one (before, after) pair per axis) of a numpy array or torch tensor."""
    if not is_torch(x):
        return np.pad(x, width, constant_values=value)
    import torch.nn.functional as F

    flat = [p for pair in reversed(width) for p in pair]  # F.pad: last axis first
    return F.pad(x, flat, value=float(value))


def _taps(xp: np.ndarray, kernel, strides, dilations, out):
    """For every kernel tap, the strided view ``xp[..., o*s + k*d]`` over all outputs o: (N, C, *out)."""
    nd = len(kernel)
    for tap in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None)] * (xp.ndim - nd)
        for i, k in enumerate(tap):
            start = k * dilations[i]
            index.append(slice(start, start + (out[i] - 1) * strides[i] + 1, strides[i]))
        yield xp[tuple(index)]


def _global_mean_codes(q: np.ndarray, in_qp, out_qp) -> np.ndarray | None:
    """uint8 codes averaged over every spatial axis as ONNX Runtime's QLinearGlobalAveragePool computes them
    (MLAS, its x86 kernels and portable C++): ``acc = sum(q) - z_x N`` exactly in int32, then
    ``y = clip(rint(float32(acc) * float32(s_x / (s_y * float32(N)))) + z_y, 0, 255)``. None where that kernel
    does not apply (other types, per-channel parameters, a scale outside MLAS's range): the float definition.

    Args:
        q: the (N, C, *S) input codes.
        in_qp: their parameters.
        out_qp: the output's parameters.

    Returns:
        The (N, C, 1, ...) output codes, or None.
    """
    if not uint8_per_tensor(in_qp, out_qp):
        return None
    n = int(np.prod(q.shape[2:]))
    scale = np.float32(in_qp.scale) / (np.float32(out_qp.scale) * np.float32(n))
    if not (0 < n < 1 << 24 and 2.0 ** -32 <= scale < 256.0):
        return None
    axes = tuple(range(2, q.ndim))
    acc = np.asarray(q, np.int64).sum(axis=axes, keepdims=True) - int(in_qp.zero_point) * n
    y = np.rint(acc.astype(np.float32) * np.float32(scale)) + int(out_qp.zero_point)
    return np.clip(y, 0, 255).astype(np.uint8)


_POOL_DEFAULTS = {
    "auto_pad": "NOTSET",
    "ceil_mode": 0,
    "dilations": None,
    "kernel_shape": None,
    "pads": None,
    "strides": None,
}


@register
class MaxPool(Op):
    """``y[o] = max_k x_pad[o*s + k*d]`` (module docstring for output size, ceil mode and the optional int64
    Indices output). Copies codes.
    """
    op_type = "MaxPool"
    channelwise = True
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {**_POOL_DEFAULTS, "storage_order": 0}
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def is_channelwise(cls, node, shape_of):
        return not (len(node.outputs) > 1 and node.outputs[1])  # the Indices output would not follow

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        kernel, strides, dilations, pads, out = _geometry(cls, node, x)
        xp = _padded(x, kernel, strides, dilations, pads, out, _lowest(x.dtype))
        if len(node.outputs) > 1 and node.outputs[1]:
            return list(cls._with_indices(node, x, xp, kernel, strides, dilations, pads, out))
        y = None
        for view in _taps(xp, kernel, strides, dilations, out):
            y = view.copy() if y is None else np.maximum(y, view, out=y)
        return [y]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``max_pool{1,2,3}d`` over ``x`` padded as in ``run`` (pads and ceil-mode overhang hold -inf),
        so the gradient goes to one maximum per window, as torch's pooling routes it. No Indices output."""
        import torch.nn.functional as F

        x = inputs[0]
        if len(node.outputs) > 1 and node.outputs[1]:
            raise NotImplementedError(f"MaxPool node {node.name!r}: the Indices output has no torch kernel")
        kernel, strides, dilations, pads, out = _geometry(cls, node, x)
        xp = _padded(x, kernel, strides, dilations, pads, out, -math.inf)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
        y = pool(xp, kernel, strides, 0, dilations)
        return [y[(..., *(slice(0, o) for o in out))]]

    @classmethod
    def _with_indices(cls, node, x, xp, kernel, strides, dilations, pads, out):
        """Max and its int64 index into ``x`` flattened: ``(n * C + c) * prod(S) + flat(position)``, the
        position flattened row-major (storage_order 0) or column-major (1); the first maximum in scan
        order wins, as ORT."""
        spatial = x.shape[2:]
        nd = len(spatial)
        col_major = int(cls.attr(node, "storage_order")) == 1
        mult = [math.prod(spatial[:i]) if col_major else math.prod(spatial[i + 1:]) for i in range(nd)]
        base = (np.arange(x.shape[0] * x.shape[1], dtype=np.int64) * math.prod(spatial)).reshape(
            x.shape[0], x.shape[1], *[1] * nd)
        y = idx = None
        for tap, view in zip(itertools.product(*(range(k) for k in kernel)),
                             _taps(xp, kernel, strides, dilations, out)):
            flat = np.zeros([1] * nd, np.int64)
            for i in range(nd):
                coord = np.arange(out[i], dtype=np.int64) * strides[i] + tap[i] * dilations[i] - pads[i]
                flat = flat + (coord * mult[i]).reshape([-1 if j == i else 1 for j in range(nd)])
            if y is None:
                y, idx = view.copy(), np.broadcast_to(base + flat, view.shape).copy()
            else:
                better = view > y
                y = np.where(better, view, y)
                idx = np.where(better, base + flat, idx)
        return y, idx


@register
class AveragePool(Op):
    """``y[o] = sum_k x_pad[o*s + k*d] / count[o]`` with pads 0 and ``count`` per ``count_include_pad``
    (module docstring).
    """
    op_type = "AveragePool"
    channelwise = True
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {**_POOL_DEFAULTS, "count_include_pad": 0}
    quant_kernel = Kernel.FLOAT
    range_rule = RangeRule.INPUT

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        kernel, strides, dilations, pads, out = _geometry(cls, node, x)
        xp = _padded(x, kernel, strides, dilations, pads, out, 0)
        total = None
        for view in _taps(xp, kernel, strides, dilations, out):
            total = view.astype(np.float32) if total is None else np.add(total, view, out=total)
        count = cls._count(node, x.shape, kernel, strides, dilations, pads, out)
        return [(total / count).astype(x.dtype, copy=False)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """uint8 per tensor, as ONNX Runtime computes it: a window over the whole unpadded input is a global mean
        (QLinearGlobalAveragePool, :func:`_global_mean_codes`); any other window is QLinearAveragePool's float32
        mean of the dequantized taps (``run``: the same tap order) quantized as ``rint(y / s_y + z_y)``, the zero
        point added before rounding. Other types: the float definition."""
        x, qx, qy = inputs[0], in_qp[0], out_qp[0]
        if is_torch(x) or x.ndim < 3 or not uint8_per_tensor(qx, qy):
            return super().run_quantized(node, inputs, in_qp, out_qp)
        kernel, _, _, pads, out = _geometry(cls, node, x)
        if tuple(kernel) == tuple(x.shape[2:]) and not any(pads) and all(o == 1 for o in out):
            y = _global_mean_codes(np.asarray(x), qx, qy)
            if y is not None:
                return [y]
        mean = cls.run(node, [qmath.dequantize(x, qx)])[0]
        codes = np.rint((mean / np.float32(qy.scale)).astype(np.float32) + np.float32(int(qy.zero_point)))
        return [np.clip(codes, 0, 255).astype(np.uint8)]

    @classmethod
    def _count(cls, node, shape, kernel, strides, dilations, pads, out) -> np.ndarray:
        """The divisor (1, 1, *out): pool a mask of the spatial extent (1 = counted) with the same geometry."""
        mask = np.ones((1, 1, *shape[2:]), np.float32)
        include = float(bool(cls.attr(node, "count_include_pad")))
        mp = _padded(mask, kernel, strides, dilations, pads, out, include, end_value=0.0)
        count = None
        for view in _taps(mp, kernel, strides, dilations, out):
            count = view.copy() if count is None else count + view
        return count

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the sum over the same taps as ``run`` divided by the same count. Without dilation the sum is
        torch's own window sum (``avg_pool`` times the window size, on the padded input: one kernel, one
        backward node, however large the window); with dilation, the taps one by one."""
        import torch
        import torch.nn.functional as F

        x = inputs[0]
        kernel, strides, dilations, pads, out = _geometry(cls, node, x)
        xp = _padded(x, kernel, strides, dilations, pads, out, 0.0)
        nd = len(kernel)
        if 1 <= nd <= 3 and all(d == 1 for d in dilations):
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
            lead = xp.shape[:-nd]
            flat = xp.reshape(-1, 1, *xp.shape[-nd:]) if xp.ndim != nd + 2 else xp
            total = pool(flat, list(kernel), list(strides)) * float(np.prod(kernel))
            total = total.reshape(*lead, *total.shape[-nd:])
            total = total[(..., *(slice(0, o) for o in out))]
        else:
            total = None
            for view in _taps(xp, kernel, strides, dilations, out):
                total = view if total is None else total + view
        count = cls._count(node, tuple(x.shape), kernel, strides, dilations, pads, out)
        return [total / torch.from_numpy(count).to(x.device)]


@register
class GlobalAveragePool(Op):
    """Mean over all spatial axes, which stay as size 1."""
    op_type = "GlobalAveragePool"
    channelwise = True
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel = Kernel.FLOAT
    range_rule = RangeRule.INPUT

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32).astype(x.dtype, copy=False)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """uint8: ONNX Runtime's QLinearGlobalAveragePool arithmetic (:func:`_global_mean_codes`: an exact integer
        sum, one float32 multiplier); otherwise the float definition."""
        y = None if is_torch(inputs[0]) else _global_mean_codes(np.asarray(inputs[0]), in_qp[0], out_qp[0])
        return [y] if y is not None else super().run_quantized(node, inputs, in_qp, out_qp)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the mean over the spatial axes."""
        x = inputs[0]
        return [x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)]


@register
class GlobalMaxPool(Op):
    """Max over all spatial axes, which stay as size 1. Copies codes."""
    op_type = "GlobalMaxPool"
    channelwise = True
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        return [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the maximum over the spatial axes."""
        x = inputs[0]
        return [x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)]
