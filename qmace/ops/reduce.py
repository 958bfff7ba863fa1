"""Reductions (ONNX opset 18+ semantics): ``axes`` is an optional int64 input, ``keepdims`` (default 1)
keeps reduced dimensions as size 1, and an omitted/empty ``axes`` reduces every axis unless
``noop_with_empty_axes=1``, which returns the input unchanged.

- ReduceSum: sum in the input type (float32 stays float32, int64 stays int64, wrapping).
- ReduceMean: float inputs are summed in float64 and divided once, then rounded to the input type;
  integer inputs divide the integer sum by the count truncating toward zero (ORT's C++ ``/``).
- ReduceMax / ReduceMin: over an empty set (a zero-size reduced axis) the lowest / highest value of the
  type (-inf / +inf for floats). Order-only, so exact on 8-bit codes: ``Kernel.COPY``,
  ``RangeRule.INPUT`` (the output shares the input's parameters).
- ReduceMean: ``Kernel.FLOAT`` (dequantize -> mean -> quantize), range from statistics.
- ReduceSum: no integer kernel (its range grows with the reduced count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.elementwise import optional_input
from qmace.ops.util import const_ints


class _Reduce(Op):
    defaults: ClassVar[dict[str, Any]] = {"keepdims": 1, "noop_with_empty_axes": 0}

    @classmethod
    def reduce(cls, x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
        """The reduction over ``axes``.

        Args:
            x: the data.
            axes: the (non-negative) axes to reduce.
            keepdims: keep them as size 1.

        Returns:
            The reduced array in the rules of the module docstring.
        """
        raise NotImplementedError

    @classmethod
    def reduce_torch(cls, x, axes: tuple[int, ...], keepdims: bool):
        """The reduction on a torch tensor (``run_torch``; every reduction here defines it).

        Args:
            x: the data tensor.
            axes: the (non-negative) axes to reduce, not empty.
            keepdims: keep them as size 1.

        Returns:
            The reduced tensor.
        """
        raise NotImplementedError(f"{cls.op_type} has no torch kernel")

    @classmethod
    def axes(cls, node, ndim: int, inputs) -> tuple[int, ...] | None:
        """The sorted non-negative axes to reduce, or None for the no-op (empty axes, noop_with_empty_axes).

        Args:
            node: the node.
            ndim: the data's rank.
            inputs: the node's inputs (``axes`` is input 1, optional).

        Returns:
            The axes, or None.

        Raises:
            ValueError: an axis out of range.
        """
        axes_list = const_ints(optional_input(inputs, 1)) or []
        if not axes_list:
            return None if cls.attr(node, "noop_with_empty_axes") else tuple(range(ndim))
        for a in axes_list:
            if not -ndim <= a < max(ndim, 1):
                raise ValueError(f"{cls.op_type} node {node.name!r}: axis {a} out of range for rank {ndim}")
        return tuple(sorted({a % max(ndim, 1) for a in axes_list})) if ndim else ()

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axes = cls.axes(node, x.ndim, inputs)
        if axes is None:
            return [x]
        y = cls.reduce(x, axes, bool(cls.attr(node, "keepdims")))
        return [np.asarray(y).astype(x.dtype, copy=False)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``reduce_torch`` over the same axes as ``run``."""
        x = inputs[0]
        axes = cls.axes(node, x.ndim, inputs)
        if axes is None or not axes:
            return [x]
        return [cls.reduce_torch(x, axes, bool(cls.attr(node, "keepdims")))]


def _extreme(fn: Callable, x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """max/min; over an empty set the identity: the lowest (max) or highest (min) value of the dtype."""
    if x.size:
        return fn(x, axis=axes, keepdims=keepdims)
    lowest = fn is np.max
    if np.issubdtype(x.dtype, np.floating):
        initial = -np.inf if lowest else np.inf
    elif x.dtype == np.bool_:
        initial = not lowest
    else:
        initial = np.iinfo(x.dtype).min if lowest else np.iinfo(x.dtype).max
    return fn(x, axis=axes, keepdims=keepdims, initial=initial)


@register
class ReduceMax(_Reduce):
    """Max over ``axes``; over an empty set the dtype's lowest value."""
    op_type = "ReduceMax"
    sign = Sign.FIRST
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def reduce(cls, x, axes, keepdims):
        return _extreme(np.max, x, axes, keepdims)

    @classmethod
    def reduce_torch(cls, x, axes, keepdims):
        return x.amax(dim=axes, keepdim=keepdims)


@register
class ReduceMin(_Reduce):
    """Min over ``axes``; over an empty set the dtype's highest value."""
    op_type = "ReduceMin"
    sign = Sign.FIRST
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def reduce(cls, x, axes, keepdims):
        return _extreme(np.min, x, axes, keepdims)

    @classmethod
    def reduce_torch(cls, x, axes, keepdims):
        return x.amin(dim=axes, keepdim=keepdims)


@register
class ReduceSum(_Reduce):
    """Sum over ``axes`` in the input's type."""
    op_type = "ReduceSum"

    @classmethod
    def reduce(cls, x, axes, keepdims):
        return np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)

    @classmethod
    def reduce_torch(cls, x, axes, keepdims):
        return x.sum(dim=axes, keepdim=keepdims)


@register
class ReduceMean(_Reduce):
    """Mean over ``axes`` (floats summed in float64, divided once, rounded to the input type)."""
    op_type = "ReduceMean"
    sign = Sign.FIRST
    quant_kernel = Kernel.FLOAT

    @classmethod
    def reduce(cls, x, axes, keepdims):
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        if np.issubdtype(x.dtype, np.integer):
            total = np.sum(x, axis=axes, keepdims=keepdims, dtype=np.int64)
            q = np.abs(total) // max(count, 1)
            return np.where(total < 0, -q, q)
        return np.sum(x, axis=axes, keepdims=keepdims, dtype=np.float64) / count

    @classmethod
    def reduce_torch(cls, x, axes, keepdims):
        return x.mean(dim=axes, keepdim=keepdims)
