"""TensorFlow ops -> IR ops (ONNX names, opset-21 semantics), one emitter per TF op.

Every value keeps TensorFlow's layout in the IR (NHWC activations, HWIO filters are converted to OIHW
constants). The ops whose ONNX form is channels-first (Conv2D, DepthwiseConv2dNative, pooling,
FusedBatchNorm, resize) are emitted between two Transposes, ``(N,H,W,C) -> (N,C,H,W)`` before and back
after; ``qmace.passes.transpose`` then cancels the pairs, so the optimized graph runs in NCHW throughout.
Elementwise ops, reductions, reshapes and shape arithmetic need nothing: TF's broadcasting and axes are
ONNX's once the layout is TF's.

An emitter gets the builder, the TF node and the IR names of its data inputs, and returns the IR names of
the node's outputs (output k of the TF node is ``result[k]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmace.frontends.tensorflow.builder import Builder
from qmace.frontends.tensorflow.fakequant import FAKE_QUANT_OPS, emit_fake_quant

TO_NCHW = (0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
TO_NHWC = (0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
# TF DataType -> ONNX TensorProto.DataType
ONNX_TYPES = {1: 1, 2: 11, 3: 6, 4: 2, 5: 5, 6: 3, 9: 7, 10: 9, 17: 4, 19: 10}

# Ops that only forward input 0 (their output is an alias in the IR).
FORWARD_OPS = {"Identity", "StopGradient", "Snapshot", "PreventGradient", "CheckNumerics",
               "PlaceholderWithDefault", "EnsureShape"}
CONTROL_FLOW_OPS = {"While", "StatelessWhile", "If", "StatelessIf", "Switch", "Merge", "Enter", "Exit",
                    "NextIteration", "LoopCond", "RefSwitch", "RefMerge", "RefEnter", "RefExit"}
VARIABLE_OPS = {"VarHandleOp", "ReadVariableOp", "VariableV2", "Variable", "AssignVariableOp",
                "ResourceGather", "VarIsInitializedOp"}


@dataclass
class TfNode:
    """A GraphDef node with attributes as Python values and data inputs (control inputs removed)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        """An attribute's value.

        Args:
            key: the TF attribute name (``strides``, ``data_format``, ...).
            default: the value when the node does not set it.

        Returns:
            The attribute as a Python value, or ``default``.
        """
        return self.attrs.get(key, default)


Emitter = Callable[[Builder, TfNode, list[str]], list[str]]
EMITTERS: dict[str, Emitter] = {}


def emits(*ops: str) -> Callable[[Emitter], Emitter]:
    """Register the decorated function as the emitter of the given TF op types (in ``EMITTERS``).

    Every emitter has the interface ``fn(b, n, ins) -> outputs``: ``b`` is the :class:`Builder` of the
    graph under construction (its ``node_name`` is ``n.name``), ``n`` the :class:`TfNode` being converted,
    ``ins`` the IR names of its data inputs in TF's order; it adds IR nodes with ``b.emit``/``b.emit1``
    and returns the IR names of the node's outputs (output k of the TF node is ``outputs[k]``). It raises
    ModelError (made by ``b.error``, naming the file and node) for a node it cannot convert.

    Args:
        *ops: the TF op types the emitter converts.

    Returns:
        The decorator (it returns the function unchanged).
    """
    def deco(fn: Emitter) -> Emitter:
        for op in ops:
            EMITTERS[op] = fn
        return fn
    return deco


def supported_tf_ops() -> list[str]:
    """Every TF op type the frontend converts (for docs/supported-ops.md)."""
    return sorted({*EMITTERS, *FORWARD_OPS, *FAKE_QUANT_OPS, "Const", "Placeholder", "NoOp"})


# The IR op each TF op becomes (besides Transposes and constants), for docs/supported-ops.md; ops mapped
# to () vanish (folded, forwarded, or turned into quantization parameters). tests/test_tensorflow.py checks
# that this table and EMITTERS agree.
IR_OPS: dict[str, tuple[str, ...]] = {
    "Conv2D": ("Conv",), "DepthwiseConv2dNative": ("Conv",), "MaxPool": ("MaxPool",),
    "AvgPool": ("AveragePool",), "FusedBatchNorm": ("BatchNormalization",),
    "FusedBatchNormV2": ("BatchNormalization",), "FusedBatchNormV3": ("BatchNormalization",),
    "ResizeBilinear": ("Resize",), "ResizeNearestNeighbor": ("Resize",), "BiasAdd": ("Add",),
    "BiasAddV1": ("Add",), "Add": ("Add",), "AddV2": ("Add",), "AddN": ("Add",), "Sub": ("Sub",),
    "Mul": ("Mul",), "RealDiv": ("Div",), "Div": ("Div",), "Relu": ("Relu",), "Sigmoid": ("Sigmoid",),
    "Tanh": ("Tanh",), "Sqrt": ("Sqrt",), "Neg": ("Neg",), "Abs": ("Abs",), "Exp": ("Exp",), "Log": ("Log",),
    "Erf": ("Erf",), "Relu6": ("Clip",), "LeakyRelu": ("LeakyRelu",), "Rsqrt": ("Sqrt", "Div"),
    "Reciprocal": ("Div",), "Inv": ("Div",), "Square": ("Mul",), "SquaredDifference": ("Sub", "Mul"),
    "Softmax": ("Softmax",), "MatMul": ("MatMul",), "BatchMatMul": ("MatMul",), "BatchMatMulV2": ("MatMul",),
    "BatchMatMulV3": ("MatMul",), "Mean": ("ReduceMean",), "Sum": ("ReduceSum",), "Max": ("ReduceMax",),
    "Min": ("ReduceMin",), "Pad": ("Pad",), "PadV2": ("Pad",), "MirrorPad": ("Pad",), "ConcatV2": ("Concat",),
    "Reshape": ("Reshape",), "Squeeze": ("Squeeze",), "ExpandDims": ("Unsqueeze",), "Transpose": ("Transpose",),
    "Shape": ("Shape", "Cast"), "Cast": ("Cast",), "StridedSlice": ("Slice", "Squeeze"), "Slice": ("Slice",),
    "Pack": ("Unsqueeze", "Concat"), "Fill": (), "Tile": ("Tile",), "Split": ("Split",), "SplitV": ("Split",),
    "GatherV2": ("Gather",), "Gather": ("Gather",),
    "FakeQuantWithMinMaxVars": (), "FakeQuantWithMinMaxArgs": (), "FakeQuantWithMinMaxVarsPerChannel": (),
}


def _fmt(n: TfNode) -> str:
    return n.attr("data_format", "NHWC")


def _spatial(values: list[int] | None, fmt: str) -> list[int]:
    """The (H, W) entries of a 4-element strides/ksize/dilations list in ``fmt`` order."""
    if not values:
        return [1, 1]
    return [int(values[1]), int(values[2])] if fmt == "NHWC" else [int(values[2]), int(values[3])]


def _padding(b: Builder, n: TfNode, fmt: str) -> dict[str, Any]:
    pad = n.attr("padding", "VALID")
    if pad == "SAME":
        return {"auto_pad": "SAME_UPPER"}  # TF puts the odd extra pad at the end, as SAME_UPPER
    if pad == "VALID":
        return {"auto_pad": "VALID"}
    if pad == "EXPLICIT":
        e = [int(v) for v in n.attr("explicit_paddings", [])]
        h, w = (2, 4) if fmt == "NHWC" else (4, 6)
        return {"pads": [e[h], e[w], e[h + 1], e[w + 1]]}
    raise b.error(f"padding {pad!r} is not supported")


def _channels_first(b: Builder, x: str, fmt: str) -> str:
    return b.transpose(x, TO_NCHW) if fmt == "NHWC" else x


def _channels_last(b: Builder, y: str, fmt: str) -> str:
    if fmt != "NHWC":
        return y
    out = b.transpose(y, TO_NHWC)
    b.core[out] = y
    return out


def _weight(b: Builder, w: str, depthwise: bool) -> str:
    """HWIO (Conv2D) or HWCM (depthwise) filter -> ONNX (M, C/g, kh, kw) constant; fixed parameters
    recorded on the filter follow it (per-channel axis mapped, depthwise ranges tiled over channels)."""
    v = b.const(w, "filter")
    if v.ndim != 4:
        raise b.error(f"filter {w!r} of shape {list(v.shape)} is not 4-D")
    qp = b.params.get(w)
    if depthwise:
        kh, kw, c, m = v.shape
        out = v.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)
    else:
        out = v.transpose(3, 2, 0, 1)
    name = b.add_const(out.astype(np.float32), f"{w}/oihw")
    if qp is not None:
        from qmace.qmath import QuantParams

        if qp.axis is None:
            b.params[name] = qp
        else:  # channel axis of the TF filter is its last (O for HWIO, M for HWCM)
            reps = v.shape[2] if depthwise else 1
            b.params[name] = QuantParams(np.tile(qp.scale, reps), np.tile(qp.zero_point, reps), qp.dtype, 0,
                                         qp.narrow_range)
    return name


@emits("Conv2D", "DepthwiseConv2dNative")
def _conv(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Conv2D / DepthwiseConv2dNative -> ``Conv`` on channels-first data, the filter as an OIHW constant
    (depthwise: ``group = C``)."""
    fmt = _fmt(n)
    depthwise = n.op == "DepthwiseConv2dNative"
    w = _weight(b, ins[1], depthwise)
    attrs = {"strides": _spatial(n.attr("strides"), fmt), "dilations": _spatial(n.attr("dilations"), fmt),
             **_padding(b, n, fmt)}
    if depthwise:
        attrs["group"] = int(b.const(ins[1]).shape[2])
    y = b.emit1("Conv", [_channels_first(b, ins[0], fmt), w], attrs)
    return [_channels_last(b, y, fmt)]


@emits("MaxPool", "AvgPool")
def _pool(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """MaxPool / AvgPool -> ``MaxPool`` / ``AveragePool`` on channels-first data."""
    fmt = _fmt(n)
    attrs = {"kernel_shape": _spatial(n.attr("ksize"), fmt), "strides": _spatial(n.attr("strides"), fmt),
             **_padding(b, n, fmt)}
    y = b.emit1("MaxPool" if n.op == "MaxPool" else "AveragePool", [_channels_first(b, ins[0], fmt)], attrs)
    return [_channels_last(b, y, fmt)]


@emits("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _batchnorm(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """FusedBatchNorm (inference mode only) -> ``BatchNormalization`` on channels-first data."""
    if n.attr("is_training", False):
        raise b.error("FusedBatchNorm with is_training=true: export the graph in inference mode")
    fmt = _fmt(n)
    y = b.emit1("BatchNormalization", [_channels_first(b, ins[0], fmt), *ins[1:5]],
                {"epsilon": float(n.attr("epsilon", 1e-3))})
    return [_channels_last(b, y, fmt)]


@emits("ResizeBilinear", "ResizeNearestNeighbor")
def _resize(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """ResizeBilinear / ResizeNearestNeighbor -> ``Resize`` to ``(N, C, *size)`` with TF's coordinate rule."""
    x = b.transpose(ins[0], TO_NCHW)
    nc = b.emit1("Shape", [x], {"start": 0, "end": 2})
    sizes = b.emit1("Concat", [nc, b.int64(ins[1])], {"axis": 0})
    align, half = bool(n.attr("align_corners", False)), bool(n.attr("half_pixel_centers", False))
    if n.op == "ResizeBilinear":
        attrs = {"mode": "linear", "coordinate_transformation_mode":
                 "align_corners" if align else "half_pixel" if half else "asymmetric"}
    else:
        attrs = {"mode": "nearest", "coordinate_transformation_mode":
                 "align_corners" if align else "tf_half_pixel_for_nn" if half else "asymmetric",
                 "nearest_mode": "round_prefer_ceil" if align else "floor"}
    y = b.emit1("Resize", [x, "", "", sizes], attrs)
    return [_channels_last(b, y, "NHWC")]


@emits("BiasAdd", "BiasAddV1")
def _bias_add(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """BiasAdd -> ``Add`` (the bias unsqueezed to ``(C, 1, 1)`` for NCHW data)."""
    bias = ins[1]
    if _fmt(n) == "NCHW":  # (C,) -> (C, 1, 1) against (N, C, H, W)
        bias = b.emit1("Unsqueeze", [bias, b.add_const(np.array([1, 2], np.int64))])
    return [b.emit1("Add", [ins[0], bias])]


_BINARY = {"Add": "Add", "AddV2": "Add", "Sub": "Sub", "Mul": "Mul", "RealDiv": "Div", "Div": "Div"}
_UNARY = {"Relu": "Relu", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "Sqrt": "Sqrt", "Neg": "Neg", "Abs": "Abs",
          "Exp": "Exp", "Log": "Log", "Erf": "Erf"}


@emits(*_BINARY)
def _binary(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Add / AddV2 / Sub / Mul / RealDiv / Div -> the ONNX op of the same broadcasting arithmetic."""
    return [b.emit1(_BINARY[n.op], ins[:2])]


@emits(*_UNARY)
def _unary(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Relu, Sigmoid, Tanh, Sqrt, Neg, Abs, Exp, Log, Erf -> the ONNX op of the same name."""
    return [b.emit1(_UNARY[n.op], ins[:1])]


@emits("AddN")
def _add_n(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """AddN -> a chain of ``Add``: ``((x0 + x1) + x2) + ...``."""
    y = ins[0]
    for x in ins[1:]:
        y = b.emit1("Add", [y, x])
    return [y]


@emits("Relu6")
def _relu6(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Relu6 -> ``Clip(x, 0, 6)``."""
    return [b.emit1("Clip", [ins[0], b.add_const(np.array(0, np.float32)), b.add_const(np.array(6, np.float32))])]


@emits("LeakyRelu")
def _leaky(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """LeakyRelu -> ``LeakyRelu`` with TF's ``alpha`` (default 0.2)."""
    return [b.emit1("LeakyRelu", ins[:1], {"alpha": float(n.attr("alpha", 0.2))})]


@emits("Rsqrt", "Reciprocal", "Inv", "Square", "SquaredDifference")
def _arith(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Rsqrt -> ``1 / Sqrt(x)``; Reciprocal / Inv -> ``1 / x``; Square -> ``x * x``;
    SquaredDifference -> ``(a - b) * (a - b)``."""
    one = b.add_const(np.array(1, np.float32))
    if n.op == "Rsqrt":
        return [b.emit1("Div", [one, b.emit1("Sqrt", ins[:1])])]
    if n.op in ("Reciprocal", "Inv"):
        return [b.emit1("Div", [one, ins[0]])]
    d = ins[0] if n.op == "Square" else b.emit1("Sub", ins[:2])
    return [b.emit1("Mul", [d, d])]


@emits("Softmax")
def _softmax(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Softmax -> ``Softmax`` over the last axis."""
    return [b.emit1("Softmax", ins[:1], {"axis": -1})]


@emits("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
def _matmul(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """MatMul / BatchMatMul -> ``MatMul``, transpose/adjoint flags as a ``Transpose`` of the last two axes."""
    a, c = ins[0], ins[1]
    ta = n.attr("transpose_a", n.attr("adj_x", False))
    tb = n.attr("transpose_b", n.attr("adj_y", False))
    for flag, idx in ((ta, 0), (tb, 1)):
        if flag:
            name = (a, c)[idx]
            t = b.graph.tensors[name]
            rank = t.data.ndim if t.data is not None else 2 if n.op == "MatMul" else None
            if rank is None:
                raise b.error("adj_x/adj_y on a computed batch operand is not supported")
            perm = [*range(rank - 2), rank - 1, rank - 2]
            if idx == 0:
                a = b.transpose(a, tuple(perm))
            else:
                c = b.transpose(c, tuple(perm))
    return [b.emit1("MatMul", [a, c])]


@emits("Mean", "Sum", "Max", "Min")
def _reduce(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Mean / Sum / Max / Min -> ``ReduceMean`` / ``ReduceSum`` / ``ReduceMax`` / ``ReduceMin`` over constant
    axes, keeping them if ``keep_dims``."""
    op = {"Mean": "ReduceMean", "Sum": "ReduceSum", "Max": "ReduceMax", "Min": "ReduceMin"}[n.op]
    axes = b.add_const(np.asarray(b.const(ins[1], "reduction axes"), np.int64).reshape(-1))
    return [b.emit1(op, [ins[0], axes], {"keepdims": int(bool(n.attr("keep_dims", False)))})]


@emits("Pad", "PadV2", "MirrorPad")
def _pad(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Pad / PadV2 / MirrorPad (REFLECT) -> ``Pad``; TF's paddings ``[[begin, end], ...]`` become ONNX's
    ``[begins..., ends...]``."""
    # TF paddings (rank, 2) [[begin, end], ...] -> ONNX pads [begins..., ends...]
    pads = b.emit1("Reshape", [b.emit1("Transpose", [b.int64(ins[1])], {"perm": [1, 0]}),
                               b.add_const(np.array([-1], np.int64))])
    mode = "constant"
    if n.op == "MirrorPad":
        mode = {"REFLECT": "reflect"}.get(n.attr("mode", ""), None)
        if mode is None:
            raise b.error(f"MirrorPad mode {n.attr('mode')!r} is not supported (REFLECT only)")
    value = [ins[2]] if n.op == "PadV2" else []
    return [b.emit1("Pad", [ins[0], pads, *value], {"mode": mode})]


@emits("ConcatV2")
def _concat(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """ConcatV2 -> ``Concat`` along its constant last input."""
    axis = int(b.const(ins[-1], "concat axis"))
    return [b.emit1("Concat", ins[:-1], {"axis": axis})]


@emits("Reshape")
def _reshape(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Reshape -> ``Reshape`` (shape as int64)."""
    return [b.emit1("Reshape", [ins[0], b.int64(ins[1])])]


@emits("Squeeze")
def _squeeze(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Squeeze -> ``Squeeze`` of ``squeeze_dims`` (all size-1 axes when empty)."""
    dims = n.attr("squeeze_dims") or []
    axes = [b.add_const(np.array(dims, np.int64))] if dims else []
    return [b.emit1("Squeeze", [ins[0], *axes])]


@emits("ExpandDims")
def _expand_dims(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """ExpandDims -> ``Unsqueeze`` at the constant ``dim``."""
    axis = np.asarray(b.const(ins[1], "dim"), np.int64).reshape(1)
    return [b.emit1("Unsqueeze", [ins[0], b.add_const(axis)])]


@emits("Transpose")
def _transpose(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Transpose -> ``Transpose`` with the constant ``perm``."""
    perm = [int(p) for p in np.asarray(b.const(ins[1], "perm")).reshape(-1)]
    return [b.transpose(ins[0], tuple(perm))]


@emits("Shape")
def _shape(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Shape -> ``Shape`` (int64), cast to ``out_type`` unless that is int64."""
    y = b.emit1("Shape", ins[:1])
    out_type = int(n.attr("out_type", 3))
    return [b.emit1("Cast", [y], {"to": ONNX_TYPES[out_type]}) if out_type != 9 else y]


@emits("Cast")
def _cast(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Cast -> ``Cast`` to the ONNX type of ``DstT``."""
    dst = int(n.attr("DstT", 1))
    if dst not in ONNX_TYPES:
        raise b.error(f"Cast to DataType {dst} is not supported")
    return [b.emit1("Cast", ins[:1], {"to": ONNX_TYPES[dst]})]


@emits("StridedSlice")
def _strided_slice(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """StridedSlice -> ``Slice`` (begin/end masks as open bounds), then ``Squeeze`` of the shrunk axes."""
    begin, end, strides = (np.asarray(b.const(i, w), np.int64).reshape(-1)
                           for i, w in zip(ins[1:4], ("begin", "end", "strides")))
    if int(n.attr("ellipsis_mask", 0)) or int(n.attr("new_axis_mask", 0)):
        raise b.error("StridedSlice with ellipsis_mask or new_axis_mask is not supported")
    bm, em, sm = (int(n.attr(k, 0)) for k in ("begin_mask", "end_mask", "shrink_axis_mask"))
    starts, ends, steps, squeeze = [], [], [], []
    for i, (s, e, st) in enumerate(zip(begin, end, strides)):
        lo, hi = (INT64_MAX, INT64_MIN) if st < 0 else (0, INT64_MAX)
        if sm >> i & 1:
            starts.append(s)
            ends.append(INT64_MAX if s == -1 else s + 1)
            steps.append(1)
            squeeze.append(i)
            continue
        starts.append(lo if bm >> i & 1 else s)
        ends.append(hi if em >> i & 1 else e)
        steps.append(st)
    consts = [b.add_const(np.array(v, np.int64)) for v in (starts, ends, list(range(len(begin))), steps)]
    y = b.emit1("Slice", [ins[0], *consts])
    if squeeze:
        y = b.emit1("Squeeze", [y, b.add_const(np.array(squeeze, np.int64))])
    return [y]


@emits("Slice")
def _slice(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Slice -> ``Slice`` with ``ends = begin + size`` (to the end where ``size < 0``)."""
    begin = np.asarray(b.const(ins[1], "begin"), np.int64).reshape(-1)
    size = np.asarray(b.const(ins[2], "size"), np.int64).reshape(-1)
    ends = np.where(size < 0, INT64_MAX, begin + size)
    axes = np.arange(len(begin), dtype=np.int64)
    return [b.emit1("Slice", [ins[0], b.add_const(begin), b.add_const(ends), b.add_const(axes)])]


@emits("Pack")
def _pack(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Pack -> ``Unsqueeze`` of each input at ``axis``, then ``Concat`` along it."""
    axis = int(n.attr("axis", 0))
    ax = b.add_const(np.array([axis], np.int64))
    parts = [b.emit1("Unsqueeze", [x, ax]) for x in ins]
    return [b.emit1("Concat", parts, {"axis": axis})]


@emits("Fill")
def _fill(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Fill -> a constant ``full(dims, value)`` (both inputs must be constants)."""
    dims = b.const(ins[0], "dims")
    value = b.const(ins[1], "value")
    return [b.add_const(np.full([int(d) for d in dims.reshape(-1)], value, value.dtype))]


@emits("Tile")
def _tile(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Tile -> ``Tile`` (multiples as int64)."""
    return [b.emit1("Tile", [ins[0], b.int64(ins[1])])]


@emits("Split")
def _split(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """Split -> ``Split`` into ``num_split`` equal parts along the constant ``split_dim``."""
    axis = int(b.const(ins[0], "split_dim"))
    k = int(n.attr("num_split", 1))
    return b.emit("Split", [ins[1]], {"axis": axis, "num_outputs": k}, k)


@emits("SplitV")
def _split_v(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """SplitV -> ``Split`` with the given ``size_splits`` along the constant ``split_dim``."""
    axis = int(b.const(ins[2], "split_dim"))
    sizes = b.int64(ins[1])
    k = int(n.attr("num_split", len(b.const(sizes, "size_splits"))))
    return b.emit("Split", [ins[0], sizes], {"axis": axis}, k)


@emits("GatherV2", "Gather")
def _gather(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """GatherV2 / Gather -> ``Gather`` along the constant axis (0 for Gather)."""
    axis = int(b.const(ins[2], "axis")) if n.op == "GatherV2" else 0
    return [b.emit1("Gather", [ins[0], ins[1]], {"axis": axis})]


@emits(*FAKE_QUANT_OPS)
def _fake_quant(b: Builder, n: TfNode, ins: list[str]) -> list[str]:
    """FakeQuant* -> nothing or a folded weight, with fixed quantization parameters (see ``fakequant``)."""
    return [emit_fake_quant(b, n.op, n.attrs, ins)]
