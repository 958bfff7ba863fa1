"""One converter per Caffe layer type: Caffe semantics -> IR nodes with ONNX names (opset 21).

Each converter gets the layer, the tensor names of its bottoms and the names its tops must take, adds
nodes to the graph and records the tops' static shapes. Shapes follow Caffe's layer ``Reshape`` rules:

- Convolution: ``out = floor((in + 2p - (d(k - 1) + 1)) / s) + 1`` (= ONNX Conv); weights
  (num_output, C/group, k...), bias (num_output) when ``bias_term``.
- Deconvolution: ``out = s(in - 1) + d(k - 1) + 1 - 2p`` (= ONNX ConvTranspose); weights (C, num_output/group, k...).
- InnerProduct: ``y = flatten(x, axis) W^T + b`` (W (N, K), or (K, N) when ``transpose``) -> Flatten + Gemm.
- Pooling: ``out = ceil((in + 2p - k) / s) + 1`` (``round_mode: FLOOR``: floor), then, when p > 0, one less
  if the last window would start at or past ``in + p``. ONNX MaxPool/AveragePool with ``ceil_mode`` computes
  the same size; a geometry where Caffe keeps a window that starts in the end padding (p = 0, s > k) is
  rejected. AVE divides by the window clipped to ``[-p, in + p)`` (padding counted, the ceil-mode overhang
  not): ONNX ``count_include_pad = 1``. Global pooling -> GlobalMaxPool / GlobalAveragePool.
- BatchNorm: mean = blob0 / s, var = blob1 / s with s = blob2[0] (0 when s = 0) -> BatchNormalization
  with scale 1 and bias 0; a following Scale becomes a second BatchNormalization (mean 0, var 1, eps 0,
  so ``y = gamma x + beta`` exactly) that ``net.merge_affine_batchnorms`` merges into the first; the
  optimizer folds the result into a convolution before it.
- Scale / Bias with a blob over axes [axis, axis + num_axes) -> Mul / Add with the blob reshaped to
  broadcast (the BatchNormalization form above when axis = 1 and num_axes = 1); with a second bottom the
  factor is that blob, reshaped the same way.
- Eltwise: SUM -> Add chain (each input first multiplied by its ``coeff`` when it is not 1), PROD -> Mul
  chain, MAX -> Max.
- Power: ``y = (shift + scale x) ^ power`` -> Mul, Add, Pow (identity steps omitted).
- Crop: bottom 0 cut to bottom 1's shape on the axes from ``axis`` on, at ``offset`` -> Slice.
- Slice -> Split; Flatten / Reshape -> Reshape; Concat, Softmax (one axis), ReLU (LeakyRelu when
  ``negative_slope``), PReLU, Sigmoid, TanH, AbsVal, Clip map one to one; Dropout and Split are copies.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qmace.frontends.caffe.net import Context, Layer

log = logging.getLogger(__name__)

Converter = Callable[[Context, Layer, list[str], list[str]], None]
CONVERTERS: dict[str, Converter] = {}
IGNORED = {"Silence"}  # layers without outputs that inference skips


def converts(*types: str) -> Callable[[Converter], Converter]:
    """Decorator: register ``fn`` as the converter of the given Caffe layer types.

    Args:
        *types: Caffe layer type names (``"Convolution"``, ...).

    Returns:
        The decorator, which returns ``fn`` unchanged.
    """
    def deco(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn
    return deco


def _axis(ctx: Context, layer: Layer, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ctx.fail(layer, f"axis {axis} out of range for a rank-{rank} bottom")
    return axis % rank


def _spatial(values: Sequence[int], h: int | None, w: int | None, nd: int, default: int, what: str,
             ctx: Context, layer: Layer) -> list[int]:
    """Caffe's per-axis size: the ``*_h``/``*_w`` pair (2-D), else one value for every axis or one per axis."""
    if h is not None or w is not None:
        if nd != 2 or h is None or w is None:
            raise ctx.fail(layer, f"{what}_h/{what}_w need both values and a 2-D spatial input")
        return [h, w]
    if not values:
        return [default] * nd
    if len(values) == 1:
        return [int(values[0])] * nd
    if len(values) != nd:
        raise ctx.fail(layer, f"{len(values)} {what} values for {nd} spatial axes")
    return [int(v) for v in values]


def _opt(msg: Any, field: str) -> int | None:
    return int(getattr(msg, field)) if msg.HasField(field) else None


# ---- inputs-free data movement ----------------------------------------------------------------------

@converts("Dropout", "Split")
def _copy(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    for k, o in enumerate(outs):
        ctx.node("Identity", [ins[0]], [o], f"{layer.name}_{k}" if len(outs) > 1 else layer.name,
                 [ctx.shape(ins[0])])


# ---- convolution, inner product, pooling -----------------------------------------------------------------

def _conv_geometry(ctx: Context, layer: Layer, nd: int) -> dict[str, list[int]]:
    p = layer.msg.convolution_param
    if p.axis != 1:
        raise ctx.fail(layer, f"convolution_param.axis {p.axis} is not supported (only 1, the channel axis)")
    kernel = _spatial(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), nd, 0, "kernel", ctx, layer)
    if min(kernel) <= 0:
        raise ctx.fail(layer, "convolution_param needs kernel_size (or kernel_h and kernel_w)")
    hw_pad = p.HasField("pad_h") or p.HasField("pad_w")  # then both count, 0 when not given (as Caffe)
    pads = _spatial(p.pad, p.pad_h if hw_pad else None, p.pad_w if hw_pad else None, nd, 0, "pad", ctx, layer)
    strides = _spatial(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), nd, 1, "stride", ctx, layer)
    dilations = _spatial(p.dilation, None, None, nd, 1, "dilation", ctx, layer)
    if min(strides) <= 0 or min(dilations) <= 0:
        raise ctx.fail(layer, f"strides {strides} and dilations {dilations} must be positive")
    return {"kernel_shape": kernel, "pads": pads + pads, "strides": strides, "dilations": dilations}


@converts("Convolution", "Deconvolution")
def _conv(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.convolution_param
    x = ctx.shape(ins[0])
    nd = len(x) - 2
    if nd < 1:
        raise ctx.fail(layer, f"bottom of shape {x} has no spatial axes")
    geo = _conv_geometry(ctx, layer, nd)
    group, m, c = int(p.group), int(p.num_output), x[1]
    if m <= 0 or c % group or m % group:
        raise ctx.fail(layer, f"num_output {m} and {c} input channels must be positive multiples of group {group}")
    deconv = layer.type == "Deconvolution"
    w_shape = (c, m // group, *geo["kernel_shape"]) if deconv else (m, c // group, *geo["kernel_shape"])
    expected = [("weight", w_shape)] + ([("bias", (m,))] if p.bias_term else [])
    blobs = ctx.weights(layer, expected)
    spatial = []
    for i in range(nd):
        k, s, d, pad = geo["kernel_shape"][i], geo["strides"][i], geo["dilations"][i], geo["pads"][i]
        span = d * (k - 1) + 1
        size = s * (x[2 + i] - 1) + span - 2 * pad if deconv else (x[2 + i] + 2 * pad - span) // s + 1
        if size <= 0:
            raise ctx.fail(layer, f"output size {size} on spatial axis {i} (input {x})")
        spatial.append(size)
    inputs = [ins[0], ctx.const(f"{layer.name}_weight", blobs[0])]
    if p.bias_term:
        inputs.append(ctx.const(f"{layer.name}_bias", blobs[1]))
    ctx.node("ConvTranspose" if deconv else "Conv", inputs, outs[:1], layer.name, [(x[0], m, *spatial)],
             group=group, **geo)


@converts("InnerProduct")
def _inner_product(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.inner_product_param
    x = ctx.shape(ins[0])
    axis = _axis(ctx, layer, p.axis, len(x))
    n, k = int(p.num_output), math.prod(x[axis:])
    expected = [("weight", (k, n) if p.transpose else (n, k))] + ([("bias", (n,))] if p.bias_term else [])
    blobs = ctx.weights(layer, expected)
    flat = ins[0]
    if len(x) != 2 or axis != 1:
        flat = ctx.tmp(f"{outs[0]}/flatten")
        ctx.node("Flatten", [ins[0]], [flat], f"{layer.name}_flatten", [(math.prod(x[:axis]), k)], axis=axis)
    inputs = [flat, ctx.const(f"{layer.name}_weight", blobs[0])]
    if p.bias_term:
        inputs.append(ctx.const(f"{layer.name}_bias", blobs[1]))
    out_shape = (*x[:axis], n)
    if axis == 1:
        ctx.node("Gemm", inputs, outs[:1], layer.name, [out_shape], transB=0 if p.transpose else 1)
        return
    y = ctx.tmp(f"{outs[0]}/gemm")
    ctx.node("Gemm", inputs, [y], layer.name, [(math.prod(x[:axis]), n)], transB=0 if p.transpose else 1)
    ctx.node("Reshape", [y, ctx.const(f"{layer.name}_shape", out_shape, np.int64)], outs[:1],
             f"{layer.name}_reshape", [out_shape])


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's PoolingLayer output size along one axis (see the module docstring).

    Args:
        size: the input size.
        kernel: the window size.
        stride: the stride.
        pad: the padding on each side.
        ceil: Caffe's default ceil rounding (else floor).

    Returns:
        The output size.
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@converts("Pooling")
def _pooling(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.pooling_param
    x = ctx.shape(ins[0])
    if len(x) != 4:
        raise ctx.fail(layer, f"Caffe pools 4-D blobs, the bottom has shape {x}")
    method = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
    if method not in ("MAX", "AVE"):
        raise ctx.fail(layer, f"pool: {method} is not supported (MAX, AVE)")
    if p.global_pooling:
        op = "GlobalMaxPool" if method == "MAX" else "GlobalAveragePool"
        ctx.node(op, ins[:1], outs[:1], layer.name, [(x[0], x[1], 1, 1)])
        return
    has_hw = p.HasField("kernel_h") or p.HasField("kernel_w")
    kernel = [_opt(p, "kernel_h"), _opt(p, "kernel_w")] if has_hw else [_opt(p, "kernel_size")] * 2
    if None in kernel or min(kernel) <= 0:
        raise ctx.fail(layer, "pooling_param needs kernel_size (or kernel_h and kernel_w), or global_pooling")
    pads = [p.pad_h, p.pad_w] if (p.HasField("pad_h") or p.HasField("pad_w")) else [p.pad, p.pad]
    strides = [p.stride_h, p.stride_w] if (p.HasField("stride_h") or p.HasField("stride_w")) else [p.stride] * 2
    if min(strides) <= 0:
        raise ctx.fail(layer, f"strides {list(strides)} must be positive (give both stride_h and stride_w)")
    ceil = p.round_mode == 0
    spatial, ceil_needed = [], False
    for i in range(2):
        k, s, pad, size = int(kernel[i]), int(strides[i]), int(pads[i]), x[2 + i]
        if pad >= k:
            raise ctx.fail(layer, f"pad {pad} must be smaller than kernel {k} (as in Caffe)")
        caffe = caffe_pool_size(size, k, s, pad, ceil)
        floor = (size + 2 * pad - k) // s + 1
        onnx = caffe_pool_size(size, k, s, pad, True) if caffe != floor else floor
        if caffe != floor and (onnx - 1) * s >= size + pad:  # ONNX drops a window starting in the end pad
            onnx -= 1
        if onnx != caffe:
            raise ctx.fail(layer, f"kernel {k}, stride {s}, pad {pad} on size {size}: Caffe keeps a last window "
                                  f"that lies wholly in the padding, which ONNX pooling cannot express")
        ceil_needed |= caffe != floor
        spatial.append(caffe)
    attrs: dict[str, Any] = {"kernel_shape": [int(k) for k in kernel], "strides": [int(s) for s in strides],
                             "pads": [int(q) for q in pads + pads], "ceil_mode": int(ceil_needed)}
    if method == "AVE" and any(pads):
        attrs["count_include_pad"] = 1
    ctx.node("MaxPool" if method == "MAX" else "AveragePool", ins[:1], outs[:1], layer.name,
             [(x[0], x[1], *spatial)], **attrs)


# ---- activations ------------------------------------------------------------------------------------

@converts("ReLU")
def _relu(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    slope = float(layer.msg.relu_param.negative_slope)
    if slope:
        ctx.node("LeakyRelu", ins[:1], outs[:1], layer.name, [ctx.shape(ins[0])], alpha=slope)
    else:
        ctx.node("Relu", ins[:1], outs[:1], layer.name, [ctx.shape(ins[0])])


@converts("Sigmoid", "TanH", "AbsVal")
def _unary(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    op = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs"}[layer.type]
    ctx.node(op, ins[:1], outs[:1], layer.name, [ctx.shape(ins[0])])


@converts("PReLU")
def _prelu(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    x = ctx.shape(ins[0])
    shared = layer.msg.prelu_param.channel_shared
    channels = 1 if shared else (x[1] if len(x) > 1 else 1)
    (slope,) = ctx.weights(layer, [("slope", (channels,))])
    slope = slope.reshape((channels,) + (1,) * max(0, len(x) - 2)) if not shared else slope
    ctx.node("PRelu", [ins[0], ctx.const(f"{layer.name}_slope", slope)], outs[:1], layer.name, [x])


@converts("Clip")
def _clip(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.clip_param
    lo, hi = ctx.const(f"{layer.name}_min", np.float32(p.min)), ctx.const(f"{layer.name}_max", np.float32(p.max))
    ctx.node("Clip", [ins[0], lo, hi], outs[:1], layer.name, [ctx.shape(ins[0])])


@converts("Softmax")
def _softmax(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    x = ctx.shape(ins[0])
    axis = _axis(ctx, layer, layer.msg.softmax_param.axis, len(x))
    ctx.node("Softmax", ins[:1], outs[:1], layer.name, [x], axis=axis)


# ---- normalization and affine -------------------------------------------------------------------------

def _bn_node(ctx: Context, layer: Layer, x_name: str, out: str, gamma, beta, mean, var, eps: float) -> None:
    x = ctx.shape(x_name)
    names = [ctx.const(f"{layer.name}_{role}", v) for role, v in
             (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
    ctx.node("BatchNormalization", [x_name, *names], [out], layer.name, [x], epsilon=float(eps))


@converts("BatchNorm")
def _batchnorm(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    x = ctx.shape(ins[0])
    if len(x) < 2:
        raise ctx.fail(layer, f"bottom of shape {x} has no channel axis")
    p = layer.msg.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        log.warning("%s: %s: use_global_stats is false (batch statistics); using the stored statistics, as "
                    "inference does", ctx.path, layer)
    c = x[1]
    mean, var, factor = ctx.weights(layer, [("mean", (c,)), ("variance", (c,)), ("scale_factor", (1,))])
    sf = float(factor[0])
    inv = 0.0 if sf == 0 else 1.0 / sf
    _bn_node(ctx, layer, ins[0], outs[0], np.ones(c), np.zeros(c), mean * inv, var * inv, p.eps)


def _param_axes(ctx: Context, layer: Layer, x: tuple[int, ...], axis: int, num_axes: int,
                other: tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
    """Start axis and shape of a Scale/Bias parameter (the second bottom's shape when there is one)."""
    axis = _axis(ctx, layer, axis, len(x)) if x else 0
    if other is not None:
        shape = other
    else:
        if num_axes < -1:
            raise ctx.fail(layer, f"num_axes {num_axes} must be >= -1")
        shape = x[axis:] if num_axes == -1 else x[axis: axis + num_axes]
    if tuple(x[axis: axis + len(shape)]) != tuple(shape):
        raise ctx.fail(layer, f"parameter shape {shape} does not match the bottom {x} from axis {axis}")
    return axis, tuple(shape)


def _broadcast(value_shape: tuple[int, ...], axis: int, rank: int) -> tuple[int, ...]:
    return (*value_shape, *([1] * (rank - axis - len(value_shape))))


@converts("Scale", "Bias")
def _scale(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    x = ctx.shape(ins[0])
    is_scale = layer.type == "Scale"
    p = layer.msg.scale_param if is_scale else layer.msg.bias_param
    other = ctx.shape(ins[1]) if len(ins) > 1 else None
    axis, shape = _param_axes(ctx, layer, x, p.axis, p.num_axes, other)
    roles = [] if other is not None else [("scale" if is_scale else "bias", shape)]
    if is_scale and p.bias_term:
        roles.append(("bias", shape))
    blobs = ctx.weights(layer, roles)
    if other is None and is_scale and axis == 1 and len(shape) == 1 and len(x) >= 2:
        beta = blobs[1] if p.bias_term else np.zeros(shape)
        _bn_node(ctx, layer, ins[0], outs[0], blobs[0], beta, np.zeros(shape), np.ones(shape), 0.0)
        return
    bshape = _broadcast(shape, axis, len(x))
    if other is not None:  # the factor (Scale) or addend (Bias) is the second bottom
        factor = ctx.tmp(f"{outs[0]}/factor")
        ctx.node("Reshape", [ins[1], ctx.const(f"{layer.name}_shape", bshape, np.int64)], [factor],
                 f"{layer.name}_reshape", [bshape])
    else:
        factor = ctx.const(f"{layer.name}_{roles[0][0]}", blobs[0].reshape(bshape))
        blobs = blobs[1:]
    op = "Mul" if is_scale else "Add"
    if not blobs:
        ctx.node(op, [ins[0], factor], outs[:1], layer.name, [x])
        return
    y = ctx.tmp(f"{outs[0]}/scaled")
    ctx.node("Mul", [ins[0], factor], [y], layer.name, [x])
    ctx.node("Add", [y, ctx.const(f"{layer.name}_bias", blobs[0].reshape(bshape))], outs[:1],
             f"{layer.name}_bias", [x])


# ---- multi-input ------------------------------------------------------------------------------------

@converts("Eltwise")
def _eltwise(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.eltwise_param
    shapes = [ctx.shape(i) for i in ins]
    if len(ins) < 2 or any(s != shapes[0] for s in shapes):
        raise ctx.fail(layer, f"needs two or more bottoms of one shape, got {shapes}")
    x = shapes[0]
    op = p.DESCRIPTOR.fields_by_name["operation"].enum_type.values_by_number[p.operation].name
    if op == "MAX":
        ctx.node("Max", ins, outs[:1], layer.name, [x])
        return
    coeffs = [float(c) for c in p.coeff]
    if coeffs and (op != "SUM" or len(coeffs) != len(ins)):
        raise ctx.fail(layer, f"{len(coeffs)} coeff values for {len(ins)} bottoms (SUM only, one per bottom)")
    terms = list(ins)
    if op == "SUM" and coeffs and len(ins) == 2 and coeffs == [1.0, -1.0]:
        ctx.node("Sub", ins, outs[:1], layer.name, [x])
        return
    for i, c in enumerate(coeffs):
        if c != 1.0:
            terms[i] = ctx.tmp(f"{outs[0]}/term{i}")
            ctx.node("Mul", [ins[i], ctx.const(f"{layer.name}_coeff{i}", np.float32(c))], [terms[i]],
                     f"{layer.name}_coeff{i}", [x])
    acc = terms[0]
    for i, t in enumerate(terms[1:], start=1):
        dst = outs[0] if i == len(terms) - 1 else ctx.tmp(f"{outs[0]}/partial{i}")
        ctx.node("Add" if op == "SUM" else "Mul", [acc, t], [dst], layer.name if i == len(terms) - 1
                 else f"{layer.name}_{i}", [x])
        acc = dst


@converts("Concat")
def _concat(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.concat_param
    shapes = [ctx.shape(i) for i in ins]
    axis = p.axis if (p.HasField("axis") or not p.HasField("concat_dim")) else int(p.concat_dim)
    axis = _axis(ctx, layer, axis, len(shapes[0]))
    for s in shapes[1:]:
        if len(s) != len(shapes[0]) or any(a != b for j, (a, b) in enumerate(zip(s, shapes[0])) if j != axis):
            raise ctx.fail(layer, f"bottom shapes {shapes} differ outside axis {axis}")
    if len(ins) == 1:
        ctx.node("Identity", ins, outs[:1], layer.name, [shapes[0]])
        return
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    ctx.node("Concat", ins, outs[:1], layer.name, [out], axis=axis)


@converts("Slice")
def _slice(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.slice_param
    x = ctx.shape(ins[0])
    axis = p.axis if (p.HasField("axis") or not p.HasField("slice_dim")) else int(p.slice_dim)
    axis = _axis(ctx, layer, axis, len(x))
    dim, n = x[axis], len(outs)
    points = [int(v) for v in p.slice_point]
    if points:
        bounds = [0, *points, dim]
        if len(points) != n - 1 or any(b >= e for b, e in itertools.pairwise(bounds)):
            raise ctx.fail(layer, f"slice_point {points} does not cut axis {axis} (size {dim}) into {n} parts")
        sizes = [e - b for b, e in itertools.pairwise(bounds)]
    else:
        if dim % n:
            raise ctx.fail(layer, f"axis {axis} of size {dim} does not split into {n} equal parts")
        sizes = [dim // n] * n
    shapes = [tuple(s if j != axis else size for j, s in enumerate(x)) for size in sizes]
    if n == 1:
        ctx.node("Identity", ins[:1], outs, layer.name, shapes)
        return
    ctx.node("Split", [ins[0], ctx.const(f"{layer.name}_split", sizes, np.int64)], outs, layer.name, shapes,
             axis=axis)


@converts("Crop")
def _crop(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.crop_param
    if len(ins) != 2:
        raise ctx.fail(layer, "needs two bottoms (the blob to crop and one of the target shape)")
    x, ref = ctx.shape(ins[0]), ctx.shape(ins[1])
    if len(x) != len(ref):
        raise ctx.fail(layer, f"bottoms of rank {len(x)} and {len(ref)}")
    axis = _axis(ctx, layer, p.axis, len(x))
    axes = list(range(axis, len(x)))
    offsets = [int(v) for v in p.offset]
    if len(offsets) <= 1:
        offsets = (offsets or [0]) * len(axes)
    if len(offsets) != len(axes):
        raise ctx.fail(layer, f"{len(offsets)} offsets for the {len(axes)} axes from axis {axis}")
    starts, ends = [], []
    for a, off in zip(axes, offsets):
        if off + ref[a] > x[a]:
            raise ctx.fail(layer, f"crop of size {ref[a]} at offset {off} exceeds axis {a} of size {x[a]}")
        starts.append(off)
        ends.append(off + ref[a])
    out = (*x[:axis], *ref[axis:])
    ctx.node("Slice", [ins[0], ctx.const(f"{layer.name}_starts", starts, np.int64),
                       ctx.const(f"{layer.name}_ends", ends, np.int64),
                       ctx.const(f"{layer.name}_axes", axes, np.int64)], outs[:1], layer.name, [out])


# ---- shape ----------------------------------------------------------------------------------------------

def _reshape(ctx: Context, layer: Layer, src: str, out: str, shape: tuple[int, ...]) -> None:
    ctx.node("Reshape", [src, ctx.const(f"{layer.name}_shape", shape, np.int64)], [out], layer.name, [shape])


@converts("Flatten")
def _flatten(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.flatten_param
    x = ctx.shape(ins[0])
    start, end = _axis(ctx, layer, p.axis, len(x)), _axis(ctx, layer, p.end_axis, len(x))
    if end < start:
        raise ctx.fail(layer, f"end_axis {p.end_axis} comes before axis {p.axis}")
    _reshape(ctx, layer, ins[0], outs[0], (*x[:start], math.prod(x[start:end + 1]), *x[end + 1:]))


@converts("Reshape")
def _caffe_reshape(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.reshape_param
    x = ctx.shape(ins[0])
    start = p.axis if p.axis >= 0 else len(x) + 1 + p.axis
    if not 0 <= start <= len(x):
        raise ctx.fail(layer, f"reshape_param.axis {p.axis} out of range for rank {len(x)}")
    end = len(x) if p.num_axes == -1 else start + p.num_axes
    if p.num_axes < -1 or end > len(x):
        raise ctx.fail(layer, f"reshape_param.num_axes {p.num_axes} out of range")
    dims = [int(d) for d in p.shape.dim]
    if sum(d == -1 for d in dims) > 1 or any(d < -1 for d in dims):
        raise ctx.fail(layer, f"shape {dims}: at most one -1 and no other negative value")
    new = [x[start + i] if d == 0 else d for i, d in enumerate(dims)]
    full = [*x[:start], *new, *x[end:]]
    known = math.prod(d for d in full if d != -1)
    if -1 in full:
        if known == 0 or math.prod(x) % known:
            raise ctx.fail(layer, f"cannot infer -1 in {full} from {math.prod(x)} values")
        full[full.index(-1)] = math.prod(x) // known
    if math.prod(full) != math.prod(x):
        raise ctx.fail(layer, f"shape {tuple(full)} does not hold the {math.prod(x)} values of {x}")
    _reshape(ctx, layer, ins[0], outs[0], tuple(full))


# ---- arithmetic -------------------------------------------------------------------------------------------

@converts("Power")
def _power(ctx: Context, layer: Layer, ins: list[str], outs: list[str]) -> None:
    p = layer.msg.power_param
    x = ctx.shape(ins[0])
    steps = [(op, value) for op, value, identity in
             (("Mul", p.scale, 1.0), ("Add", p.shift, 0.0), ("Pow", p.power, 1.0)) if value != identity]
    if not steps:
        ctx.node("Identity", ins[:1], outs[:1], layer.name, [x])
        return
    src = ins[0]
    for i, (op, value) in enumerate(steps):
        dst = outs[0] if i == len(steps) - 1 else ctx.tmp(f"{outs[0]}/{op.lower()}")
        ctx.node(op, [src, ctx.const(f"{layer.name}_{op.lower()}", np.float32(value))], [dst],
                 layer.name if i == len(steps) - 1 else f"{layer.name}_{op.lower()}", [x])
        src = dst
