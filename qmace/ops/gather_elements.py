"""GatherElements (ONNX opset 13+ semantics): ``out[i][j][k] = data[index[i][j][k]][j][k]`` for ``axis=0``
(the index replaces the coordinate along ``axis``; likewise for other axes). ``indices`` has the rank of
``data``, int32 or int64, negative values count from the end of the axis; out-of-range indices are an
error. The output has the shape of ``indices``.

Pure data movement: on 8-bit codes it computes exactly what it computes on the dequantized floats, so
``Kernel.COPY`` and ``RangeRule.INPUT`` (the output shares the data's parameters).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.util import const_ints


@register
class GatherElements(Op):
    """``out[i][j][k] = data[index[i][j][k]][j][k]`` for ``axis=0`` (likewise for other axes). Copies codes."""
    op_type = "GatherElements"
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {"axis": 0}
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def run(cls, node, inputs):
        x, idx = np.asarray(inputs[0]), np.asarray(inputs[1]).astype(np.int64)
        if idx.ndim != x.ndim:
            raise ValueError(f"GatherElements node {node.name!r}: indices rank {idx.ndim} != data rank {x.ndim}")
        axis = int(cls.attr(node, "axis"))
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"GatherElements node {node.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        d = x.shape[axis]
        if idx.size and (idx.min() < -d or idx.max() >= d):
            raise IndexError(f"GatherElements node {node.name!r}: indices outside [-{d}, {d - 1}]")
        return [np.take_along_axis(x, np.where(idx < 0, idx + d, idx), axis=axis)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.gather`` along ``axis`` with the negative indices wrapped."""
        import torch

        x = inputs[0]
        idx = np.asarray(const_ints(inputs[1]), np.int64).reshape(np.shape(inputs[1]))
        axis = int(cls.attr(node, "axis")) % x.ndim
        d = x.shape[axis]
        if idx.size and (idx.min() < -d or idx.max() >= d):
            raise IndexError(f"GatherElements node {node.name!r}: indices outside [-{d}, {d - 1}]")
        return [x.gather(axis, torch.from_numpy(np.where(idx < 0, idx + d, idx)).to(x.device))]
