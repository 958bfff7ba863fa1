"""Activations (ONNX opset 21 semantics): Tanh, Sigmoid, Gelu, Relu, LeakyRelu, HardSigmoid, HardSwish, PRelu,
Clip. Elementwise like ``qmace.ops.elementwise`` (whose unary base class, dtype rules and float64 evaluation of
transcendental functions they share); their quantization traits are listed in that module's docstring.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from qmace import qmath
from qmace.ops import qlinear
from qmace.ops.base import ARITH, Kernel, Op, RangeRule, Sign, register
from qmace.ops.elementwise import _as_dtype, _Unary, erf, optional_input
from qmace.ops.util import as_tensor_like
from qmace.qmath import QuantParams, Range

#: HardSwish's inner HardSigmoid codes (its 8-bit integer form): uint8 on [0, 1], as a fixed-range HardSigmoid's.
HSIG_PARAMS = qmath.params_asymmetric(0.0, 1.0, "uint8")
#: ``Op.integer_arith`` of HardSigmoid / HardSwish: ONNX Runtime's QLinearAdd (+ QLinearMul) instead of a float
#: island; set by the quantizer unless a source model's Q/DQ fixed a parameter (an imported model keeps its island).
QLINEAR = "qlinear"


def _affine_plan(x_qp: QuantParams | None, alpha: float, beta: float,
                 out_qp: QuantParams | None) -> tuple[QuantParams, QuantParams] | None:
    """``quantize(clip(alpha * x + beta, 0, 1))`` as ONNX Runtime's QLinearAdd: ``DequantizeLinear(x)`` with the
    scale ``float32(s_x * alpha)``, plus ``beta`` (the code 1 at scale ``beta``), quantized to the output. The
    output's saturation is the clip: applies when 0 and 1 quantize to the output's extreme codes (a [0, 1]
    range), ``alpha``, ``beta`` > 0, and input and output are uint8 per tensor (QLinearAdd's operands share
    one type; int8 activations are shifted to uint8 for ORT, a constant beside them would not be).

    Returns:
        ``(x's parameters with the scaled scale, beta's parameters)``, or None (the float island applies).
    """
    if not (qlinear.uint8_per_tensor(x_qp, out_qp) and alpha > 0 and beta > 0):
        return None
    if int(qmath.quantize(0.0, out_qp)) != out_qp.qmin or int(qmath.quantize(1.0, out_qp)) != out_qp.qmax:
        return None
    # beta nudged up by 1/16 of an output step: with beta / s_out = 127.5 (beta 0.5 on [0, 1]) every input code
    # whose alpha * x is a whole number of output steps (common: scales commensurate with 6 / 255) would be an
    # exact rounding tie, which ORT's x86 (float, fma) and ARM (fixed-point) QLinearAdd break differently
    return (QuantParams(np.float32(float(x_qp.scale) * alpha), x_qp.zero_point, "uint8"),
            QuantParams(np.float32(beta + float(out_qp.scale) / 16), 0, "uint8"))


def _affine_codes(q: np.ndarray, plan: tuple[QuantParams, QuantParams], out_qp: QuantParams) -> np.ndarray:
    """The reference of :func:`_affine_plan`'s QLinearAdd: codes ``q`` (parameters ``xs``) plus the scalar code 1
    (parameters ``bs``), as every uint8 Add (``qmace.ops.qlinear``)."""
    xs, bs = plan
    return qlinear.qlinear_add(np.asarray(q), np.array(1, np.uint8), xs, bs, out_qp)


def _affine_nodes(prefix: str, x: str, x_zp: str, plan: tuple[QuantParams, QuantParams], out: str, out_s: str,
                  out_z: str) -> tuple[list, list]:
    """ONNX nodes of :func:`_affine_codes` (fused by ONNX Runtime into one QLinearAdd): codes ``x`` -> codes
    ``out``."""
    from onnx import helper, numpy_helper

    xs, bs = plan
    inits = [numpy_helper.from_array(np.asarray(xs.scale, np.float32), f"{prefix}__x_scale"),
             numpy_helper.from_array(np.array(1, np.uint8), f"{prefix}__beta"),
             numpy_helper.from_array(np.asarray(bs.scale, np.float32), f"{prefix}__beta_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), f"{prefix}__beta_zero")]
    nodes = [helper.make_node("DequantizeLinear", [x, f"{prefix}__x_scale", x_zp], [f"{prefix}__ax"],
                              name=f"{prefix}__ax_DQ"),
             helper.make_node("DequantizeLinear", [f"{prefix}__beta", f"{prefix}__beta_scale", f"{prefix}__beta_zero"],
                              [f"{prefix}__b"], name=f"{prefix}__beta_DQ"),
             helper.make_node("Add", [f"{prefix}__ax", f"{prefix}__b"], [f"{prefix}__sum"], name=f"{prefix}__add"),
             helper.make_node("QuantizeLinear", [f"{prefix}__sum", out_s, out_z], [out], name=f"{prefix}__Q")]
    return nodes, inits


@register
class Tanh(_Unary):
    """``Y = tanh(X)``, in float64 rounded once; fixed output range (-1, 1)."""
    op_type = "Tanh"
    float64_math = True
    range_rule = RangeRule.FIXED
    fixed_range = Range(-1.0, 1.0)

    @classmethod
    def saturating_input(cls, node):
        edge = 0.5 * math.log(2 * 255 - 1)  # tanh(x) >= 1 - 1/255 (the last 8-bit step of [-1, 1]) beyond
        return -edge, edge

    @classmethod
    def compute(cls, node, x):
        return np.tanh(x)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``tanh(X)``."""
        x = inputs[0]
        return [x.tanh()]


@register
class Sigmoid(_Unary):
    """``1 / (1 + exp(-x))``."""

    op_type = "Sigmoid"
    float64_math = True
    quant_kernel = Kernel.FLOAT
    range_rule = RangeRule.FIXED
    fixed_range = Range(0.0, 1.0)
    sign = Sign.NONNEG

    @classmethod
    def saturating_input(cls, node):
        edge = math.log(2 * 255 - 1)  # sigmoid(x) >= 1 - 0.5/255 (the last 8-bit step of [0, 1]) beyond
        return -edge, edge

    @classmethod
    def compute(cls, node, x):
        return 1.0 / (1.0 + np.exp(-x))

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``sigmoid(X)``."""
        x = inputs[0]
        return [x.sigmoid()]


@register
class Gelu(_Unary):
    """Opset 20. ``approximate="none"``: ``0.5 x (1 + erf(x / sqrt 2))``;
    ``"tanh"``: ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``."""

    op_type = "Gelu"
    defaults: ClassVar[dict[str, Any]] = {"approximate": "none"}
    float64_math = True
    quant_kernel = Kernel.FLOAT
    ort_kernel = "none, a float island between DequantizeLinear/QuantizeLinear"

    @classmethod
    def compute(cls, node, x):
        approximate = cls.attr(node, "approximate")
        if approximate == "none":
            return 0.5 * x * (1.0 + erf(x * math.sqrt(0.5)))
        if approximate == "tanh":
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        raise ValueError(f"Gelu node {node.name!r}: approximate must be 'none' or 'tanh', got {approximate!r}")

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.nn.functional.gelu`` with the same ``approximate``."""
        import torch.nn.functional as F

        approximate = cls.attr(node, "approximate")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"Gelu node {node.name!r}: approximate must be 'none' or 'tanh', got {approximate!r}")
        return [F.gelu(inputs[0], approximate=approximate)]


# ---------------------------------------------------------------------------------------------------------
# Activations


@register
class Relu(_Unary):
    """``Y = max(X, 0)``; fusable into a producing Conv/Gemm."""
    op_type = "Relu"
    quant_kernel = Kernel.FLOAT
    fusable_activation = True
    channelwise = True
    sign = Sign.NONNEG

    @classmethod
    def fusion_attrs(cls, node, constant):
        return {"qm_activation": "Relu"}

    @classmethod
    def compute(cls, node, x):
        return np.maximum(x, np.zeros((), x.dtype))

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``max(X, 0)``."""
        x = inputs[0]
        return [x.relu()]


@register
class LeakyRelu(_Unary):
    """``x if x >= 0 else alpha * x`` (float32 product)."""

    op_type = "LeakyRelu"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.01}
    quant_kernel = Kernel.FLOAT

    @classmethod
    def compute(cls, node, x):
        alpha = np.asarray(cls.attr(node, "alpha"), x.dtype)
        return np.where(x >= 0, x, x * alpha)

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``torch.nn.functional.leaky_relu`` with the node's ``alpha``."""
        import torch.nn.functional as F

        return [F.leaky_relu(inputs[0], float(cls.attr(node, "alpha")))]


@register
class HardSigmoid(_Unary):
    """``max(0, min(1, alpha * x + beta))`` in X's float type."""

    op_type = "HardSigmoid"
    sign = Sign.NONNEG
    ort_kernel = "none, a float island between DequantizeLinear/QuantizeLinear"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.2, "beta": 0.5}
    quant_kernel = Kernel.FLOAT  # SE gates of PP-LCNet/MobileNetV3; ORT runs it in float32 between Q/DQ
    range_rule = RangeRule.FIXED
    fixed_range = Range(0.0, 1.0)

    @classmethod
    def saturating_input(cls, node):
        alpha, beta = float(cls.attr(node, "alpha")), float(cls.attr(node, "beta"))
        if alpha > 0:
            return -beta / alpha, (1.0 - beta) / alpha  # the linear part; outside it exactly 0 or 1
        if alpha < 0:
            return (1.0 - beta) / alpha, -beta / alpha
        return -math.inf, math.inf  # a constant output

    @classmethod
    def compute(cls, node, x):
        alpha = np.asarray(cls.attr(node, "alpha"), x.dtype)
        beta = np.asarray(cls.attr(node, "beta"), x.dtype)
        return np.clip(alpha * x + beta, 0, 1)

    integer_arith = QLINEAR

    @classmethod
    def _plan(cls, node, in_qp, out_qp):
        if node.attrs.get(ARITH) != QLINEAR:
            return None
        return _affine_plan(in_qp[0], float(cls.attr(node, "alpha")), float(cls.attr(node, "beta")), out_qp[0])

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """On a [0, 1] uint8 output: ``quantize(dequantize(x; s_x * alpha) + beta)`` (the saturation clips), as
        ONNX Runtime's QLinearAdd runs it (``onnx_integer_nodes``); else the float definition."""
        plan = cls._plan(node, in_qp, out_qp)
        if plan is None:
            return super().run_quantized(node, inputs, in_qp, out_qp)
        return [_affine_codes(inputs[0], plan, out_qp[0])]

    @classmethod
    def onnx_integer_nodes(cls, node, in_tensors, out_tensors, qparams):
        """One QLinearAdd (module docstring of :func:`_affine_plan`) instead of a float island."""
        x, y = in_tensors[0], out_tensors[0]
        plan = cls._plan(node, [x.quant], [y.quant])
        if plan is None:
            return None
        return _affine_nodes(node.name, x.name, qparams(x)[1], plan, y.name, *qparams(y))

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``clamp(alpha * x + beta, 0, 1)``."""
        alpha, beta = float(cls.attr(node, "alpha")), float(cls.attr(node, "beta"))
        return [(inputs[0] * alpha + beta).clamp(0, 1)]


@register
class HardSwish(_Unary):
    """``x * max(0, min(1, x / 6 + 0.5))``."""

    op_type = "HardSwish"
    ort_kernel = "none, a float island between DequantizeLinear/QuantizeLinear"
    quant_kernel = Kernel.FLOAT  # ORT runs it in float32 between its Q/DQ nodes

    @classmethod
    def compute(cls, node, x):
        alpha = np.asarray(1.0 / 6.0, x.dtype)
        return x * np.clip(alpha * x + np.asarray(0.5, x.dtype), 0, 1)

    integer_arith = QLINEAR

    @classmethod
    def _plan(cls, node, in_qp, out_qp):
        if node.attrs.get(ARITH) != QLINEAR:
            return None
        plan = _affine_plan(in_qp[0], 1.0 / 6.0, 0.5, HSIG_PARAMS)
        return plan if qlinear.uint8_per_tensor(out_qp[0]) else None

    @classmethod
    def run_quantized(cls, node, inputs, in_qp, out_qp):
        """uint8 per tensor: two integer steps, as ONNX Runtime's QLinearAdd and QLinearMul run them
        (``onnx_integer_nodes``): ``h = quantize(dequantize(x; s_x / 6) + 0.5)`` on ``HSIG_PARAMS`` (the clip is
        the saturation), then ``y = x * h`` as QLinearMul computes it (``qmace.ops.qlinear``). ``h`` rounds
        the HardSigmoid factor to 1/255: at most ``|x| / 510 <= 3 / 510`` from the float island's value, only
        for ``|x| < 3``. Other types: the float definition."""
        plan = cls._plan(node, in_qp, out_qp)
        if plan is None:
            return super().run_quantized(node, inputs, in_qp, out_qp)
        h = _affine_codes(inputs[0], plan, HSIG_PARAMS)
        return [qlinear.qlinear_mul(np.asarray(inputs[0]), h, in_qp[0], HSIG_PARAMS, out_qp[0])]

    @classmethod
    def onnx_integer_nodes(cls, node, in_tensors, out_tensors, qparams):
        """QLinearAdd (the HardSigmoid factor's codes) + QLinearMul instead of a float island (``run_quantized``):
        measured 2.75x faster than DequantizeLinear -> HardSigmoid, Mul -> QuantizeLinear at one thread."""
        from onnx import helper, numpy_helper

        x, y = in_tensors[0], out_tensors[0]
        plan = cls._plan(node, [x.quant], [y.quant])
        if plan is None:
            return None
        p = node.name
        h_s, h_z = f"{p}__h_scale", f"{p}__h_zero"
        nodes, inits = _affine_nodes(p, x.name, qparams(x)[1], plan, f"{p}__h", h_s, h_z)
        inits += [numpy_helper.from_array(np.asarray(HSIG_PARAMS.scale, np.float32), h_s),
                  numpy_helper.from_array(np.asarray(HSIG_PARAMS.zero_point).astype(np.uint8), h_z)]
        x_s, x_z = qparams(x)
        nodes += [helper.make_node("DequantizeLinear", [f"{p}__h", h_s, h_z], [f"{p}__hf"], name=f"{p}__h_DQ"),
                  helper.make_node("DequantizeLinear", [x.name, x_s, x_z], [f"{p}__xf"], name=f"{p}__x_DQ"),
                  helper.make_node("Mul", [f"{p}__xf", f"{p}__hf"], [f"{p}__m"], name=f"{p}__mul"),
                  helper.make_node("QuantizeLinear", [f"{p}__m", *qparams(y)], [y.name], name=f"{p}__Q")]
        return nodes, inits

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``x * clamp(x / 6 + 0.5, 0, 1)``."""
        x = inputs[0]
        return [x * (x * (1.0 / 6.0) + 0.5).clamp(0, 1)]


@register
class PRelu(Op):
    """``x if x >= 0 else slope * x``; ``slope`` broadcasts to X (unidirectionally)."""

    op_type = "PRelu"

    @classmethod
    def run(cls, node, inputs):
        x, slope = np.asarray(inputs[0]), np.asarray(inputs[1], dtype=np.asarray(inputs[0]).dtype)
        if np.broadcast_shapes(x.shape, slope.shape) != x.shape:
            raise ValueError(f"PRelu node {node.name!r}: slope {slope.shape} does not broadcast to X {x.shape}")
        return [_as_dtype(np.where(x >= 0, x, x * slope), x.dtype)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``where(x >= 0, x, slope * x)``."""
        x, slope = inputs[0], as_tensor_like(inputs[1], inputs[0])
        return [x.where(x >= 0, x * slope)]


@register
class Clip(Op):
    """``min(max(x, lo), hi)`` with optional scalar inputs ``lo``/``hi`` (omitted: no bound). When lo > hi
    every value becomes hi (the spec's and ORT's order of operations)."""

    op_type = "Clip"
    quant_kernel = Kernel.FLOAT
    fusable_activation = True
    elementwise = True  # its bounds are scalar parameters

    @classmethod
    def _bounds(cls, node, constant) -> list[float] | None:
        """[lo, hi] when both bounds are constant scalars (omitted: -inf / inf), else None."""
        lo = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else np.array(-np.inf)
        hi = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else np.array(np.inf)
        if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:
            return None  # anything else is left to the kernel's named error
        return [float(np.asarray(lo).reshape(())), float(np.asarray(hi).reshape(()))]

    @classmethod
    def fusion_attrs(cls, node, constant):
        bounds = cls._bounds(node, constant)
        return None if bounds is None else {"qm_activation": "Clip", "qm_clip": bounds}

    @classmethod
    def output_nonneg(cls, node, constant, nonneg):
        lo = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        return (lo is not None and float(lo) >= 0) or nonneg(node.inputs[0])

    @classmethod
    def run(cls, node, inputs):
        x = np.asarray(inputs[0])
        lo, hi = optional_input(inputs, 1), optional_input(inputs, 2)
        y = x
        if lo is not None:
            y = np.maximum(y, np.asarray(lo, x.dtype).reshape(()))
        if hi is not None:
            y = np.minimum(y, np.asarray(hi, x.dtype).reshape(()))
        return [_as_dtype(y, x.dtype)]

    @classmethod
    def run_torch(cls, node, inputs):
        """Torch: ``min(max(x, lo), hi)`` with the optional bounds."""
        x = inputs[0]
        lo, hi = optional_input(inputs, 1), optional_input(inputs, 2)
        if lo is not None:
            x = x.maximum(as_tensor_like(lo, x).reshape(()))
        if hi is not None:
            x = x.minimum(as_tensor_like(hi, x).reshape(()))
        return [x]
