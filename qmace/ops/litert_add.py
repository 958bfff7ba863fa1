"""LiteRT's integer ADD / SUB: the ``qm_arith="litert"`` variant of quantized Add and Sub.

Adds and Subs imported from a quantized ``.tflite`` carry the node attribute ``qm_arith = "litert"`` (set by the
TFLite frontend; kept by the IR, the model file and the ONNX lowering). Quantized with 8-bit per-tensor
parameters of one type on both inputs and the output, such a node computes the codes LiteRT computes, instead
of qmace's definition ``quantize(dequantize(a) + dequantize(b))`` (docs/quantization.md). Both were read from
the sources and checked against the LiteRT 2.3 interpreter on every code pair (tests/test_litert_add.py).

With ``r_a = fl32(s_a / s_y)`` and ``r_b = fl32(s_b / s_y)`` (float32 divisions):

**XNNPACK** (LiteRT's default CPU delegate; it takes the node when both ratios lie in ``[2^-10, 2^8)``;
``xnn_init_qs8_add_minmax_scalar_params`` + the ``qs8-vadd`` kernels)::

    e      = floor(log2(max(r_a, r_b)))            # the float32 exponent
    shift  = 20 - e                                 # in [12, 30]
    m_a    = rint(r_a * 2^shift)                    # exact scaling, then round half to even (< 2^21)
    m_b    = rint(r_b * 2^shift)                    # negated for SUB
    acc    = (q_a - z_a) m_a + (q_b - z_b) m_b + 2^(shift - 1)          # exact integers
    y      = clip(floor(acc / 2^shift) + z_y, qmin, qmax)               # rounds half up (toward +inf)

**TFLite's builtin kernel** (``kernels/add.cc`` Prepare + ``reference_integer_ops::AddFunc``; the optimized
kernels compute the same; LiteRT runs it where the delegate refuses the node, e.g. a ratio below ``2^-10``)::

    twice  = 2 max(s_a, s_b)                        # float64 from here
    M_a, e_a = QuantizeMultiplier(s_a / twice)      # likewise M_b, e_b; M_y, e_y of twice / (2^20 s_y)
    v_a    = RDBPOT(SRDHM((q_a - z_a) 2^20, M_a), -e_a)                 # likewise v_b
    y      = clip(RDBPOT(SRDHM(v_a ± v_b, M_y), -e_y) + z_y, qmin, qmax)

    QuantizeMultiplier(m): m = q 2^e with q in [0.5, 1); M = round_half_away(q 2^31); M == 2^31 -> M = 2^30, e + 1
    SRDHM(x, M) = trunc((x M + (x M >= 0 ? 2^30 : 1 - 2^30)) / 2^31)    # gemmlowp SaturatingRoundingDoublingHighMul
    RDBPOT(x, k) = x / 2^k rounded half away from zero                  # gemmlowp RoundingDivideByPOT

Both differ from qmace's float definition only near rounding ties (measured on all 65536 code pairs of 100
random scale triples: XNNPACK on 67 of 6.5 M pairs, the builtin kernel on 10), but a network amplifies one
step (benchmarks/README.md, "TFLite models"). A fused activation is a separate Relu/Clip node on the same
grid; its clamp is LiteRT's. Above ``2^8`` neither LiteRT path was reproduced (XNNPACK takes such nodes but
its SIMD kernels give other codes); the builtin formula is used there.

ONNX lowering (``onnx_nodes``): exact arithmetic between ``DequantizeLinear(codes, 1, z)`` (the centred
codes, exact in float32) and ``QuantizeLinear(y, 1, z_y)`` (which adds the zero point and saturates), so the
codes stay readable by DequantizeLinear alone (``int8_activations_as_uint8`` still applies). XNNPACK's branch
in float64: ``Floor(Sum(c_a (m_a 2^-shift), c_b (m_b 2^-shift), 1/2))``, every value a multiple of
``2^-shift`` below ``2^31`` of them, so nothing rounds (10 ONNX nodes). The builtin branch in int64: ONNX
integer ``Div`` truncates toward zero as C++ does (SRDHM); RDBPOT divides the magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qmace.ops.base import ARITH
from qmace.qmath import QuantParams

__all__ = ["ARITH", "LITERT", "TflParams", "XnnParams", "applies", "litert_add", "onnx_nodes", "tflite_params",
           "uses_xnnpack", "xnnpack_params"]

LITERT = "litert"  # its value for Adds/Subs imported from a .tflite
XNN_MIN_RATIO, XNN_MAX_RATIO = 2.0 ** -10, 2.0 ** 8
LEFT_SHIFT = 20  # TFLite's 8-bit ADD/SUB input shift


@dataclass(frozen=True)
class XnnParams:
    """XNNPACK's ADD parameters: ``y = floor(((q_a - z_a) a_multiplier + (q_b - z_b) b_multiplier
    + 2^(shift-1)) / 2^shift) + z_y`` (module docstring)."""
    a_multiplier: int
    b_multiplier: int
    shift: int


@dataclass(frozen=True)
class TflParams:
    """TFLite's builtin ADD parameters: ``(multiplier, exponent)`` per input and for the output (module
    docstring); the inputs are shifted left by ``LEFT_SHIFT`` first."""
    a: tuple[int, int]
    b: tuple[int, int]
    y: tuple[int, int]


def _ratios(s_a: float, s_b: float, s_y: float) -> tuple[np.float32, np.float32]:
    f = np.float32
    with np.errstate(all="ignore"):
        return f(f(s_a) / f(s_y)), f(f(s_b) / f(s_y))


def uses_xnnpack(s_a: float, s_b: float, s_y: float) -> bool:
    """Whether LiteRT's XNNPACK delegate takes the node: both ratios ``s / s_y`` (float32) in ``[2^-10, 2^8)``.

    Args:
        s_a: scale of input A.
        s_b: scale of input B.
        s_y: scale of the output.

    Returns:
        True for XNNPACK's arithmetic, False for TFLite's builtin kernel.
    """
    return all(XNN_MIN_RATIO <= float(r) < XNN_MAX_RATIO for r in _ratios(s_a, s_b, s_y))


def xnnpack_params(s_a: float, s_b: float, s_y: float, subtract: bool = False) -> XnnParams:
    """XNNPACK's multipliers and shift for the scales (float32 values).

    Args:
        s_a: scale of input A.
        s_b: scale of input B.
        s_y: scale of the output.
        subtract: SUB (B's multiplier negated).

    Returns:
        The XnnParams.
    """
    r_a, r_b = _ratios(s_a, s_b, s_y)
    exponent = math.frexp(float(max(r_a, r_b)))[1] - 1  # floor(log2(r)) of a normal float32
    shift = 20 - exponent
    m_a, m_b = (int(np.rint(np.float32(math.ldexp(float(r), shift)))) for r in (r_a, r_b))
    return XnnParams(m_a, -m_b if subtract else m_b, shift)


def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``m = M 2^(e - 31)`` with a Q0.31 ``M`` in [2^30, 2^31).

    Args:
        m: the real multiplier, ``0 < m < 1``.

    Returns:
        ``(M, e)``; ``(0, 0)`` when ``e < -31``.
    """
    q, e = math.frexp(m)
    fixed = math.floor(q * 2.0 ** 31 + 0.5)  # TfLiteRound of a positive value: half away from zero
    if fixed == 2 ** 31:
        fixed //= 2
        e += 1
    return (0, 0) if e < -31 else (int(fixed), e)


def tflite_params(s_a: float, s_b: float, s_y: float) -> TflParams:
    """TFLite's builtin ADD/SUB multipliers for the scales (``add.cc`` Prepare, float64 maths).

    Args:
        s_a: scale of input A.
        s_b: scale of input B.
        s_y: scale of the output.

    Returns:
        The TflParams.
    """
    a, b, y = (float(np.float32(s)) for s in (s_a, s_b, s_y))
    twice = 2.0 * max(a, b)
    return TflParams(quantize_multiplier(a / twice), quantize_multiplier(b / twice),
                     quantize_multiplier(twice / (float(1 << LEFT_SHIFT) * y)))


def _srdhm(x: np.ndarray, multiplier: int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul(x, M)`` on int64 arrays (|x| < 2^31, 0 <= M < 2^31: no
    saturation case)."""
    p = x * np.int64(multiplier)
    s = p + np.where(p >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    return np.where(s >= 0, s >> 31, -((-s) >> 31))  # C++ division: truncation toward zero


def _rdbpot(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT(x, k)``: ``x / 2^k`` rounded half away from zero."""
    if exponent <= 0:
        return x
    mag = (np.abs(x) + np.int64(1 << (exponent - 1))) >> exponent
    return np.where(x < 0, -mag, mag)


def applies(in_qp: list, out_qp: list) -> bool:
    """Whether the LiteRT kernel computes this node: two inputs and one output, all 8-bit per tensor of one
    type (otherwise the node keeps qmace's float definition).

    Args:
        in_qp: QuantParams per input (None for an unquantized one).
        out_qp: QuantParams per output.

    Returns:
        True when ``litert_add`` applies.
    """
    qps = [*in_qp[:2], *out_qp[:1]]
    return (len(in_qp) == 2 and len(out_qp) == 1 and all(q is not None for q in qps)
            and len({q.dtype for q in qps}) == 1 and qps[0].dtype in ("int8", "uint8")
            and not any(q.is_per_channel for q in qps))


def litert_add(q_a: np.ndarray, q_b: np.ndarray, p_a: QuantParams, p_b: QuantParams, p_y: QuantParams,
               subtract: bool = False) -> np.ndarray:
    """LiteRT's integer ADD (or SUB) on codes: XNNPACK's arithmetic where the delegate takes the node, else
    TFLite's builtin kernel (module docstring). Broadcasts numpy-style.

    Args:
        q_a: codes of A.
        q_b: codes of B.
        p_a: A's parameters.
        p_b: B's parameters.
        p_y: the output's parameters (its dtype, zero point and range).
        subtract: compute ``A - B``.

    Returns:
        The output codes (``p_y.dtype``).
    """
    s_a, s_b, s_y = (float(p.scale) for p in (p_a, p_b, p_y))
    c_a = np.asarray(q_a, np.int64) - int(p_a.zero_point)
    c_b = np.asarray(q_b, np.int64) - int(p_b.zero_point)
    if uses_xnnpack(s_a, s_b, s_y):
        xp = xnnpack_params(s_a, s_b, s_y, subtract)
        y = (c_a * xp.a_multiplier + c_b * xp.b_multiplier + (1 << (xp.shift - 1))) >> xp.shift
    else:
        tp = tflite_params(s_a, s_b, s_y)
        v_a = _rdbpot(_srdhm(c_a << LEFT_SHIFT, tp.a[0]), -tp.a[1])
        v_b = _rdbpot(_srdhm(c_b << LEFT_SHIFT, tp.b[0]), -tp.b[1])
        y = _rdbpot(_srdhm(v_a - v_b if subtract else v_a + v_b, tp.y[0]), -tp.y[1])
    return np.clip(y + int(p_y.zero_point), p_y.qmin, p_y.qmax).astype(p_y.dtype)


# ---- ONNX lowering -----------------------------------------------------------------------------------------

class _Emitter:
    """Collects int64 ONNX nodes and scalar initializers named after one IR node."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}__{hint}{self._n}"

    def const(self, value, dtype=np.int64) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def srdhm(self, x: str, multiplier: int) -> str:
        p = self.op("Mul", [x, self.const(multiplier)])
        nudge = self.op("Where", [self.op("Less", [p, self.const(0)]), self.const(1 - (1 << 30)), self.const(1 << 30)])
        return self.op("Div", [self.op("Add", [p, nudge]), self.const(1 << 31)])  # ONNX integer Div truncates

    def rdbpot(self, x: str, exponent: int) -> str:
        if exponent <= 0:
            return x
        mag = self.op("Div", [self.op("Add", [self.op("Abs", [x]), self.const(1 << (exponent - 1))]),
                              self.const(1 << exponent)])
        return self.op("Where", [self.op("Less", [x, self.const(0)]), self.op("Neg", [mag]), mag])


def onnx_nodes(node_name: str, codes: list[str], zero_points: list[str], out_codes: str, out_zero_point: str,
               p_a: QuantParams, p_b: QuantParams, p_y: QuantParams, subtract: bool = False) -> tuple[list, list]:
    """ONNX nodes computing ``litert_add``'s codes exactly (int64 arithmetic; module docstring).

    Args:
        node_name: the IR node's name (prefix of the new names).
        codes: the ONNX names of A's and B's codes.
        zero_points: the names of their zero-point initializers.
        out_codes: the name the output codes are written to.
        out_zero_point: the name of the output's zero-point initializer.
        p_a: A's parameters.
        p_b: B's parameters.
        p_y: the output's parameters.
        subtract: SUB.

    Returns:
        ``(NodeProtos, initializers)``.
    """
    e = _Emitter(node_name)
    one = e.const(1.0, np.float32)
    centred = [e.op("DequantizeLinear", [c, one, z]) for c, z in zip(codes, zero_points)]  # q - z, exact
    s_a, s_b, s_y = (float(p.scale) for p in (p_a, p_b, p_y))
    if uses_xnnpack(s_a, s_b, s_y):
        # float64, exact: (q - z) m 2^-shift has < 30 significant bits on the grid 2^-shift, so the sum
        # with 1/2 is exact and Floor gives floor(acc / 2^shift) (fewer nodes than int64 with offsets)
        xp = xnnpack_params(s_a, s_b, s_y, subtract)
        terms = [e.op("Mul", [e.op("Cast", [c], to=TensorProto.DOUBLE), e.const(math.ldexp(m, -xp.shift), np.float64)])
                 for c, m in zip(centred, (xp.a_multiplier, xp.b_multiplier))]
        y = e.op("Floor", [e.op("Sum", [*terms, e.const(0.5, np.float64)])])
    else:
        tp = tflite_params(s_a, s_b, s_y)
        v = [e.rdbpot(e.srdhm(e.op("Mul", [e.op("Cast", [c], to=TensorProto.INT64), e.const(1 << LEFT_SHIFT)]), m), -k)
             for c, (m, k) in zip(centred, (tp.a, tp.b))]
        y = e.rdbpot(e.srdhm(e.op("Sub" if subtract else "Add", v), tp.y[0]), -tp.y[1])
    # QuantizeLinear(y, 1, z_y) adds the zero point and saturates to the output type, exactly (y is an integer)
    e.nodes.append(helper.make_node("QuantizeLinear", [e.op("Cast", [y], to=TensorProto.FLOAT), one, out_zero_point],
                                    [out_codes], name=e.name("q")))
    return e.nodes, e.inits
