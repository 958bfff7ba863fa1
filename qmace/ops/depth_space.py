"""DepthToSpace and SpaceToDepth (ONNX opset 13 semantics), NCHW, block size b.

DepthToSpace, x (N, C, H, W) -> y (N, C/b², H·b, W·b):
- ``DCR`` (default; TensorFlow's / TFLite's order): ``y[n, c, h·b + i, w·b + j] = x[n, (i·b + j)·C/b² + c, h, w]``
- ``CRD`` (PyTorch's pixel shuffle):              ``y[n, c, h·b + i, w·b + j] = x[n, c·b² + i·b + j, h, w]``
SpaceToDepth is DepthToSpace(DCR)'s inverse: ``y[n, (i·b + j)·C + c, h, w] = x[n, c, h·b + i, w·b + j]``.

Pure data movement: on 8-bit codes the kernels move codes (``quant_kernel = "copy"``, output parameters =
input parameters).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register


def _block(cls, node, x: np.ndarray) -> int:
    b = int(cls.attr(node, "blocksize"))
    if x.ndim != 4 or b < 1:
        raise ValueError(f"{cls.op_type} node {node.name!r}: needs a 4-D input and blocksize >= 1, "
                         f"got shape {x.shape}, blocksize {b}")
    return b


@register
class DepthToSpace(Op):
    op_type = "DepthToSpace"
    defaults: ClassVar[dict[str, Any]] = {"blocksize": None, "mode": "DCR"}
    quant_kernel = "copy"
    output_range = "input"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        b = _block(cls, node, x)
        n, c, h, w = x.shape
        if c % (b * b):
            raise ValueError(f"DepthToSpace node {node.name!r}: {c} channels do not divide by blocksize² {b * b}")
        mode = cls.attr(node, "mode")
        if mode == "DCR":  # (N, b, b, C', H, W) -> (N, C', H, b, W, b)
            y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        elif mode == "CRD":  # (N, C', b, b, H, W) -> (N, C', H, b, W, b)
            y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        else:
            raise ValueError(f"DepthToSpace node {node.name!r}: unknown mode {mode!r}")
        return [np.ascontiguousarray(y.reshape(n, c // (b * b), h * b, w * b))]


@register
class SpaceToDepth(Op):
    op_type = "SpaceToDepth"
    defaults: ClassVar[dict[str, Any]] = {"blocksize": None}
    quant_kernel = "copy"
    output_range = "input"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        b = _block(cls, node, x)
        n, c, h, w = x.shape
        if h % b or w % b:
            raise ValueError(f"SpaceToDepth node {node.name!r}: spatial size {h}x{w} does not divide by {b}")
        # (N, C, H', b, W', b) -> (N, b, b, C, H', W')
        y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
        return [np.ascontiguousarray(y.reshape(n, c * b * b, h // b, w // b))]
