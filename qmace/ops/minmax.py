"""Max and Min (ONNX opset 13+ semantics): the elementwise maximum / minimum of one or more inputs, with
multidirectional (numpy) broadcasting.

``Y = max(X_0, X_1, ...)`` (``min`` for Min) in the inputs' common dtype; a NaN in any input gives NaN, as
ORT and onnx/reference. Quantization: no integer kernel (``Kernel.NONE``: the inputs may carry
different parameters, so the op runs in float between DequantizeLinear/QuantizeLinear).
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from qmace.ops.base import Op, Sign, register


class _Extreme(Op):
    fn = staticmethod(np.maximum)

    @classmethod
    def run(cls, node, inputs):
        xs = [np.asarray(x) for x in inputs if x is not None]
        if not xs:
            raise ValueError(f"{cls.op_type} node {node.name!r}: no inputs")
        dtypes = {x.dtype for x in xs}
        if len(dtypes) > 1:
            raise TypeError(f"{cls.op_type} node {node.name!r}: input dtypes differ ({', '.join(map(str, dtypes))})")
        return [np.asarray(reduce(cls.fn, xs)).astype(xs[0].dtype, copy=False)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the elementwise maximum/minimum of the inputs (broadcasting; NaN propagates)."""
        xs = [x for x in inputs if x is not None]
        y = xs[0]
        for x in xs[1:]:
            y = y.maximum(x) if cls.fn is np.maximum else y.minimum(x)
        return [y]


@register
class Max(_Extreme):
    """``Y = max(X_1, ..., X_n)`` elementwise with multidirectional broadcasting; NaN propagates."""
    op_type = "Max"
    sign = Sign.ALL
    fn = staticmethod(np.maximum)


@register
class Min(_Extreme):
    """``Y = min(X_1, ..., X_n)`` elementwise with multidirectional broadcasting; NaN propagates."""
    op_type = "Min"
    sign = Sign.ALL
    fn = staticmethod(np.minimum)
