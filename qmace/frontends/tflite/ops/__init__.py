"""TFLite builtin (and known custom) operators -> IR nodes with ONNX-named ops, in the NCHW layout.

One function per TFLite op, registered in ``CONVERTERS`` (builtin name) or ``CUSTOM_CONVERTERS``
(custom code): convolutions, fully-connected, pooling and reductions in ``nn``, element-wise and
data-movement ops in ``tensor``; this module holds the registry and the helpers they share. Each reads its options from the ``tflite`` package's accessor object and emits nodes
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

import importlib
from collections.abc import Callable

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.builder import NHWC_TO_NCHW_AXIS, Builder, nchw_shape
from qmace.frontends.tflite.reader import TflOp
from qmace.qmath import QuantParams

Converter = Callable[[Builder, TflOp], None]
CONVERTERS: dict[str, Converter] = {}
CUSTOM_CONVERTERS: dict[str, Converter] = {}
IR_OPS: dict[str, str] = {}  # TFLite op (custom: "CUSTOM <code>") -> the IR op(s) it becomes (docs/supported-ops.md)


def converts(*names: str, ir: str | dict[str, str], custom: bool = False):
    """Decorator: register ``fn`` as the converter of TFLite builtin (or, with ``custom``, custom) operators.

    A converter ``fn(b, op)`` takes the :class:`Builder` ``b`` and the operator ``op`` (a ``TflOp``), emits
    IR nodes through ``b`` (reading inputs with ``b.value``, writing outputs named by ``b.output``) and
    returns nothing; it raises ModelError naming the operator (``b.where(op)``) for options or inputs it
    cannot convert. The registered converters document only what they map to; these are their arguments.

    Args:
        *names: TFLite builtin operator names (``"CONV_2D"``) or custom codes.
        ir: the IR op(s) each becomes, one string for all names or a dict per name (docs/supported-ops.md).
        custom: register custom codes instead of builtin names.

    Returns:
        The decorator, which returns ``fn`` unchanged.
    """
    def deco(fn: Converter) -> Converter:
        for n in names:
            (CUSTOM_CONVERTERS if custom else CONVERTERS)[n] = fn
            IR_OPS[f"CUSTOM {n}" if custom else n] = ir if isinstance(ir, str) else ir[n]
        return fn
    return deco


# ---- helpers -----------------------------------------------------------------------------------------

def options(op: TflOp, b: Builder):
    """The operator's builtin options table.

    Args:
        op: the operator.
        b: the builder (for the message).

    Returns:
        The ``tflite`` package's options object.

    Raises:
        ModelError: the options are missing.
    """
    if op.options is None:
        raise ModelError(f"{b.where(op)}: builtin options are missing")
    return op.options


def samepads_attr(in_hw, k_hw, s_hw, d_hw) -> list[int]:
    """ONNX pads [top, left, bottom, right] of TFLite's SAME padding (see the module docstring).

    Args:
        in_hw: input (height, width).
        k_hw: kernel (height, width).
        s_hw: strides.
        d_hw: dilations.

    Returns:
        The four pads.
    """
    begins, ends = [], []
    for size, k, s, d in zip(in_hw, k_hw, s_hw, d_hw):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return begins + ends


def pads_attr(b: Builder, op: TflOp, padding: int, x_index: int, k_hw, s_hw, d_hw) -> dict:
    """The ``pads`` attribute for TFLite's padding code (0 SAME, 1 VALID) of a 2-D window op.

    Args:
        b: the builder.
        op: the operator.
        padding: TFLite's padding code.
        x_index: the input tensor (NHWC, for its spatial size).
        k_hw: kernel (height, width).
        s_hw: strides.
        d_hw: dilations.

    Returns:
        ``{"pads": [top, left, bottom, right]}``.

    Raises:
        ModelError: an unknown padding code, or SAME padding of an input that is not 4-D.
    """
    if padding == 1:  # VALID
        return {"pads": [0, 0, 0, 0]}
    if padding != 0:
        raise ModelError(f"{b.where(op)}: padding {padding} is not supported")
    shape = b.t(x_index).shape
    if len(shape) != 4:
        raise ModelError(f"{b.where(op)}: input {b.t(x_index).name!r} is not 4-D (shape {list(shape)})")
    return {"pads": samepads_attr(shape[1:3], k_hw, s_hw, d_hw)}


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
    follow the permutation (IR axis = position of the TFLite dimension in ``perm``).

    Args:
        b: the builder.
        op: the operator.
        slot: the weight's input position.
        perm: TFLite -> IR axis permutation.
        what: what the input is, for messages.

    Returns:
        The IR name of the float32 weight constant (its fixed quantization parameters recorded if quantized).

    Raises:
        ModelError: the weight is not a constant.
    """
    b.require(op, slot, what)
    index = op.inputs[slot]
    w = np.ascontiguousarray(b.float_data(index).transpose(perm))
    name = b.const(b.names[index] if b.names[index] not in b.graph.tensors else f"{b.names[index]}__{op.index}", w)
    qp = _weight_params(b, b.resolve(index), {src: dst for dst, src in enumerate(perm)})
    if qp is not None:
        b.params[name] = qp.to_json()
    return name


def bias(b: Builder, op: TflOp, slot: int) -> list[str]:
    """The operator's optional bias input as a float32 constant (int32 codes dequantized).

    Args:
        b: the builder.
        op: the operator.
        slot: the bias's input position.

    Returns:
        ``[name]``, or ``[]`` when there is no bias.

    Raises:
        ModelError: the bias is not a constant.
    """
    if slot >= len(op.inputs) or op.inputs[slot] < 0:
        return []
    b.require(op, slot, "bias")
    index = op.inputs[slot]
    return [b.const(f"{b.names[index]}__{op.index}", b.float_data(index).astype(np.float32).reshape(-1))]


def ir_axis(axis: int, rank: int) -> int:
    """A TFLite axis in the IR layout (rank 4: NHWC -> NCHW position).

    Args:
        axis: the TFLite axis (negative counts from the end).
        rank: the tensor's rank.

    Returns:
        The IR axis.
    """
    axis = axis % rank if rank else 0
    return NHWC_TO_NCHW_AXIS[axis] if rank == 4 else axis



def as_nhwc(b: Builder, index: int) -> str:
    """IR name of TFLite tensor ``index`` in TFLite's own layout (NHWC for rank 4).

    Args:
        b: the builder.
        index: the TFLite tensor index.

    Returns:
        The IR name (a cached NHWC view for rank-4 tensors).
    """
    name = b.value(index)
    if b.rank(index) != 4:
        return name
    return b.nhwc(name, nchw_shape(b.t(index).shape))


def emit_in_tflite_layout(b: Builder, op: TflOp, op_type: str, inputs: list[str], out_index: int, **attrs) -> None:
    """Emit ``op_type`` on TFLite-layout inputs; a rank-4 output is laid out NCHW afterwards.

    Args:
        b: the builder.
        op: the operator.
        op_type: the IR op.
        inputs: its inputs, in TFLite layout.
        out_index: the TFLite output tensor index.
        **attrs: the node's attributes.
    """
    if b.rank(out_index) != 4:
        b.node(op_type, inputs, [b.output(out_index)], **attrs)
        return
    shape = b.t(out_index).shape
    mid = b.temp(f"{b.names[out_index]}__nhwc", shape)
    b.node(op_type, inputs, [mid], **attrs)
    b.to_nchw(mid, shape, b.output(out_index))

def reshape_into(b: Builder, op: TflOp, src: str, shape_nhwc: list[int], out: str) -> None:
    """Reshape ``src`` (TFLite layout) to ``shape_nhwc`` and write it to ``out`` (NCHW when the result is 4-D).

    Args:
        b: the builder.
        op: the operator being converted (not read by the reshape itself).
        src: the source tensor in TFLite layout.
        shape_nhwc: the target shape in TFLite layout.
        out: the IR output tensor.
    """
    if len(shape_nhwc) == 4:
        mid = b.temp(f"{out}__nhwc", shape_nhwc)
        b.node("Reshape", [src, b.ints(f"{out}__shape", shape_nhwc)], [mid])
        b.to_nchw(mid, tuple(shape_nhwc), out)
    else:
        b.node("Reshape", [src, b.ints(f"{out}__shape", shape_nhwc)], [out])


# The converters register themselves on import. They import the registry and helpers above from this
# package, so they are loaded by name (as qmace.ops loads its op modules), not by a circular static import.
for _module in ("nn", "tensor"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["CONVERTERS", "CUSTOM_CONVERTERS", "IR_OPS", "converts"]
