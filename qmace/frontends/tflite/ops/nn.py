"""TFLite convolutions, fully-connected, pooling and reductions -> IR Conv / ConvTranspose / Gemm / pools /
Reduce* (layouts and padding: see the package docstring)."""

from __future__ import annotations

import struct

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.builder import NHWC_TO_NCHW_AXIS, Builder
from qmace.frontends.tflite.ops import (
    as_nhwc,
    bias,
    converts,
    emit_in_tflite_layout,
    options,
    pads_attr,
    reshape_into,
    weight,
)
from qmace.frontends.tflite.reader import TflOp

# ---- convolutions ------------------------------------------------------------------------------------

@converts("CONV_2D", ir="Conv")
def conv_2d(b: Builder, op: TflOp) -> None:
    """CONV_2D -> Conv: weights (O, KH, KW, I) -> (O, I, KH, KW), group = C_in / I, SAME/VALID pads, fused activation.
    """
    o = options(op, b)
    w_shape = b.t(op.inputs[1]).shape  # (O, KH, KW, I)
    c_in = b.t(op.inputs[0]).shape[3]
    if c_in % w_shape[3]:
        raise ModelError(f"{b.where(op)}: {c_in} input channels do not divide into groups of {w_shape[3]}")
    k, s, d = w_shape[1:3], (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    w = weight(b, op, 1, (0, 3, 1, 2))
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Conv", [b.value(op.inputs[0]), w, *bias(b, op, 2)], [pre], kernel_shape=list(k), strides=list(s),
           dilations=list(d), group=c_in // w_shape[3], **pads_attr(b, op, o.Padding(), op.inputs[0], k, s, d))
    b.finish_activation(fused, pre, out)


@converts("DEPTHWISE_CONV_2D", ir="Conv (group = channels)")
def depthwise_conv_2d(b: Builder, op: TflOp) -> None:
    """DEPTHWISE_CONV_2D -> Conv with group = C_in: weights (1, KH, KW, C·M) -> (C·M, 1, KH, KW)."""
    o = options(op, b)
    w_shape = b.t(op.inputs[1]).shape  # (1, KH, KW, C*M)
    c_in = b.t(op.inputs[0]).shape[3]
    if w_shape[0] != 1 or w_shape[3] % c_in:
        raise ModelError(f"{b.where(op)}: depthwise weights of shape {list(w_shape)} do not fit {c_in} channels")
    k, s, d = w_shape[1:3], (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    w = weight(b, op, 1, (3, 0, 1, 2))
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Conv", [b.value(op.inputs[0]), w, *bias(b, op, 2)], [pre], kernel_shape=list(k), strides=list(s),
           dilations=list(d), group=c_in, **pads_attr(b, op, o.Padding(), op.inputs[0], k, s, d))
    b.finish_activation(fused, pre, out)


def _transpose_conv(b: Builder, op: TflOp, x_slot: int, w_slot: int, b_slot: int, padding: int, strides,
                    fused: int) -> None:
    x_shape = b.t(op.inputs[x_slot]).shape  # (N, H, W, C_in)
    w_shape = b.t(op.inputs[w_slot]).shape  # (O, KH, KW, I)
    out_shape = b.t(op.outputs[0]).shape  # (N, OH, OW, O)
    k = w_shape[1:3]
    pads_b, pads_e, out_pad = [], [], []
    for i in range(2):
        full = strides[i] * (x_shape[1 + i] - 1) + k[i]
        total = full - out_shape[1 + i] if padding == 0 else 0
        if padding == 1 and out_shape[1 + i] > full:
            out_pad.append(out_shape[1 + i] - full)
        else:
            out_pad.append(max(-total, 0))
        total = max(total, 0)
        pads_b.append(total // 2)
        pads_e.append(total - total // 2)
    w = weight(b, op, w_slot, (3, 0, 1, 2))
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("ConvTranspose", [b.value(op.inputs[x_slot]), w, *bias(b, op, b_slot)], [pre], kernel_shape=list(k),
           strides=list(strides), pads=pads_b + pads_e, output_padding=out_pad if any(out_pad) else None)
    b.finish_activation(fused, pre, out)


@converts("TRANSPOSE_CONV", ir="ConvTranspose")
def transpose_conv(b: Builder, op: TflOp) -> None:
    """TRANSPOSE_CONV -> ConvTranspose: inputs (output_shape, weights (O, KH, KW, I), x, bias)."""
    o = options(op, b)
    fused = o.FusedActivationFunction() if hasattr(o, "FusedActivationFunction") else 0
    _transpose_conv(b, op, 2, 1, 3, o.Padding(), (o.StrideH(), o.StrideW()), fused)


@converts("Convolution2DTransposeBias", custom=True, ir="ConvTranspose")
def conv2d_transpose_bias(b: Builder, op: TflOp) -> None:
    """MediaPipe's custom op: inputs (x, weights (O, KH, KW, I), bias); custom options are the C struct
    ``TfLiteTransposeConvParams {int32 padding (1 SAME, 2 VALID); int32 stride_w; int32 stride_h}``."""
    if len(op.custom_options) < 12:
        raise ModelError(f"{b.where(op)}: custom options hold {len(op.custom_options)} bytes, expected 12")
    padding, stride_w, stride_h = struct.unpack_from("<iii", op.custom_options)
    if padding not in (1, 2):
        raise ModelError(f"{b.where(op)}: padding {padding} is not supported")
    _transpose_conv(b, op, 0, 1, 2, padding - 1, (stride_h, stride_w), 0)


@converts("FULLY_CONNECTED", ir="Gemm (transB = 1)")
def fully_connected(b: Builder, op: TflOp) -> None:
    """FULLY_CONNECTED -> Gemm(transB=1) on the input flattened to (-1, depth) in NHWC order (keep_num_dims:
    reshaped back).
    """
    o = options(op, b)
    if o.WeightsFormat() != 0:
        raise ModelError(f"{b.where(op)}: weights format {o.WeightsFormat()} (shuffled) is not supported")
    depth = b.t(op.inputs[1]).shape[1]  # weights (units, depth)
    x = as_nhwc(b, op.inputs[0])
    x_shape = b.t(op.inputs[0]).shape
    if len(x_shape) != 2 or x_shape[-1] != depth:
        flat = b.temp(f"{x}__flat", (int(np.prod(x_shape)) // depth, depth))
        b.node("Reshape", [x, b.ints(f"{x}__flat_shape", [-1, depth])], [flat])
        x = flat
    w = weight(b, op, 1, (0, 1))
    fused = o.FusedActivationFunction()
    out_shape = b.t(op.outputs[0]).shape
    if len(out_shape) == 2:
        pre, out = b.activation(op, fused, op.outputs[0])
        b.node("Gemm", [x, w, *bias(b, op, 2)], [pre], transB=1)
    else:  # keep_num_dims: (..., units)
        pre, out = b.activation(op, fused, op.outputs[0])
        mid = b.temp(f"{out}__2d")
        b.node("Gemm", [x, w, *bias(b, op, 2)], [mid], transB=1)
        reshape_into(b, op, mid, list(out_shape), pre)
    b.finish_activation(fused, pre, out)




# ---- pooling ---------------------------------------------------------------------------------------

def _pool(b: Builder, op: TflOp, op_type: str) -> None:
    o = options(op, b)
    k, s = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node(op_type, [b.value(op.inputs[0])], [pre], kernel_shape=list(k), strides=list(s),
           **pads_attr(b, op, o.Padding(), op.inputs[0], k, s, (1, 1)))
    b.finish_activation(fused, pre, out)


@converts("MAX_POOL_2D", ir="MaxPool")
def max_pool(b: Builder, op: TflOp) -> None:
    """MAX_POOL_2D -> MaxPool with SAME/VALID pads and fused activation."""
    _pool(b, op, "MaxPool")


@converts("AVERAGE_POOL_2D", ir="AveragePool")
def average_pool(b: Builder, op: TflOp) -> None:
    """TFLite divides by the number of real (unpadded) inputs: ONNX count_include_pad = 0."""
    _pool(b, op, "AveragePool")


_REDUCE = {"MEAN": "ReduceMean", "SUM": "ReduceSum", "REDUCE_MAX": "ReduceMax", "REDUCE_MIN": "ReduceMin"}


@converts(*_REDUCE, ir=_REDUCE)
def reduce(b: Builder, op: TflOp) -> None:
    """MEAN / SUM / REDUCE_MAX / REDUCE_MIN -> ReduceMean / ReduceSum / ReduceMax / ReduceMin over the constant
    ``axes`` (mapped to the IR layout), ``keepdims`` from the options.
    """
    op_type = _REDUCE[op.op]
    keep = bool(options(op, b).KeepDims())
    rank = b.rank(op.inputs[0])
    axes = sorted({int(a) % rank for a in np.asarray(b.require(op, 1, "axes")).reshape(-1)})
    if rank == 4:
        ir_axes = sorted(NHWC_TO_NCHW_AXIS[a] for a in axes)
        left_nchw = [a for a in range(4) if a not in ir_axes]
        left_nhwc = [NHWC_TO_NCHW_AXIS.index(a) for a in left_nchw]
        if keep or left_nhwc == sorted(left_nhwc):  # the reduced result has TFLite's axis order
            b.node(op_type, [b.value(op.inputs[0]), b.ints("axes", ir_axes)], [b.output(op.outputs[0])], keepdims=int(keep))
            return
    emit_in_tflite_layout(b, op, op_type, [as_nhwc(b, op.inputs[0]), b.ints("axes", axes)], op.outputs[0],
                           keepdims=int(keep))
