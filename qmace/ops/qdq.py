"""The IR's explicit quantization boundaries: ``QuantizeLinear`` (float -> codes) and ``DequantizeLinear``
(codes -> float).

In the IR these nodes have a single input: the parameters belong to the quantized tensor (QuantizeLinear:
its output's ``quant``; DequantizeLinear: its input's), so the reference runtime always runs them through
``run_quantized`` with the formulas of ``qmace.qmath`` (ORT's arithmetic, bit-exact):
``quantize(x) = clip(rint(x / scale) + zero_point, qmin, qmax)``, ``dequantize(q) = (q - zero_point) * scale``.

``run`` also accepts the ONNX form with explicit ``scale``/``zero_point`` inputs, which is how a float
model keeps a standalone QuantizeLinear/DequantizeLinear (codes entering or leaving the model; the QDQ
import removes the Q->DQ pairs and constant weights). Code type: the zero point's dtype, else
QuantizeLinear's ``output_dtype``, else uint8; any 8/16-bit integer type. Scale layouts (ONNX opset 21):
a scalar (per tensor), 1-D along ``axis`` (per channel), or, with ``block_size`` B > 0, the input's rank
with ``ceil(d / B)`` along ``axis`` (blocked: element i uses block ``i // B``). Same formulas as above
(float32 division, round half to even, saturation to the code type). Without explicit parameters ``run``
raises, since they are unknown outside a graph. These nodes have no quantization traits of their own
(``Kernel.NONE``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from onnx import helper

from qmace.errors import QuantizationError
from qmace.ops.base import Op, register
from qmace.ops.elementwise import optional_input


def _explicit_params(cls: type[Op], node, inputs):
    """QuantParams from ONNX-style scale / zero-point inputs, or None when the node has a single input."""
    scale = optional_input(inputs, 1)
    if scale is None:
        return None
    from qmace.qmath import QuantParams

    zp = optional_input(inputs, 2)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros(scale.shape, np.uint8) if zp is None else np.asarray(zp)
    axis = None if scale.ndim == 0 else int(cls.attr(node, "axis"))
    return QuantParams(scale, zp.astype(np.int32), str(zp.dtype), axis)


_CODE_TYPES = ("uint8", "int8", "uint16", "int16")


def _code_dtype(node, inputs) -> np.dtype:
    zp = optional_input(inputs, 2)
    if zp is not None:
        dtype = np.asarray(zp).dtype
    elif node.op_type == "QuantizeLinear" and int(node.attrs.get("output_dtype", 0) or 0):
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"])))
    elif node.op_type == "DequantizeLinear":
        dtype = np.asarray(inputs[0]).dtype
    else:
        dtype = np.dtype(np.uint8)
    if str(dtype) not in _CODE_TYPES + (("int32",) if node.op_type == "DequantizeLinear" else ()):
        raise NotImplementedError(f"{node.op_type} node {node.name!r}: code type {dtype} is not supported "
                                  f"(supported: {', '.join(_CODE_TYPES)})")
    return dtype


def _along(param, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A scale / zero point broadcast against data of ``shape`` (per tensor, per axis or blocked)."""
    p = np.asarray(param)
    if p.ndim == 0 or (p.size == 1 and not block_size):
        return p.reshape(())
    ndim = len(shape)
    axis %= ndim
    if block_size:
        p = np.repeat(p, block_size, axis=axis)
        return p[tuple(slice(0, shape[axis]) if d == axis else slice(None) for d in range(ndim))]
    return p.reshape([-1 if d == axis else 1 for d in range(ndim)])


def quantize_explicit(node, inputs, axis: int, block_size: int) -> np.ndarray:
    """``saturate(rint(x / scale) + zero_point)`` in the code type (NaN -> qmin, as ORT's x86 kernels).

    Args:
        node: the QuantizeLinear node (its ``output_dtype`` attribute, its name for messages).
        inputs: ``[x, scale, zero_point (optional)]``.
        axis: the per-channel / blocked axis.
        block_size: the block size B, 0 for per tensor / per axis.

    Returns:
        The codes.

    Raises:
        NotImplementedError: a code type other than 8/16-bit integers.
    """
    x = np.asarray(inputs[0])
    dtype = _code_dtype(node, inputs)
    info = np.iinfo(dtype)
    ftype = np.float32 if x.dtype != np.float64 else np.float64
    scale = _along(inputs[1], x.shape, axis, block_size).astype(ftype)
    zp = optional_input(inputs, 2)
    zp = np.zeros((), np.float64) if zp is None else _along(zp, x.shape, axis, block_size).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        q = np.rint(x.astype(ftype) / scale).astype(np.float64) + zp
    q = np.where(np.isnan(q), info.min, q)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_explicit(node, inputs, axis: int, block_size: int) -> np.ndarray:
    """``(q - zero_point) * scale`` in the scale's float type.

    Args:
        node: the DequantizeLinear node.
        inputs: ``[q, scale, zero_point (optional)]``.
        axis: the per-channel / blocked axis.
        block_size: the block size B, 0 for per tensor / per axis.

    Returns:
        The real values.

    Raises:
        NotImplementedError: an unsupported code type.
    """
    q = np.asarray(inputs[0])
    _code_dtype(node, inputs)
    scale = np.asarray(inputs[1])
    zp = optional_input(inputs, 2)
    zp = np.zeros((), np.int64) if zp is None else _along(zp, q.shape, axis, block_size).astype(np.int64)
    centered = (q.astype(np.int64) - zp).astype(scale.dtype)
    return centered * _along(scale, q.shape, axis, block_size)


def _param(params, node, which: str):
    if params is None:
        raise QuantizationError(
            f"{node.op_type} node {node.name!r}: {which} tensor has no quantization parameters"
        )
    return params


@register
class QuantizeLinear(Op):
    """``q = clip(rint(x / scale) + zero_point, qmin, qmax)`` (module docstring for the parameter layouts)."""
    op_type = "QuantizeLinear"
    defaults: ClassVar[dict[str, Any]] = {"axis": 1, "saturate": 1, "block_size": 0, "output_dtype": 0}

    @classmethod
    def run(cls, node, inputs):

        if optional_input(inputs, 1) is None:
            raise QuantizationError(
                f"QuantizeLinear node {node.name!r}: parameters come from the quantized output tensor; "
                "run it in a graph (reference runtime) or give scale/zero_point inputs"
            )
        return [quantize_explicit(node, inputs, int(cls.attr(node, "axis")), int(cls.attr(node, "block_size")))]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace import qmath

        qp = _explicit_params(cls, node, inputs) or _param(out_qp[0], node, "output")
        return [qmath.quantize(inputs[0], qp)]


@register
class DequantizeLinear(Op):
    """``x = (q - zero_point) * scale`` (module docstring for the parameter layouts)."""
    op_type = "DequantizeLinear"
    defaults: ClassVar[dict[str, Any]] = {"axis": 1, "block_size": 0}

    @classmethod
    def run(cls, node, inputs):

        if optional_input(inputs, 1) is None:
            raise QuantizationError(
                f"DequantizeLinear node {node.name!r}: parameters come from the quantized input tensor; "
                "run it in a graph (reference runtime) or give scale/zero_point inputs"
            )
        return [dequantize_explicit(node, inputs, int(cls.attr(node, "axis")), int(cls.attr(node, "block_size")))]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace import qmath

        qp = _explicit_params(cls, node, inputs) or _param(in_qp[0], node, "input")
        return [qmath.dequantize(inputs[0], qp)]
