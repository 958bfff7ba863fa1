"""Normalizations (ONNX opset 15+/17+ semantics); all computed in float64 and returned in X's dtype.

- BatchNormalization (inference, training_mode 0): ``y = (x - mean[c]) / sqrt(var[c] + epsilon) * scale[c]
  + B[c]`` on (N, C, *S). Output range from statistics; usually folded into the producing Conv by a pass.
  training_mode 1 normalizes by the batch's mean and biased variance over (N, *S) instead and returns
  the running statistics ``input_mean * momentum + batch_mean * (1 - momentum)`` (same for var) as the
  optional outputs (never folded).
- InstanceNormalization: per (n, c) over the spatial axes, ``y = (x - mu) / sqrt(sigma^2 + epsilon)
  * scale[c] + B[c]`` (biased variance).
- LayerNormalization: over the axes ``[axis, rank)``, ``y = (x - mu) * inv_std * Scale + B`` with
  ``inv_std = 1 / sqrt(sigma^2 + epsilon)``; the optional outputs Mean and InvStdDev (shape
  ``X.shape[:axis] + (1,) * (rank - axis)``, float32 for stash_type 1) are returned when requested.
BatchNormalization and InstanceNormalization have no integer kernel (``Kernel.NONE``: they run in float
between DequantizeLinear/QuantizeLinear). LayerNormalization runs on codes: ``Kernel.FLOAT``,
``quantize(LN(dequantize(x)))`` with the statistics in float (ONNX Runtime: DQ -> LayerNormalization -> Q,
float32); its input is one of the tensors the 16-bit rule widens (docs/quantization.md, "16-bit activations").
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ops.base import Kernel, Op, register


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (1, C, 1, ...) for an ``ndim``-d NC* tensor."""
    return np.asarray(v, np.float64).reshape(1, -1, *([1] * (ndim - 2)))


@register
class BatchNormalization(Op):
    """``y = (x - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + B[c]`` (inference); training_mode 1 uses the
    batch statistics and returns the running ones (module docstring).
    """
    op_type = "BatchNormalization"
    defaults: ClassVar[dict[str, Any]] = {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0}

    @classmethod
    def run(cls, node, inputs):
        x, scale, b, mean, var = inputs[:5]
        nd = x.ndim
        eps = float(np.float32(cls.attr(node, "epsilon")))
        outs = []
        if int(cls.attr(node, "training_mode")):
            axes = (0, *range(2, nd))
            x64 = x.astype(np.float64)
            batch_mean, batch_var = x64.mean(axis=axes), x64.var(axis=axes)
            m = float(np.float32(cls.attr(node, "momentum")))
            outs = [(np.asarray(mean, np.float64) * m + batch_mean * (1 - m)).astype(np.asarray(mean).dtype),
                    (np.asarray(var, np.float64) * m + batch_var * (1 - m)).astype(np.asarray(var).dtype)]
            mean, var = batch_mean, batch_var
        inv = _channel(scale, nd) / np.sqrt(_channel(var, nd) + eps)
        y = (x.astype(np.float64) - _channel(mean, nd)) * inv + _channel(b, nd)
        return [y.astype(x.dtype), *outs[:len(node.outputs) - 1]]


@register
class InstanceNormalization(Op):
    """Per (n, c) over the spatial axes: ``y = (x - mu) / sqrt(sigma^2 + epsilon) * scale[c] + B[c]``."""
    op_type = "InstanceNormalization"
    defaults: ClassVar[dict[str, Any]] = {"epsilon": 1e-5}

    @classmethod
    def run(cls, node, inputs):
        x, scale, b = inputs[:3]
        x64 = x.astype(np.float64)
        axes = tuple(range(2, x.ndim))
        mu = x64.mean(axis=axes, keepdims=True)
        var = ((x64 - mu) ** 2).mean(axis=axes, keepdims=True)
        eps = float(np.float32(cls.attr(node, "epsilon")))
        y = (x64 - mu) / np.sqrt(var + eps) * _channel(scale, x.ndim) + _channel(b, x.ndim)
        return [y.astype(x.dtype)]


@register
class LayerNormalization(Op):
    """Over the axes ``[axis, rank)``: ``y = (x - mu) / sqrt(sigma^2 + epsilon) * Scale + B``; optional Mean
    and InvStdDev outputs.
    """
    op_type = "LayerNormalization"
    defaults: ClassVar[dict[str, Any]] = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}
    quant_kernel = Kernel.FLOAT

    @classmethod
    def run(cls, node, inputs):
        x, scale = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        axis = int(cls.attr(node, "axis")) % x.ndim
        axes = tuple(range(axis, x.ndim))
        x64 = x.astype(np.float64)
        mu = x64.mean(axis=axes, keepdims=True)
        var = ((x64 - mu) ** 2).mean(axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt(var + float(np.float32(cls.attr(node, "epsilon"))))
        y = (x64 - mu) * inv_std * scale.astype(np.float64)
        if b is not None:
            y = y + b.astype(np.float64)
        stash = np.float32 if int(cls.attr(node, "stash_type")) == 1 else x.dtype
        results = [y.astype(x.dtype), mu.astype(stash), inv_std.astype(stash)]
        return results[: max(1, len(node.outputs))]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``layer_norm`` over ``[axis, rank)`` (output Y only; QAT trains through Y)."""
        import torch.nn.functional as F

        x = inputs[0]
        axis = int(cls.attr(node, "axis")) % x.ndim
        shape = tuple(x.shape[axis:])
        scale = inputs[1].reshape(shape) if inputs[1] is not None else None
        bias = inputs[2].reshape(shape) if len(inputs) > 2 and inputs[2] is not None else None
        return [F.layer_norm(x, shape, scale, bias, eps=float(cls.attr(node, "epsilon")))]
