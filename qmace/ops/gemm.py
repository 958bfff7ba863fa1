"""Gemm and MatMul (ONNX opset 13+ semantics), float and integer kernels; fused activation (``qm_activation``).

Float:
- Gemm:   ``Y = alpha * A' @ B' + beta * C`` with ``A' = A.T if transA``, ``B' = B.T if transB`` (A', B' 2-D,
  A' (M, K), B' (K, N)); C (optional) broadcasts unidirectionally to (M, N). float32 BLAS.
- MatMul: numpy.matmul semantics (N-d batch broadcasting, 1-D operands promoted and squeezed).

Integer (docs/quantization.md; ``qmace.ops.accumulate``, the same arithmetic as Conv):
``acc = bias_q + sum_k (q_a - zp_a) * (q_b - zp_b[n])`` exactly (float64 matmul of centred codes, exact
while |acc| < 2^53), then ``y_q = clip(rint(float32(acc) * M[n]) + zp_y, qmin, qmax)`` with
``M = float32(float32(s_a * s_b[n]) / s_y)``; a fused Relu/Clip clamps the codes to its quantized bounds.
The output channel n is the last axis of Y. Gemm's integer kernel requires alpha == beta == 1 (the quantizer
folds them into the weights and bias first); C is then the int32 bias (scale s_a * s_b, zero point 0).

Weights (``weight_axis``): the constant input 1 (B), per channel along its output-channel axis:
Gemm: axis 0 when transB (B is (N, K)) else axis 1 (B is (K, N)); MatMul: axis 1 (B a 2-D (K, N) weight;
the quantizer treats MatMul's input 1 as a weight only when it is a 2-D constant, otherwise both inputs are
per-tensor activations and the same kernel applies). Input 0 is always the activation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node
from qmace.ops.accumulate import AccumulateOp
from qmace.ops.base import register
from qmace.ops.util import apply_fused_activation, apply_fused_activation_torch


def _matmul(a, b):
    """``a @ b`` (numpy.matmul semantics; torch.matmul for tensors)."""
    return a @ b


@register
class Gemm(AccumulateOp):
    """``Y = alpha * A' @ B' + beta * C`` (module docstring), then the fused activation. Integer kernel (alpha ==
    beta == 1): exact accumulation of centred codes plus the int32 bias, requantized with
    ``M = s_a s_b[n] / s_y``; weight B per channel (axis 0 if transB else 1), bias input 2.
    """
    op_type = "Gemm"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    bias_input = 2
    fuses_activation = True
    channel_axis = -1

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        if index != 1:
            return None
        return 0 if cls.attr(node, "transB") else 1

    @classmethod
    def quantizable(cls, node):
        has_c = len(node.inputs) > 2 and bool(node.inputs[2])
        return float(cls.attr(node, "alpha")) == 1.0 and (not has_c or float(cls.attr(node, "beta")) == 1.0)

    @classmethod
    def weight_rows(cls, node, w):
        if cls.attr(node, "transA") or float(cls.attr(node, "alpha")) != 1.0 or w.ndim != 2:
            return None
        rows = w if cls.attr(node, "transB") else w.T  # (N, K)
        return rows.astype(np.float64)[None, :, :, None]

    @classmethod
    def weight_from_rows(cls, node, rows, shape):
        rows = rows[0, :, :, 0]
        return rows if cls.attr(node, "transB") else rows.T

    @classmethod
    def input_rows(cls, node, x, w_shape):
        return np.asarray(x, np.float64).reshape(1, -1, x.shape[-1])

    @classmethod
    def fold_bias_scale(cls, node):
        beta = float(cls.attr(node, "beta"))
        node.attrs["beta"] = 1.0
        return beta

    @classmethod
    def linear(cls, node, a, b):
        """``A' @ B'`` (2-D operands, transposed per transA/transB)."""
        if cls.attr(node, "transA"):
            a = a.T
        if cls.attr(node, "transB"):
            b = b.T
        return _matmul(a, b)

    @classmethod
    def check_integer(cls, node, has_bias):
        if float(cls.attr(node, "alpha")) != 1.0 or (has_bias and float(cls.attr(node, "beta")) != 1.0):
            raise NotImplementedError(
                f"Gemm node {node.name!r}: the integer kernel needs alpha == beta == 1 (fold them into B and C first)"
            )

    @classmethod
    def _affine(cls, node, y, c, alpha, beta):
        """``alpha * y + beta * C`` (the products skipped when alpha or beta is 1, C when beta is 0)."""
        if alpha != 1:
            y = y * alpha
        if c is not None and beta != 0:
            y = y + (c * beta if beta != 1 else c)
        return y

    @classmethod
    def run(cls, node, inputs):
        a, c = inputs[0], (inputs[2] if len(inputs) > 2 else None)
        y = cls.linear(node, a, inputs[1])
        alpha, beta = np.float32(cls.attr(node, "alpha")), np.float32(cls.attr(node, "beta"))
        y = cls._affine(node, y, c, alpha, beta)
        return [apply_fused_activation(node, y.astype(a.dtype, copy=False))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Float torch kernel: ``alpha * A' @ B' + beta * C`` then the fused activation (differentiable)."""
        c = inputs[2] if len(inputs) > 2 else None
        y = cls.linear(node, inputs[0], inputs[1])
        y = cls._affine(node, y, c, float(cls.attr(node, "alpha")), float(cls.attr(node, "beta")))
        return [apply_fused_activation_torch(node, y)]


@register
class MatMul(AccumulateOp):
    """``Y = A @ B`` with numpy.matmul semantics, then the fused activation. Integer kernel as Gemm's, per-channel
    B along its last axis.
    """
    op_type = "MatMul"
    defaults: ClassVar[dict[str, Any]] = {}
    fuses_activation = True
    channel_axis = -1

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        return 1 if index == 1 else None

    @classmethod
    def weight_rows(cls, node, w):
        return w.T.astype(np.float64)[None, :, :, None] if w.ndim == 2 else None  # (K, N) -> (1, N, K, 1)

    @classmethod
    def weight_from_rows(cls, node, rows, shape):
        return rows[0, :, :, 0].T

    @classmethod
    def input_rows(cls, node, x, w_shape):
        return np.asarray(x, np.float64).reshape(1, -1, x.shape[-1])

    @classmethod
    def linear(cls, node, a, b):
        return _matmul(a, b)

    @classmethod
    def run(cls, node, inputs):
        return [apply_fused_activation(node, cls.linear(node, inputs[0], inputs[1]))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Float torch kernel: ``torch.matmul`` then the fused activation (differentiable)."""
        return [apply_fused_activation_torch(node, cls.linear(node, inputs[0], inputs[1]))]
