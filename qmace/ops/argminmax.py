"""ArgMax and ArgMin (ONNX opset 13+ semantics): the int64 index of the largest / smallest element along
``axis`` (default 0), the reduced axis kept as size 1 when ``keepdims`` (default 1).

Ties: the first index, or the last with ``select_last_index=1``. Order-only, so the index is the same on
8-bit codes as on their dequantized values, but the output is an index, not a quantized value:
``Kernel.NONE`` (it reads float input, after a DequantizeLinear in a quantized model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register


class _ArgExtreme(Op):
    defaults: ClassVar[dict[str, Any]] = {"axis": 0, "keepdims": 1, "select_last_index": 0}
    fn = staticmethod(np.argmax)

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axis = int(cls.attr(node, "axis"))
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"{cls.op_type} node {node.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        if int(cls.attr(node, "select_last_index")):
            idx = x.shape[axis] - 1 - cls.fn(np.flip(x, axis=axis), axis=axis)
        else:
            idx = cls.fn(x, axis=axis)
        if int(cls.attr(node, "keepdims")):
            idx = np.expand_dims(idx, axis)
        return [np.asarray(idx, np.int64)]


@register
class ArgMax(_ArgExtreme):
    """The int64 index of the largest element along ``axis`` (first index on ties, last with
    ``select_last_index``).
    """
    op_type = "ArgMax"
    fn = staticmethod(np.argmax)


@register
class ArgMin(_ArgExtreme):
    """The int64 index of the smallest element along ``axis`` (first index on ties, last with
    ``select_last_index``).
    """
    op_type = "ArgMin"
    fn = staticmethod(np.argmin)
