"""Elementwise ops and the QuantizeLinear/DequantizeLinear boundary ops against ONNX Runtime.

Float kernels: check_op (same dtype, shape, values within 1e-5; Erf/Gelu within 1e-6 absolute).
Quantized kernels: "float" ops equal dequantize -> float run -> quantize; QDQ's run_quantized equals ORT's
QuantizeLinear/DequantizeLinear bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qmace.ir import Node
from qmace.ops import get_op
from qmace.ops.elementwise import erf
from qmace.qmath import QuantParams, dequantize, quantize
from tests.opcheck import check_op, ort_run_node

RNG = np.random.default_rng(1234)


def randf(*shape, lo=-3.0, hi=3.0):
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def randi(*shape, lo=-20, hi=20, dtype=np.int64):
    return RNG.integers(lo, hi, size=shape).astype(dtype)


BROADCAST_SHAPES = [
    ((2, 3, 4), (2, 3, 4)),
    ((2, 3, 4), (4,)),  # B broadcasts to A
    ((1, 4), (3, 1)),  # both broadcast
    ((3,), (2, 1, 3)),  # A broadcasts to B
    ((), (2, 3)),  # scalar A
    ((2, 3), ()),  # scalar B
    ((), ()),
    ((2, 0, 3), (1, 3)),  # empty
]


# ---------------------------------------------------------------------------------------------------------
# Binary arithmetic


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
def test_binary_float(op, shapes):
    a, b = randf(*shapes[0]), randf(*shapes[1])
    if op == "Div":
        b = np.where(np.abs(b) < 0.1, np.float32(0.5), b).astype(np.float32)
    check_op(op, [a, b])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_binary_int(op, dtype):
    a = randi(3, 4, dtype=dtype)
    b = randi(4, dtype=dtype)
    if op == "Div":
        b[b == 0] = 3
        b[0] = -7  # negative divisor: truncation toward zero, not floor
    check_op(op, [a, b])


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("shapes", [((3, 4),), ((2, 3, 4), (3, 1)), ((1, 3, 1), (2, 1, 4), (4,))], ids=str)
def test_variadic_max_min(op, shapes):
    xs = [randf(*s) for s in shapes]
    xs[0].flat[0] = np.nan  # NaN propagates, as in ORT
    check_op(op, xs)


def test_div_int_truncates_toward_zero():
    a = np.array([-7, 7, -7, 7, -1, 0], np.int64)
    b = np.array([2, -2, -2, 2, 3, -5], np.int64)
    got = check_op("Div", [a, b])[0]
    np.testing.assert_array_equal(got, [-3, -3, 3, 3, 0, 0])


def test_div_by_zero_float():
    check_op("Div", [np.array([1.0, -1.0, 2.0], np.float32), np.array([0.0, 0.0, 4.0], np.float32)])


def test_pow():
    x = randf(2, 3, 4, lo=0.1, hi=3.0)
    check_op("Pow", [x, randf(4, lo=-2, hi=2)])
    check_op("Pow", [x, np.array(2.0, np.float32)])
    check_op("Pow", [randf(3, 4), np.array(3, np.int64)])  # exponent of another type
    check_op("Pow", [randi(5, lo=-4, hi=5), np.array(3, np.int64)])
    check_op("Pow", [randf(5, lo=-2, hi=-0.5), np.array([0.5], np.float32)])  # NaN
    check_op("Pow", [np.array([0.0, 0.0], np.float32), np.array([-1.0, 0.0], np.float32)])  # inf, 1


# ---------------------------------------------------------------------------------------------------------
# Unary maths and activations


@pytest.mark.parametrize(
    "op,lo,hi",
    [
        ("Sqrt", 0.0, 9.0),
        ("Neg", -5.0, 5.0),
        ("Abs", -5.0, 5.0),
        ("Exp", -20.0, 20.0),
        ("Log", 1e-4, 50.0),
        ("Tanh", -6.0, 6.0),
        ("Sigmoid", -20.0, 20.0),
        ("Relu", -3.0, 3.0),
        ("HardSwish", -5.0, 5.0),
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 5), (), (7,)], ids=str)
def test_unary_float(op, lo, hi, shape):
    check_op(op, [randf(*shape, lo=lo, hi=hi)])


@pytest.mark.parametrize("op", ["Neg", "Abs", "Relu"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8])
def test_unary_int(op, dtype):
    x = randi(3, 4, dtype=dtype)
    if op == "Relu" and dtype == np.int64:  # ORT has no int64 Relu; the kernel keeps the dtype anyway
        y = get_op("Relu").run(_node("Relu", 1), [x])[0]
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, np.maximum(x, 0))
        return
    check_op(op, [x])


def test_unary_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e-30, 90.0, -90.0], np.float32)
    for op in ("Exp", "Tanh", "Sigmoid", "Abs", "Neg", "Relu"):
        check_op(op, [x])
    check_op("Log", [np.array([0.0, 1.0, np.inf, -1.0], np.float32)])
    check_op("Sqrt", [np.array([0.0, 4.0, np.inf, -1.0], np.float32)])


def test_erf_matches_math_erf_float64():
    x = np.concatenate([np.linspace(-30, 30, 20001), [0.46875, -0.46875, 4.0, -4.0, 1e-300, 0.0]])
    ref = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(erf(x), ref, rtol=1e-15, atol=1e-300)
    assert np.isnan(erf(np.array([np.nan]))[0])
    np.testing.assert_array_equal(erf(np.array([np.inf, -np.inf])), [1.0, -1.0])


def test_erf_vs_ort():
    x = np.concatenate([randf(100_000, lo=-6, hi=6), np.array([0.0, 0.46875, 4.0, 10.0, -10.0], np.float32)])
    check_op("Erf", [x], rtol=0, atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = np.concatenate([randf(50_000, lo=-8, hi=8), np.array([0.0, -20.0, 20.0], np.float32)])
    check_op("Gelu", [x], {"approximate": approximate}, rtol=0, atol=1e-6)


def test_gelu_default_is_exact_erf():
    check_op("Gelu", [randf(3, 7)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.2, 3.0])
def test_leaky_relu(alpha):
    check_op("LeakyRelu", [randf(2, 3, 4)], {} if alpha is None else {"alpha": alpha})


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.5, "beta": 0.1}, {"alpha": -1.0, "beta": 0.9}])
def test_hard_sigmoid(attrs):
    check_op("HardSigmoid", [randf(4, 5, lo=-6, hi=6)], attrs)


@pytest.mark.parametrize("slope_shape", [(1,), (3, 1, 1), (5,), (4, 5), (2, 3, 4, 5), ()], ids=str)
def test_prelu(slope_shape):
    check_op("PRelu", [randf(2, 3, 4, 5), randf(*slope_shape, lo=-1, hi=1)], const_inputs=(1,))


@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.0, None), (None, 0.5), (None, None), (1.0, -1.0)], ids=str)
def test_clip(bounds):
    lo, hi = (None if b is None else np.array(b, np.float32) for b in bounds)
    check_op("Clip", [randf(3, 4), lo, hi])


def test_clip_int():
    check_op("Clip", [randi(3, 4), np.array(-5, np.int64), np.array(6, np.int64)])
    check_op("Clip", [randi(3, 4, dtype=np.int32), None, np.array(2, np.int32)])


# ---------------------------------------------------------------------------------------------------------
# Traits


def test_traits():
    t = {op: get_op(op) for op in ["Add", "Sub", "Mul", "Sigmoid", "Tanh", "LeakyRelu", "Relu", "Clip", "Div",
                                   "Erf", "Gelu", "Exp", "PRelu", "HardSwish", "Pow"]}
    assert t["Add"].quant_kernel == "float" and t["Add"].output_range == "stat"
    assert t["Mul"].quant_kernel == "float" and t["Mul"].output_range == "stat"
    assert t["Add"].range_without_stats == "interval" and t["Sub"].range_without_stats == "interval"
    assert getattr(t["Mul"], "range_without_stats", None) is None
    assert t["Sub"].quant_kernel is None
    assert t["Sigmoid"].quant_kernel == "float" and t["Sigmoid"].output_range == (0.0, 1.0)
    assert t["Tanh"].quant_kernel is None and t["Tanh"].output_range == (-1.0, 1.0)
    assert t["LeakyRelu"].quant_kernel == "float"
    for op in ("Relu", "Clip"):
        assert t[op].quant_kernel == "float" and t[op].fusable_activation
    for op in ("Div", "Erf", "Gelu", "Exp", "PRelu", "Pow"):
        assert t[op].quant_kernel is None and not t[op].fusable_activation
    # issue 10: HardSwish / HardSigmoid run in the integer domain (one float island in ORT, no fallback)
    assert t["HardSwish"].quant_kernel == "float" and t["HardSwish"].output_range == "stat"
    assert get_op("HardSigmoid").quant_kernel == "float" and get_op("HardSigmoid").output_range == (0.0, 1.0)
    assert get_op("Gelu").defaults == {"approximate": "none"}
    assert get_op("LeakyRelu").defaults == {"alpha": 0.01}
    assert get_op("HardSigmoid").defaults == {"alpha": 0.2, "beta": 0.5}


def _node(op, n_in, n_out=1, **attrs):
    return Node("n", op, [f"i{k}" for k in range(n_in)], [f"o{k}" for k in range(n_out)], attrs)


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_float_kernel_quantized_add_mul(op):
    qa = QuantParams(np.float32(0.02), np.int32(128), "uint8")
    qb = QuantParams(np.float32(0.05), np.int32(10), "uint8")
    qy = QuantParams(np.float32(0.07), np.int32(100), "uint8")
    a = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    b = RNG.integers(0, 256, (4,)).astype(np.uint8)
    node = _node(op, 2)
    got = get_op(op).run_quantized(node, [a, b], [qa, qb], [qy])[0]
    ref = get_op(op).run(node, [dequantize(a, qa), dequantize(b, qb)])[0]
    np.testing.assert_array_equal(got, quantize(ref, qy))
    assert got.dtype == np.uint8


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "LeakyRelu"])
def test_float_kernel_quantized_unary(op):
    qx = QuantParams(np.float32(0.03), np.int32(120), "uint8")
    qy = QuantParams(np.float32(1 / 255), np.int32(0), "uint8") if op != "LeakyRelu" else qx
    x = np.arange(256, dtype=np.uint8).reshape(4, 64)
    node = _node(op, 1)
    got = get_op(op).run_quantized(node, [x], [qx], [qy])[0]
    np.testing.assert_array_equal(got, quantize(get_op(op).run(node, [dequantize(x, qx)])[0], qy))


def test_clip_quantized_with_float_bounds():
    qx = QuantParams(np.float32(0.05), np.int32(128), "uint8")
    x = np.arange(256, dtype=np.uint8)
    lo, hi = np.array(0.0, np.float32), np.array(6.0, np.float32)
    node = _node("Clip", 3)
    got = get_op("Clip").run_quantized(node, [x, lo, hi], [qx, None, None], [qx])[0]
    np.testing.assert_array_equal(got, np.clip(x, 128, 248))


# ---------------------------------------------------------------------------------------------------------
# QuantizeLinear / DequantizeLinear


QDQ_PARAMS = [
    QuantParams(np.float32(0.0371), np.int32(131), "uint8"),
    QuantParams(np.float32(0.5), np.int32(0), "uint8"),
    QuantParams(np.float32(0.0213), np.int32(-7), "int8"),
    QuantParams(np.float32(0.25), np.int32(0), "int8"),
]


def _onnx_qparams(qp: QuantParams):
    return [np.asarray(qp.scale, np.float32), np.asarray(qp.zero_point).astype(qp.dtype)]


@pytest.mark.parametrize("qp", QDQ_PARAMS, ids=lambda q: f"{q.dtype}-{float(q.scale)}-{int(q.zero_point)}")
def test_quantize_linear_bit_exact(qp):
    x = np.concatenate([
        randf(5000, lo=-10, hi=10),
        # exact half steps (ties to even), saturation, signed zero
        ((np.arange(-300, 300) + 0.5) * qp.scale).astype(np.float32),
        np.array([0.0, -0.0, 1e6, -1e6, np.inf, -np.inf], np.float32),
    ])
    expected = ort_run_node("QuantizeLinear", [x, *_onnx_qparams(qp)], const_inputs=(1, 2))[0]
    node = Node("q", "QuantizeLinear", ["x"], ["y"])
    got = get_op("QuantizeLinear").run_quantized(node, [x], [None], [qp])[0]
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("qp", QDQ_PARAMS, ids=lambda q: f"{q.dtype}-{float(q.scale)}-{int(q.zero_point)}")
def test_dequantize_linear_bit_exact(qp):
    codes = np.arange(qp.qmin, qp.qmax + 1).astype(qp.dtype).reshape(-1, 4)
    expected = ort_run_node("DequantizeLinear", [codes, *_onnx_qparams(qp)], const_inputs=(1, 2))[0]
    node = Node("dq", "DequantizeLinear", ["x"], ["y"])
    got = get_op("DequantizeLinear").run_quantized(node, [codes], [qp], [None])[0]
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_qdq_per_channel_explicit_inputs():
    scale = np.array([0.01, 0.2, 0.033], np.float32)
    zp = np.array([-3, 0, 5], np.int8)
    x = randf(2, 3, 4, lo=-5, hi=5)
    check_op("QuantizeLinear", [x, scale, zp], {"axis": 1}, const_inputs=(1, 2))
    codes = RNG.integers(-128, 128, (2, 3, 4)).astype(np.int8)
    check_op("DequantizeLinear", [codes, scale, zp], {"axis": 1}, const_inputs=(1, 2), rtol=0, atol=0)
    qp = QuantParams(scale, zp.astype(np.int32), "int8", axis=1)
    got = get_op("DequantizeLinear").run_quantized(Node("dq", "DequantizeLinear", ["x"], ["y"]), [codes], [qp], [None])
    np.testing.assert_array_equal(got[0], ort_run_node("DequantizeLinear", [codes, scale, zp], {"axis": 1}, const_inputs=(1, 2))[0])


def test_qdq_run_without_params_raises():
    from qmace.errors import QuantizationError

    with pytest.raises(QuantizationError, match="parameters"):
        get_op("QuantizeLinear").run(Node("q", "QuantizeLinear", ["x"], ["y"]), [randf(3)])
    with pytest.raises(QuantizationError, match="parameters"):
        get_op("DequantizeLinear").run(Node("dq", "DequantizeLinear", ["x"], ["y"]), [np.zeros(3, np.uint8)])
    with pytest.raises(QuantizationError, match="no quantization parameters"):
        get_op("QuantizeLinear").run_quantized(Node("q", "QuantizeLinear", ["x"], ["y"]), [randf(3)], [None], [None])
