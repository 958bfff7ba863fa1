"""The IR's explicit quantization boundaries: ``QuantizeLinear`` (float -> codes) and ``DequantizeLinear``
(codes -> float).

In the IR these nodes have a single input: the parameters belong to the quantized tensor (QuantizeLinear:
its output's ``quant``; DequantizeLinear: its input's), so the reference runtime always runs them through
``run_quantized`` with the formulas of ``qmace.quantize.qmath`` (ORT's arithmetic, bit-exact):
``quantize(x) = clip(rint(x / scale) + zero_point, qmin, qmax)``, ``dequantize(q) = (q - zero_point) * scale``.

``run`` also accepts the ONNX form with explicit ``scale``/``zero_point`` inputs (zero point's dtype
names the code type, default uint8; ``axis`` for per-channel scales); without them it raises, since the
parameters are unknown outside a graph. These nodes are placed by the quantizer and have no quantization
traits of their own (``quant_kernel`` None).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.errors import QuantizationError
from qmace.ops.base import Op, register
from qmace.ops.elementwise import optional_input


def _explicit_params(cls: type[Op], node, inputs):
    """QuantParams from ONNX-style scale / zero-point inputs, or None when the node has a single input."""
    scale = optional_input(inputs, 1)
    if scale is None:
        return None
    from qmace.quantize.qmath import QuantParams

    zp = optional_input(inputs, 2)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros(scale.shape, np.uint8) if zp is None else np.asarray(zp)
    axis = None if scale.ndim == 0 else int(cls.attr(node, "axis"))
    return QuantParams(scale, zp.astype(np.int32), str(zp.dtype), axis)


def _param(params, node, which: str):
    if params is None:
        raise QuantizationError(
            f"{node.op_type} node {node.name!r}: {which} tensor has no quantization parameters"
        )
    return params


@register
class QuantizeLinear(Op):
    op_type = "QuantizeLinear"
    defaults: ClassVar[dict[str, Any]] = {"axis": 1, "saturate": 1, "block_size": 0, "output_dtype": 0}

    @classmethod
    def run(cls, node, inputs):
        from qmace.quantize import qmath

        qp = _explicit_params(cls, node, inputs)
        if qp is None:
            raise QuantizationError(
                f"QuantizeLinear node {node.name!r}: parameters come from the quantized output tensor; "
                "run it in a graph (reference runtime) or give scale/zero_point inputs"
            )
        return [qmath.quantize(inputs[0], qp)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace.quantize import qmath

        qp = _explicit_params(cls, node, inputs) or _param(out_qp[0], node, "output")
        return [qmath.quantize(inputs[0], qp)]


@register
class DequantizeLinear(Op):
    op_type = "DequantizeLinear"
    defaults: ClassVar[dict[str, Any]] = {"axis": 1, "block_size": 0}

    @classmethod
    def run(cls, node, inputs):
        from qmace.quantize import qmath

        qp = _explicit_params(cls, node, inputs)
        if qp is None:
            raise QuantizationError(
                f"DequantizeLinear node {node.name!r}: parameters come from the quantized input tensor; "
                "run it in a graph (reference runtime) or give scale/zero_point inputs"
            )
        return [qmath.dequantize(inputs[0], qp)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace.quantize import qmath

        qp = _explicit_params(cls, node, inputs) or _param(in_qp[0], node, "input")
        return [qmath.dequantize(inputs[0], qp)]
