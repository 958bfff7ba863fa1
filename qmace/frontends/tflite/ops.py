"""TFLite builtin (and known custom) operators -> IR nodes with ONNX-named ops, in the NCHW layout.

One function per TFLite op, registered in ``CONVERTERS`` (builtin name) or ``CUSTOM_CONVERTERS``
(custom code). Each reads its options from the ``tflite`` package's accessor object and emits nodes
through the :class:`Builder`. Conventions (TFLite -> IR):
- CONV_2D weights (O, KH, KW, I) -> Conv (O, I, KH, KW); groups = C_in / I.
- DEPTHWISE_CONV_2D weights (1, KH, KW, C·M) -> Conv (C·M, 1, KH, KW), group = C_in (output channel
  c·M + m reads input channel c, as in TFLite).
- TRANSPOSE_CONV / MediaPipe's Convolution2DTransposeBias weights (O, KH, KW, I) -> ConvTranspose (I, O, KH, KW).
- FULLY_CONNECTED weights (units, in) -> Gemm(transB=1) on the input flattened to (-1, in) in NHWC order.
- padding SAME: ``out = ceil(in / s)``, ``total = max((out - 1)·s + (k - 1)·d + 1 - in, 0)``, begin =
  ``total // 2`` (ONNX's SAME_UPPER), written as explicit pads; VALID: no padding.
- fused_activation_function: a Relu / Clip(lo, hi) / Tanh node after the op (qmace's passes fuse it back).
Quantized weights (int8/uint8 constants with scales) are dequantized to float32 and their parameters kept
(``Builder.params``) on the IR weight, the per-axis dimension mapped to the IR axis; int32 biases become
``codes · scale`` (the quantizer derives their codes again from ``s_x · s_w``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.builder import NCHW_FROM_NHWC, NHWC_TO_NCHW_AXIS, Builder, nchw_shape
from qmace.frontends.tflite.reader import TflOp
from qmace.quantize.qmath import QuantParams

Converter = Callable[[Builder, TflOp], None]
CONVERTERS: dict[str, Converter] = {}
CUSTOM_CONVERTERS: dict[str, Converter] = {}
IR_OPS: dict[str, str] = {}  # TFLite op (custom: "CUSTOM <code>") -> the IR op(s) it becomes (docs/supported-ops.md)


def converts(*names: str, ir: str | dict[str, str], custom: bool = False):
    def deco(fn: Converter) -> Converter:
        for n in names:
            (CUSTOM_CONVERTERS if custom else CONVERTERS)[n] = fn
            IR_OPS[f"CUSTOM {n}" if custom else n] = ir if isinstance(ir, str) else ir[n]
        return fn
    return deco


# ---- helpers -----------------------------------------------------------------------------------------

def _opt(op: TflOp, b: Builder):
    if op.options is None:
        raise ModelError(f"{b.where(op)}: builtin options are missing")
    return op.options


def same_pads(in_hw, k_hw, s_hw, d_hw) -> list[int]:
    """ONNX pads [top, left, bottom, right] of TFLite's SAME padding (see the module docstring)."""
    begins, ends = [], []
    for size, k, s, d in zip(in_hw, k_hw, s_hw, d_hw):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return begins + ends


def _pads(b: Builder, op: TflOp, padding: int, x_index: int, k_hw, s_hw, d_hw) -> dict:
    if padding == 1:  # VALID
        return {"pads": [0, 0, 0, 0]}
    if padding != 0:
        raise ModelError(f"{b.where(op)}: padding {padding} is not supported")
    shape = b.t(x_index).shape
    if len(shape) != 4:
        raise ModelError(f"{b.where(op)}: input {b.t(x_index).name!r} is not 4-D (shape {list(shape)})")
    return {"pads": same_pads(shape[1:3], k_hw, s_hw, d_hw)}


def _weight_params(b: Builder, index: int, axis_map: dict[int, int]) -> QuantParams | None:
    t = b.t(index)
    if t.quant is None or t.dtype not in ("int8", "uint8"):
        return None
    q = t.quant
    if q.per_axis:
        if q.axis not in axis_map:
            raise ModelError(f"{b.model.path}: tensor {t.name!r}: quantized dimension {q.axis} is not supported here")
        return QuantParams(q.scale, q.zero_point.astype(np.int32), t.dtype, axis_map[q.axis])
    return QuantParams(q.scale.reshape(()), q.zero_point.reshape(()).astype(np.int32), t.dtype)


def weight(b: Builder, op: TflOp, slot: int, perm: tuple[int, ...], what: str = "weights") -> str:
    """Constant weights of input ``slot``, transposed by ``perm`` into the IR layout; per-axis parameters
    follow the permutation (IR axis = position of the TFLite dimension in ``perm``)."""
    b.require(op, slot, what)
    index = op.inputs[slot]
    w = np.ascontiguousarray(b.float_data(index).transpose(perm))
    name = b.const(b.names[index] if b.names[index] not in b.graph.tensors else f"{b.names[index]}__{op.index}", w)
    qp = _weight_params(b, b.resolve(index), {src: dst for dst, src in enumerate(perm)})
    if qp is not None:
        b.params[name] = qp.to_json()
    return name


def bias(b: Builder, op: TflOp, slot: int) -> list[str]:
    if slot >= len(op.inputs) or op.inputs[slot] < 0:
        return []
    b.require(op, slot, "bias")
    index = op.inputs[slot]
    return [b.const(f"{b.names[index]}__{op.index}", b.float_data(index).astype(np.float32).reshape(-1))]


def _axis4(axis: int, rank: int) -> int:
    axis = axis % rank if rank else 0
    return NHWC_TO_NCHW_AXIS[axis] if rank == 4 else axis


def _in_shape(b: Builder, index: int) -> tuple:
    return nchw_shape(b.graph.tensors[b.value(index)].shape or b.t(index).shape)


def _as_nhwc(b: Builder, index: int) -> str:
    """IR name of TFLite tensor ``index`` in TFLite's own layout (NHWC for rank 4)."""
    name = b.value(index)
    if b.rank(index) != 4:
        return name
    return b.nhwc(name, nchw_shape(b.t(index).shape))


def _emit_in_tflite_layout(b: Builder, op: TflOp, op_type: str, inputs: list[str], out_index: int, **attrs) -> None:
    """Emit ``op_type`` on TFLite-layout inputs; a rank-4 output is laid out NCHW afterwards."""
    if b.rank(out_index) != 4:
        b.node(op_type, inputs, [b.output(out_index)], **attrs)
        return
    shape = b.t(out_index).shape
    mid = b.temp(f"{b.names[out_index]}__nhwc", shape)
    b.node(op_type, inputs, [mid], **attrs)
    b.to_nchw(mid, shape, b.output(out_index))


# ---- convolutions ------------------------------------------------------------------------------------

@converts("CONV_2D", ir="Conv")
def conv_2d(b: Builder, op: TflOp) -> None:
    o = _opt(op, b)
    w_shape = b.t(op.inputs[1]).shape  # (O, KH, KW, I)
    c_in = b.t(op.inputs[0]).shape[3]
    if c_in % w_shape[3]:
        raise ModelError(f"{b.where(op)}: {c_in} input channels do not divide into groups of {w_shape[3]}")
    k, s, d = w_shape[1:3], (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    w = weight(b, op, 1, (0, 3, 1, 2))
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Conv", [b.value(op.inputs[0]), w, *bias(b, op, 2)], [pre], kernel_shape=list(k), strides=list(s),
           dilations=list(d), group=c_in // w_shape[3], **_pads(b, op, o.Padding(), op.inputs[0], k, s, d))
    b.finish_activation(fused, pre, out)


@converts("DEPTHWISE_CONV_2D", ir="Conv (group = channels)")
def depthwise_conv_2d(b: Builder, op: TflOp) -> None:
    o = _opt(op, b)
    w_shape = b.t(op.inputs[1]).shape  # (1, KH, KW, C*M)
    c_in = b.t(op.inputs[0]).shape[3]
    if w_shape[0] != 1 or w_shape[3] % c_in:
        raise ModelError(f"{b.where(op)}: depthwise weights of shape {list(w_shape)} do not fit {c_in} channels")
    k, s, d = w_shape[1:3], (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    w = weight(b, op, 1, (3, 0, 1, 2))
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Conv", [b.value(op.inputs[0]), w, *bias(b, op, 2)], [pre], kernel_shape=list(k), strides=list(s),
           dilations=list(d), group=c_in, **_pads(b, op, o.Padding(), op.inputs[0], k, s, d))
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
    o = _opt(op, b)
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
    o = _opt(op, b)
    if o.WeightsFormat() != 0:
        raise ModelError(f"{b.where(op)}: weights format {o.WeightsFormat()} (shuffled) is not supported")
    depth = b.t(op.inputs[1]).shape[1]  # weights (units, depth)
    x = _as_nhwc(b, op.inputs[0])
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
        _reshape_into(b, op, mid, list(out_shape), pre)
    b.finish_activation(fused, pre, out)


def _reshape_into(b: Builder, op: TflOp, src: str, shape_nhwc: list[int], out: str) -> None:
    if len(shape_nhwc) == 4:
        mid = b.temp(f"{out}__nhwc", shape_nhwc)
        b.node("Reshape", [src, b.ints(f"{out}__shape", shape_nhwc)], [mid])
        b.to_nchw(mid, tuple(shape_nhwc), out)
    else:
        b.node("Reshape", [src, b.ints(f"{out}__shape", shape_nhwc)], [out])


# ---- pooling ---------------------------------------------------------------------------------------

def _pool(b: Builder, op: TflOp, op_type: str) -> None:
    o = _opt(op, b)
    k, s = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node(op_type, [b.value(op.inputs[0])], [pre], kernel_shape=list(k), strides=list(s),
           **_pads(b, op, o.Padding(), op.inputs[0], k, s, (1, 1)))
    b.finish_activation(fused, pre, out)


@converts("MAX_POOL_2D", ir="MaxPool")
def max_pool(b: Builder, op: TflOp) -> None:
    _pool(b, op, "MaxPool")


@converts("AVERAGE_POOL_2D", ir="AveragePool")
def average_pool(b: Builder, op: TflOp) -> None:
    """TFLite divides by the number of real (unpadded) inputs: ONNX count_include_pad = 0."""
    _pool(b, op, "AveragePool")


_REDUCE = {"MEAN": "ReduceMean", "SUM": "ReduceSum", "REDUCE_MAX": "ReduceMax", "REDUCE_MIN": "ReduceMin"}


@converts(*_REDUCE, ir=_REDUCE)
def reduce(b: Builder, op: TflOp) -> None:
    op_type = _REDUCE[op.op]
    keep = bool(_opt(op, b).KeepDims())
    rank = b.rank(op.inputs[0])
    axes = sorted({int(a) % rank for a in np.asarray(b.require(op, 1, "axes")).reshape(-1)})
    if rank == 4:
        ir_axes = sorted(NHWC_TO_NCHW_AXIS[a] for a in axes)
        left_nchw = [a for a in range(4) if a not in ir_axes]
        left_nhwc = [NHWC_TO_NCHW_AXIS.index(a) for a in left_nchw]
        if keep or left_nhwc == sorted(left_nhwc):  # the reduced result has TFLite's axis order
            b.node(op_type, [b.value(op.inputs[0]), b.ints("axes", ir_axes)], [b.output(op.outputs[0])], keepdims=int(keep))
            return
    _emit_in_tflite_layout(b, op, op_type, [_as_nhwc(b, op.inputs[0]), b.ints("axes", axes)], op.outputs[0],
                           keepdims=int(keep))


# ---- element-wise ------------------------------------------------------------------------------------

_BINARY = {"ADD": "Add", "SUB": "Sub", "MUL": "Mul", "DIV": "Div", "MAXIMUM": "Max", "MINIMUM": "Min",
           "POW": "Pow"}


@converts(*_BINARY, ir=_BINARY)
def binary(b: Builder, op: TflOp) -> None:
    out_rank = b.rank(op.outputs[0])
    a, c = (b.broadcast_operand(i, out_rank) for i in op.inputs[:2])
    fused = op.options.FusedActivationFunction() if hasattr(op.options, "FusedActivationFunction") else 0
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node(_BINARY[op.op], [a, c], [pre])
    b.finish_activation(fused, pre, out)


@converts("SQUARED_DIFFERENCE", ir="Sub, Mul")
def squared_difference(b: Builder, op: TflOp) -> None:
    out_rank = b.rank(op.outputs[0])
    a, c = (b.broadcast_operand(i, out_rank) for i in op.inputs[:2])
    out = b.output(op.outputs[0])
    diff = b.temp(f"{out}__diff")
    b.node("Sub", [a, c], [diff])
    b.node("Mul", [diff, diff], [out])


_UNARY = {"LOGISTIC": "Sigmoid", "TANH": "Tanh", "RELU": "Relu", "HARD_SWISH": "HardSwish", "EXP": "Exp",
          "LOG": "Log", "SQRT": "Sqrt", "ABS": "Abs", "NEG": "Neg"}
_CLIPS = {"RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}


@converts(*_UNARY, ir=_UNARY)
def unary(b: Builder, op: TflOp) -> None:
    b.node(_UNARY[op.op], [b.value(op.inputs[0])], [b.output(op.outputs[0])])


@converts(*_CLIPS, ir="Clip")
def clip(b: Builder, op: TflOp) -> None:
    lo, hi = _CLIPS[op.op]
    out = b.output(op.outputs[0])
    b.node("Clip", [b.value(op.inputs[0]), b.const(f"{out}__lo", np.float32(lo)), b.const(f"{out}__hi", np.float32(hi))],
           [out])


@converts("RSQRT", ir="Sqrt, Div")
def rsqrt(b: Builder, op: TflOp) -> None:
    out = b.output(op.outputs[0])
    root = b.temp(f"{out}__sqrt")
    b.node("Sqrt", [b.value(op.inputs[0])], [root])
    b.node("Div", [b.const(f"{out}__one", np.float32(1.0)), root], [out])


@converts("LEAKY_RELU", ir="LeakyRelu")
def leaky_relu(b: Builder, op: TflOp) -> None:
    b.node("LeakyRelu", [b.value(op.inputs[0])], [b.output(op.outputs[0])], alpha=float(_opt(op, b).Alpha()))


@converts("PRELU", ir="PRelu")
def prelu(b: Builder, op: TflOp) -> None:
    out_rank = b.rank(op.outputs[0])
    b.node("PRelu", [b.value(op.inputs[0]), b.broadcast_operand(op.inputs[1], out_rank)], [b.output(op.outputs[0])])


@converts("GELU", ir="Gelu")
def gelu(b: Builder, op: TflOp) -> None:
    approx = "tanh" if _opt(op, b).Approximate() else "none"
    b.node("Gelu", [b.value(op.inputs[0])], [b.output(op.outputs[0])], approximate=approx)


@converts("SOFTMAX", ir="Softmax (Mul when beta != 1)")
def softmax(b: Builder, op: TflOp) -> None:
    beta = float(_opt(op, b).Beta())
    x = b.value(op.inputs[0])
    if beta != 1.0:
        scaled = b.temp(f"{x}__beta")
        b.node("Mul", [x, b.const(f"{x}__beta_value", np.float32(beta))], [scaled])
        x = scaled
    b.node("Softmax", [x], [b.output(op.outputs[0])], axis=1 if b.rank(op.inputs[0]) == 4 else -1)


# ---- data movement -----------------------------------------------------------------------------------

@converts("RESHAPE", "SQUEEZE", "EXPAND_DIMS", ir="Reshape")
def reshape(b: Builder, op: TflOp) -> None:
    """The output's static shape is the target (TFLite's converter always records it)."""
    out_shape = list(b.t(op.outputs[0]).shape)
    sig = b.t(op.outputs[0]).signature
    if len(sig) == len(out_shape):
        out_shape = [-1 if s < 0 else d for d, s in zip(out_shape, sig)]
    in_rank, out_rank = b.rank(op.inputs[0]), len(out_shape)
    if in_rank == 4 and out_rank == 4 and out_shape == list(b.t(op.inputs[0]).shape):
        b.node("Identity", [b.value(op.inputs[0])], [b.output(op.outputs[0])])
        return
    x = _as_nhwc(b, op.inputs[0])
    _reshape_into(b, op, x, out_shape, b.output(op.outputs[0]))


@converts("TRANSPOSE", ir="Transpose")
def transpose(b: Builder, op: TflOp) -> None:
    perm = [int(p) for p in np.asarray(b.require(op, 1, "perm")).reshape(-1)]
    if len(perm) == 4:  # Y_ir = X_ir . (NCHW->NHWC) . perm . (NHWC->NCHW)
        inv = (0, 2, 3, 1)
        perm = [inv[perm[NCHW_FROM_NHWC[i]]] for i in range(4)]
    b.node("Transpose", [b.value(op.inputs[0])], [b.output(op.outputs[0])], perm=perm)


@converts("CONCATENATION", ir="Concat")
def concatenation(b: Builder, op: TflOp) -> None:
    o = _opt(op, b)
    rank = b.rank(op.outputs[0])
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Concat", [b.value(i) for i in op.inputs], [pre], axis=_axis4(o.Axis(), rank))
    b.finish_activation(fused, pre, out)


@converts("PAD", "PADV2", "MIRROR_PAD", ir="Pad")
def pad(b: Builder, op: TflOp) -> None:
    paddings = np.asarray(b.require(op, 1, "paddings"), np.int64).reshape(-1, 2)
    rank = len(paddings)
    order = [NHWC_TO_NCHW_AXIS.index(a) for a in range(4)] if rank == 4 else list(range(rank))
    pads = [int(paddings[a, 0]) for a in order] + [int(paddings[a, 1]) for a in order]
    ins = [b.value(op.inputs[0]), b.ints(f"{b.names[op.outputs[0]]}__pads", pads)]
    mode = "constant"
    if op.op == "PADV2" and len(op.inputs) > 2 and op.inputs[2] >= 0:
        b.require(op, 2, "constant value")
        ins.append(b.const(f"{b.names[op.outputs[0]]}__value",
                           np.float32(b.float_data(op.inputs[2]).reshape(()))))
    if op.op == "MIRROR_PAD":
        if _opt(op, b).Mode() != 0:
            raise ModelError(f"{b.where(op)}: MIRROR_PAD mode SYMMETRIC is not supported (REFLECT is)")
        mode = "reflect"
    b.node("Pad", ins, [b.output(op.outputs[0])], mode=mode)


def _resize(b: Builder, op: TflOp, mode: str) -> None:
    o = _opt(op, b)
    size = [int(v) for v in np.asarray(b.require(op, 1, "size")).reshape(-1)]
    n, _, _, c = b.t(op.inputs[0]).shape
    if o.AlignCorners():
        ctm, nearest = "align_corners", "round_prefer_ceil"
    elif o.HalfPixelCenters():
        ctm, nearest = ("half_pixel", None) if mode == "linear" else ("tf_half_pixel_for_nn", "floor")
    else:
        ctm, nearest = "asymmetric", "floor"
    x = b.value(op.inputs[0])
    out = b.output(op.outputs[0])
    b.node("Resize", [x, "", "", b.ints(f"{out}__sizes", [n, c, *size])], [out], mode=mode,
           coordinate_transformation_mode=ctm, nearest_mode=nearest if mode == "nearest" else None)


@converts("RESIZE_BILINEAR", ir="Resize (linear)")
def resize_bilinear(b: Builder, op: TflOp) -> None:
    _resize(b, op, "linear")


@converts("RESIZE_NEAREST_NEIGHBOR", ir="Resize (nearest)")
def resize_nearest(b: Builder, op: TflOp) -> None:
    _resize(b, op, "nearest")


@converts("DEPTH_TO_SPACE", ir="DepthToSpace (DCR)")
def depth_to_space(b: Builder, op: TflOp) -> None:
    """TensorFlow's depth_to_space is ONNX's DCR order."""
    b.node("DepthToSpace", [b.value(op.inputs[0])], [b.output(op.outputs[0])], blocksize=int(_opt(op, b).BlockSize()),
           mode="DCR")


@converts("SPACE_TO_DEPTH", ir="SpaceToDepth")
def space_to_depth(b: Builder, op: TflOp) -> None:
    b.node("SpaceToDepth", [b.value(op.inputs[0])], [b.output(op.outputs[0])], blocksize=int(_opt(op, b).BlockSize()))


@converts("SLICE", ir="Slice")
def slice_(b: Builder, op: TflOp) -> None:
    begin = [int(v) for v in np.asarray(b.require(op, 1, "begin")).reshape(-1)]
    size = [int(v) for v in np.asarray(b.require(op, 2, "size")).reshape(-1)]
    shape = b.t(op.inputs[0]).shape
    end = [shape[i] if s < 0 else bg + s for i, (bg, s) in enumerate(zip(begin, size))]
    _slice(b, op, begin, end, [1] * len(begin))


def _slice(b: Builder, op: TflOp, begin, end, steps) -> None:
    rank = len(begin)
    axes = [_axis4(a, rank) for a in range(rank)]
    out = b.output(op.outputs[0])
    b.node("Slice", [b.value(op.inputs[0]), b.ints(f"{out}__starts", begin), b.ints(f"{out}__ends", end),
                     b.ints(f"{out}__axes", axes), b.ints(f"{out}__steps", steps)], [out])


@converts("STRIDED_SLICE", ir="Slice (+ Reshape for shrink_axis_mask)")
def strided_slice(b: Builder, op: TflOp) -> None:
    o = _opt(op, b)
    if o.EllipsisMask() or o.NewAxisMask() or (hasattr(o, "Offset") and o.Offset()):
        raise ModelError(f"{b.where(op)}: ellipsis_mask / new_axis_mask / offset are not supported")
    begin = [int(v) for v in np.asarray(b.require(op, 1, "begin")).reshape(-1)]
    end = [int(v) for v in np.asarray(b.require(op, 2, "end")).reshape(-1)]
    steps = [int(v) for v in np.asarray(b.require(op, 3, "strides")).reshape(-1)] if len(op.inputs) > 3 else [1] * len(begin)
    shape = b.t(op.inputs[0]).shape
    big = 2**62
    for i in range(len(begin)):
        if o.BeginMask() >> i & 1:
            begin[i] = 0 if steps[i] > 0 else big
        if o.EndMask() >> i & 1:
            end[i] = big if steps[i] > 0 else -big
        if o.ShrinkAxisMask() >> i & 1:
            start = begin[i] + shape[i] if begin[i] < 0 else begin[i]
            begin[i], end[i], steps[i] = start, start + 1, 1
    if not o.ShrinkAxisMask():
        _slice(b, op, begin, end, steps)
        return
    x = _as_nhwc(b, op.inputs[0])
    out = b.names[op.outputs[0]]
    mid = b.temp(f"{out}__sliced")
    b.node("Slice", [x, b.ints(f"{out}__starts", begin), b.ints(f"{out}__ends", end),
                     b.ints(f"{out}__axes", range(len(begin))), b.ints(f"{out}__steps", steps)], [mid])
    _reshape_into(b, op, mid, list(b.t(op.outputs[0]).shape), b.output(op.outputs[0]))


@converts("SPLIT", "SPLIT_V", ir="Split")
def split(b: Builder, op: TflOp) -> None:
    if op.op == "SPLIT":
        axis_slot, x_slot, sizes = 0, 1, None
    else:
        axis_slot, x_slot = 2, 0
        sizes = [int(v) for v in np.asarray(b.require(op, 1, "size_splits")).reshape(-1)]
    rank = b.rank(op.inputs[x_slot])
    axis = int(np.asarray(b.require(op, axis_slot, "axis")).reshape(()))
    if sizes is None:
        dim = b.t(op.inputs[x_slot]).shape[axis % rank]
        sizes = [dim // len(op.outputs)] * len(op.outputs)
    outs = [b.output(i) for i in op.outputs]
    b.node("Split", [b.value(op.inputs[x_slot]), b.ints(f"{outs[0]}__split", sizes)], outs, axis=_axis4(axis, rank))


@converts("GATHER", ir="Gather")
def gather(b: Builder, op: TflOp) -> None:
    o = _opt(op, b)
    rank = b.rank(op.inputs[0])
    if o.BatchDims():
        raise ModelError(f"{b.where(op)}: GATHER with batch_dims is not supported")
    idx = b.require(op, 1, "indices")
    x = _as_nhwc(b, op.inputs[0])
    _emit_in_tflite_layout(b, op, "Gather", [x, b.const(f"{b.names[op.outputs[0]]}__indices", np.asarray(idx, np.int64))],
                           op.outputs[0], axis=int(o.Axis()) % rank)


@converts("CAST", ir="Cast")
def cast(b: Builder, op: TflOp) -> None:
    from qmace.runtime.lower import onnx_elem_type

    to = b.t(op.outputs[0]).dtype
    b.node("Cast", [b.value(op.inputs[0])], [b.output(op.outputs[0])], to=onnx_elem_type(to))


@converts("TILE", ir="Tile")
def tile(b: Builder, op: TflOp) -> None:
    reps = [int(v) for v in np.asarray(b.require(op, 1, "multiples")).reshape(-1)]
    if len(reps) == 4:
        reps = [reps[p] for p in NCHW_FROM_NHWC]
    out = b.output(op.outputs[0])
    b.node("Tile", [b.value(op.inputs[0]), b.ints(f"{out}__repeats", reps)], [out])
