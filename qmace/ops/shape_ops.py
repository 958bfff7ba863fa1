"""Data-movement and shape ops (ONNX opset 21 semantics: axes, split sizes, slice bounds and shapes are
inputs, not attributes).

All kernels are dtype-generic: they move values without arithmetic, so on 8-bit codes they compute exactly
what they compute on the dequantized floats. Hence the quantization traits:
- Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Gather, Split, Identity, Dropout, Expand, Tile:
  ``Kernel.COPY``, ``RangeRule.INPUT`` (the output shares input 0's parameters).
- Concat: ``Kernel.COPY``, ``RangeRule.UNION`` (the union of the input ranges). Its
  ``run_quantized`` concatenates codes when every input has the output's parameters, and otherwise
  requantizes each differing input into the output's parameters first:
  ``quantize(dequantize(q_i, qp_i), qp_out)`` (ORT's QLinearConcat does the same).
- Shape, Cast, ConstantOfShape, Range, Equal, Where: no integer kernel. Shape only reads the input's shape,
  so its ``run_quantized`` accepts codes too.

Integer-valued shape inputs (``shape``, ``axes``, ``starts``...) are int64 tensors, usually constants.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.elementwise import optional_input
from qmace.ops.util import const_ints


def _axis(axis: int, ndim: int, node, what: str = "axis") -> int:
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{node.op_type} node {node.name!r}: {what} {axis} out of range for rank {ndim}")
    return axis % ndim


def _ints(v: np.ndarray | None) -> list[int] | None:
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


class _Copy(Op):
    """Pure data movement: runs unchanged on codes; the output shares input 0's quantization parameters."""

    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT
    sign = Sign.FIRST


@register
class Reshape(_Copy):
    """``shape`` input: -1 infers one dimension; 0 copies the input's dimension unless ``allowzero=1``
    (then 0 is a real zero-size dimension)."""

    op_type = "Reshape"
    defaults: ClassVar[dict[str, Any]] = {"allowzero": 0}

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        shape = _ints(inputs[1])
        if not cls.attr(node, "allowzero"):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch, batched: as ``run``, except that a leading 1 in the target shape becomes the batch size (QAT
        runs a converted batch-1 graph on batches): without a -1 in the target, ``numel(x) / prod(shape[1:])``
        (the batch may have been merged into another dimension, e.g. by a Flatten before a Softmax); with a -1,
        the input's first dimension. A target that already fits ``x`` is used as it is, so a batch-1 input
        reshapes exactly as ``run``."""
        x = inputs[0]
        shape = const_ints(inputs[1])
        if not cls.attr(node, "allowzero"):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        if shape and shape[0] == 1 and x.ndim:
            if -1 not in shape:
                rest = math.prod(shape[1:])
                if rest and x.numel() % rest == 0:
                    shape[0] = x.numel() // rest
            elif x.shape[0] > 1:
                shape[0] = x.shape[0]
        return [x.reshape(shape)]


@register
class Flatten(_Copy):
    """(d0, ..., dn-1) -> (d0 * ... * d(axis-1), d(axis) * ... * dn-1); axis in [-r, r]."""

    op_type = "Flatten"
    defaults: ClassVar[dict[str, Any]] = {"axis": 1}
    channelwise = True  # where it keeps the channels (is_channelwise)

    @classmethod
    def is_channelwise(cls, node, shape_of):
        shape = shape_of(node.inputs[0])  # (N, C, 1, ..., 1) -> (N, C) only
        return (int(cls.attr(node, "axis")) == 1 and shape is not None and len(shape) >= 2
                and all(d == 1 for d in shape[2:]))

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axis = int(cls.attr(node, "axis"))
        if not -x.ndim <= axis <= x.ndim:
            raise ValueError(f"Flatten node {node.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis = axis + x.ndim if axis < 0 else axis
        outer = math.prod(x.shape[:axis])
        return [x.reshape(outer, math.prod(x.shape[axis:]))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the same reshape as ``run``."""
        x = inputs[0]
        axis = int(cls.attr(node, "axis"))
        if not -x.ndim <= axis <= x.ndim:
            raise ValueError(f"Flatten node {node.name!r}: axis {axis} out of range for rank {x.ndim}")
        axis = axis + x.ndim if axis < 0 else axis
        return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register
class Transpose(_Copy):
    """``perm`` defaults to reversing the axes."""

    op_type = "Transpose"
    defaults: ClassVar[dict[str, Any]] = {"perm": None}

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        perm = cls.attr(node, "perm")
        perm = list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]
        return [np.ascontiguousarray(np.transpose(x, perm))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``permute`` by ``perm`` (default: reversed axes)."""
        x = inputs[0]
        perm = cls.attr(node, "perm")
        return [x.permute(*(list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]))]


@register
class Squeeze(_Copy):
    """Removes the size-1 dimensions listed in the optional ``axes`` input (all size-1 ones if omitted)."""

    op_type = "Squeeze"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axes = _ints(optional_input(inputs, 1))
        if axes is None:
            return [x.reshape([d for d in x.shape if d != 1])]
        axes = sorted({_axis(a, x.ndim, node, "axes entry") for a in axes})
        for a in axes:
            if x.shape[a] != 1:
                raise ValueError(f"Squeeze node {node.name!r}: dimension {a} of {x.shape} is not 1")
        return [np.squeeze(x, axis=tuple(axes))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the same reshape as ``run``."""
        x = inputs[0]
        axes = const_ints(optional_input(inputs, 1))
        if axes is None:
            return [x.reshape([d for d in x.shape if d != 1])]
        axes = sorted({_axis(a, x.ndim, node, "axes entry") for a in axes})
        return [x.reshape([d for i, d in enumerate(x.shape) if i not in axes])]


@register
class Unsqueeze(_Copy):
    """Inserts size-1 dimensions at ``axes`` (input; positions in the output, negative from its end)."""

    op_type = "Unsqueeze"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axes = _ints(inputs[1])
        out_rank = x.ndim + len(axes)
        norm = [_axis(a, out_rank, node, "axes entry") for a in axes]
        if len(set(norm)) != len(norm):
            raise ValueError(f"Unsqueeze node {node.name!r}: repeated axes {axes}")
        return [np.expand_dims(x, tuple(norm))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: size-1 dimensions inserted at the same output positions as ``run``."""
        x = inputs[0]
        axes = const_ints(inputs[1])
        out_rank = x.ndim + len(axes)
        for a in sorted(_axis(a, out_rank, node, "axes entry") for a in axes):
            x = x.unsqueeze(a)
        return [x]


@register
class Concat(Op):
    """Concatenate the inputs along ``axis``; on codes, inputs with other parameters than the output are
    requantized into the output's first (module docstring).
    """
    op_type = "Concat"
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.UNION
    const_data_inputs = True
    sign = Sign.ALL

    @classmethod
    def run(cls, node, inputs):
        xs = [np.asarray(x) for x in inputs]
        axis = _axis(cls.attr(node, "axis"), xs[0].ndim, node)
        return [np.concatenate(xs, axis=axis)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """Codes are concatenated as they are where the input's parameters equal the output's; any other
        input (other parameters, or float) is brought to the output's parameters first."""
        from qmace import qmath

        yq = out_qp[0]
        if yq is None:  # float output: dequantize whatever is quantized
            xs = [qmath.dequantize(x, qp) if qp is not None else x for x, qp in zip(inputs, in_qp)]
            return cls.run(node, xs)
        xs = []
        for x, qp in zip(inputs, in_qp):
            if qp is not None and qp == yq:
                xs.append(np.asarray(x))
            else:
                real = qmath.dequantize(x, qp) if qp is not None else x
                xs.append(qmath.quantize(real, yq))
        return cls.run(node, xs)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.cat`` along ``axis``."""
        import torch

        return [torch.cat(list(inputs), dim=_axis(cls.attr(node, "axis"), inputs[0].ndim, node))]


@register
class Split(_Copy):
    """Splits along ``axis`` by the ``split`` input's sizes, or into ``num_outputs`` chunks of
    ``ceil(d / num_outputs)`` (the last one smaller), or (neither given) into equal parts, one per output."""

    op_type = "Split"
    defaults: ClassVar[dict[str, Any]] = {"axis": 0, "num_outputs": None}

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        axis = _axis(cls.attr(node, "axis"), x.ndim, node)
        bounds = np.cumsum(cls.sizes(node, x.shape[axis], inputs))[:-1]
        return [np.ascontiguousarray(p) for p in np.split(x, bounds, axis=axis)]

    @classmethod
    def sizes(cls, node, dim: int, inputs) -> list[int]:
        """The output sizes along the split axis (class docstring).

        Args:
            node: the node.
            dim: the split axis's size.
            inputs: the node's inputs (``split`` is input 1, optional).

        Returns:
            One size per output.

        Raises:
            ValueError: sizes that do not split ``dim`` into the node's outputs.
        """
        n = len(node.outputs)
        sizes = const_ints(optional_input(inputs, 1))
        num_outputs = cls.attr(node, "num_outputs")
        if sizes is None and num_outputs is not None:
            chunk = -(-dim // int(num_outputs))
            sizes = [chunk] * (int(num_outputs) - 1) + [dim - chunk * (int(num_outputs) - 1)]
        elif sizes is None:
            if dim % n:
                raise ValueError(f"Split node {node.name!r}: dimension {dim} does not split into {n} equal parts")
            sizes = [dim // n] * n
        if len(sizes) != n or sum(sizes) != dim or min(sizes) < 0:
            raise ValueError(f"Split node {node.name!r}: sizes {sizes} do not split dimension {dim} into {n} outputs")
        return sizes

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.split`` by the same sizes as ``run``."""
        x = inputs[0]
        axis = _axis(cls.attr(node, "axis"), x.ndim, node)
        return list(x.split(cls.sizes(node, x.shape[axis], inputs), dim=axis))


@register
class Slice(_Copy):
    """``x[starts:ends:steps]`` on ``axes`` (default all leading axes, steps default 1). Negative starts and
    ends count from the dimension's end; then they are clamped to [0, d] for positive steps and to
    [0, d - 1] (start) / [-1, d - 1] (end) for negative steps, where end = -1 means "before index 0"."""

    op_type = "Slice"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        return [np.ascontiguousarray(x[tuple(cls.index(node, x.shape, inputs))])]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: the same elements as ``run``, gathered with ``index_select`` (torch has no negative steps)."""
        import torch

        x = inputs[0]
        for axis, sl in enumerate(cls.index(node, tuple(x.shape), inputs)):
            if sl != slice(None):
                picked = torch.arange(x.shape[axis], device=x.device)[_positive(sl, x.shape[axis])]
                x = x.index_select(axis, picked.flip(0) if (sl.step or 1) < 0 else picked)
        return [x]

    @classmethod
    def index(cls, node, shape: tuple[int, ...], inputs) -> list[slice]:
        """One Python slice per axis of the data (``slice(None)`` where not sliced), bounds clamped as in the
        class docstring.

        Args:
            node: the node.
            shape: the data's shape.
            inputs: the node's inputs (starts, ends, axes, steps are inputs 1-4).

        Returns:
            The slices.

        Raises:
            ValueError: inconsistent starts/ends/axes/steps, a step of 0 or an axis out of range.
        """
        starts, ends = const_ints(inputs[1]), const_ints(inputs[2])
        axes = const_ints(optional_input(inputs, 3)) or list(range(len(starts)))
        steps = const_ints(optional_input(inputs, 4)) or [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise ValueError(f"Slice node {node.name!r}: starts/ends/axes/steps lengths differ")
        ndim = len(shape)
        index = [slice(None)] * ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = _axis(axis, ndim, node, "axes entry")
            d = shape[axis]
            if step == 0:
                raise ValueError(f"Slice node {node.name!r}: step 0 on axis {axis}")
            start = start + d if start < 0 else start
            end = end + d if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), d), min(max(end, 0), d)
                index[axis] = slice(start, end, step)
            elif d == 0:
                index[axis] = slice(0, 0)
            else:
                start, end = min(max(start, 0), d - 1), min(max(end, -1), d - 1)
                index[axis] = slice(start, end if end >= 0 else None, step)
        return index


def _positive(sl: slice, d: int) -> slice:
    """A slice with a positive step selecting the elements of ``sl`` over ``range(d)`` in ascending order."""
    picked = range(d)[sl]
    if not len(picked):
        return slice(0, 0)
    lo = min(picked[0], picked[-1])
    return slice(lo, max(picked[0], picked[-1]) + 1, abs(sl.step or 1))


@register
class Gather(_Copy):
    """``out = take(data, indices, axis)``: indices of any shape, negative ones count from the end."""

    op_type = "Gather"
    defaults: ClassVar[dict[str, Any]] = {"axis": 0}

    @classmethod
    def run(cls, node, inputs):
        x, idx = np.asarray(inputs[0]), np.asarray(inputs[1])
        axis = _axis(cls.attr(node, "axis"), x.ndim, node)
        d = x.shape[axis]
        if idx.size and (idx.min() < -d or idx.max() >= d):
            raise IndexError(f"Gather node {node.name!r}: indices outside [-{d}, {d - 1}]")
        return [np.take(x, idx.astype(np.int64), axis=axis)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``index_select`` of the flattened indices (negative ones wrapped), reshaped as ``take``."""
        import torch

        x = inputs[0]
        idx = np.asarray(const_ints(inputs[1]), np.int64).reshape(np.shape(inputs[1]))
        axis = _axis(cls.attr(node, "axis"), x.ndim, node)
        d = x.shape[axis]
        if idx.size and (idx.min() < -d or idx.max() >= d):
            raise IndexError(f"Gather node {node.name!r}: indices outside [-{d}, {d - 1}]")
        y = x.index_select(axis, torch.from_numpy(idx.reshape(-1) % max(d, 1)).to(x.device))
        return [y.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]


@register
class Identity(_Copy):
    """``Y = X``."""
    op_type = "Identity"
    elementwise = True

    @classmethod
    def run(cls, node, inputs):
        return [inputs[0]]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``Y = X``."""
        return [inputs[0]]


@register
class Dropout(_Copy):
    """Inference only: output = input, and the optional mask output is all True. ``training_mode`` true
    with a nonzero ratio is random and unsupported."""

    op_type = "Dropout"
    defaults: ClassVar[dict[str, Any]] = {"seed": None}

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        ratio, training = optional_input(inputs, 1), optional_input(inputs, 2)
        if training is not None and bool(np.asarray(training)) and (ratio is None or float(np.asarray(ratio)) != 0):
            raise NotImplementedError(f"Dropout node {node.name!r}: training_mode=True is not supported")
        outs = [x]
        if len(node.outputs) > 1:
            outs.append(np.ones(x.shape, dtype=bool))
        return outs

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: inference Dropout is the identity (no mask output)."""
        if len(node.outputs) > 1 and node.outputs[1]:
            raise NotImplementedError(f"Dropout node {node.name!r}: the mask output has no torch kernel")
        return [inputs[0]]


@register
class Expand(_Copy):
    """Broadcasts ``input`` to ``shape`` bidirectionally (the output shape is the broadcast of both)."""

    op_type = "Expand"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        out_shape = np.broadcast_shapes(x.shape, tuple(_ints(inputs[1])))
        return [np.ascontiguousarray(np.broadcast_to(x, out_shape))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``expand`` to the broadcast of the input's and the target shape."""
        x = inputs[0]
        return [x.expand(*np.broadcast_shapes(tuple(x.shape), tuple(const_ints(inputs[1]))))]


@register
class Tile(_Copy):
    """Repeat the input ``repeats[i]`` times along each axis i."""
    op_type = "Tile"

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        repeats = _ints(inputs[1])
        if len(repeats) != x.ndim:
            raise ValueError(f"Tile node {node.name!r}: {len(repeats)} repeats for rank {x.ndim}")
        return [np.tile(x, repeats)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``repeat`` by ``repeats``."""
        x = inputs[0]
        repeats = const_ints(inputs[1])
        if len(repeats) != x.ndim:
            raise ValueError(f"Tile node {node.name!r}: {len(repeats)} repeats for rank {x.ndim}")
        return [x.repeat(*repeats)]


# ---------------------------------------------------------------------------------------------------------
# No integer kernel


# Targets whose ONNX conversion (saturate attribute, 2/4-bit packing and clamping) NumPy's astype does not
# follow: refused by name instead of computed differently. Casting *from* them is exact and allowed.
_NARROW_TARGETS = {"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
                   "float4_e2m1fn", "int4", "uint4", "int2", "uint2"}


@register
class Cast(Op):
    """Converts to the ONNX TensorProto element type ``to`` (float -> int truncates toward zero). float8,
    float4 and 2/4-bit integer targets raise NotImplementedError (``_NARROW_TARGETS``)."""

    op_type = "Cast"
    defaults: ClassVar[dict[str, Any]] = {"saturate": 1}

    @classmethod
    def run(cls, node, inputs):
        to = cls.attr(node, "to")
        if isinstance(to, str):
            dtype = np.dtype(to)
        elif int(to) == TensorProto.STRING:
            raise NotImplementedError(f"Cast node {node.name!r}: casting to string is not supported")
        else:
            dtype = helper.tensor_dtype_to_np_dtype(int(to))
        if np.dtype(dtype).name in _NARROW_TARGETS:
            raise NotImplementedError(f"Cast node {node.name!r}: casting to {np.dtype(dtype).name} is not supported "
                                      "(its saturation and rounding rules are not implemented)")
        return [np.asarray(inputs[0]).astype(dtype)]


@register
class Shape(Op):
    """The input's shape as int64, ``shape[start:end]`` (Python slicing: negative and clamped bounds)."""

    op_type = "Shape"
    defaults: ClassVar[dict[str, Any]] = {"start": 0, "end": None}

    @classmethod
    def run(cls, node, inputs):
        shape = np.asarray(inputs[0]).shape
        end = cls.attr(node, "end")
        return [np.array(shape[int(cls.attr(node, "start")): None if end is None else int(end)], np.int64)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        return cls.run(node, inputs)


@register
class ConstantOfShape(Op):
    """A tensor of shape ``input`` filled with ``value`` (a one-element array; default float32 0)."""

    op_type = "ConstantOfShape"
    defaults: ClassVar[dict[str, Any]] = {"value": None}

    @classmethod
    def run(cls, node, inputs):
        value = cls.attr(node, "value")
        if value is None:
            value = np.zeros(1, np.float32)
        elif isinstance(value, TensorProto):
            value = numpy_helper.to_array(value)
        value = np.asarray(value)
        if value.size != 1:
            raise ValueError(f"ConstantOfShape node {node.name!r}: value must have one element, has {value.size}")
        return [np.full(tuple(_ints(inputs[0])), value.reshape(-1)[0], dtype=value.dtype)]


@register
class Range(Op):
    """``start, start + delta, ...`` below ``limit`` (above, for negative delta):
    ``n = max(ceil(float64(limit - start) / float64(delta)), 0)`` elements, produced by repeated addition
    in the input type (as ORT does, so float rounding matches)."""

    op_type = "Range"

    @classmethod
    def run(cls, node, inputs):
        start, limit, delta = (np.asarray(v).reshape(()) for v in inputs[:3])
        dtype = start.dtype
        if delta == 0:
            raise ValueError(f"Range node {node.name!r}: delta is 0")
        if np.issubdtype(dtype, np.integer):
            n = max(math.ceil(float(int(limit) - int(start)) / float(delta)), 0)
            return [(start + np.arange(n, dtype=dtype) * delta).astype(dtype)]
        n = max(math.ceil(float(np.asarray(limit - start, dtype)) / float(delta)), 0)
        steps = np.full(n, delta, dtype)
        if n:
            steps[0] = start
        return [np.cumsum(steps, dtype=dtype)]


@register
class Equal(Op):
    """``A == B`` elementwise with multidirectional broadcasting, as bool."""
    op_type = "Equal"

    @classmethod
    def run(cls, node, inputs):
        return [np.asarray(np.equal(inputs[0], inputs[1]))]


@register
class Where(Op):
    """``condition ? X : Y`` with multidirectional broadcasting of all three."""

    op_type = "Where"

    @classmethod
    def run(cls, node, inputs):
        cond, x, y = (np.asarray(v) for v in inputs[:3])
        return [np.where(cond.astype(bool), x, y).astype(x.dtype, copy=False)]
