"""Einsum (ONNX opset 12+ semantics): Einstein summation over the inputs by ``equation``
(``"ij,jk->ik"``; implicit output when ``->`` is omitted, ``...`` broadcasting), as ``numpy.einsum``.

Float inputs are accumulated in float64 and rounded once to the input dtype (ORT accumulates in the input
type: differences are rounding-level); integer inputs stay in their type. No integer kernel
(``Kernel.NONE``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register


@register
class Einsum(Op):
    """Einstein summation by ``equation`` as ``numpy.einsum``; floats accumulated in float64 and rounded once."""
    op_type = "Einsum"
    defaults: ClassVar[dict[str, Any]] = {"equation": None}

    @classmethod
    def run(cls, node, inputs):
        eq = cls.attr(node, "equation")
        if not eq:
            raise ValueError(f"Einsum node {node.name!r}: no equation")
        xs = [np.asarray(x) for x in inputs]
        dtype = xs[0].dtype
        work = [x.astype(np.float64) for x in xs] if np.issubdtype(dtype, np.floating) else xs
        return [np.asarray(np.einsum(eq.replace(" ", ""), *work)).astype(dtype)]
