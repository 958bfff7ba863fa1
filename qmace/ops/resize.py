"""Resize (ONNX opset 19+ semantics): inputs X, roi, scales, sizes; modes nearest and linear.

Output size: ``sizes`` (with ``keep_aspect_ratio_policy`` stretch / not_larger / not_smaller), or
``floor(float32(scale) * in)``; ``axes`` restricts roi/scales/sizes to the listed axes. The coordinate of
output index ``x`` along an axis in the input, ``x_orig``, is computed in float32 exactly as ONNX Runtime does
(so nearest-mode ties resolve identically; half_pixel_symmetric's tail in float64 as ORT), with ``scale`` the given scale or ``float32(out) / float32(in)``:
- half_pixel: ``(x + 0.5) / scale - 0.5``;  pytorch_half_pixel: the same, or 0 when out == 1;
- half_pixel_symmetric: ``in/2 * (1 - out / (scale * in)) + (x + 0.5) / scale - 0.5``;
- align_corners: ``x * (in - 1) / (out - 1)`` (0 when out == 1);  asymmetric: ``x / scale``;
- tf_half_pixel_for_nn: ``(x + 0.5) / scale``;
- tf_crop_and_resize: ``start * (in - 1) + x * (end - start) * (in - 1) / (out - 1)`` (roi start/end), and
  outputs whose ``x_orig`` falls outside [0, in - 1] are ``extrapolation_value``.
nearest: ``x[rnd(x_orig)]`` clamped to [0, in - 1], rnd one of round_prefer_floor, round_prefer_ceil, floor,
ceil. linear: ``x_orig`` clamped to [0, in - 1], ``lo = floor``, ``hi = min(lo + 1, in - 1)``, ``y = (hi -
x_orig) x[lo] + (x_orig - lo) x[hi]`` (weights 1/2, 1/2 when lo == hi), applied separably on every resized
axis (N-d: 1-D, bilinear, trilinear); when exactly the last two axes are resized, in ONNX Runtime's bilinear
order instead (``_bilinear``: four taps, product weights), so float32 results round as ORT's do. cubic, and linear/cubic with antialias=1, weigh taps around
``x_orig`` as onnx/reference does (``_filter_weights``: Keys' cubic with ``cubic_coeff_a``, edge values,
``exclude_outside``), separably, in float64.
Known difference: half_pixel_symmetric + round_prefer_* at a mathematically exact tie that the float
formula misses by one ulp (e.g. scale 0.75 on 6 -> 0.49999997) picks the other neighbour than ORT 1.32 does.

Quantization: nearest only moves codes (``Kernel.COPY``, ``RangeRule.INPUT``); linear and cubic blend them
(``Kernel.FLOAT``: dequantize -> run -> quantize; ORT runs it on uint8 too). The class attribute
``quant_kernel`` states the default mode's kind (COPY); ``kernel_for(node)`` gives the node's, and the
planner and ``run_quantized`` dispatch on it. The output range is the input's in every mode (linear
interpolation stays inside it; cubic overshoot saturates).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node
from qmace.ops.base import Kernel, Op, RangeRule, Sign, register

_F = np.float32


def _given(v: np.ndarray | None) -> bool:
    return v is not None and np.asarray(v).size > 0


def _original_coords(mode: str, out_len: int, in_len: int, scale, start, end) -> np.ndarray:
    """x_orig for x = 0..out_len-1, float32 arithmetic as ONNX Runtime's get_original_coordinate."""
    x = np.arange(out_len, dtype=_F)
    s = _F(scale)
    half = _F(0.5)
    if mode == "half_pixel":
        return (x + half) / s - half
    if mode == "pytorch_half_pixel":
        return (x + half) / s - half if out_len > 1 else np.zeros(out_len, _F)
    if mode == "half_pixel_symmetric":
        adjustment = _F(out_len) / (s * _F(in_len))
        offset = _F(in_len) / _F(2) * (_F(1) - adjustment)
        # ORT adds the double literal 0.5 here: the tail is evaluated in float64, then rounded to float32
        return (offset + (x.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(_F)
    if mode == "align_corners":
        return x * _F(in_len - 1) / _F(out_len - 1) if out_len > 1 else np.zeros(out_len, _F)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / s
    if mode == "tf_crop_and_resize":
        st, en = _F(start), _F(end)
        if out_len > 1:
            return st * _F(in_len - 1) + x * (en - st) * _F(in_len - 1) / _F(out_len - 1)
        return np.full(out_len, 0.5 * np.float64(st + en) * (in_len - 1), _F)  # float64 as ORT
    raise ValueError(f"Resize: unknown coordinate_transformation_mode {mode!r}")


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``std::round`` (exact: no ``floor(x + 0.5)``, which rounds 0.49999997 up in float32)."""
    a = np.abs(x)
    r = np.floor(a)
    return np.copysign(r + (a - r >= 0.5), x)


def _nearest_index(x_orig: np.ndarray, rule: str) -> np.ndarray:
    if rule == "round_prefer_floor":
        fl = np.floor(x_orig)
        return np.where(x_orig - fl == _F(0.5), fl, _round_half_away(x_orig)).astype(np.int64)
    if rule == "round_prefer_ceil":
        return _round_half_away(x_orig).astype(np.int64)
    if rule == "floor":
        return np.floor(x_orig).astype(np.int64)
    if rule == "ceil":
        return np.ceil(x_orig).astype(np.int64)
    raise ValueError(f"Resize: unknown nearest_mode {rule!r}")


def _out_sizes_and_scales(node: Node, shape: tuple[int, ...], roi, scales, sizes):
    """Per axis of x: output size, coordinate scale, roi start and end."""
    op = Resize
    rank = len(shape)
    axes = op.attr(node, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    out = list(shape)
    scale = [1.0] * rank
    if _given(scales):
        sc = np.asarray(scales, _F).reshape(-1)
        if sc.size != len(axes):
            raise ValueError(f"Resize: {sc.size} scales for {len(axes)} axes")
        for a, s in zip(axes, sc):
            scale[a] = _F(s)
            out[a] = int(np.floor(_F(s) * _F(shape[a])))
    elif _given(sizes):
        sz = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if len(sz) != len(axes):
            raise ValueError(f"Resize: {len(sz)} sizes for {len(axes)} axes")
        policy = op.attr(node, "keep_aspect_ratio_policy")
        if policy == "stretch":
            for a, v in zip(axes, sz):
                out[a] = v
        elif policy in ("not_larger", "not_smaller"):
            ratios = [_F(v) / _F(shape[a]) for a, v in zip(axes, sz)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                out[a] = int(np.floor(r * _F(shape[a]) + _F(0.5)))
                scale[a] = r
        else:
            raise ValueError(f"Resize: unknown keep_aspect_ratio_policy {policy!r}")
        if policy == "stretch":
            for a in axes:
                scale[a] = _F(out[a]) / _F(shape[a])
    else:
        raise ValueError(f"Resize node {node.name!r}: one of scales and sizes must be given")
    start, end = [0.0] * rank, [1.0] * rank
    if _given(roi):
        r = np.asarray(roi, _F).reshape(-1)
        if r.size != 2 * len(axes):
            raise ValueError(f"Resize: roi has {r.size} values for {len(axes)} axes")
        for i, a in enumerate(axes):
            start[a], end[a] = r[i], r[i + len(axes)]
    return out, scale, start, end


def _cubic(d: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a`` at distance ``d``."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _filter_weights(node: Node, xo: np.ndarray, in_len: int, scale: float) -> np.ndarray:
    """(out, in) float64 weights of cubic, or antialiased linear/cubic, interpolation (onnx/reference).

    ``base = ceil(x_orig) - 1`` and ``ratio = x_orig - base`` in (0, 1]; taps ``base + i`` for
    ``i = i0 .. 1 - i0``. Without antialias ``i0 = -1`` (cubic, 4 taps, ``w_i = cubic(i - ratio)``). With
    antialias the filter is stretched by ``1 / s``, ``s = min(scale, 1)`` (downsampling only):
    ``i0 = floor(-R / s) + 1``, R = 1 (linear: ``w_i = max(0, 1 - |s (i - ratio)|)``) or 2 (cubic:
    ``w_i = cubic(s (i - ratio))``), weights normalized to sum 1. Taps outside [0, in) read the edge
    value, or with ``exclude_outside`` get weight 0 (the rest renormalized).
    """
    op = Resize
    mode = op.attr(node, "mode")
    a = float(op.attr(node, "cubic_coeff_a"))
    antialias = bool(int(op.attr(node, "antialias")))
    s = min(float(scale), 1.0) if antialias else 1.0
    reach = 2 if mode == "cubic" else 1
    i0 = int(np.floor(-reach / s) + 1)
    taps = np.arange(i0, 1 - i0 + 1 if reach == 1 else 2 - i0)
    xo = xo.astype(np.float64)
    base = np.ceil(xo) - 1
    ratio = xo - base
    dist = (taps[None, :] - ratio[:, None]) * s
    w = _cubic(dist, a) if mode == "cubic" else np.clip(1 - np.abs(dist), 0, 1)
    if antialias:
        w = w / w.sum(axis=1, keepdims=True)
    idx = base.astype(np.int64)[:, None] + taps[None, :]
    if int(op.attr(node, "exclude_outside")):
        w = np.where((idx < 0) | (idx >= in_len), 0.0, w)
        w = w / w.sum(axis=1, keepdims=True)
    weights = np.zeros((len(xo), in_len))
    rows = np.broadcast_to(np.arange(len(xo))[:, None], idx.shape)
    np.add.at(weights, (rows, np.clip(idx, 0, in_len - 1)), w)
    return weights


def _plan(node: Node, shape: tuple[int, ...], roi, scales, sizes) -> tuple[list[tuple], np.ndarray | None]:
    """What :func:`resize` does, per axis, as index and weight arrays (numpy, float32 coordinates as ORT):
    ``(axis, "weights", w)`` (cubic / antialias: ``(out, in)`` float64 taps), ``(axis, "take", idx)``
    (nearest) or ``(axis, "lerp", lo, hi, w_lo, w_hi)`` (linear); identity axes are left out. The second
    value is the boolean mask of outputs outside the crop (tf_crop_and_resize), or None.

    Raises:
        ValueError: an unknown mode or transformation, or scales/sizes that do not fit the input.
        NotImplementedError: antialias with nearest mode.
    """
    op = Resize
    mode = op.attr(node, "mode")
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize node {node.name!r}: unknown mode {mode!r}")
    if mode == "nearest" and int(op.attr(node, "antialias")):
        raise NotImplementedError(f"Resize node {node.name!r}: antialias=1 applies to linear and cubic only")
    filtered = mode == "cubic" or int(op.attr(node, "antialias"))
    ctm = op.attr(node, "coordinate_transformation_mode")
    crop = ctm == "tf_crop_and_resize"
    out, scale, start, end = _out_sizes_and_scales(node, shape, roi, scales, sizes)
    steps: list[tuple] = []
    outside = None  # boolean mask over y's resized axes (broadcastable), tf_crop_and_resize only
    for a, in_len in enumerate(shape):
        if out[a] == in_len and scale[a] == 1.0 and not crop:
            continue  # identity along this axis for every mode
        xo = _original_coords(ctm, out[a], in_len, scale[a], start[a], end[a])
        if crop:
            oob = (xo < 0) | (xo > _F(in_len - 1))
            mask_shape = [1] * len(shape)
            mask_shape[a] = out[a]
            oob = oob.reshape(mask_shape)
            outside = oob if outside is None else (outside | oob)
        if filtered:
            steps.append((a, "weights", _filter_weights(node, xo, in_len, scale[a])))
        elif mode == "nearest":
            steps.append((a, "take", np.clip(_nearest_index(xo, op.attr(node, "nearest_mode")), 0, in_len - 1)))
        else:
            xc = np.clip(xo, _F(0), _F(in_len - 1))
            lo = np.minimum(xc.astype(np.int64), in_len - 1)
            hi = np.minimum(lo + 1, in_len - 1)
            w_hi = np.abs(xc - lo.astype(_F))
            w_lo = np.abs(xc - hi.astype(_F))
            same = lo == hi
            steps.append((a, "lerp", lo, hi, np.where(same, _F(0.5), w_lo), np.where(same, _F(0.5), w_hi)))
    return steps, outside


def _broadcast_along(v, axis: int, ndim: int):
    shape = [1] * ndim
    shape[axis] = len(v)
    return v.reshape(shape)


def _bilinear(x: np.ndarray, steps: list[tuple]) -> np.ndarray:
    """Linear resizing of the last two axes as ONNX Runtime's bilinear kernel sums it (float32, one output from
    four taps, each weighted by the product of its row and column weights, added in the order
    (y_lo, x_lo), (y_lo, x_hi), (y_hi, x_lo), (y_hi, x_hi)): the separable form rounds differently, one step on
    about 1% of uint8 codes after quantization."""
    (ay, _, ylo, yhi, wy_lo, wy_hi), (ax, _, xlo, xhi, wx_lo, wx_hi) = steps
    top, bot = np.take(x, ylo, axis=ay), np.take(x, yhi, axis=ay)
    cy_lo, cy_hi = wy_lo[:, None], wy_hi[:, None]
    cx_lo, cx_hi = wx_lo[None, :], wx_hi[None, :]
    return ((cx_lo * cy_lo) * np.take(top, xlo, axis=ax) + (cx_hi * cy_lo) * np.take(top, xhi, axis=ax)
            + (cx_lo * cy_hi) * np.take(bot, xlo, axis=ax) + (cx_hi * cy_hi) * np.take(bot, xhi, axis=ax))


def resize(node: Node, x: np.ndarray, roi, scales, sizes, extrapolation) -> np.ndarray:
    """The Resize kernel; ``extrapolation`` is the value written outside the crop (tf_crop_and_resize).

    Args:
        node: the Resize node (mode, coordinate_transformation_mode, nearest_mode, cubic_coeff_a, antialias,
            exclude_outside, axes, keep_aspect_ratio_policy).
        x: the input.
        roi: the optional roi input (tf_crop_and_resize), or None.
        scales: the optional scales input, or None.
        sizes: the optional sizes input, or None.
        extrapolation: the value written outside the crop.

    Returns:
        The resized array in x's dtype.

    Raises:
        ValueError: an unknown mode or transformation, or scales/sizes that do not fit the input.
        NotImplementedError: antialias with nearest mode.
    """
    steps, outside = _plan(node, x.shape, roi, scales, sizes)
    y = x
    if [(a, kind) for a, kind, *_ in steps] == [(x.ndim - 2, "lerp"), (x.ndim - 1, "lerp")]:
        y, steps = _bilinear(x, steps), []
    for a, kind, *arrays in steps:
        if kind == "weights":
            y = np.moveaxis(np.tensordot(arrays[0], np.moveaxis(y, a, 0).astype(np.float64), axes=(1, 0)), 0, a)
        elif kind == "take":
            y = np.take(y, arrays[0], axis=a)
        else:
            lo, hi, w_lo, w_hi = arrays
            y = (np.take(y, lo, axis=a) * _broadcast_along(w_lo, a, x.ndim)
                 + np.take(y, hi, axis=a) * _broadcast_along(w_hi, a, x.ndim))
    if outside is not None:
        y = np.where(outside, np.asarray(extrapolation).astype(x.dtype), y)
    return np.ascontiguousarray(y.astype(x.dtype, copy=False))


def resize_torch(node: Node, x, roi, scales, sizes, extrapolation):
    """:func:`resize` on a float torch tensor, differentiable in ``x``: the same index and weight arrays
    (:func:`_plan`), applied with torch (float32; the cubic / antialias taps in float64 as the numpy kernel).
    A batch of N > 1 samples through a graph whose ``sizes`` say batch 1 (QAT trains the YAML's batch-1
    graph on batches, as Reshape's torch kernel does) keeps its batch: each sample is resized as alone.

    Args:
        node: the Resize node.
        x: the input tensor.
        roi: roi, scales, sizes: constants (numpy arrays, tensors or None).
        scales: see ``roi``.
        sizes: see ``roi``.
        extrapolation: the value written outside the crop.

    Returns:
        The resized tensor in x's dtype.
    """
    import torch

    def const(v):
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v

    shape = tuple(x.shape)
    args = (const(roi), const(scales), const(sizes))
    steps, outside = _plan(node, shape, *args)
    if shape and shape[0] > 1 and any(step[0] == 0 for step in steps):
        # QAT runs the YAML's batch-1 graph on a batch: ``sizes`` written for batch 1 keep the batch as it is
        steps, outside = _plan(node, (1, *shape[1:]), *args)
        if any(step[0] == 0 for step in steps):
            raise ValueError(f"Resize node {node.name!r}: resizes the batch axis")
    y = x
    for a, kind, *arrays in steps:
        if kind == "weights":
            w = torch.from_numpy(arrays[0]).to(x.device)
            y = torch.movedim(torch.tensordot(w, torch.movedim(y, a, 0).to(torch.float64), dims=([1], [0])),
                              0, a).to(x.dtype)
        elif kind == "take":
            y = torch.index_select(y, a, torch.from_numpy(arrays[0]).to(x.device))
        else:
            lo, hi, w_lo, w_hi = (torch.from_numpy(np.ascontiguousarray(v)).to(x.device) for v in arrays)
            y = (torch.index_select(y, a, lo) * _broadcast_along(w_lo, a, x.ndim).to(y.dtype)
                 + torch.index_select(y, a, hi) * _broadcast_along(w_hi, a, x.ndim).to(y.dtype))
    if outside is not None:
        y = torch.where(torch.from_numpy(outside).to(x.device),
                        torch.tensor(float(extrapolation), dtype=y.dtype, device=y.device), y)
    return y


@register
class Resize(Op):
    """Resize X by ``scales`` or to ``sizes`` with nearest, linear or cubic interpolation (module docstring for
    the coordinate transformations). Nearest copies codes; linear/cubic run as "float".
    """
    op_type = "Resize"
    sign = Sign.FIRST
    # Nearest, linear and cubic outputs are per-channel weighted sums of X, so a positive per-channel scale
    # commutes with them where N and C are kept (equalization); not tf_crop_and_resize's extrapolation value.
    channelwise = True
    defaults: ClassVar[dict[str, Any]] = {
        "antialias": 0,
        "axes": None,
        "coordinate_transformation_mode": "half_pixel",
        "cubic_coeff_a": -0.75,
        "exclude_outside": 0,
        "extrapolation_value": 0.0,
        "keep_aspect_ratio_policy": "stretch",
        "mode": "nearest",
        "nearest_mode": "round_prefer_floor",
    }
    quant_kernel = Kernel.COPY  # for the default mode (nearest); see kernel_for
    kernel_variants: ClassVar[dict[str, Kernel]] = {
        "mode=nearest": Kernel.COPY, "mode=linear": Kernel.FLOAT, "mode=cubic": Kernel.FLOAT}
    range_rule = RangeRule.INPUT

    @classmethod
    def is_channelwise(cls, node, shape_of):
        si, so = shape_of(node.inputs[0]), shape_of(node.outputs[0])
        return (cls.attr(node, "coordinate_transformation_mode") != "tf_crop_and_resize"
                and si is not None and so is not None and len(si) >= 2 and tuple(si[:2]) == tuple(so[:2]))

    @classmethod
    def kernel_for(cls, node: Node) -> Kernel:
        """The kernel this node's mode has: COPY for nearest, FLOAT for linear (and cubic), which blends codes.

        Args:
            node: a Resize node.

        Returns:
            ``Kernel.COPY`` or ``Kernel.FLOAT``.
        """
        return Kernel.COPY if cls.attr(node, "mode") == "nearest" else Kernel.FLOAT

    @staticmethod
    def _args(inputs):
        x = inputs[0]
        roi, scales, sizes = (list(inputs[1:]) + [None, None, None])[:3]
        return x, roi, scales, sizes

    @classmethod
    def run(cls, node, inputs):
        x, roi, scales, sizes = cls._args(inputs)
        return [resize(node, x, roi, scales, sizes, cls.attr(node, "extrapolation_value"))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: :func:`resize_torch` (the numpy kernel's index and weight arrays, applied with torch)."""
        x, roi, scales, sizes = cls._args(inputs)
        return [resize_torch(node, x, roi, scales, sizes, cls.attr(node, "extrapolation_value"))]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace import qmath

        x, roi, scales, sizes = cls._args(inputs)
        xq = in_qp[0]
        yq = out_qp[0] if out_qp[0] is not None else xq
        extrap = float(cls.attr(node, "extrapolation_value"))
        if cls.kernel_for(node) is Kernel.COPY:
            code = qmath.quantize(np.array(extrap, np.float32), yq)
            return [resize(node, x, roi, scales, sizes, code)]
        y = resize(node, qmath.dequantize(x, xq), roi, scales, sizes, extrap)
        return [qmath.quantize(y, yq)]
