"""Elementwise ops (ONNX opset 21 semantics): arithmetic and unary maths (activations: ``qmace.ops.activation``).

Binary ops broadcast numpy-style (multidirectional), PRelu's slope broadcasts to X (unidirectional).
Dtypes follow ONNX Runtime: float32 stays float32, integer arithmetic stays in the input's integer type
(wrapping on overflow); integer Div truncates toward zero (C++), integer Pow goes through float64 ``pow``
then truncates, as ORT's kernel does.

Transcendental functions (Exp, Log, Tanh, Sigmoid, Erf, Gelu) are evaluated in float64 and rounded once to
the input dtype, so they are within 1 float32 ulp of the exact value (ORT's MLAS approximations are within a
few ulps; tests assert 1e-6 absolute for Erf/Gelu).

Erf uses W. J. Cody's rational Chebyshev approximations (Math. Comp. 23, 1969; the CALERF routine),
relative error below 1e-16 in float64, vectorised over three intervals of |x|.

Quantization traits (see ``qmace.ops.base``):
- Add, Mul: ``Kernel.FLOAT`` (ORT's QLinearAdd / QLinearMul), range from statistics; a uint8 Add or Mul is
  defined by QLinearAdd's / QLinearMul's own float32 arithmetic (``qmace.ops.qlinear``).
- Add, Sub with ``qm_arith="litert"`` (imported from a ``.tflite``): LiteRT's integer ADD/SUB on 8-bit
  per-tensor codes (``qmace.ops.litert_add``: numpy kernel and exact float64/int64 ONNX lowering); such a
  Sub is ``Kernel.FLOAT`` (``kernel_for``), every other Sub has no integer kernel.
- Add, Sub: ``range_without_stats = RangeRule.INTERVAL``, used only when a tensor has no calibration
  statistics: the output range is then the interval sum/difference of the input ranges (``interval``:
  [a0 + b0, a1 + b1] for Add, [a0 - b1, a1 - b0] for Sub). Other ops have no such fallback (None).
- Add, Sub, Mul, Div: ``const_data_inputs`` (a float constant operand is data with its own range).
- Sigmoid: ``Kernel.FLOAT`` with fixed range (0, 1); Tanh: fixed range (-1, 1) but no integer kernel.
- Relu, Clip: ``Kernel.FLOAT`` and ``fusable_activation`` (a producing Conv/Gemm absorbs them,
  ``fusion_attrs``: Clip only with constant scalar bounds).
- Relu and same-shape Add are ``channelwise``; sign traits: Relu/Sigmoid/HardSigmoid non-negative,
  Add/Mul keep the sign of all inputs, Clip is non-negative when its lower bound is >= 0 or its input is.
- LeakyRelu: ``Kernel.FLOAT`` (ORT's QLinearLeakyRelu).
- Gelu, HardSwish: ``Kernel.FLOAT``, range from statistics; HardSigmoid: ``Kernel.FLOAT`` with the fixed
  range (0, 1). ONNX Runtime has no integer kernel for them (``ort_kernel`` says so): the lowered
  DequantizeLinear -> op -> QuantizeLinear runs in float (one elementwise island), except uint8 HardSwish /
  HardSigmoid whose parameters qmace chose, which run as QLinearAdd (+ QLinearMul) (``qmace.ops.activation``,
  ``Op.integer_arith``). The passes
  ``qmace.passes.decomposed`` and ``qmace.passes.hardswish`` fuse their decomposed spellings into them, so a
  HardSwish costs one island instead of four 8-bit round trips.
- Everything else has no integer kernel (float fallback between DequantizeLinear/QuantizeLinear).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node
from qmace.ops import litert_add, qlinear
from qmace.ops.base import Kernel, Op, RangeRule, Sign, register
from qmace.qmath import Range


def optional_input(inputs: list[np.ndarray | None], index: int) -> np.ndarray | None:
    """Input ``index``, or None when it is omitted ("" in the node) or beyond the list.

    Args:
        inputs: a node's input arrays (None for omitted ones).
        index: the input's position.

    Returns:
        The array or None.
    """
    return inputs[index] if index < len(inputs) else None


def _as_dtype(y: Any, dtype: np.dtype) -> np.ndarray:
    """An ndarray of ``dtype`` (numpy returns scalars for 0-d results; ONNX wants arrays)."""
    return np.asarray(y).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------------
# erf: W. J. Cody's rational approximations

_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01, 2.98635138197400131e02,
          8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03,
          2.15311535474403846e-8)
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02, 1.62138957456669019e03,
          3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03, 1.23033935480374942e03)
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2,
          6.58749161529837803e-4, 1.63153871373020978e-2)
_ERF_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1, 6.05183413124413191e-2,
          2.33520497626869185e-3)
_SQRT_1_PI = 5.6418958354775628695e-1


def _erfc_tail(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``exp(-y^2) * r`` with y^2 split as ysq^2 + del (ysq = y truncated to 1/16) to keep exp exact."""
    ysq = np.trunc(y * 16.0) / 16.0
    dl = (y - ysq) * (y + ysq)
    return np.exp(-ysq * ysq) * np.exp(-dl) * r


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) in float64 (|error| < 1e-16 relative), by Cody's approximation on three intervals.

    |x| <= 0.46875: erf directly; 0.46875 < |x| <= 4 and |x| > 4: erfc, then
    ``erf = sign(x) * (1 - erfc(|x|))``. NaN stays NaN.

    Args:
        x: any real array.

    Returns:
        erf(x) as float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.abs(x)
    out = np.empty_like(x)

    small = y <= 0.46875
    xs = x[small]
    z = xs * xs
    num, den = _ERF_A[4] * z, z
    for i in range(3):
        num = (num + _ERF_A[i]) * z
        den = (den + _ERF_B[i]) * z
    out[small] = xs * (num + _ERF_A[3]) / (den + _ERF_B[3])

    mid = (~small) & (y <= 4.0)
    ym = y[mid]
    num, den = _ERF_C[8] * ym, ym
    for i in range(7):
        num = (num + _ERF_C[i]) * ym
        den = (den + _ERF_D[i]) * ym
    erfc_mid = _erfc_tail(ym, (num + _ERF_C[7]) / (den + _ERF_D[7]))
    out[mid] = np.copysign(1.0 - erfc_mid, x[mid])

    big = y > 4.0  # NaN is in none of the three masks
    yb = np.minimum(y[big], 27.0)  # erfc(27) underflows to 0 in float64; avoids inf * 0
    z = 1.0 / (yb * yb)
    num, den = _ERF_P[5] * z, z
    for i in range(4):
        num = (num + _ERF_P[i]) * z
        den = (den + _ERF_Q[i]) * z
    r = (_SQRT_1_PI - z * (num + _ERF_P[4]) / (den + _ERF_Q[4])) / yb
    out[big] = np.copysign(1.0 - _erfc_tail(yb, r), x[big])

    out[np.isnan(x)] = np.nan
    return out


# ---------------------------------------------------------------------------------------------------------
# Binary arithmetic


class _Binary(Op):
    """``Y = A <op> B`` with multidirectional broadcasting."""

    elementwise = True

    @classmethod
    def compute(cls, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The op's formula on two broadcast-compatible arrays of the same dtype.

        Args:
            a: input A.
            b: input B.

        Returns:
            ``A <op> B`` (cast back to A's dtype by ``run``).
        """
        raise NotImplementedError

    @classmethod
    def run(cls, node, inputs):
        a, b = np.asarray(inputs[0]), np.asarray(inputs[1])
        if a.dtype != b.dtype:
            raise TypeError(f"{cls.op_type} node {node.name!r}: input dtypes differ ({a.dtype}, {b.dtype})")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return [_as_dtype(cls.compute(a, b), a.dtype)]


class _LiteRTArith(Op):
    """Add/Sub's ``qm_arith="litert"`` variant (``qmace.ops.litert_add``): a node imported from a ``.tflite``
    computes LiteRT's integer codes when its inputs and output are 8-bit per tensor of one type; otherwise,
    and without the attribute, the op's own quantized definition applies."""

    subtracts: ClassVar[bool] = False

    @classmethod
    def litert(cls, node) -> bool:
        """Whether the node carries the ``litert`` variant."""
        return node.attrs.get(litert_add.ARITH) == litert_add.LITERT

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """LiteRT's integer codes for a ``litert`` node with 8-bit per-tensor codes, else the op's own definition.

        Args:
            node: the node.
            inputs: the input codes (or values of unquantized inputs).
            in_qp: QuantParams per input (None for unquantized ones).
            out_qp: QuantParams per output.

        Returns:
            The output codes.
        """
        if cls.litert(node) and litert_add.applies(in_qp, out_qp):
            return [litert_add.litert_add(inputs[0], inputs[1], in_qp[0], in_qp[1], out_qp[0], cls.subtracts)]
        return super().run_quantized(node, inputs, in_qp, out_qp)

    @classmethod
    def onnx_integer_nodes(cls, node, in_tensors, out_tensors, qparams):
        """LiteRT's arithmetic (``qm_arith="litert"``) as exact float64/int64 ONNX nodes; None keeps the QDQ
        form."""
        if not cls.litert(node) or any(t is None for t in in_tensors) \
                or not litert_add.applies([t.quant for t in in_tensors], [t.quant for t in out_tensors]):
            return None
        (a, b), y = in_tensors, out_tensors[0]
        return litert_add.onnx_nodes(node.name, [a.name, b.name], [qparams(a)[1], qparams(b)[1]], y.name,
                                     qparams(y)[1], a.quant, b.quant, y.quant, cls.subtracts)


@register
class Add(_LiteRTArith, _Binary):
    """``C = A + B``; integers wrap on overflow. Quantized: ORT's QLinearAdd; without statistics the output
    range is the interval sum ``[a0 + b0, a1 + b1]``. With ``qm_arith="litert"`` (Adds imported from a
    ``.tflite``) and 8-bit per-tensor codes: LiteRT's integer ADD instead (``qmace.ops.litert_add``).
    """
    op_type = "Add"
    quant_kernel = Kernel.FLOAT
    kernel_variants = {f"{litert_add.ARITH}={litert_add.LITERT}": Kernel.FLOAT}
    range_without_stats = RangeRule.INTERVAL
    const_data_inputs = True
    channelwise = True  # (s a) + (s b) = s (a + b), for two same-shape inputs (is_channelwise)
    sign = Sign.ALL

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """uint8 per tensor: ORT's QLinearAdd arithmetic (``qmace.ops.qlinear``); else as ``_LiteRTArith``."""
        if not cls.litert(node) and qlinear.applies(inputs[0], inputs[1], in_qp[0], in_qp[1], out_qp[0]):
            return [qlinear.qlinear_add(inputs[0], inputs[1], in_qp[0], in_qp[1], out_qp[0])]
        return super().run_quantized(node, inputs, in_qp, out_qp)

    @classmethod
    def interval(cls, node, inputs):
        a, b = inputs[0], inputs[1]
        return Range(a.min + b.min, a.max + b.max)

    @classmethod
    def is_channelwise(cls, node, shape_of):
        if len(node.inputs) != 2:
            return False
        shapes = [shape_of(t) for t in (*node.inputs, node.outputs[0])]
        return shapes[0] is not None and shapes[0] == shapes[1] == shapes[2]  # no broadcasting

    @classmethod
    def compute(cls, a, b):
        return np.add(a, b)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``A + B``."""
        a, b = inputs[0], inputs[1]
        return [a + b]


@register
class Sub(_LiteRTArith, _Binary):
    """``C = A - B``; integers wrap on overflow. Without statistics the output range is
    ``[a0 - b1, a1 - b0]``. No integer kernel, except LiteRT's integer SUB for nodes imported from a
    ``.tflite`` (``qm_arith="litert"``, ``qmace.ops.litert_add``).
    """
    op_type = "Sub"
    kernel_variants = {f"{litert_add.ARITH}={litert_add.LITERT}": Kernel.FLOAT}
    range_without_stats = RangeRule.INTERVAL
    const_data_inputs = True
    subtracts = True

    @classmethod
    def kernel_for(cls, node: Node) -> Kernel:
        """``FLOAT`` (quantized, here with LiteRT's kernel) for a ``qm_arith="litert"`` node, else ``NONE``.

        Args:
            node: a Sub node.

        Returns:
            The node's Kernel.
        """
        return Kernel.FLOAT if cls.litert(node) else cls.quant_kernel

    @classmethod
    def interval(cls, node, inputs):
        a, b = inputs[0], inputs[1]
        return Range(a.min - b.max, a.max - b.min)

    @classmethod
    def compute(cls, a, b):
        return np.subtract(a, b)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``A - B``."""
        a, b = inputs[0], inputs[1]
        return [a - b]


@register
class Mul(_Binary):
    """``C = A * B``; integers wrap on overflow. Quantized: ORT's QLinearMul."""
    op_type = "Mul"
    quant_kernel = Kernel.FLOAT
    const_data_inputs = True
    sign = Sign.ALL

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """uint8 per tensor: ORT's QLinearMul arithmetic (``qmace.ops.qlinear``); else the float definition."""
        if qlinear.applies(inputs[0], inputs[1], in_qp[0], in_qp[1], out_qp[0], broadcast_any=True):
            return [qlinear.qlinear_mul(inputs[0], inputs[1], in_qp[0], in_qp[1], out_qp[0])]
        return super().run_quantized(node, inputs, in_qp, out_qp)

    @classmethod
    def compute(cls, a, b):
        return np.multiply(a, b)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``A * B``."""
        a, b = inputs[0], inputs[1]
        return [a * b]


@register
class Div(_Binary):
    """Float: IEEE division. Integer: quotient truncated toward zero (C++ ``/``), not numpy's floor."""

    op_type = "Div"
    const_data_inputs = True

    @classmethod
    def compute(cls, a, b):
        if np.issubdtype(a.dtype, np.integer):
            q = np.abs(a) // np.abs(b)
            negative = (a < 0) != (b < 0)
            return np.where(negative, -q, q)
        return np.divide(a, b)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``A / B``."""
        a, b = inputs[0], inputs[1]
        return [a / b]


@register
class Pow(Op):
    """``Z = X ** Y``; the exponent may have another numeric type. Output has X's type. Integer X goes
    through float64 ``pow`` and truncates (ORT); float X computes in X's float type."""

    op_type = "Pow"

    @classmethod
    def run(cls, node, inputs):
        x, y = np.asarray(inputs[0]), np.asarray(inputs[1])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if np.issubdtype(x.dtype, np.integer):
                z = np.power(x.astype(np.float64), y.astype(np.float64))
            else:
                z = np.power(x, y.astype(x.dtype))
            return [_as_dtype(z, x.dtype)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``X ** Y``."""
        a, b = inputs[0], inputs[1]
        return [a ** b]


# ---------------------------------------------------------------------------------------------------------
# Unary maths


class _Unary(Op):
    """``Y = f(X)`` elementwise; ``float64_math`` ops evaluate f in float64 and round once to X's dtype."""

    float64_math: ClassVar[bool] = False
    elementwise = True

    @classmethod
    def compute(cls, node, x: np.ndarray) -> np.ndarray:
        """The op's formula ``f(X)`` elementwise.

        Args:
            node: the node (for attributes such as ``alpha``).
            x: input X (float64 for ``float64_math`` ops).

        Returns:
            ``f(X)`` (rounded to X's dtype by ``run``).
        """
        raise NotImplementedError

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        xin = x.astype(np.float64) if cls.float64_math else x
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return [_as_dtype(cls.compute(node, xin), x.dtype)]


@register
class Sqrt(_Unary):
    """``Y = sqrt(X)`` (NaN for X < 0)."""
    op_type = "Sqrt"

    @classmethod
    def compute(cls, node, x):
        return np.sqrt(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``sqrt(X)``."""
        x = inputs[0]
        return [x.sqrt()]


@register
class Neg(_Unary):
    """``Y = -X`` (integers wrap: ``-INT_MIN == INT_MIN``)."""
    op_type = "Neg"

    @classmethod
    def compute(cls, node, x):
        return np.negative(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``-X``."""
        x = inputs[0]
        return [-x]


@register
class Abs(_Unary):
    """``Y = |X|``."""
    op_type = "Abs"

    @classmethod
    def compute(cls, node, x):
        return np.abs(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``|X|``."""
        x = inputs[0]
        return [x.abs()]


@register
class Exp(_Unary):
    """``Y = exp(X)``, in float64 rounded once to X's dtype."""
    op_type = "Exp"
    float64_math = True

    @classmethod
    def compute(cls, node, x):
        return np.exp(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``exp(X)``."""
        x = inputs[0]
        return [x.exp()]


@register
class Log(_Unary):
    """``Y = log(X)`` (natural logarithm; -inf at 0, NaN below), in float64 rounded once."""
    op_type = "Log"
    float64_math = True

    @classmethod
    def compute(cls, node, x):
        return np.log(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``log(X)``."""
        x = inputs[0]
        return [x.log()]


@register
class Erf(_Unary):
    """``Y = erf(X)`` (Cody's approximation, float64, rounded once)."""
    op_type = "Erf"
    float64_math = True

    @classmethod
    def compute(cls, node, x):
        return erf(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``erf(X)``."""
        x = inputs[0]
        return [x.erf()]
