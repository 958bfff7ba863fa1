"""Trilu (ONNX opset 14+ semantics): keeps the upper (``upper=1``, default) or lower triangle of the last
two axes and zeroes the rest. With the optional int64 scalar input ``k`` (default 0): upper keeps
``j - i >= k``, lower keeps ``j - i <= k`` (element [..., i, j]).

No integer kernel (``Kernel.NONE``): the zeros it writes are real 0.0, which on codes would be the
zero point, not code 0; it runs in float in a quantized model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Op, register
from qmace.ops.elementwise import optional_input


@register
class Trilu(Op):
    """Keep the upper (``j - i >= k``) or lower (``j - i <= k``) triangle of the last two axes, zero the rest."""
    op_type = "Trilu"
    defaults: ClassVar[dict[str, Any]] = {"upper": 1}

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        if x.ndim < 2:
            raise ValueError(f"Trilu node {node.name!r}: input rank {x.ndim} < 2")
        k = optional_input(inputs, 1)
        k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
        return [np.triu(x, k) if int(cls.attr(node, "upper")) else np.tril(x, k)]
