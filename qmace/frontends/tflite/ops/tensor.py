"""TFLite element-wise and data-movement ops -> IR ops (rank-4 axes mapped NHWC -> NCHW)."""

from __future__ import annotations

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.builder import NCHW_FROM_NHWC, NHWC_TO_NCHW_AXIS, Builder
from qmace.frontends.tflite.ops import (
    as_nhwc,
    converts,
    emit_in_tflite_layout,
    ir_axis,
    options,
    reshape_into,
)
from qmace.frontends.tflite.reader import TflOp
from qmace.ops.litert_add import ARITH, LITERT

# ---- element-wise ------------------------------------------------------------------------------------

_BINARY = {"ADD": "Add", "SUB": "Sub", "MUL": "Mul", "DIV": "Div", "MAXIMUM": "Max", "MINIMUM": "Min",
           "POW": "Pow"}


@converts(*_BINARY, ir=_BINARY)
def binary(b: Builder, op: TflOp) -> None:
    """ADD, SUB, MUL, DIV, MAXIMUM, MINIMUM, POW -> the ONNX op, operands broadcast in the IR layout, fused
    activation. A quantized (8-bit) ADD / SUB carries ``qm_arith="litert"``: quantized, it computes LiteRT's
    integer codes (``qmace.ops.litert_add``) instead of qmace's float definition.
    """
    out_rank = b.rank(op.outputs[0])
    a, c = (b.broadcast_operand(i, out_rank) for i in op.inputs[:2])
    fused = op.options.FusedActivationFunction() if hasattr(op.options, "FusedActivationFunction") else 0
    pre, out = b.activation(op, fused, op.outputs[0])
    litert = op.op in ("ADD", "SUB") and b.t(op.outputs[0]).dtype in ("int8", "uint8")
    b.node(_BINARY[op.op], [a, c], [pre], **({ARITH: LITERT} if litert else {}))
    b.finish_activation(fused, pre, out)


@converts("SQUARED_DIFFERENCE", ir="Sub, Mul")
def squared_difference(b: Builder, op: TflOp) -> None:
    """SQUARED_DIFFERENCE -> ``d = a - b; d * d``."""
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
    """LOGISTIC, TANH, RELU, HARD_SWISH, EXP, LOG, SQRT, ABS, NEG -> the ONNX op of the same function."""
    b.node(_UNARY[op.op], [b.value(op.inputs[0])], [b.output(op.outputs[0])])


@converts(*_CLIPS, ir="Clip")
def clip(b: Builder, op: TflOp) -> None:
    """RELU6, RELU_N1_TO_1, RELU_0_TO_1 -> Clip with bounds (0, 6), (-1, 1), (0, 1)."""
    lo, hi = _CLIPS[op.op]
    out = b.output(op.outputs[0])
    b.node("Clip", [b.value(op.inputs[0]), b.const(f"{out}__lo", np.float32(lo)), b.const(f"{out}__hi", np.float32(hi))],
           [out])


@converts("RSQRT", ir="Sqrt, Div")
def rsqrt(b: Builder, op: TflOp) -> None:
    """RSQRT -> ``1 / Sqrt(x)``."""
    out = b.output(op.outputs[0])
    root = b.temp(f"{out}__sqrt")
    b.node("Sqrt", [b.value(op.inputs[0])], [root])
    b.node("Div", [b.const(f"{out}__one", np.float32(1.0)), root], [out])


@converts("LEAKY_RELU", ir="LeakyRelu")
def leaky_relu(b: Builder, op: TflOp) -> None:
    """LEAKY_RELU -> LeakyRelu(alpha)."""
    b.node("LeakyRelu", [b.value(op.inputs[0])], [b.output(op.outputs[0])], alpha=float(options(op, b).Alpha()))


@converts("PRELU", ir="PRelu")
def prelu(b: Builder, op: TflOp) -> None:
    """PRELU -> PRelu, the slope broadcast in the IR layout."""
    out_rank = b.rank(op.outputs[0])
    b.node("PRelu", [b.value(op.inputs[0]), b.broadcast_operand(op.inputs[1], out_rank)], [b.output(op.outputs[0])])


@converts("GELU", ir="Gelu")
def gelu(b: Builder, op: TflOp) -> None:
    """GELU -> Gelu (``approximate`` "tanh" when the options say so, else "none")."""
    approx = "tanh" if options(op, b).Approximate() else "none"
    b.node("Gelu", [b.value(op.inputs[0])], [b.output(op.outputs[0])], approximate=approx)


@converts("SOFTMAX", ir="Softmax (Mul when beta != 1)")
def softmax(b: Builder, op: TflOp) -> None:
    """SOFTMAX -> Softmax over the channel axis (``softmax(beta x)``: a Mul by beta first when beta != 1)."""
    beta = float(options(op, b).Beta())
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
    x = as_nhwc(b, op.inputs[0])
    reshape_into(b, op, x, out_shape, b.output(op.outputs[0]))


@converts("TRANSPOSE", ir="Transpose")
def transpose(b: Builder, op: TflOp) -> None:
    """TRANSPOSE -> Transpose, a rank-4 ``perm`` rewritten for NCHW tensors."""
    perm = [int(p) for p in np.asarray(b.require(op, 1, "perm")).reshape(-1)]
    if len(perm) == 4:  # Y_ir = X_ir . (NCHW->NHWC) . perm . (NHWC->NCHW)
        inv = (0, 2, 3, 1)
        perm = [inv[perm[NCHW_FROM_NHWC[i]]] for i in range(4)]
    b.node("Transpose", [b.value(op.inputs[0])], [b.output(op.outputs[0])], perm=perm)


@converts("CONCATENATION", ir="Concat")
def concatenation(b: Builder, op: TflOp) -> None:
    """CONCATENATION -> Concat on the IR axis, fused activation."""
    o = options(op, b)
    rank = b.rank(op.outputs[0])
    fused = o.FusedActivationFunction()
    pre, out = b.activation(op, fused, op.outputs[0])
    b.node("Concat", [b.value(i) for i in op.inputs], [pre], axis=ir_axis(o.Axis(), rank))
    b.finish_activation(fused, pre, out)


@converts("PAD", "PADV2", "MIRROR_PAD", ir="Pad")
def pad(b: Builder, op: TflOp) -> None:
    """PAD, PADV2 (constant value), MIRROR_PAD (REFLECT only) -> Pad with ONNX-ordered pads."""
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
        if options(op, b).Mode() != 0:
            raise ModelError(f"{b.where(op)}: MIRROR_PAD mode SYMMETRIC is not supported (REFLECT is)")
        mode = "reflect"
    b.node("Pad", ins, [b.output(op.outputs[0])], mode=mode)


def _resize(b: Builder, op: TflOp, mode: str) -> None:
    o = options(op, b)
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
    """RESIZE_BILINEAR -> Resize(linear): align_corners, half_pixel or asymmetric coordinates as the options say."""
    _resize(b, op, "linear")


@converts("RESIZE_NEAREST_NEIGHBOR", ir="Resize (nearest)")
def resize_nearest(b: Builder, op: TflOp) -> None:
    """RESIZE_NEAREST_NEIGHBOR -> Resize(nearest) with TensorFlow's coordinate and rounding rule."""
    _resize(b, op, "nearest")


@converts("DEPTH_TO_SPACE", ir="DepthToSpace (DCR)")
def depth_to_space(b: Builder, op: TflOp) -> None:
    """TensorFlow's depth_to_space is ONNX's DCR order."""
    b.node("DepthToSpace", [b.value(op.inputs[0])], [b.output(op.outputs[0])], blocksize=int(options(op, b).BlockSize()),
           mode="DCR")


@converts("SPACE_TO_DEPTH", ir="SpaceToDepth")
def space_to_depth(b: Builder, op: TflOp) -> None:
    """SPACE_TO_DEPTH -> SpaceToDepth(blocksize)."""
    b.node("SpaceToDepth", [b.value(op.inputs[0])], [b.output(op.outputs[0])], blocksize=int(options(op, b).BlockSize()))


@converts("SLICE", ir="Slice")
def slice_(b: Builder, op: TflOp) -> None:
    """SLICE (begin, size; size -1: to the end) -> Slice."""
    begin = [int(v) for v in np.asarray(b.require(op, 1, "begin")).reshape(-1)]
    size = [int(v) for v in np.asarray(b.require(op, 2, "size")).reshape(-1)]
    shape = b.t(op.inputs[0]).shape
    end = [shape[i] if s < 0 else bg + s for i, (bg, s) in enumerate(zip(begin, size))]
    _slice(b, op, begin, end, [1] * len(begin))


def _slice(b: Builder, op: TflOp, begin, end, steps) -> None:
    rank = len(begin)
    axes = [ir_axis(a, rank) for a in range(rank)]
    out = b.output(op.outputs[0])
    b.node("Slice", [b.value(op.inputs[0]), b.ints(f"{out}__starts", begin), b.ints(f"{out}__ends", end),
                     b.ints(f"{out}__axes", axes), b.ints(f"{out}__steps", steps)], [out])


@converts("STRIDED_SLICE", ir="Slice (+ Reshape for shrink_axis_mask)")
def strided_slice(b: Builder, op: TflOp) -> None:
    """STRIDED_SLICE -> Slice with begin/end masks resolved (+ Reshape for shrink_axis_mask); ellipsis and
    new-axis masks are refused.
    """
    o = options(op, b)
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
    x = as_nhwc(b, op.inputs[0])
    out = b.names[op.outputs[0]]
    mid = b.temp(f"{out}__sliced")
    b.node("Slice", [x, b.ints(f"{out}__starts", begin), b.ints(f"{out}__ends", end),
                     b.ints(f"{out}__axes", range(len(begin))), b.ints(f"{out}__steps", steps)], [mid])
    reshape_into(b, op, mid, list(b.t(op.outputs[0]).shape), b.output(op.outputs[0]))


@converts("SPLIT", "SPLIT_V", ir="Split")
def split(b: Builder, op: TflOp) -> None:
    """SPLIT (equal parts) and SPLIT_V (size_splits) -> Split on the IR axis."""
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
    b.node("Split", [b.value(op.inputs[x_slot]), b.ints(f"{outs[0]}__split", sizes)], outs, axis=ir_axis(axis, rank))


@converts("GATHER", ir="Gather")
def gather(b: Builder, op: TflOp) -> None:
    """GATHER (constant indices, no batch_dims) -> Gather in the TFLite layout."""
    o = options(op, b)
    rank = b.rank(op.inputs[0])
    if o.BatchDims():
        raise ModelError(f"{b.where(op)}: GATHER with batch_dims is not supported")
    idx = b.require(op, 1, "indices")
    x = as_nhwc(b, op.inputs[0])
    emit_in_tflite_layout(b, op, "Gather", [x, b.const(f"{b.names[op.outputs[0]]}__indices", np.asarray(idx, np.int64))],
                           op.outputs[0], axis=int(o.Axis()) % rank)


@converts("CAST", ir="Cast")
def cast(b: Builder, op: TflOp) -> None:
    """CAST -> Cast to the output tensor's type."""
    from qmace.onnx_bridge import onnx_elem_type

    to = b.t(op.outputs[0]).dtype
    b.node("Cast", [b.value(op.inputs[0])], [b.output(op.outputs[0])], to=onnx_elem_type(to))


@converts("TILE", ir="Tile")
def tile(b: Builder, op: TflOp) -> None:
    """TILE -> Tile, rank-4 multiples mapped to NCHW."""
    reps = [int(v) for v in np.asarray(b.require(op, 1, "multiples")).reshape(-1)]
    if len(reps) == 4:
        reps = [reps[p] for p in NCHW_FROM_NHWC]
    out = b.output(op.outputs[0])
    b.node("Tile", [b.value(op.inputs[0]), b.ints(f"{out}__repeats", reps)], [out])
