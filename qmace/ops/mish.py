"""Mish (ONNX opset 18+): ``y = x * tanh(softplus(x))`` with ``softplus(x) = ln(1 + e^x)``, elementwise.

Float: evaluated in float64 (``softplus`` as ``logaddexp(0, x)``, which neither overflows for large x nor
loses the tail for very negative x) and rounded once to the input's float type, so within 1 float32 ulp of
the exact value. Quantized: ``Kernel.FLOAT`` (dequantize -> Mish -> quantize, docs/quantization.md), range
from statistics (Mish is unbounded above, with minimum about -0.3088 at x about -1.19). ONNX Runtime runs
the lowered ``DequantizeLinear -> Mish -> QuantizeLinear`` with its float Mish between the two.
"""

from __future__ import annotations

import numpy as np

from qmace.ops.base import Kernel, Op, register


@register
class Mish(Op):
    """``y = x * tanh(ln(1 + e^x))``, float64 inside, rounded once to X's float type."""

    op_type = "Mish"
    quant_kernel = Kernel.FLOAT
    elementwise = True

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"Mish node {node.name!r}: input dtype {x.dtype} is not a float type")
        x64 = x.astype(np.float64)
        return [(x64 * np.tanh(np.logaddexp(0.0, x64))).astype(x.dtype)]
