"""Differentiable fake quantization: qmath's quantize/dequantize written on torch tensors.

Every function here computes the same numbers as its ``qmace.qmath`` counterpart (the forward pass) and passes
straight-through gradients (the backward pass): rounding is ``rint`` (half to even) forward and the identity
backward; the clip to ``[qmin, qmax]`` passes no gradient outside the range.
"""

from __future__ import annotations

import numpy as np
import torch

from qmace import qmath


class _RoundSTE(torch.autograd.Function):
    """Round half to even (np.rint) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``rint(x)`` (half to even) forward, identity backward (straight-through estimator).

    Args:
        x: the values to round.

    Returns:
        The rounded tensor, differentiable as if it were ``x``.
    """
    return _RoundSTE.apply(x)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clip(rint(x / scale) + zp, qmin, qmax) - zp) * scale`` in float32 = dequantize(quantize(x)).

    Straight-through for the rounding; the clip passes no gradient outside the range; the gradient to
    ``scale`` is LSQ's (``q - zp - x / scale`` inside, the clipped code outside).

    Args:
        x: the float values.
        scale: the quantization scale (scalar or broadcastable per channel).
        zp: the zero point.
        qmin, qmax: the integer code range (e.g. 0, 255 for uint8).

    Returns:
        The fake-quantized float32 tensor, same shape as ``x``.
    """
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def fake_quant_weight(w: torch.Tensor, qp: qmath.QuantParams) -> torch.Tensor:
    """``dequantize(quantize(w, qp))`` of a weight with (per-tensor or per-channel) parameters ``qp``.

    Args:
        w: the float weight parameter.
        qp: its QuantParams (``qmath.weight_params``), per channel along ``qp.axis``.

    Returns:
        The fake-quantized weight, differentiable in ``w`` (straight through).
    """
    shape = [1] * w.ndim
    if qp.is_per_channel:
        shape[qp.axis % w.ndim] = -1
    scale = torch.from_numpy(np.array(qp.scale, np.float32)).reshape(shape).to(w.device)
    zp = torch.from_numpy(np.array(qp.zero_point, np.float32)).reshape(shape).to(w.device)
    return fake_quant(w, scale, zp, qp.qmin, qp.qmax)


def fake_quant_bias(b: torch.Tensor, bias_scale: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize_bias(b))``: the codes ``clip(rint(float64(b) / float64(bias_scale)), int32)`` of
    ``qmath.quantize_bias`` (a float64 division, as ORT's quantizer), then ``float32(codes) * bias_scale``.

    Args:
        b: the float bias parameter.
        bias_scale: ``float32(s_x * s_w)`` (scalar or per channel), differentiable in ``s_x``.

    Returns:
        The fake-quantized float32 bias; gradients reach ``b`` (straight through) and ``bias_scale``.
    """
    lo, hi = qmath.dtype_bounds("int32")
    codes = round_ste(b.to(torch.float64) / bias_scale.to(torch.float64)).clamp(lo, hi)
    return codes.to(torch.float32) * bias_scale.to(torch.float32)  # qmath.dequantize: float32(q) * scale


def with_value(t: torch.Tensor, value: np.ndarray) -> torch.Tensor:
    """``t``'s gradient, ``value``'s exact value (so every scale equals qmath's bit for bit).

    Args:
        t: the differentiable tensor (e.g. a scale computed from learnable ranges).
        value: the exact value it must take (float32).

    Returns:
        ``t + (value - t).detach()`` in float32.
    """
    t = t.float()
    v = torch.from_numpy(np.array(value, np.float32)).to(t.device)  # the simulation runs in float32
    return t + (v - t).detach()
