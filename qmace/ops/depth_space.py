"""DepthToSpace and SpaceToDepth (ONNX opset 13+ semantics) on (N, C, H, W) with block size b.

- DepthToSpace: (N, C, H, W) -> (N, C / b^2, H * b, W * b). Mode DCR (default): the input channel of
  output (c, h * b + i, w * b + j) is ``(i * b + j) * C / b^2 + c``; mode CRD: ``c * b^2 + i * b + j``.
- SpaceToDepth: the inverse of DCR: (N, C, H, W) -> (N, C * b^2, H / b, W / b), output channel
  ``(i * b + j) * C + c`` holds input (c, h * b + i, w * b + j).

Pure data movement (a reshape-transpose-reshape): on 8-bit codes it computes exactly what it computes on
the dequantized floats, so ``Kernel.COPY`` and ``RangeRule.INPUT``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.util import is_torch


def _permute(x, perm: tuple[int, ...]):
    """``x`` with its axes permuted (numpy ``transpose`` / torch ``permute``)."""
    return x.permute(*perm) if is_torch(x) else x.transpose(perm)


def _checked(op: type[Op], node, x: np.ndarray) -> int:
    b = int(op.attr(node, "blocksize"))
    if x.ndim != 4 or b < 1:
        raise ValueError(f"{op.op_type} node {node.name!r}: needs a 4-D input and blocksize >= 1 "
                         f"(got shape {x.shape}, blocksize {b})")
    return b


class _BlockMove(Op):
    """A block rearrangement of (N, C, H, W): ``run`` and ``run_torch`` apply the subclass's ``move``, which is
    written once for numpy arrays and torch tensors. Copies codes."""
    sign = Sign.FIRST
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def run(cls, node, inputs):
        return [np.ascontiguousarray(cls.move(node, np.asarray(inputs[0])))]

    @classmethod
    def run_torch(cls, node, inputs):
        return [cls.move(node, inputs[0])]

    @classmethod
    def move(cls, node, x):
        """The rearrangement on a numpy array or torch tensor (the subclass's).

        Args:
            node: the node (blocksize, ...).
            x: the (N, C, H, W) input.

        Returns:
            The rearranged output, same namespace.
        """
        raise NotImplementedError


@register
class DepthToSpace(_BlockMove):
    """(N, C, H, W) -> (N, C / b^2, H b, W b); DCR or CRD channel order (module docstring). Copies codes."""
    op_type = "DepthToSpace"
    defaults: ClassVar[dict[str, Any]] = {"blocksize": None, "mode": "DCR"}

    @classmethod
    def move(cls, node, x):
        """The rearrangement of the module docstring on a numpy array or torch tensor.

        Args:
            node: the node (blocksize, mode).
            x: the (N, C, H, W) input.

        Returns:
            The (N, C / b^2, H b, W b) output, same namespace.

        Raises:
            ValueError: a bad shape, blocksize or mode.
        """
        b = _checked(cls, node, x)
        n, c, h, w = x.shape
        if c % (b * b):
            raise ValueError(f"DepthToSpace node {node.name!r}: {c} channels not divisible by blocksize^2 = {b * b}")
        mode = cls.attr(node, "mode")
        if mode == "DCR":
            y = _permute(x.reshape(n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2))
        elif mode == "CRD":
            y = _permute(x.reshape(n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3))
        else:
            raise ValueError(f"DepthToSpace node {node.name!r}: unknown mode {mode!r}")
        return y.reshape(n, c // (b * b), h * b, w * b)


@register
class SpaceToDepth(_BlockMove):
    """(N, C, H, W) -> (N, C b^2, H / b, W / b), the inverse of DCR DepthToSpace. Copies codes."""
    op_type = "SpaceToDepth"
    defaults: ClassVar[dict[str, Any]] = {"blocksize": None}

    @classmethod
    def move(cls, node, x):
        """The rearrangement of the module docstring on a numpy array or torch tensor.

        Args:
            node: the node (blocksize).
            x: the (N, C, H, W) input.

        Returns:
            The (N, C b^2, H / b, W / b) output, same namespace.

        Raises:
            ValueError: a bad shape or blocksize.
        """
        b = _checked(cls, node, x)
        n, c, h, w = x.shape
        if h % b or w % b:
            raise ValueError(f"SpaceToDepth node {node.name!r}: spatial size {h}x{w} not divisible by {b}")
        y = _permute(x.reshape(n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4))
        return y.reshape(n, c * b * b, h // b, w // b)
