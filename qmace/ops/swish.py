"""Swish / SiLU (ONNX opset 24 ``Swish``): ``Y = X * sigmoid(alpha * X)`` elementwise, ``alpha`` default 1.0
(SiLU). Evaluated in float64 and rounded once to X's dtype.

The fusion pass (``qmace.passes.decomposed``) turns ``x * Sigmoid(x)`` into this op, so a quantized model
rounds the activation once instead of twice (the Sigmoid output and the product).

Quantized: ``Kernel.FLOAT`` (``quantize(swish(dequantize(x)))``), output range from statistics.
ONNX Runtime lowering: ``Sigmoid`` (of ``alpha * X`` when alpha != 1) then ``Mul`` at the IR's opset 21, so
a model containing Swish is not lifted to opset 24; ORT runs that pair in float32 between its Q/DQ nodes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from onnx import helper, numpy_helper

from qmace.ir import Node
from qmace.ops.base import Kernel, Op, register


@register
class Swish(Op):
    """``Y = X * sigmoid(alpha * X)`` (float64, rounded once); SiLU for alpha = 1."""

    op_type = "Swish"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 1.0}
    quant_kernel = Kernel.FLOAT

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        x64 = x.astype(np.float64)
        alpha = float(np.float32(cls.attr(node, "alpha")))
        with np.errstate(over="ignore"):
            y = x64 / (1.0 + np.exp(-alpha * x64))
        return [y.astype(x.dtype)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``X * sigmoid(alpha * X)``."""
        import torch

        x = inputs[0]
        return [x * torch.sigmoid(float(cls.attr(node, "alpha")) * x)]

    @classmethod
    def onnx_nodes(cls, node: Node, inputs: list[str], outputs: list[str]) -> tuple[list, list]:
        """Opset-21 ONNX nodes for ONNX Runtime: ``Mul(X, Sigmoid(alpha * X))``.

        Args:
            node: the Swish node.
            inputs: the ONNX name read for X (its float value).
            outputs: the ONNX name to write Y to.

        Returns:
            ``(nodes, initializers)``.
        """
        alpha = float(np.float32(cls.attr(node, "alpha")))
        x, inits, nodes = inputs[0], [], []
        sig_in = x
        if alpha != 1.0:
            a_name, sig_in = f"{node.name}__alpha", f"{node.name}__scaled"
            inits.append(numpy_helper.from_array(np.array(alpha, np.float32), a_name))
            nodes.append(helper.make_node("Mul", [x, a_name], [sig_in], name=f"{node.name}__scale"))
        nodes.append(helper.make_node("Sigmoid", [sig_in], [f"{node.name}__sigmoid"], name=f"{node.name}__sigmoid"))
        nodes.append(helper.make_node("Mul", [x, f"{node.name}__sigmoid"], [outputs[0]], name=node.name))
        return nodes, inits
