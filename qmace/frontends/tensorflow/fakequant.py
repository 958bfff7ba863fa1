"""TensorFlow FakeQuant nodes -> fixed quantization parameters (QAT graphs).

TensorFlow's rule (``tensorflow/core/kernels/fake_quant_ops_functor.h``), per tensor or per channel over
the last axis: ``qmin = 1 if narrow_range else 0``, ``qmax = 2**num_bits - 1``,
``scale = (max - min) / (qmax - qmin)``, ``zp = clip(round_half_away(qmin - min / scale), qmin, qmax)``,
``nudged_min = (qmin - zp) * scale``, ``nudged_max = (qmax - zp) * scale`` and
``out = floor((clip(x, nudged_min, nudged_max) - nudged_min) / scale + 0.5) * scale + nudged_min``.
So TF's code ``k`` in ``[qmin, qmax]`` means ``(k - zp) * scale``:

- on an activation ``x`` the node becomes nothing (readers read ``x``) and ``x`` gets the uint8 parameters
  ``(scale, zp)``: the integer model's codes are TF's codes;
- on a constant weight the node folds to the fake-quantized weight ``out`` and, under the ``int8`` schema,
  records int8 parameters ``(scale, zp - 128)`` (narrow range: codes in [-127, 127]; per channel on the
  filter's last axis), so quantizing the weight with them gives back TF's codes exactly. Under the
  ``uint8`` schema (MACE's per-tensor asymmetric weights) the learned grid cannot be kept: the
  fake-quantized float weight is re-quantized per tensor (one warning per model).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from qmace.qmath import QuantParams

if TYPE_CHECKING:
    from qmace.frontends.tensorflow.builder import Builder

log = logging.getLogger(__name__)

FAKE_QUANT_OPS = ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs", "FakeQuantWithMinMaxVarsPerChannel")


def tf_nudge(min_: np.ndarray, max_: np.ndarray, num_bits: int, narrow_range: bool) -> dict[str, np.ndarray]:
    """TF's nudged scale, zero point (in TF's unsigned codes), nudged min and max, in float32.

    Formulas as in the module docstring.

    Args:
        min_, max_: the range (a scalar, or one value per channel).
        num_bits: the code width (``qmax = 2**num_bits - 1``).
        narrow_range: ``qmin = 1`` instead of 0.

    Returns:
        ``{"scale", "zero_point" (int64), "nudged_min", "nudged_max"}``, each shaped like ``min_``.
    """
    qmin = 1 if narrow_range else 0
    qmax = 2**num_bits - 1
    min_ = np.asarray(min_, np.float32)
    max_ = np.asarray(max_, np.float32)
    scale = (max_ - min_) / np.float32(qmax - qmin)
    zp_from_min = np.float32(qmin) - min_ / scale
    zp = np.clip(np.sign(zp_from_min) * np.floor(np.abs(zp_from_min) + 0.5), qmin, qmax).astype(np.int64)
    return {"scale": scale.astype(np.float32), "zero_point": zp,
            "nudged_min": ((qmin - zp) * scale).astype(np.float32),
            "nudged_max": ((qmax - zp) * scale).astype(np.float32)}


def tf_fake_quant(x: np.ndarray, nudged: dict[str, np.ndarray], axis: int | None) -> np.ndarray:
    """TF's FakeQuant output for ``x`` with parameters from :func:`tf_nudge` (per channel along ``axis``).

    ``out = floor((clip(x, nudged_min, nudged_max) - nudged_min) / scale + 0.5) * scale + nudged_min``.

    Args:
        x: the values.
        nudged: the parameters from :func:`tf_nudge`.
        axis: the channel axis of per-channel parameters, None for scalar ones.

    Returns:
        The fake-quantized values, float32, shaped like ``x``.
    """
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    lo, hi, s = (nudged[k].reshape(shape) for k in ("nudged_min", "nudged_max", "scale"))
    clamped = np.clip(x.astype(np.float32), lo, hi)
    return (np.floor((clamped - lo) / s + np.float32(0.5)) * s + lo).astype(np.float32)


def _min_max(b: Builder, op: str, attrs: dict[str, Any], ins: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if op == "FakeQuantWithMinMaxArgs":
        return np.asarray(attrs.get("min", -6.0), np.float32), np.asarray(attrs.get("max", 6.0), np.float32)
    lo = np.asarray(b.const(ins[1], "min"), np.float32)
    hi = np.asarray(b.const(ins[2], "max"), np.float32)
    return lo, hi


def emit_fake_quant(b: Builder, op: str, attrs: dict[str, Any], ins: list[str]) -> str:
    """Record the node's parameters (see the module docstring); returns the IR name of its output.

    Args:
        b: the builder (its ``params`` receive the parameters).
        op: the FakeQuant op type.
        attrs: the node's attributes (``num_bits``, ``narrow_range``, and ``min``/``max`` for the Args form).
        ins: IR names of its inputs (``x``, and constant ``min``, ``max`` for the Vars forms).

    Returns:
        The IR name standing for its output: ``x`` itself on an activation, the folded weight otherwise.

    Raises:
        ModelError: ``num_bits`` other than 8, non-constant, mismatched, inverted or empty ranges,
            per-channel ranges on an activation or not matching the weight's last axis.
    """
    num_bits = int(attrs.get("num_bits", 8))
    narrow = bool(attrs.get("narrow_range", False))
    if num_bits != 8:
        raise b.error(f"{op} with num_bits={num_bits}: only 8-bit fake quantization is supported")
    lo, hi = _min_max(b, op, attrs, ins)
    if lo.shape != hi.shape:
        raise b.error(f"{op}: min of shape {list(lo.shape)} and max of shape {list(hi.shape)} differ")
    if np.any(lo > hi):
        i = int(np.argmax((lo > hi).reshape(-1)))
        raise b.error(f"{op}: min {float(lo.reshape(-1)[i])} > max {float(hi.reshape(-1)[i])}")
    if np.any(lo == hi):
        raise b.error(f"{op}: min == max ({float(lo.reshape(-1)[0])}): an empty range")
    nudged = tf_nudge(lo, hi, num_bits, narrow)
    per_channel = lo.ndim == 1 and lo.size > 1
    if not per_channel:  # shape [1] (tfmot's depthwise ranges) is one range
        nudged = {k: v.reshape(()) for k, v in nudged.items()}
    x = ins[0]
    value = b.graph.constant(x)
    if value is None:
        if per_channel:
            raise b.error(f"{op}: per-channel fake quantization of the activation {x!r} is not supported")
        if narrow:
            log.warning("%s: node %r: narrow_range on an activation; its code 0 is kept usable",
                        b.path, b.node_name)
        qp = QuantParams(nudged["scale"], nudged["zero_point"], "uint8")
        if x in b.params and b.params[x] != qp:
            log.warning("%s: node %r: a second FakeQuant on %r with other parameters; the first is kept",
                        b.path, b.node_name, x)
        else:
            b.params[x] = qp
        return x
    axis = value.ndim - 1 if per_channel else None
    if per_channel and value.shape[-1] != lo.size:
        raise b.error(f"{op}: {lo.size} ranges for a last axis of {value.shape[-1]}")
    out = b.add_const(tf_fake_quant(value, nudged, axis), f"{b.node_name}:0")
    if b.keep_weight_grid:
        b.params[out] = QuantParams(nudged["scale"], nudged["zero_point"] - 128, "int8", axis, narrow)
    elif not b.warned_weight_grid:
        b.warned_weight_grid = True
        log.warning("%s: quantize_schema uint8 stores weights per tensor as uint8 (MACE's rule), so the weight "
                    "grid learned by fake quantization cannot be kept: the fake-quantized weights are "
                    "re-quantized from their own min/max; use quantize_schema: int8 to keep it", b.path)
    return out
