"""The one numeric definition of qmace's 8-bit quantization (see docs/quantization.md).

The numpy reference kernels, the ONNX Runtime fast path and the QAT simulation all follow these formulas.
They are ONNX Runtime's arithmetic, so that the fast path is bit-exact with the reference:

- ``quantize(x)   = clip(rint(float32(x) / scale) + zero_point, qmin, qmax)``
  float32 division, round half to even (``np.rint``), as ORT's QuantizeLinear.
- ``dequantize(q) = float32(q - zero_point) * scale`` (float32 product), as ORT's DequantizeLinear.
- ``requantize(acc) = clip(rint(float32(acc) * M) + zero_point_y, qmin, qmax)`` with the float32 multiplier
  ``M = float32(float32(s_x * s_w) / s_y)``, as ORT's QLinearConv / QLinearMatMul (MlasRequantizeOutput).

Scales are float32, zero points int32 arrays; per-channel parameters are 1-D arrays applied along ``axis``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from qmace.errors import QuantizationError, RangeError

__all__ = [
    "MIN_SCALE",
    "SCHEMAS",
    "Schema",
    "NudgedRange",
    "QuantParams",
    "Range",
    "bias_params",
    "dequantize",
    "dtype_bounds",
    "nudged_range",
    "params_asymmetric",
    "params_asymmetric_weights",
    "params_symmetric",
    "quantize",
    "quantize_bias",
    "requant_multiplier",
    "requantize",
    "round_to_codes",
    "weight_params",
]


@dataclass(frozen=True)
class Range:
    """A closed float interval [min, max] of a tensor's values; both finite, min <= max."""

    min: float
    max: float

    def __post_init__(self) -> None:
        lo, hi = float(self.min), float(self.max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RangeError(f"range [{lo!r}, {hi!r}] is not finite")
        if lo > hi:
            raise RangeError(f"range [{lo!r}, {hi!r}] has min > max")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)


#: Smallest scale qmace ever produces (2**-40, about 9.1e-13). Ranges narrower than 255 * MIN_SCALE are
#: widened to it, so that scales, bias scales (s_x * s_w >= 2**-80) and requantization multipliers stay
#: normal float32 numbers: never zero, never subnormal.
MIN_SCALE = float(2.0**-40)

_DTYPES: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),  # 16-bit activations (docs/quantization.md, "16-bit activations")
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}


def dtype_bounds(dtype: str, narrow: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of an integer code type; ``narrow`` drops the most negative code of a signed type
    (int8 -> [-127, 127], the symmetric weight range), and is a no-op for uint8.

    Args:
        dtype: ``"uint8"``, ``"int8"``, ``"int32"`` ...
        narrow: use the narrow (symmetric) range.

    Returns:
        ``(qmin, qmax)``.

    Raises:
        QuantizationError: an unsupported dtype.
    """
    if dtype not in _DTYPES:
        raise QuantizationError(f"unsupported quantized dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    qmin, qmax = _DTYPES[dtype]
    if narrow and qmin < 0:
        qmin += 1
    return qmin, qmax


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Affine quantization parameters: ``real = scale * (code - zero_point)``.

    ``scale`` float32 and ``zero_point`` int32 arrays of equal shape: () per tensor, or (C,) per channel,
    applied along ``axis`` of the quantized tensor (``axis`` is None exactly when per tensor).
    ``narrow_range`` clips signed codes to [-qmax, qmax] (symmetric int8 weights use [-127, 127]).
    The arrays are made read-only.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None
    narrow_range: bool = False

    def __post_init__(self) -> None:
        scale = np.array(self.scale, dtype=np.float32)
        zero_point = np.array(self.zero_point, dtype=np.int64)
        qmin, qmax = dtype_bounds(self.dtype, self.narrow_range)
        if scale.shape != zero_point.shape:
            raise QuantizationError(
                f"scale shape {scale.shape} differs from zero_point shape {zero_point.shape}"
            )
        if self.axis is None and scale.ndim != 0:
            raise QuantizationError(f"per-tensor params need shape (), got {scale.shape} with axis=None")
        if self.axis is not None and scale.ndim != 1:
            raise QuantizationError(f"per-channel params (axis={self.axis}) need shape (C,), got {scale.shape}")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise QuantizationError(f"scale must be finite and > 0, got {scale.tolist()}")
        if np.any(zero_point < qmin) or np.any(zero_point > qmax):
            raise QuantizationError(
                f"zero_point {zero_point.tolist()} outside [{qmin}, {qmax}] of {self.dtype}"
            )
        zero_point = zero_point.astype(np.int32)
        scale.setflags(write=False)
        zero_point.setflags(write=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def qmin(self) -> int:
        """The smallest code (``dtype_bounds(dtype, narrow_range)[0]``)."""
        return dtype_bounds(self.dtype, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        """The largest code (``dtype_bounds(dtype, narrow_range)[1]``)."""
        return dtype_bounds(self.dtype, self.narrow_range)[1]

    @property
    def is_per_channel(self) -> bool:
        """True when there is one scale/zero point per channel along ``axis``."""
        return self.axis is not None

    @property
    def is_symmetric(self) -> bool:
        """True when every zero point is 0."""
        return bool(np.all(self.zero_point == 0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantParams):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.axis == other.axis
            and self.narrow_range == other.narrow_range
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self) -> int:
        return hash((self.dtype, self.axis, self.narrow_range, self.scale.tobytes(), self.zero_point.tobytes()))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict. Scales are written as Python floats: a float32 widened to float64 is exact and
        ``json`` writes floats with ``repr``, so the round trip is exact."""
        return {
            "dtype": self.dtype,
            "axis": self.axis,
            "narrow_range": self.narrow_range,
            "scale": [float(s) for s in self.scale.reshape(-1)],
            "zero_point": [int(z) for z in self.zero_point.reshape(-1)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantParams:
        """Inverse of :meth:`to_json`; scales may also be ``float.hex`` strings.

        Args:
            data: a dict as written by ``to_json``.

        Returns:
            The QuantParams.

        Raises:
            QuantizationError: missing keys, wrong types or invalid values (scale <= 0, zero point out of range).
        """
        try:
            scale = [float.fromhex(s) if isinstance(s, str) else float(s) for s in data["scale"]]
            zero_point = [int(z) for z in data["zero_point"]]
            axis = data.get("axis")
            dtype = data["dtype"]
            narrow = bool(data.get("narrow_range", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizationError(f"malformed quantization params {data!r}: {exc}") from exc
        if axis is None:
            if len(scale) != 1 or len(zero_point) != 1:
                raise QuantizationError(f"per-tensor params need one scale and one zero point: {data!r}")
            return cls(np.float32(scale[0]), np.int32(zero_point[0]), dtype, None, narrow)
        return cls(np.array(scale, np.float32), np.array(zero_point, np.int32), dtype, int(axis), narrow)


class NudgedRange(NamedTuple):
    """The real interval the codes cover exactly: [(qmin - zp) * scale, (qmax - zp) * scale] (float32)."""

    min: np.ndarray
    max: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# Choosing parameters


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C/C++ ``std::round`` (half away from zero), exact for every float64 (no ``floor(x + 0.5)`` error)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    r = np.floor(a)
    r = r + (a - r >= 0.5)
    return np.copysign(r, x)


def _finalize_scale(scale64: np.ndarray, degenerate: np.ndarray) -> np.ndarray:
    """float64 scale -> float32: degenerate ranges get 1.0, tiny ones MIN_SCALE (see MIN_SCALE)."""
    scale64 = np.where(degenerate, 1.0, np.maximum(scale64, MIN_SCALE))
    scale = scale64.astype(np.float32)
    if not np.all(np.isfinite(scale)):
        raise QuantizationError(f"range too large for a float32 scale: {scale64.tolist()}")
    return scale


def params_asymmetric(
    rmin: Any, rmax: Any, dtype: str = "uint8", axis: int | None = None
) -> QuantParams:
    """Asymmetric parameters from a real range (MACE's uint8 rule), per tensor or per channel.

    The range is widened to contain 0: ``min = min(rmin, 0)``, ``max = max(rmax, 0)``. Then
    ``scale = float32((max - min) / (qmax - qmin))`` (float64 arithmetic) and
    ``zero_point = clip(qmin + round_half_away(-min / scale), qmin, qmax)``, so 0.0 is a code exactly,
    an all-positive range gets ``zero_point = qmin`` and an all-negative one ``qmax``.
    ``max == min == 0`` gives ``scale = 1.0``; scales are never below MIN_SCALE (a range that narrow gets
    ``zero_point = qmin + round_half_away((qmax - qmin) * -min / (max - min))``, i.e. it is widened
    around its zero point's relative position).
    ``rmin``/``rmax`` are scalars, or 1-D arrays with ``axis`` set for per-channel parameters.

    Args:
        rmin: the range's minimum (scalar, or (C,) per channel).
        rmax: the range's maximum, same shape.
        dtype: the code type (``"uint8"``, ``"int8"``).
        axis: the channel axis for per-channel parameters, None per tensor.

    Returns:
        The QuantParams.

    Raises:
        QuantizationError: shapes that do not fit ``axis``, a non-finite range, min > max, or a range too
            large for a float32 scale.
    """
    lo = np.asarray(rmin, dtype=np.float64)
    hi = np.asarray(rmax, dtype=np.float64)
    if lo.shape != hi.shape or (axis is None) != (lo.ndim == 0) or lo.ndim > 1:
        raise QuantizationError(
            f"rmin/rmax shapes {lo.shape}/{hi.shape} do not fit axis={axis} (scalars per tensor, (C,) per channel)"
        )
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise QuantizationError(f"range is not finite: min={lo.tolist()} max={hi.tolist()}")
    if np.any(lo > hi):
        raise QuantizationError(f"range has min > max: min={lo.tolist()} max={hi.tolist()}")
    qmin, qmax = dtype_bounds(dtype)
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    scale64 = (hi - lo) / float(qmax - qmin)
    scale = _finalize_scale(scale64, hi == lo)
    zp = qmin + _round_half_away(-lo / scale.astype(np.float64))
    # a range floored to MIN_SCALE keeps its zero point's relative position (all-negative stays at qmax)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = qmin + _round_half_away((qmax - qmin) * (-lo / (hi - lo)))
    zp = np.where((scale64 < MIN_SCALE) & (hi > lo), relative, zp)
    zp = np.clip(zp, qmin, qmax).astype(np.int32)
    return QuantParams(scale, zp, dtype, axis)


def _reduce_axes(w: np.ndarray, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(w.ndim))
    axis = _normalize_axis(axis, w.ndim)
    return tuple(i for i in range(w.ndim) if i != axis)


def params_symmetric(w: Any, axis: int | None, dtype: str = "int8", bits: int = 8) -> QuantParams:
    """Symmetric (zero point 0, narrow range) parameters from a weight array, per channel along ``axis``
    or per tensor when ``axis`` is None: ``scale = float32(max|w| / qmax)`` (float64 arithmetic) with
    ``qmax = 2**(bits-1) - 1`` (127 for 8 bits, 63 for 7 bits), codes clipped to [-127, 127] (the codes of
    ``bits`` < 8 stay within [-qmax, qmax] by construction; rounding choices such as AdaRound's can reach
    ``qmax + 1``). An all-zero channel gets scale 1.0.

    Args:
        w: the weight array.
        axis: its output-channel axis, or None for one scale.
        dtype: the code type (int8).
        bits: weight bits (8, or 7 for ``int8_w7``).

    Returns:
        The QuantParams (narrow range).

    Raises:
        QuantizationError: an unsigned dtype, bits outside [2, 8], non-finite or empty weights, or an invalid
            axis.
    """
    if dtype_bounds(dtype)[0] >= 0:
        raise QuantizationError(f"symmetric quantization needs a signed dtype, got {dtype!r}")
    if not 2 <= bits <= 8:
        raise QuantizationError(f"symmetric weight bits must be in [2, 8], got {bits}")
    w = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        raise QuantizationError("weights contain NaN or Inf; cannot choose a scale")
    if w.size == 0:
        raise QuantizationError("cannot choose a scale for an empty weight tensor")
    axis = None if axis is None else _normalize_axis(axis, w.ndim)
    amax = np.max(np.abs(w), axis=_reduce_axes(w, axis))
    qmax = min(dtype_bounds(dtype, narrow=True)[1], 2 ** (bits - 1) - 1)
    scale = _finalize_scale(amax / float(qmax), amax == 0)
    return QuantParams(scale, np.zeros(scale.shape, np.int32), dtype, axis, narrow_range=True)


#: The quantization schemas (``quantize_schema``) and how each chooses weight parameters; activations are
#: asymmetric per-tensor uint8 in all of them.
#: - ``uint8`` (MACE's default): asymmetric per-tensor uint8 weights;
#: - ``int8``: symmetric per-channel int8 weights, codes in [-127, 127];
#: - ``int8_w7``: the same with 7-bit weights, codes in [-63, 63] (ONNX Runtime's ``reduce_range``). The
#:   model is still int8 (same file format and kernels on every device), but no pair of u8 x s8 products can
#:   exceed int16 (255 * 64 * 2 = 32640 < 32767), so x86 kernels built on ``vpmaddubsw`` (AVX2 without VNNI)
#:   are exact on it, at the cost of one bit of weight resolution.
class Schema(StrEnum):
    """The quantization schemas (comment above); string-valued for YAML and the CLI: ``Schema.INT8 == "int8"``."""
    UINT8 = "uint8"
    INT8 = "int8"
    INT8_W7 = "int8_w7"


SCHEMAS = tuple(s.value for s in Schema)
_SYMMETRIC_WEIGHT_BITS = {Schema.INT8: 8, Schema.INT8_W7: 7}


def weight_params(w: Any, axis: int | None, schema: str) -> QuantParams:
    """The parameters ``schema`` gives weight ``w`` (``axis``: its output-channel axis, used by the
    per-channel schemas); the one place the quantizer, bias correction, AdaRound and QAT take them from.

    Args:
        w: the float weight array.
        axis: its output-channel axis.
        schema: ``"uint8"`` (MACE's asymmetric per-tensor weights), ``"int8"`` (per channel, symmetric) or
            ``"int8_w7"`` (7-bit symmetric per channel).

    Returns:
        The weight's QuantParams.

    Raises:
        QuantizationError: an unknown schema or an empty weight.
    """
    if schema == Schema.UINT8:
        return params_asymmetric_weights(w, None, "uint8")
    if schema not in _SYMMETRIC_WEIGHT_BITS:
        raise QuantizationError(f"unknown quantize_schema {schema!r} (choose from {', '.join(SCHEMAS)})")
    return params_symmetric(w, axis, "int8", bits=_SYMMETRIC_WEIGHT_BITS[schema])


def params_asymmetric_weights(w: Any, axis: int | None = None, dtype: str = "uint8") -> QuantParams:
    """MACE-style asymmetric weight parameters from ``w.min()``/``w.max()`` (per channel along ``axis``
    when given), with the rule of :func:`params_asymmetric`.

    Args:
        w: the float weight array.
        axis: the channel axis, or None per tensor.
        dtype: the code type.

    Returns:
        The QuantParams.

    Raises:
        QuantizationError: an empty weight tensor (or see :func:`params_asymmetric`).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        raise QuantizationError("cannot choose a scale for an empty weight tensor")
    axis = None if axis is None else _normalize_axis(axis, w.ndim)
    axes = _reduce_axes(w, axis)
    return params_asymmetric(np.min(w, axis=axes), np.max(w, axis=axes), dtype, axis)


def bias_params(x_qp: QuantParams, w_qp: QuantParams) -> QuantParams:
    """int32 bias parameters: ``scale = float32(s_x) * float32(s_w)`` (float32 product), zero point 0.
    Per channel (axis 0 of the 1-D bias) when the weights are per channel.

    Args:
        x_qp: the (per-tensor) input activation's parameters.
        w_qp: the weight's parameters.

    Returns:
        The int32 bias QuantParams.

    Raises:
        QuantizationError: per-channel activation parameters.
    """
    if x_qp.is_per_channel:
        raise QuantizationError("activation params must be per tensor to derive a bias scale")
    scale = np.multiply(x_qp.scale, w_qp.scale, dtype=np.float32)
    axis = 0 if w_qp.is_per_channel else None
    return QuantParams(scale, np.zeros(scale.shape, np.int32), "int32", axis)


def quantize_bias(b: Any, x_qp: QuantParams, w_qp: QuantParams) -> np.ndarray:
    """int32 bias codes as ORT's quantizer writes them:
    ``clip(rint(float64(b) / float64(bias_scale)), int32)`` with the float32 bias scale of
    :func:`bias_params`. Saturates instead of wrapping.

    Args:
        b: the float bias.
        x_qp: the input activation's parameters.
        w_qp: the weight's parameters.

    Returns:
        The int32 bias codes.

    Raises:
        QuantizationError: as for :func:`bias_params`, or a bias whose length is not the weights' channel count.
    """
    qp = bias_params(x_qp, w_qp)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    if qp.is_per_channel and (b64.ndim != 1 or b64.shape[0] != qp.scale.shape[0]):
        raise QuantizationError(f"bias shape {b64.shape} does not match {qp.scale.shape[0]} weight channels")
    codes = np.rint(b64 / qp.scale.astype(np.float64))
    return np.clip(codes, qp.qmin, qp.qmax).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Applying parameters


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise QuantizationError(f"axis {axis} out of range for a tensor of rank {ndim}")
    return axis % ndim


def _along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape per-channel values (C,) to broadcast along ``axis`` of a rank-``ndim`` tensor."""
    if values.ndim == 0:
        return values
    if axis is None:
        raise QuantizationError("per-channel values need a channel axis")
    axis = _normalize_axis(axis, ndim)
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def _check_channels(x: np.ndarray, qp: QuantParams) -> None:
    if qp.is_per_channel:
        axis = _normalize_axis(qp.axis, x.ndim)  # type: ignore[arg-type]
        if x.shape[axis] != qp.scale.shape[0]:
            raise QuantizationError(
                f"tensor of shape {x.shape} has {x.shape[axis]} channels on axis {qp.axis}, "
                f"params have {qp.scale.shape[0]}"
            )


def quantize(x: Any, qp: QuantParams) -> np.ndarray:
    """``clip(rint(float32(x) / scale) + zero_point, qmin, qmax)`` as ``qp.dtype`` codes.

    float32 division, round half to even, saturation (ORT QuantizeLinear). +-Inf saturate; NaN maps to
    qmin, as ORT's x86 kernels do (their float clamp returns the bound for NaN).

    Args:
        x: real values.
        qp: the parameters (per channel along ``qp.axis``).

    Returns:
        The codes, dtype ``qp.dtype``.

    Raises:
        QuantizationError: per-channel parameters that do not fit ``x``'s shape.
    """
    x = np.asarray(x, dtype=np.float32)
    _check_channels(x, qp)
    scale = _along(qp.scale, x.ndim, qp.axis)
    zp = _along(qp.zero_point, x.ndim, qp.axis)
    return round_to_codes(x, scale, zp, qp.qmin, qp.qmax).astype(qp.dtype)


def round_to_codes(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int) -> np.ndarray:
    """The rounding of :func:`quantize` with scales and zero points already shaped to broadcast against ``x``:
    ``clip(rint(float32(x) / float32(scale)) + zero_point, qmin, qmax)`` (NaN -> qmin), as float64 codes.
    For callers that hold weights in another layout (AdaRound's (G, M, K) rows).

    Args:
        x: real values.
        scale: float32 scales broadcasting against ``x``.
        zero_point: zero points broadcasting against ``x``.
        qmin, qmax: the code range.

    Returns:
        The codes (float64, integer-valued).
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(x / np.asarray(scale, np.float32)).astype(np.float64) + np.asarray(zero_point, np.float64)
    q = np.where(np.isnan(q), qmin, q)
    return np.clip(q, qmin, qmax)


def dequantize(q: Any, qp: QuantParams) -> np.ndarray:
    """``float32(q - zero_point) * scale`` in float32 (ORT DequantizeLinear).

    Args:
        q: integer codes.
        qp: their parameters (per channel along ``qp.axis``).

    Returns:
        float32 real values.

    Raises:
        QuantizationError: non-integer codes, or per-channel parameters that do not fit ``q``'s shape.
    """
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise QuantizationError(f"dequantize needs integer codes, got {q.dtype}")
    _check_channels(q, qp)
    zp = _along(qp.zero_point, q.ndim, qp.axis)
    centered = (q.astype(np.int64) - zp).astype(np.float32)
    return centered * _along(qp.scale, q.ndim, qp.axis)


def nudged_range(qp: QuantParams) -> NudgedRange:
    """The representable real interval ``[(qmin - zp) * scale, (qmax - zp) * scale]`` (float32, shaped
    like ``qp.scale``): dequantize(qmin) and dequantize(qmax).

    Args:
        qp: the parameters.

    Returns:
        NudgedRange ``(min, max)``.
    """
    lo = (np.int64(qp.qmin) - qp.zero_point).astype(np.float32) * qp.scale
    hi = (np.int64(qp.qmax) - qp.zero_point).astype(np.float32) * qp.scale
    return NudgedRange(lo, hi)


def requant_multiplier(x_qp: QuantParams, w_qp: QuantParams, y_qp: QuantParams) -> np.ndarray:
    """float32 multiplier ``M = (s_x * s_w) / s_y``, each operation rounded to float32 in this order, as
    ORT's QLinearConv/QLinearMatMul compute it. Shape () or (C,) (per-channel weights).

    Args:
        x_qp: the input activation's parameters.
        w_qp: the weight's parameters.
        y_qp: the output's parameters.

    Returns:
        The float32 multiplier ``M``.
    """
    if x_qp.is_per_channel or y_qp.is_per_channel:
        raise QuantizationError("input and output activation params must be per tensor")
    product = np.multiply(x_qp.scale, w_qp.scale, dtype=np.float32)
    return np.divide(product, y_qp.scale, dtype=np.float32)


def requantize(
    acc_int32: Any, multiplier: Any, y_qp: QuantParams, axis_of_channels: int | None = None
) -> np.ndarray:
    """Integer accumulator (bias already added) -> output codes, as ORT's MlasRequantizeOutput:
    ``clip(rint(float32(acc) * M) + zero_point_y, qmin, qmax)``; ``float32(acc)`` rounds to nearest even,
    the product is one float32 multiplication, rint rounds half to even.

    ``multiplier`` is float32, shape () or (C,); a per-channel multiplier applies along
    ``axis_of_channels`` of ``acc_int32`` (e.g. 1 for NCHW conv outputs, -1 for MatMul outputs).
    Fused ReLU/ReLU6 act only through ``y_qp`` (its range starts at 0, so its zero point is qmin).

    Args:
        acc_int32: the integer accumulator (any integer dtype).
        multiplier: ``M`` from :func:`requant_multiplier`.
        y_qp: the output's per-tensor parameters.
        axis_of_channels: the channel axis of ``acc_int32`` for a per-channel multiplier.

    Returns:
        The output codes, dtype ``y_qp.dtype``.

    Raises:
        QuantizationError: a non-integer accumulator, a multiplier of rank > 1, per-channel output
            parameters, or a per-channel multiplier without ``axis_of_channels``.
    """
    acc = np.asarray(acc_int32)
    if not np.issubdtype(acc.dtype, np.integer):
        raise QuantizationError(f"requantize needs an integer accumulator, got {acc.dtype}")
    m = np.asarray(multiplier, dtype=np.float32)
    if m.ndim > 1:
        raise QuantizationError(f"multiplier must have shape () or (C,), got {m.shape}")
    if y_qp.is_per_channel:
        raise QuantizationError("output params of a requantization must be per tensor")
    if m.ndim == 1 and axis_of_channels is None:
        raise QuantizationError("a per-channel multiplier needs axis_of_channels")
    m = _along(m, acc.ndim, axis_of_channels)
    y = np.rint(acc.astype(np.float32) * m).astype(np.float64) + float(y_qp.zero_point)
    return np.clip(y, y_qp.qmin, y_qp.qmax).astype(y_qp.dtype)

