"""The integer kernel of every accumulate op (Conv, Gemm, MatMul), written once for numpy and torch.

An accumulate op is a bilinear map ``Y = linear(A, B)`` (convolution, matrix product) plus a bias along the
output-channel axis. On 8-bit codes (docs/quantization.md):

    acc = bias_q + linear(q_a - zp_a, q_b - zp_b)        exact int32 sum, computed in float64
    y_q = clip(rint(float32(acc) * M) + zp_y, qmin, qmax),  M = float32(float32(s_a * s_b) / s_y)

then a fused Relu/Clip clamps the codes to its quantized bounds. ``zp_b`` (and ``s_b``, hence ``M``) may be
per channel: along ``qp.axis`` of B, i.e. along :attr:`AccumulateOp.channel_axis` of Y. Every partial sum of
centred codes is an integer below 2^53 in magnitude, so float64 arithmetic is exact whatever the summation
order: numpy's BLAS and torch's float64 convolution give the same accumulator.

One subclass per op provides only ``linear(node, a, b)`` in the namespace of its inputs (numpy arrays or torch
tensors). The reference runtime calls ``run_quantized`` on numpy codes; QAT's exact mode calls it on torch
tensors of codes (faster convolutions, same integers); QAT's training mode and the ops' ``run_torch`` reuse
``linear`` on float tensors. A new accumulate op is one ``linear``: nothing in QAT changes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace import qmath
from qmace.ir import Node
from qmace.ops.base import Kernel, Op
from qmace.ops.util import clamp_codes_to_activation, is_torch


def as_float64(x: Any):
    """``x`` as float64 in its own namespace (torch tensor or numpy array).

    Args:
        x: integer codes or values.

    Returns:
        A float64 tensor/array (exact for integers below 2^53).
    """
    if is_torch(x):
        import torch

        return x.to(torch.float64)
    return np.asarray(x).astype(np.float64)


def along_axis(v: np.ndarray, like: Any, axis: int | None):
    """The per-channel vector ``v`` shaped to broadcast along ``axis`` of ``like``, in ``like``'s namespace.

    Args:
        v: a scalar or (C,) numpy array.
        like: the array/tensor it will combine with (its rank, namespace and device).
        axis: the channel axis of ``like`` (negative counts from the end); ignored for scalars.

    Returns:
        ``v`` as float64, shaped ``(1, ..., C, ..., 1)`` (scalars unchanged), a tensor if ``like`` is one.
    """
    v = np.asarray(v, np.float64)
    if v.ndim and axis is not None:
        shape = [1] * like.ndim
        shape[axis % like.ndim] = -1
        v = v.reshape(shape)
    if is_torch(like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(v)).to(like.device)
    return v


def centred(q: Any, qp) -> Any:
    """``q - zp`` as float64 (exact), a per-channel zero point applied along ``qp.axis`` of ``q``.

    Args:
        q: the codes (numpy array or torch tensor).
        qp: their QuantParams.

    Returns:
        The centred codes, float64, in ``q``'s namespace.
    """
    return as_float64(q) - along_axis(qp.zero_point, q, qp.axis)


class AccumulateOp(Op):
    """An op whose integer kernel is the exact accumulation of the module docstring.

    Subclasses set ``channel_axis`` (Y's output-channel axis: 1 for NCHW convolutions, -1 for matrix
    products) and implement :meth:`linear`.
    """

    quant_kernel = Kernel.ACCUMULATE
    channel_axis: ClassVar[int] = -1

    @classmethod
    def linear(cls, node: Node, a: Any, b: Any) -> Any:
        """The bias-free bilinear map ``linear(A, B)`` in the namespace and float dtype of ``a`` and ``b``.

        Args:
            node: the node (its attributes: strides, transposes ...).
            a: input A (activation), a numpy array or torch tensor.
            b: input B (weight or second activation), same namespace and dtype.

        Returns:
            ``linear(A, B)`` (exact in float64 for integer-valued inputs whose sums stay below 2^53).
        """
        raise NotImplementedError

    @classmethod
    def check_integer(cls, node: Node, has_bias: bool) -> None:
        """Raise when the node's attributes fall outside what the integer kernel computes (default: nothing).

        Args:
            node: the node.
            has_bias: whether the bias input is given.
        """

    @classmethod
    def accumulate(cls, node: Node, a: Any, b: Any, bias: Any, a_qp, b_qp) -> Any:
        """``acc = bias_q + linear(q_a - zp_a, q_b - zp_b)`` as exact float64, in ``a``'s namespace.

        Args:
            node: the node.
            a: A's codes.
            b: B's codes, same namespace as ``a``.
            bias: the int32 bias codes (1-D along the output channels), or None.
            a_qp: A's QuantParams (per tensor).
            b_qp: B's QuantParams (per tensor or per channel along ``b_qp.axis``).

        Returns:
            The accumulator, float64 holding integers.
        """
        cls.check_integer(node, bias is not None)
        acc = cls.linear(node, centred(a, a_qp), centred(b, b_qp))
        if bias is not None:
            b64 = np.asarray(bias.detach().cpu().numpy() if is_torch(bias) else bias)
            acc = acc + along_axis(b64, acc, cls.channel_axis if b64.ndim == 1 else None)  # 1-D: per channel
        return acc

    @classmethod
    def requantize(cls, node: Node, acc: Any, a_qp, b_qp, y_qp) -> np.ndarray:
        """Accumulator -> output codes: int32, ``qmath.requantize`` with ``M = s_a s_b / s_y``, then the fused
        activation's clamp.

        Args:
            node: the node.
            acc: the float64 accumulator (numpy or torch).
            a_qp, b_qp, y_qp: the QuantParams of A, B and Y.

        Returns:
            Y's codes (numpy).
        """
        acc = acc.detach().cpu().numpy() if is_torch(acc) else np.asarray(acc)
        mult = qmath.requant_multiplier(a_qp, b_qp, y_qp)
        y = qmath.requantize(
            acc.astype(np.int64).astype(np.int32), mult, y_qp, cls.channel_axis if np.ndim(mult) else None
        )
        return clamp_codes_to_activation(node, y, y_qp)

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """The integer kernel (module docstring) on codes given as numpy arrays or torch tensors."""
        if not cls.integer_kernel_applies(node, in_qp, out_qp):  # 16-bit activations: DQ -> op -> Q
            values = [x.detach().cpu().numpy() if is_torch(x) else x for x in inputs]
            return cls.run_float_defined(node, values, in_qp, out_qp)
        bias = inputs[2] if len(inputs) > 2 else None
        acc = cls.accumulate(node, inputs[0], inputs[1], bias, in_qp[0], in_qp[1])
        return [cls.requantize(node, acc, in_qp[0], in_qp[1], out_qp[0])]
