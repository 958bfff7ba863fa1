"""Softmax and LogSoftmax (ONNX opset 13+ semantics: normalised along the single axis ``axis``, default -1).

``Softmax(x) = exp(x - max) / sum(exp(x - max))`` and ``LogSoftmax(x) = (x - max) - log(sum(exp(x - max)))``
along ``axis``, in float32. Quantized: ``Kernel.FLOAT`` (dequantize -> float -> quantize); Softmax's
output range is fixed to [0, 1]; LogSoftmax's range comes from statistics (it is unbounded below).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.qmath import Range


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    return x - np.max(x, axis=axis, keepdims=True)


@register
class Softmax(Op):
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``; fixed output range [0, 1]."""
    op_type = "Softmax"
    sign = Sign.NONNEG
    defaults: ClassVar[dict[str, Any]] = {"axis": -1}
    quant_kernel = Kernel.FLOAT
    range_rule = RangeRule.FIXED
    fixed_range = Range(0.0, 1.0)

    @classmethod
    def saturating_input(cls, node):
        return -math.inf, math.inf  # saturation depends on each row's maximum: no global bound

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        axis = int(cls.attr(node, "axis"))
        e = np.exp(_shifted(x, axis))
        return [(e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype, copy=False)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.softmax`` along ``axis``."""
        return [inputs[0].softmax(dim=int(cls.attr(node, "axis")))]


@register
class LogSoftmax(Op):
    """``(x - max) - log(sum(exp(x - max)))`` along ``axis``; output range from statistics."""
    op_type = "LogSoftmax"
    defaults: ClassVar[dict[str, Any]] = {"axis": -1}
    quant_kernel = Kernel.FLOAT

    @classmethod
    def run(cls, node, inputs):
        x = inputs[0]
        axis = int(cls.attr(node, "axis"))
        s = _shifted(x, axis)
        return [(s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))).astype(x.dtype, copy=False)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.log_softmax`` along ``axis``."""
        return [inputs[0].log_softmax(dim=int(cls.attr(node, "axis")))]
