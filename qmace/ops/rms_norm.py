"""RMSNormalization (ONNX opset 23): over the axes ``[axis, rank)`` (``axis`` default -1),
``Y = X / sqrt(mean(X^2) + epsilon) * scale`` (``epsilon`` default 1e-5; ``scale`` broadcasts to the
normalized axes). Computed in float64 and rounded once to X's dtype (the spec's ``stash_type`` float32 or
wider). No integer kernel (``Kernel.NONE``). The ONNX Runtime lowering writes such graphs at opset
23 (``onnx_opset``), the first that defines the op.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register


@register
class RMSNormalization(Op):
    """Over the axes ``[axis, rank)``: ``Y = X / sqrt(mean(X^2) + epsilon) * scale`` (float64, rounded once)."""
    op_type = "RMSNormalization"
    defaults: ClassVar[dict[str, Any]] = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}
    onnx_opset = 23

    @classmethod
    def run(cls, node, inputs):
        x, scale = np.asarray(inputs[0]), np.asarray(inputs[1])
        axis = int(cls.attr(node, "axis"))
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"RMSNormalization node {node.name!r}: axis {axis} out of range for rank {x.ndim}")
        axes = tuple(range(axis % x.ndim, x.ndim))
        x64 = x.astype(np.float64)
        ms = np.mean(x64 * x64, axis=axes, keepdims=True)
        eps = float(np.float32(cls.attr(node, "epsilon")))
        return [(x64 / np.sqrt(ms + eps) * scale.astype(np.float64)).astype(x.dtype)]
