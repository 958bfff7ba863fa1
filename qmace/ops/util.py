"""Helpers shared by op kernels: padding arithmetic, sliding windows, fused activations."""

from __future__ import annotations

import numpy as np

from qmace.ir import Node


def conv_pads(
    in_spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    pads: list[int] | None,
    auto_pad: str,
) -> list[int]:
    """ONNX pads ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` resolved from ``auto_pad``.

    SAME_*: ``out = ceil(in / s)``, ``total = max(0, (out - 1) s + (k - 1) d + 1 - in)``, the odd element at
    the end (SAME_UPPER) or the begin (SAME_LOWER); VALID: 0; NOTSET: ``pads`` (default 0).

    Args:
        in_spatial: the input's spatial sizes.
        kernel: the kernel's spatial sizes.
        strides: per spatial axis.
        dilations: per spatial axis.
        pads: the node's explicit pads, or None.
        auto_pad: ``"NOTSET"``, ``"VALID"``, ``"SAME_UPPER"`` or ``"SAME_LOWER"``.

    Returns:
        The begin pads followed by the end pads.

    Raises:
        ValueError: an unknown auto_pad.
    """
    nd = len(in_spatial)
    if auto_pad in ("NOTSET", "", None):
        return list(pads) if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        elif auto_pad == "SAME_LOWER":
            begins.append(big)
            ends.append(small)
        else:
            raise ValueError(f"unknown auto_pad {auto_pad!r}")
    return begins + ends


def windows(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """Sliding windows over the trailing len(kernel) axes of an already padded ``x``.

    (N, C, *S) -> (N, C, *O, *K): ``out[..., o, k] = x[..., o * stride + k * dilation]`` (a view, no copy).

    Args:
        x: the padded input.
        kernel: the kernel's spatial sizes.
        strides: per spatial axis.
        dilations: per spatial axis.

    Returns:
        The strided window view.
    """
    nd = len(kernel)
    eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    axes = tuple(range(x.ndim - nd, x.ndim))
    v = np.lib.stride_tricks.sliding_window_view(x, eff, axis=axes)
    # v: (N, C, *O_full, *eff); take strides on O and dilations on the window
    index = [slice(None)] * (x.ndim - nd)
    index += [slice(None, None, s) for s in strides]
    index += [slice(None, None, d) for d in dilations]
    return v[tuple(index)]


def pad_spatial(x: np.ndarray, pads: list[int], value: float = 0) -> np.ndarray:
    """Constant-pad the trailing ``len(pads) // 2`` axes of ``x``.

    Args:
        x: the input (N, C, *S).
        pads: ONNX order, begins then ends.
        value: the fill value.

    Returns:
        The padded array (``x`` itself when every pad is 0).
    """
    nd = len(pads) // 2
    if not any(pads):
        return x
    width = [(0, 0)] * (x.ndim - nd) + [(pads[i], pads[i + nd]) for i in range(nd)]
    return np.pad(x, width, mode="constant", constant_values=value)


def activation_bounds(node: Node) -> tuple[float, float] | None:
    """The clamp a fused activation applies (``qm_activation`` Relu or Clip).

    Args:
        node: a Conv/Gemm/MatMul node.

    Returns:
        ``(lo, hi)`` (Relu: ``(0, inf)``; Clip: its ``qm_clip``), or None without a fused activation.

    Raises:
        ValueError: an unknown fused activation.
    """
    act = node.attrs.get("qm_activation")
    if act is None:
        return None
    if act == "Relu":
        return 0.0, float("inf")
    if act == "Clip":
        lo, hi = node.attrs.get("qm_clip", [float("-inf"), float("inf")])
        return float(lo), float(hi)
    raise ValueError(f"node {node.name!r}: unknown fused activation {act!r}")


def apply_fused_activation(node: Node, y: np.ndarray) -> np.ndarray:
    """Apply the node's fused activation to its float output: ``clip(y, lo, hi)``.

    Args:
        node: the producing node.
        y: its output before the activation.

    Returns:
        The activated output, y's dtype.

    Raises:
        ValueError: an unknown fused activation.
    """
    bounds = activation_bounds(node)
    if bounds is None:
        return y
    lo, hi = bounds
    return np.clip(y, np.float32(lo), np.float32(hi)).astype(y.dtype, copy=False)


def clamp_codes_to_activation(node: Node, codes: np.ndarray, qp) -> np.ndarray:
    """A fused activation on quantized output: clamp the codes to ``[quantize(lo), quantize(hi)]``.

    Args:
        node: the producing node.
        codes: its output codes.
        qp: the output's QuantParams.

    Returns:
        The clamped codes.
    """
    bounds = activation_bounds(node)
    if bounds is None:
        return codes
    from qmace import qmath

    lo, hi = bounds
    qlo = qmath.quantize(np.array(lo, np.float32), qp) if np.isfinite(lo) else None
    qhi = qmath.quantize(np.array(hi, np.float32), qp) if np.isfinite(hi) else None
    return np.clip(codes, qlo, qhi).astype(codes.dtype, copy=False)


def broadcast_per_channel(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Shape a per-channel vector to broadcast along ``axis`` of an ``ndim``-d array.

    Args:
        v: a (C,) vector or a scalar.
        axis: the channel axis, or None.
        ndim: the rank of the array it will broadcast against.

    Returns:
        ``v`` reshaped to ``(1, ..., C, ..., 1)``; scalars and ``axis`` None unchanged.
    """
    v = np.asarray(v)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Torch helpers for the ops' ``run_torch`` kernels (QAT). torch is imported only when one of them runs.


def is_torch(x: object) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch).

    Args:
        x: any value.

    Returns:
        True for a ``torch.Tensor``.
    """
    return type(x).__module__.split(".")[0] == "torch"


def const_ints(v: object) -> list[int] | None:
    """The integers of a constant shape/axes input given as a torch tensor, numpy array or list.

    Args:
        v: the input value, or None when omitted.

    Returns:
        Its values as a flat list of ints, or None.
    """
    if v is None:
        return None
    if is_torch(v):
        v = v.detach().cpu().numpy()
    return [int(i) for i in np.asarray(v).reshape(-1)]


def pad_spatial_torch(x, pads: list[int], value: float = 0.0):
    """Torch version of :func:`pad_spatial`: constant-pad the trailing ``len(pads) // 2`` axes.

    Args:
        x: a torch tensor (N, C, *S).
        pads: ONNX order, begins then ends (non-negative).
        value: the fill value.

    Returns:
        The padded tensor (``x`` itself when every pad is 0).
    """
    import torch.nn.functional as F

    nd = len(pads) // 2
    if not any(pads):
        return x
    width: list[int] = []
    for i in reversed(range(nd)):  # F.pad lists the last axis first
        width += [pads[i], pads[i + nd]]
    return F.pad(x, width, value=value)


def apply_fused_activation_torch(node: Node, y):
    """Torch version of :func:`apply_fused_activation`: ``clamp(y, lo, hi)`` (differentiable).

    Args:
        node: the producing node.
        y: its output tensor before the activation.

    Returns:
        The activated tensor.

    Raises:
        ValueError: an unknown fused activation.
    """
    import torch

    bounds = activation_bounds(node)
    if bounds is None:
        return y
    lo, hi = bounds
    return torch.clamp(y, lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)


def as_tensor_like(v: object, like):
    """``v`` (a torch tensor, numpy array or number) as a tensor of ``like``'s dtype and device.

    Args:
        v: the value (e.g. a constant input that arrives as a numpy array).
        like: the reference tensor.

    Returns:
        The tensor (``v`` itself when it already matches).
    """
    import torch

    if not is_torch(v):
        v = torch.from_numpy(np.array(v))
    return v.to(dtype=like.dtype, device=like.device)

