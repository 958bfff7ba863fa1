"""ConvTranspose (ONNX opset 11+ semantics): 1-D, 2-D (any N-d), groups, strides, dilations, pads,
output_padding, output_shape, auto_pad; fused activation (``qm_activation``).

x (N, C, *S), w (C, M/g, *K), b (M,). With the full (uncropped) output
``F[n, g*Mg + m, i*s + k*d] += sum_{c in group g} x[n, c, i] * w[c, m, k]`` (i over input positions, k over
taps), the result is ``y = F[..., pad_begin : pad_begin + out] + b`` where per spatial axis
``out = s*(in - 1) + output_padding + (k - 1)*d + 1 - pad_begin - pad_end``.
When ``output_shape`` is given (or auto_pad is SAME_*, where ``out = in * s``), the pads are derived from
``total = max(0, s*(in - 1) + output_padding + (k - 1)*d + 1 - out)`` as the spec and ONNX Runtime 1.32 do:
SAME_UPPER puts ``total//2`` at the begin, SAME_LOWER and NOTSET put ``total - total//2`` there.
Computed as one matmul per group (x^T w: every tap at once) followed by one strided add per kernel tap.

Quantization: ``Kernel.NONE`` (float fallback). Weights would be per-channel along axis 1 of w (the output
channel within a group, C_in x M/g layout); for group > 1 that axis has M/g entries shared by the groups.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node
from qmace.ops.base import Op, register
from qmace.ops.util import apply_fused_activation, apply_fused_activation_torch


def _geometry(node: Node, in_spatial, kernel):
    op = ConvTranspose
    nd = len(in_spatial)
    strides = list(op.attr(node, "strides") or [1] * nd)
    dilations = list(op.attr(node, "dilations") or [1] * nd)
    out_pad = list(op.attr(node, "output_padding") or [0] * nd)
    auto_pad = op.attr(node, "auto_pad") or "NOTSET"
    output_shape = op.attr(node, "output_shape")
    if output_shape is not None:
        output_shape = list(output_shape)[-nd:]
    pads = list(op.attr(node, "pads") or [0] * (2 * nd))
    begins, outs = [], []
    for i in range(nd):
        full = strides[i] * (in_spatial[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or output_shape is not None:
            out = output_shape[i] if output_shape is not None else in_spatial[i] * strides[i]
            total = max(0, full - out)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad in ("NOTSET", "VALID"):
            begin, end = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i + nd])
            out = full - begin - end
        else:
            raise ValueError(f"ConvTranspose node {node.name!r}: unknown auto_pad {auto_pad!r}")
        if begin < 0:
            raise NotImplementedError(f"ConvTranspose node {node.name!r}: negative pads are not supported")
        begins.append(begin)
        outs.append(int(out))
    return strides, dilations, begins, outs


def conv_transpose_core(x: np.ndarray, w: np.ndarray, node: Node, dtype) -> np.ndarray:
    """Grouped transposed convolution without bias in ``dtype`` arithmetic: (N, C, *S) -> (N, M, *O).

    Args:
        x: the input (N, C, *S).
        w: the weight (C, M/g, *K).
        node: the ConvTranspose node (strides, dilations, pads, output_padding, output_shape, auto_pad, group).
        dtype: the arithmetic dtype.

    Returns:
        The output (N, M, *O) in ``dtype``.

    Raises:
        ValueError: an unknown auto_pad.
        NotImplementedError: negative pads.
    """
    op = ConvTranspose
    group = int(op.attr(node, "group"))
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    nd = len(spatial)
    kernel = tuple(w.shape[2:])
    mg = w.shape[1]
    m = mg * group
    cg = c // group
    kk = int(np.prod(kernel))
    p = int(np.prod(spatial))
    strides, dilations, begins, outs = _geometry(node, spatial, kernel)
    xs = x.astype(dtype, copy=False).reshape(n, group, cg, p).transpose(1, 0, 3, 2).reshape(group, n * p, cg)
    wg = w.astype(dtype, copy=False).reshape(group, cg, mg * kk)
    cols = np.matmul(xs, wg)  # (G, N*P, Mg*KK)
    cols = cols.reshape(group, n, p, mg, kk).transpose(1, 0, 3, 4, 2).reshape(n, m, kk, *spatial)
    extent = [
        max(strides[i] * (spatial[i] - 1) + (kernel[i] - 1) * dilations[i] + 1, begins[i] + outs[i]) for i in range(nd)
    ]
    full = np.zeros((n, m, *extent), dtype)
    for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
        index = [slice(None), slice(None)]
        for i, k in enumerate(tap):
            start = k * dilations[i]
            index.append(slice(start, start + strides[i] * (spatial[i] - 1) + 1, strides[i]))
        full[tuple(index)] += cols[:, :, t]
    crop = (slice(None), slice(None), *(slice(b, b + o) for b, o in zip(begins, outs)))
    return full[crop]


@register
class ConvTranspose(Op):
    """Transposed convolution (module docstring): the full output ``F[n, g*Mg + m, i*s + k*d] += x[n, c, i] *
    w[c, m, k]`` cropped by the pads, plus ``b``; the fused activation applied. Float only.
    """
    op_type = "ConvTranspose"
    fuses_activation = True
    defaults: ClassVar[dict[str, Any]] = {
        "auto_pad": "NOTSET",
        "dilations": None,
        "group": 1,
        "kernel_shape": None,
        "output_padding": None,
        "output_shape": None,
        "pads": None,
        "strides": None,
    }

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        return 1 if index == 1 else None

    @classmethod
    def run(cls, node, inputs):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        y = conv_transpose_core(x, w, node, np.float32)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * (y.ndim - 2)))
        return [apply_fused_activation(node, np.ascontiguousarray(y, dtype=np.float32))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``conv_transpose{1,2,3}d`` without padding gives the full output ``F``, zero-extended to the
        output_padding / output_shape extent and cropped as ``run`` crops it; plus the bias; the fused
        activation."""
        import torch.nn.functional as F

        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        nd = x.ndim - 2
        _, dilations, begins, outs = geometry = _geometry(node, tuple(x.shape[2:]), tuple(w.shape[2:]))
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        full = fn(x, w, None, stride=geometry[0], groups=int(cls.attr(node, "group")), dilation=dilations)
        extra = [max(0, begins[i] + outs[i] - full.shape[2 + i]) for i in range(nd)]
        if any(extra):
            full = F.pad(full, [p for e in reversed(extra) for p in (0, e)])
        y = full[(slice(None), slice(None), *(slice(bg, bg + o) for bg, o in zip(begins, outs)))]
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * nd))
        return [apply_fused_activation_torch(node, y)]
