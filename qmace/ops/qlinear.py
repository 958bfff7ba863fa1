"""ONNX Runtime's QLinearAdd and QLinearMul arithmetic: the definitions of quantized uint8 Add and Mul
(``qmace.ops.elementwise``), and of HardSwish's integer steps (``qmace.ops.activation``).

**QLinearAdd.**
ONNX Runtime fuses ``DequantizeLinear -> Add -> QuantizeLinear`` into QLinearAdd. On x86-64 with AVX2 its MLAS
kernel (``qladd_avx2.cpp``, compiled with FMA contraction) computes, in float32, with ``r_a = s_a / s_c``,
``r_b = s_b / s_c`` and the fixed part ``f = z_c - fma(r_a, z_a, r_b * z_b)``:

- two full operands: ``c = rint(fma(a, r_a, fma(b, r_b, f)))``;
- ``b`` one value for the whole run of the innermost axes (a scalar, or a per-channel operand broadcast over
  the spatial axes): ``f' = f + b * r_b`` (no fma), ``c = rint(fma(a, r_a, f'))``; an ``a`` broadcast that way
  swaps the roles (ORT passes the broadcast operand second);

then saturates to [0, 255]. ``rint`` rounds half to even. The reference computes exactly this (float32
products and sums, an fma as one rounding of the exact value, ``_fma``), so the onnxruntime backend and the
reference give the same codes (measured once: 300 random scale triples x all 65536 code pairs, 0 differing;
tests/test_ort_exact.py checks 21 triples and every broadcast form). Before, the reference was
``quantize(dequantize(a) + dequantize(b))`` in float32, one step apart on up to 0.01% of code pairs.
ONNX Runtime's ARM (NEON) kernel uses 22-bit fixed-point multipliers instead, and its portable C++
``rint((s_a (a - z_a) + s_b (b - z_b)) / s_c)``: on such builds the backends can still differ by a step at a
rounding tie. Other types (int8, 16-bit) and per-channel parameters keep the float definition.

**QLinearMul** (MLAS ``qlmul.cpp``, x86): ``c = rint(float32((a - z_a)(b - z_b)) * float32(float32(s_a s_b) / s_c)
+ z_c)``, saturated: the integer product, one float32 multiplier, the zero point added before rounding (a product
that lands on ``k + 0.5`` rounds to the even ``c``, not to the even ``c - z_c``). Before, the reference was
``quantize(dequantize(a) * dequantize(b))``, which rounds a near-tie differently (seen in PP-OCRv4 det's squeeze-excite
Mul on 2 of 8 images).
"""

from __future__ import annotations

import numpy as np

from qmace.qmath import QuantParams

__all__ = ["applies", "qlinear_add", "qlinear_mul", "uint8_per_tensor"]

_F = np.float32


def uint8_per_tensor(*qps: QuantParams | None) -> bool:
    """Whether every one of ``qps`` is uint8 per tensor: the codes ONNX Runtime's x86 QLinear kernels take and
    whose arithmetic qmace's reference states (Add, Mul, pools, HardSwish/HardSigmoid).

    Args:
        *qps: QuantParams, or None for an unquantized tensor.

    Returns:
        True when all are uint8 per-tensor parameters.
    """
    return all(q is not None and q.dtype == "uint8" and q.axis is None for q in qps)


def applies(a: np.ndarray, b: np.ndarray, qa: QuantParams | None, qb: QuantParams | None,
            qc: QuantParams | None, broadcast_any: bool = False) -> bool:
    """Whether :func:`qlinear_add` defines this Add: uint8 per-tensor codes in and out, numpy arrays, and a
    broadcast ORT runs with one of its three span kinds (see :func:`_form`).

    Args:
        a: the first operand's codes.
        b: the second's.
        qa: a's parameters (None: not quantized).
        qb: b's.
        qc: the output's.
        broadcast_any: any broadcast (Mul: its formula does not depend on the span kind); else one of
            :func:`_form`'s (Add).

    Returns:
        True when the ORT arithmetic defines the node.
    """
    if not uint8_per_tensor(qa, qb, qc):
        return False
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    return broadcast_any or _form(a.shape, b.shape) is not None


def _form(sa: tuple, sb: tuple) -> str | None:
    """``full`` (both operands vary along the innermost axis of the output that is longer than 1), ``b`` (b is
    constant along it: ORT's scalar-B span), ``a`` (a is), or None (every output axis has length 1)."""
    n = max(len(sa), len(sb))
    pa, pb = (1,) * (n - len(sa)) + tuple(sa), (1,) * (n - len(sb)) + tuple(sb)
    for da, db in zip(reversed(pa), reversed(pb)):
        if max(da, db) > 1:
            return "full" if da == db else ("b" if db == 1 else "a")
    return None


def _fma(x, y, z) -> np.ndarray:
    """float32 ``x * y + z`` rounded once, as the fma instruction: the float64 product of two float32 values is
    exact, and so is its float64 sum with ``z`` unless ``z``'s exponent exceeds the product's by more than 5 or
    falls below it by more than 29; then the float64 sum is rounded first, which changes the float32 result only
    when it lands exactly on a float32 rounding midpoint (about 2^-29 of such cases)."""
    return (np.asarray(x, np.float64) * np.asarray(y, np.float64) + np.asarray(z, np.float64)).astype(_F)


def qlinear_add(a: np.ndarray, b: np.ndarray, qa: QuantParams, qb: QuantParams, qc: QuantParams) -> np.ndarray:
    """uint8 codes of ``a + b`` as ONNX Runtime's x86-64 QLinearAdd computes them (module docstring).

    Args:
        a: uint8 codes of the first operand.
        b: uint8 codes of the second, broadcastable.
        qa: a's per-tensor parameters.
        qb: b's.
        qc: the output's.

    Returns:
        The broadcast output codes (uint8).
    """
    form = _form(a.shape, b.shape)
    if form == "a":  # ORT passes the broadcast operand as B
        a, b, qa, qb = b, a, qb, qa
    r_a = _F(_F(qa.scale) / _F(qc.scale))
    r_b = _F(_F(qb.scale) / _F(qc.scale))
    fixed = _F(_F(int(qc.zero_point)) - _fma(r_a, _F(int(qa.zero_point)), _F(r_b * _F(int(qb.zero_point)))))
    af, bf = np.asarray(a).astype(_F), np.asarray(b).astype(_F)
    if form == "full":
        v = _fma(af, r_a, _fma(bf, r_b, fixed))
    else:
        v = _fma(af, r_a, (fixed + bf * r_b).astype(_F))
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def qlinear_mul(a: np.ndarray, b: np.ndarray, qa: QuantParams, qb: QuantParams, qc: QuantParams) -> np.ndarray:
    """uint8 codes of ``a * b`` as ONNX Runtime's QLinearMul computes them (module docstring).

    Args:
        a: uint8 codes of the first operand.
        b: uint8 codes of the second, broadcastable.
        qa: a's per-tensor parameters.
        qb: b's.
        qc: the output's.

    Returns:
        The broadcast output codes (uint8).
    """
    ratio = _F(_F(_F(qa.scale) * _F(qb.scale)) / _F(qc.scale))
    prod = (np.asarray(a, np.int64) - int(qa.zero_point)) * (np.asarray(b, np.int64) - int(qb.zero_point))
    return np.clip(np.rint((prod.astype(_F) * ratio).astype(_F) + _F(int(qc.zero_point))), 0, 255).astype(np.uint8)
