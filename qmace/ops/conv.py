"""Conv (ONNX opset 11+ semantics): 1-D and 2-D, groups, dilations, pads, auto_pad; fused activation.

Float: y[n, m, o] = b[m] + sum_{c in group(m), k} x_pad[n, c, o*s + k*d] * w[m, c, k]  (float32 BLAS).
Integer (docs/quantization.md; ``qmace.ops.accumulate``): acc = bias_q + sum (q_x - zp_x) * (q_w - zp_w[m])
exactly in int32 (computed through float64 matmul, exact while |acc| < 2^53), x padded with its zero point,
then y_q = clip(rint(float32(acc) * M[m]) + zp_y, qmin, qmax) with M = float32(float32(s_x * s_w[m]) / s_y).
Torch (QAT): the same ``linear`` map through ``torch.nn.functional.conv{1,2,3}d``.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Node
from qmace.ops.accumulate import AccumulateOp
from qmace.ops.base import register
from qmace.ops.util import (
    apply_fused_activation,
    apply_fused_activation_torch,
    conv_pads,
    is_torch,
    pad_spatial,
    pad_spatial_torch,
    windows,
)


def im2col(x: np.ndarray, w_shape: tuple[int, ...], node: Node, pad_value: float, dtype) -> tuple[np.ndarray, tuple[int, ...]]:
    """Patches of ``x`` for a grouped convolution with weights of ``w_shape`` (M, C/g, *K).

    x (N, C, *S) -> cols (G, N*Ho*Wo, Cg*kh*kw) and the output spatial shape (Ho, Wo); 1-D convolutions
    are computed as 2-D with a height of 1.

    Args:
        x: the input (N, C, *S), 1-D or 2-D spatial.
        w_shape: the weight's shape (M, C/g, *K).
        node: the Conv node (strides, dilations, pads, auto_pad, group).
        pad_value: the value padded in (0.0 for floats and centred codes).
        dtype: the arithmetic dtype of the patches.

    Returns:
        ``(cols, (Ho, Wo))``.

    Raises:
        ValueError: pads or auto_pad the spec does not allow.
    """
    squeeze_1d = x.ndim == 3
    if squeeze_1d:  # (N, C, L) -> (N, C, 1, L)
        x, w_shape = x[:, :, None, :], (w_shape[0], w_shape[1], 1, w_shape[2])
    nd = x.ndim - 2
    kernel = tuple(w_shape[2:])
    strides = tuple(Conv.attr(node, "strides") or [1] * nd) if not squeeze_1d else (1, *(Conv.attr(node, "strides") or [1]))
    dil = Conv.attr(node, "dilations") or [1] * (1 if squeeze_1d else nd)
    dilations = tuple(dil) if not squeeze_1d else (1, *dil)
    pads = Conv.attr(node, "pads")
    auto_pad = Conv.attr(node, "auto_pad")
    if squeeze_1d:
        spatial_pads = conv_pads(x.shape[3:], kernel[1:], strides[1:], dilations[1:], pads, auto_pad)
        pads2 = [0, spatial_pads[0], 0, spatial_pads[1]]
    else:
        pads2 = conv_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    group = int(Conv.attr(node, "group"))
    n, c = x.shape[:2]
    xp = pad_spatial(x.astype(dtype, copy=False), pads2, pad_value)
    cols = windows(xp, kernel, strides, dilations)  # (N, C, Ho, Wo, kh, kw)
    ho, wo = cols.shape[2], cols.shape[3]
    cg = c // group
    kk = int(np.prod(kernel))
    # (N, G, Cg, Ho, Wo, kh, kw) -> (G, N*Ho*Wo, Cg*kh*kw)
    cols = cols.reshape(n, group, cg, ho, wo, kk).transpose(1, 0, 3, 4, 2, 5).reshape(group, n * ho * wo, cg * kk)
    return cols, (ho, wo)


def conv_core(x: np.ndarray, w: np.ndarray, node: Node, pad_value: float, dtype) -> np.ndarray:
    """Grouped convolution without bias in ``dtype`` arithmetic. x (N, C, *S), w (M, C/g, *K) -> (N, M, *O).

    Args:
        x: the input (N, C, *S).
        w: the weight (M, C/g, *K).
        node: the Conv node (its attributes).
        pad_value: the value padded in.
        dtype: the arithmetic dtype (float32 for the float kernel, float64 for exact integer sums).

    Returns:
        The output (N, M, *O) in ``dtype``.
    """
    cols, (ho, wo) = im2col(x, w.shape, node, pad_value, dtype)
    group, n, m = cols.shape[0], x.shape[0], w.shape[0]
    mg = m // group
    wg = w.astype(dtype, copy=False).reshape(group, mg, -1).transpose(0, 2, 1)  # (G, Cg*K, Mg)
    out = np.matmul(cols, wg)  # (G, N*Ho*Wo, Mg)
    out = out.reshape(group, n, ho, wo, mg).transpose(1, 0, 4, 2, 3).reshape(n, m, ho, wo)
    return out[:, :, 0, :] if x.ndim == 3 else out


def conv_torch(x, w, node: Node):
    """Grouped convolution without bias in torch (1-D, 2-D or 3-D), in ``x``'s dtype: the torch twin of
    :func:`conv_core`. x (N, C, *S), w (M, C/g, *K) -> (N, M, *O); pads (any, also asymmetric) applied first.

    Args:
        x: the input tensor.
        w: the weight tensor.
        node: the Conv node (strides, dilations, pads, auto_pad, group).

    Returns:
        The output tensor.
    """
    import torch.nn.functional as F

    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(Conv.attr(node, "strides") or [1] * nd)
    dilations = tuple(Conv.attr(node, "dilations") or [1] * nd)
    pads = conv_pads(tuple(x.shape[2:]), kernel, strides, dilations, Conv.attr(node, "pads"), Conv.attr(node, "auto_pad"))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(pad_spatial_torch(x, pads, 0.0), w, None, stride=strides, dilation=dilations,
              groups=int(Conv.attr(node, "group")))


@register
class Conv(AccumulateOp):
    """Convolution (module docstring): ``y[n, m, o] = b[m] + sum_{c in group(m), k} x_pad[n, c, o*s + k*d] *
    w[m, c, k]``, then the fused activation. Integer kernel: exact int32 accumulation of centred codes and
    requantization with ``M = s_x s_w[m] / s_y``; weights per channel along axis 0, bias input 2.
    """
    op_type = "Conv"
    defaults = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None, "pads": None, "strides": None}
    bias_input = 2
    fuses_activation = True
    channel_axis = 1

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        return 0 if index == 1 else None

    @classmethod
    def weight_rows(cls, node, w):
        group = int(cls.attr(node, "group"))  # (M, Cg, *K) -> (G, M/G, Cg, prod(K))
        return w.astype(np.float64).reshape(group, w.shape[0] // group, w.shape[1], -1)

    @classmethod
    def weight_from_rows(cls, node, rows, shape):
        return rows.reshape(shape)

    @classmethod
    def input_rows(cls, node, x, w_shape):
        return im2col(np.asarray(x), w_shape, node, 0.0, np.float64)[0]  # (G, N*Ho*Wo, Cg*prod(K))

    @classmethod
    def linear(cls, node, a, b):
        if is_torch(a):
            return conv_torch(a, b, node)
        return conv_core(a, b, node, 0.0, a.dtype)  # centred codes: padding with 0 = padding with zp

    @classmethod
    def run(cls, node, inputs):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        y = conv_core(x, w, node, 0.0, np.float32)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * (y.ndim - 2)))
        return [apply_fused_activation(node, y.astype(np.float32, copy=False))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Float torch kernel: ``linear(x, w) + b`` then the fused activation (differentiable)."""
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        y = cls.linear(node, x, w)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * (y.ndim - 2)))
        return [apply_fused_activation_torch(node, y)]
