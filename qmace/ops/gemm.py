"""Gemm and MatMul (ONNX opset 13+ semantics), float and integer kernels; fused activation (``qm_activation``).

Float:
- Gemm:   ``Y = alpha * A' @ B' + beta * C`` with ``A' = A.T if transA``, ``B' = B.T if transB`` (A', B' 2-D,
  A' (M, K), B' (K, N)); C (optional) broadcasts unidirectionally to (M, N). float32 BLAS.
- MatMul: numpy.matmul semantics (N-d batch broadcasting, 1-D operands promoted and squeezed).

Integer (docs/quantization.md; same arithmetic as Conv):
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
from qmace.ops.base import Op, register
from qmace.ops.util import apply_fused_activation, clamp_codes_to_activation


def _centered(q: np.ndarray, qp, channel_axis: int | None) -> np.ndarray:
    """Codes minus zero point as float64 (exact); a per-channel zero point applies along ``channel_axis``."""
    zp = np.asarray(qp.zero_point, np.float64)
    if zp.ndim:
        shape = [1] * q.ndim
        shape[channel_axis if channel_axis is not None else qp.axis] = -1
        zp = zp.reshape(shape)
    return q.astype(np.float64) - zp


def _requantize(node: Node, acc: np.ndarray, a_qp, b_qp, y_qp) -> np.ndarray:
    """float64 exact accumulator (N-d, channels last) -> output codes, fused activation applied."""
    from qmace import qmath

    mult = qmath.requant_multiplier(a_qp, b_qp, y_qp)
    y = qmath.requantize(acc.astype(np.int64).astype(np.int32), mult, y_qp, -1 if np.ndim(mult) else None)
    return clamp_codes_to_activation(node, y, y_qp)


@register
class Gemm(Op):
    """``Y = alpha * A' @ B' + beta * C`` (module docstring), then the fused activation. Integer kernel (alpha ==
    beta == 1): exact accumulation of centred codes plus the int32 bias, requantized with
    ``M = s_a s_b[n] / s_y``; weight B per channel (axis 0 if transB else 1), bias input 2.
    """
    op_type = "Gemm"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    quant_kernel = "accumulate"
    bias_input = 2

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        if index != 1:
            return None
        return 0 if cls.attr(node, "transB") else 1

    @classmethod
    def run(cls, node, inputs):
        a, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        if cls.attr(node, "transA"):
            a = a.T
        if cls.attr(node, "transB"):
            b = b.T
        y = np.matmul(a, b)
        alpha, beta = np.float32(cls.attr(node, "alpha")), np.float32(cls.attr(node, "beta"))
        if alpha != 1:
            y = y * alpha
        if c is not None and beta != 0:
            y = y + (c * beta if beta != 1 else c)
        return [apply_fused_activation(node, y.astype(a.dtype, copy=False))]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        a, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        if float(cls.attr(node, "alpha")) != 1.0 or (c is not None and float(cls.attr(node, "beta")) != 1.0):
            raise NotImplementedError(
                f"Gemm node {node.name!r}: the integer kernel needs alpha == beta == 1 (fold them into B and C first)"
            )
        trans_b = bool(cls.attr(node, "transB"))
        a_c = _centered(a, in_qp[0], None)
        b_c = _centered(b, in_qp[1], 0 if trans_b else 1)
        if cls.attr(node, "transA"):
            a_c = a_c.T
        if trans_b:
            b_c = b_c.T
        acc = a_c @ b_c  # (M, N), exact integers in float64
        if c is not None:
            acc = acc + c.astype(np.float64)
        return [_requantize(node, acc, in_qp[0], in_qp[1], out_qp[0])]


@register
class MatMul(Op):
    """``Y = A @ B`` with numpy.matmul semantics, then the fused activation. Integer kernel as Gemm's, per-channel
    B along its last axis.
    """
    op_type = "MatMul"
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel = "accumulate"
    activation_weights = True  # Q·Kᵀ, attention·V: B is an activation, per tensor from calibration

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        return 1 if index == 1 else None

    @classmethod
    def run(cls, node, inputs):
        y = np.matmul(inputs[0], inputs[1])
        return [apply_fused_activation(node, y)]

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        a, b = inputs[0], inputs[1]
        a_c = _centered(a, in_qp[0], None)
        b_c = _centered(b, in_qp[1], -1)  # per-channel B: channels on its last axis (N)
        acc = np.matmul(a_c, b_c)
        return [_requantize(node, acc, in_qp[0], in_qp[1], out_qp[0])]

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
