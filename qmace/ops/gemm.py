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

Activation x activation (MatMul's ``activation_weights``: Q·Kᵀ, attention·V): when B is not a constant, both
inputs are uint8 activations with per-tensor parameters from calibration and the same kernel applies; ONNX
Runtime runs it as QLinearMatMul u8 x u8 (exact on every x86 CPU: no ``vpmaddubsw`` saturation), or, for a
16-bit output, as MatMulInteger + the same requantization (``onnx_integer_nodes``). With a 16-bit input the
node is ``quantize(matmul(dequantize(a), dequantize(b)))`` (``Op.integer_kernel_applies``).

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
    activation_weights = True  # Q·Kᵀ, attention·V: B is an activation, per tensor from calibration

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

    @classmethod
    def integer_kernel_applies(cls, node, in_qp, out_qp):
        """8-bit everywhere (QLinearMatMul), or uint8 x uint8 per tensor into a 16-bit output without a fused
        activation (``onnx_integer_nodes``: MatMulInteger + requantization, the same arithmetic)."""
        return super().integer_kernel_applies(node, in_qp, out_qp) or _u8u8_wide_output(node, in_qp, out_qp)

    @classmethod
    def onnx_integer_nodes(cls, node, in_tensors, out_tensors, qparams):
        """uint8 x uint8 -> 16-bit output: ``acc = MatMulInteger(A, B, zp_a, zp_b)`` (exact int32, u8 x u8
        kernels that never saturate), ``Cast`` to float32 (round to nearest even), ``Mul`` by the float32
        multiplier ``M``, ``QuantizeLinear(scale 1, zp_y)`` (round half to even, saturate): exactly
        ``qmath.requantize``. Other cases keep the QDQ form (ORT fuses 8-bit ones into QLinearMatMul)."""
        from onnx import TensorProto, helper, numpy_helper

        from qmace import qmath

        a, b, y = in_tensors[0], in_tensors[1], out_tensors[0]
        if y is None or not _u8u8_wide_output(node, [a.quant, b.quant], [y.quant]):
            return None
        _, zp_a = qparams(a)
        _, zp_b = qparams(b)
        mult = qmath.requant_multiplier(a.quant, b.quant, y.quant)
        m_name, one_name, zp_y = f"{y.name}__mult", f"{y.name}__unit_scale", f"{y.name}__zero_point"
        inits = [numpy_helper.from_array(np.asarray(mult, np.float32), m_name),
                 numpy_helper.from_array(np.asarray(1.0, np.float32), one_name),
                 numpy_helper.from_array(np.asarray(y.quant.zero_point).astype(y.quant.dtype), zp_y)]
        acc, accf, scaled = f"{y.name}__acc", f"{y.name}__accf", f"{y.name}__scaled"
        nodes = [helper.make_node("MatMulInteger", [a.name, b.name, zp_a, zp_b], [acc], name=node.name),
                 helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=f"{node.name}__cast"),
                 helper.make_node("Mul", [accf, m_name], [scaled], name=f"{node.name}__requant"),
                 helper.make_node("QuantizeLinear", [scaled, one_name, zp_y], [y.name], name=f"{y.name}__Q")]
        return nodes, inits


def _u8u8_wide_output(node: Node, in_qp: list, out_qp: list) -> bool:
    """MatMul of two per-tensor uint8 operands into a 16-bit output, no fused activation."""
    a, b = in_qp[0], in_qp[1]
    y = out_qp[0] if out_qp else None
    return (a is not None and b is not None and y is not None and not node.attrs.get("qm_activation")
            and a.dtype == "uint8" and b.dtype == "uint8" and not a.is_per_channel and not b.is_per_channel
            and y.dtype in ("uint16", "int16"))
