"""Pad (ONNX opset 19+/21 semantics): inputs data, pads, constant_value (optional), axes (optional).

``pads`` (int64) is ``[b_1, ..., b_n, e_1, ..., e_n]`` for the axes listed in ``axes`` (default: all, in
order; negative axes count from the end). Positive entries add ``b_i``/``e_i`` elements before/after axis i,
negative ones remove them (applied first). Modes: ``constant`` (``constant_value``, default 0), ``reflect``
(mirror without repeating the edge), ``edge`` (repeat the edge), ``wrap`` (periodic) — numpy's
``constant``/``reflect``/``edge``/``wrap`` modes.

Quantized (``Kernel.COPY``, output shares the input's parameters): the codes are padded directly and a
constant is written as ``quantize(constant_value)`` in the data's parameters — the zero point for 0.0, which
is exact; any other constant is rounded to the nearest code (saturating), as ONNX Runtime's QDQ Pad does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.ops.util import as_tensor_like, const_ints

_NUMPY_MODE = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad_array(x: np.ndarray, pads: np.ndarray, mode: str, value, axes: np.ndarray | None) -> np.ndarray:
    """Pad (or, for negative pads, crop) ``x`` as the module docstring states.

    Args:
        x: the data.
        pads: ``[b_1, ..., b_n, e_1, ..., e_n]`` for the axes in ``axes``.
        mode: ``"constant"``, ``"reflect"``, ``"edge"`` or ``"wrap"``.
        value: the constant for ``"constant"`` mode (in x's dtype).
        axes: the padded axes (negative counts from the end); None: all axes in order.

    Returns:
        The padded array.

    Raises:
        ValueError: an unknown mode, or a pads length that is not twice the number of axes.
    """
    if mode not in _NUMPY_MODE:
        raise ValueError(f"unknown Pad mode {mode!r}")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes_list = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in np.asarray(axes).reshape(-1)]
    n = len(axes_list)
    if len(pads) != 2 * n:
        raise ValueError(f"Pad: {len(pads)} pads for {n} axes")
    width = [(0, 0)] * x.ndim
    crop = [slice(None)] * x.ndim
    for i, ax in enumerate(axes_list):
        b, e = pads[i], pads[i + n]
        width[ax] = (max(b, 0), max(e, 0))
        crop[ax] = slice(max(-b, 0), x.shape[ax] - max(-e, 0))
    x = x[tuple(crop)]
    if not any(w != (0, 0) for w in width):
        return x.copy()
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=value)
    return np.pad(x, width, mode=_NUMPY_MODE[mode])


@register
class Pad(Op):
    """Pad/crop the data by ``pads`` along ``axes`` in one of four modes (module docstring). Copies codes; a
    constant is padded as its code in the data's parameters.
    """
    op_type = "Pad"
    sign = Sign.FIRST
    defaults: ClassVar[dict[str, Any]] = {"mode": "constant"}
    quant_kernel = Kernel.COPY
    range_rule = RangeRule.INPUT

    @classmethod
    def _args(cls, inputs):
        value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        axes = inputs[3] if len(inputs) > 3 else None
        return inputs[0], inputs[1], value, axes

    @classmethod
    def run(cls, node, inputs):
        x, pads, value, axes = cls._args(inputs)
        v = np.asarray(value).reshape(()).astype(x.dtype) if value is not None else x.dtype.type(0)
        return [pad_array(x, pads, cls.attr(node, "mode"), v, axes)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        from qmace import qmath

        x, pads, value, axes = cls._args(inputs)
        qp = out_qp[0] if out_qp and out_qp[0] is not None else in_qp[0]
        if value is None:
            code = np.asarray(qp.zero_point).astype(x.dtype)
        elif len(in_qp) > 2 and in_qp[2] is not None:  # constant_value given as codes of its own params
            code = qmath.quantize(qmath.dequantize(np.asarray(value), in_qp[2]), qp)
        else:
            code = qmath.quantize(np.asarray(value, np.float32).reshape(()), qp)
        return [pad_array(x, pads, cls.attr(node, "mode"), code.reshape(()), axes)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch, any mode: ``pad_array`` of the element indices (-1 for a padded constant) picks the output
        from the flattened input, so every mode and crop is exactly ``run``'s, and differentiable."""
        import torch

        x, pads, value, axes = cls._args(inputs)
        mode = cls.attr(node, "mode")
        index = pad_array(np.arange(x.numel(), dtype=np.int64).reshape(tuple(x.shape)), np.array(const_ints(pads)),
                          mode, np.int64(-1), None if axes is None else np.array(const_ints(axes)))
        idx = torch.from_numpy(index).to(x.device)
        y = x.reshape(-1)[idx.clamp(min=0)]
        if mode == "constant":
            fill = as_tensor_like(0.0 if value is None else value, x).reshape(())
            y = torch.where(idx < 0, fill, y)
        return [y]
