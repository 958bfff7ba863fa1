"""NN ops (Conv, ConvTranspose, Gemm, MatMul, norms, pools, Softmax, Resize, Pad): reference kernels against
ONNX Runtime (opset 21, optimizations off), and the integer kernels of Conv/Gemm/MatMul against an
independent int64 statement of docs/quantization.md:

    acc = sum (q_x - zp_x) * (q_w - zp_w[c]) + bias_q          (exact, int64)
    y_q = clip(rint(float32(acc) * M[c]) + zp_y, qmin, qmax)   M = float32(float32(s_x * s_w[c]) / s_y)

and Conv/MatMul also against ONNX Runtime's QLinearConv/QLinearMatMul (bit-exact: the bound asserted is 0).
"""

from __future__ import annotations

import zlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace.ir import Node
from qmace.ops import get_op
from qmace.qmath import Range
from tests.opcheck import check_op, ort_exact, ref_run_node

F32 = np.float32


def rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(r: np.random.Generator, *shape) -> np.ndarray:
    return r.standard_normal(shape).astype(F32)


# ---------------------------------------------------------------------------------------------------------
# Conv


CONV_CASES = [
    # (x shape, w shape, attrs)
    ((2, 3, 9, 10), (4, 3, 3, 3), {}),
    ((1, 4, 8, 8), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ((1, 6, 9, 7), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]}),  # depthwise
    ((1, 4, 11, 12), (8, 1, 3, 3), {"group": 4, "strides": [2, 1]}),  # depthwise multiplier 2
    ((2, 3, 12, 11), (5, 3, 3, 2), {"dilations": [2, 3], "pads": [2, 1, 0, 3]}),
    ((1, 2, 10, 10), (3, 2, 2, 2), {"strides": [3, 3]}),  # stride > kernel
    ((1, 3, 7, 9), (2, 3, 1, 1), {"strides": [2, 2]}),
    ((1, 3, 8, 9), (4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 3, 8, 9), (4, 3, 4, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),
    ((1, 3, 8, 9), (4, 3, 4, 2), {"auto_pad": "SAME_UPPER"}),  # ORT: no dilation with SAME_*
    ((1, 3, 8, 9), (4, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}),
    ((1, 3, 8, 9), (4, 3, 3, 3), {"auto_pad": "NOTSET", "pads": [0, 1, 2, 0]}),
    ((2, 4, 17), (6, 4, 3), {"pads": [1, 2]}),  # 1-D
    ((2, 4, 17), (4, 2, 5), {"group": 2, "strides": [2], "dilations": [2]}),
    ((1, 4, 16), (4, 1, 3), {"group": 4, "auto_pad": "SAME_UPPER", "strides": [3]}),
    ((1, 3, 16), (2, 3, 4), {"auto_pad": "SAME_LOWER"}),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_float(case, bias):
    xs, ws, attrs = CONV_CASES[case]
    r = rng("conv", case, bias)
    inputs = [randn(r, *xs), randn(r, *ws)] + ([randn(r, ws[0])] if bias else [])
    check_op("Conv", inputs, {"kernel_shape": list(ws[2:]), **attrs}, atol=1e-4, rtol=1e-4)


def test_conv_fused_activation_clamps():
    r = rng("conv-act")
    x, w = randn(r, 1, 3, 6, 6), randn(r, 4, 3, 3, 3)
    plain = ref_run_node("Conv", [x, w], {})[0]
    relu = ref_run_node("Conv", [x, w], {"qm_activation": "Relu"})[0]
    clip = ref_run_node("Conv", [x, w], {"qm_activation": "Clip", "qm_clip": [0.0, 1.0]})[0]
    np.testing.assert_array_equal(relu, np.maximum(plain, 0))
    np.testing.assert_array_equal(clip, np.clip(plain, 0, 1))


# ---------------------------------------------------------------------------------------------------------
# ConvTranspose


CONVT_CASES = [
    ((2, 3, 5, 6), (3, 4, 3, 3), {}),
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2]}),
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
    ((1, 4, 5, 5), (4, 3, 3, 2), {"group": 2, "strides": [2, 3], "dilations": [2, 1]}),
    ((1, 4, 6, 5), (4, 1, 4, 4), {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # depthwise upsample
    ((1, 2, 5, 5), (2, 3, 2, 2), {"strides": [3, 3]}),  # stride > kernel: gaps
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 3, 5, 6), (3, 2, 4, 3), {"strides": [2, 2], "auto_pad": "VALID"}),
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2], "output_shape": [10, 12]}),
    ((1, 3, 5, 6), (3, 2, 3, 3), {"strides": [2, 2], "output_shape": [10, 11], "auto_pad": "SAME_UPPER"}),
    ((2, 3, 7), (3, 2, 3), {"strides": [2]}),  # 1-D
    ((1, 4, 7), (4, 1, 5), {"group": 2, "strides": [3], "pads": [1, 2], "output_padding": [2]}),
    ((1, 2, 6), (2, 2, 3), {"dilations": [2], "auto_pad": "SAME_LOWER", "strides": [2]}),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", range(len(CONVT_CASES)))
def test_conv_transpose_float(case, bias):
    xs, ws, attrs = CONVT_CASES[case]
    r = rng("convt", case, bias)
    group = attrs.get("group", 1)
    inputs = [randn(r, *xs), randn(r, *ws)] + ([randn(r, ws[1] * group)] if bias else [])
    check_op("ConvTranspose", inputs, {"kernel_shape": list(ws[2:]), **attrs}, atol=1e-4, rtol=1e-4)


def test_conv_transpose_traits():
    op = get_op("ConvTranspose")
    node = Node("n", "ConvTranspose", ["x", "w", "b"], ["y"])
    assert op.quant_kernel == "none" and op.weight_axis(node, 1) == 1 and op.weight_axis(node, 0) is None


# ---------------------------------------------------------------------------------------------------------
# Gemm / MatMul


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (1, 5), (4, 1), (4, 5)])
def test_gemm_float(trans_a, trans_b, c_shape):
    r = rng("gemm", trans_a, trans_b, c_shape)
    a = randn(r, *((6, 4) if trans_a else (4, 6)))
    b = randn(r, *((5, 6) if trans_b else (6, 5)))
    inputs = [a, b] + ([] if c_shape is None else [randn(r, *c_shape)])
    check_op("Gemm", inputs, {"transA": trans_a, "transB": trans_b})


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (1.0, -2.0), (2.5, 0.0), (-1.0, 0.25)])
def test_gemm_alpha_beta(alpha, beta):
    r = rng("gemm-ab", alpha, beta)
    check_op("Gemm", [randn(r, 3, 7), randn(r, 5, 7), randn(r, 5)], {"alpha": alpha, "beta": beta, "transB": 1})


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),
        ((2, 3, 4), (2, 4, 5)),
        ((2, 1, 3, 4), (5, 4, 6)),  # batch broadcast
        ((1, 3, 4), (3, 1, 4, 2)),
        ((4,), (4, 5)),  # 1-D promoted
        ((3, 4), (4,)),
        ((4,), (4,)),
        ((2, 3, 4), (4,)),
    ],
)
def test_matmul_float(a_shape, b_shape):
    r = rng("matmul", a_shape, b_shape)
    check_op("MatMul", [randn(r, *a_shape), randn(r, *b_shape)])


def test_gemm_traits():
    gemm, matmul = get_op("Gemm"), get_op("MatMul")
    n0 = Node("n", "Gemm", ["a", "b", "c"], ["y"])
    n1 = Node("n", "Gemm", ["a", "b", "c"], ["y"], {"transB": 1})
    assert gemm.quant_kernel == "accumulate" and gemm.bias_input == 2
    assert (gemm.weight_axis(n0, 1), gemm.weight_axis(n1, 1), gemm.weight_axis(n0, 0)) == (1, 0, None)
    nm = Node("n", "MatMul", ["a", "b"], ["y"])
    assert matmul.quant_kernel == "accumulate" and matmul.weight_axis(nm, 1) == 1 and matmul.weight_axis(nm, 0) is None


# ---------------------------------------------------------------------------------------------------------
# Normalization


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7), (3, 2)])
def test_batchnorm(shape):
    r = rng("bn", shape)
    c = shape[1]
    var = np.abs(randn(r, c)) + F32(0.1)
    check_op("BatchNormalization", [randn(r, *shape), randn(r, c), randn(r, c), randn(r, c), var], {"epsilon": 1e-3})


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 2)])
def test_batchnorm_training_mode(shape):
    r = rng("bnt", shape)
    c = shape[1]
    var = np.abs(randn(r, c)) + F32(0.1)
    check_op("BatchNormalization", [randn(r, *shape), randn(r, c), randn(r, c), randn(r, c), var],
             {"epsilon": 1e-3, "momentum": 0.8, "training_mode": 1}, n_outputs=3)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 9)])
def test_instancenorm(shape):
    r = rng("in", shape)
    c = shape[1]
    check_op("InstanceNormalization", [randn(r, *shape) * 3 + 1, randn(r, c), randn(r, c)], {"epsilon": 1e-4}, atol=1e-4)


@pytest.mark.parametrize("axis", [-1, 1, -2, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layernorm(axis, with_bias):
    r = rng("ln", axis, with_bias)
    x = randn(r, 2, 3, 4, 5) * 2 + 1
    norm_shape = x.shape[axis % 4:]
    inputs = [x, randn(r, *norm_shape)] + ([randn(r, *norm_shape)] if with_bias else [])
    check_op("LayerNormalization", inputs, {"axis": axis}, atol=1e-4)


def test_layernorm_mean_invstd_outputs():
    r = rng("ln3")
    x = randn(r, 3, 4, 6)
    check_op("LayerNormalization", [x, randn(r, 6), randn(r, 6)], {"axis": -1, "epsilon": 1e-3}, n_outputs=3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Pooling

POOL_CASES = [
    ((2, 3, 9, 10), {"kernel_shape": [3, 3]}),
    ((1, 2, 9, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 9, 10), {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    ((1, 2, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 7, 7), {"kernel_shape": [2, 2], "strides": [3, 3], "ceil_mode": 1}),  # stride > kernel
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "strides": [3, 3]}),
    ((1, 2, 10, 9), {"kernel_shape": [3, 2], "dilations": [2, 3]}),
    ((1, 2, 10, 9), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 2], "pads": [1, 1, 0, 1], "ceil_mode": 1}),
    ((1, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 9, 8), {"kernel_shape": [4, 3], "strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),  # 1-D
    ((2, 3, 11), {"kernel_shape": [4], "strides": [3], "ceil_mode": 1, "pads": [0, 2]}),
    ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "strides": [1, 2, 2]}),  # 3-D
]


@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_maxpool(case):
    shape, attrs = POOL_CASES[case]
    check_op("MaxPool", [randn(rng("maxpool", case), *shape)], attrs)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_averagepool(case, count_include_pad):
    shape, attrs = POOL_CASES[case]
    check_op("AveragePool", [randn(rng("avgpool", case), *shape)], {**attrs, "count_include_pad": count_include_pad})


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("case", [1, 2, 8])
def test_maxpool_on_codes_pads_with_lowest_code(case, dtype):
    """On codes the padding must be the lowest code (never a cast -inf); ORT's integer MaxPool agrees."""
    shape, attrs = POOL_CASES[case]
    info = np.iinfo(dtype)
    x = rng("maxpool-q", case, dtype).integers(info.min, info.max + 1, shape).astype(dtype)
    x[..., 0, :] = info.min  # a border of lowest codes next to the padding
    check_op("MaxPool", [x], attrs)


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("case", [0, 1, 2, 8])
def test_maxpool_indices_output(case, storage_order):
    shape, attrs = POOL_CASES[case]
    x = np.round(randn(rng("mpi", case), *shape) * 2) / 2  # many ties: the first maximum must win
    check_op("MaxPool", [x], {**attrs, "storage_order": storage_order}, n_outputs=2)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 9), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool(op, shape):
    check_op(op, [randn(rng(op, shape), *shape)])


def test_pool_traits():
    assert (get_op("MaxPool").quant_kernel, get_op("MaxPool").range_rule) == ("copy", "input")
    assert (get_op("GlobalMaxPool").quant_kernel, get_op("GlobalMaxPool").range_rule) == ("copy", "input")
    assert (get_op("AveragePool").quant_kernel, get_op("AveragePool").range_rule) == ("float", "input")
    assert (get_op("GlobalAveragePool").quant_kernel, get_op("GlobalAveragePool").range_rule) == ("float", "input")


# ---------------------------------------------------------------------------------------------------------
# Softmax


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("shape,axis", [((3, 10), -1), ((2, 3, 4), 1), ((2, 3, 4), 0), ((5,), 0), ((2, 3, 4, 5), -2)])
def test_softmax(op, shape, axis):
    x = randn(rng(op, shape, axis), *shape) * 5
    check_op(op, [x], {"axis": axis})
    if op == "Softmax":
        assert get_op(op).fixed_range == Range(0.0, 1.0) and get_op(op).quant_kernel == "float"


# ---------------------------------------------------------------------------------------------------------
# Resize

COORD_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
RESIZE_SCALES = [(2.0, 2.0), (0.5, 0.5), (1.5, 0.75), (3.0, 1.0), (0.6, 2.5)]


def _resize(x, attrs, scales=None, sizes=None, roi=None):
    inputs = [x, roi, None if scales is None else np.array(scales, F32), None if sizes is None else np.array(sizes, np.int64)]
    return check_op("Resize", inputs, attrs, const_inputs=(1, 2, 3))


@pytest.mark.parametrize("scales", RESIZE_SCALES)
@pytest.mark.parametrize("ctm", COORD_MODES + ["tf_half_pixel_for_nn"])
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
def test_resize_nearest(nearest_mode, ctm, scales):
    if ctm == "half_pixel_symmetric" and scales in [(1.5, 0.75), (0.6, 2.5)] and nearest_mode.startswith("round"):
        pytest.skip("known: at exact ties float32 misses by 1 ulp (0.49999997, 0.5000002) ORT 1.32 still sees a tie")
    x = randn(rng("rn", nearest_mode, ctm, scales), 1, 2, 7, 6)
    attrs = {"mode": "nearest", "nearest_mode": nearest_mode, "coordinate_transformation_mode": ctm}
    _resize(x, attrs, scales=[1.0, 1.0, *scales])


@pytest.mark.parametrize("scales", RESIZE_SCALES)
@pytest.mark.parametrize("ctm", COORD_MODES)
def test_resize_linear(ctm, scales):
    x = randn(rng("rl", ctm, scales), 2, 3, 7, 6)
    _resize(x, {"mode": "linear", "coordinate_transformation_mode": ctm}, scales=[1.0, 1.0, *scales])


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("sizes", [(14, 12), (3, 4), (9, 5), (1, 1), (7, 13)])
@pytest.mark.parametrize("ctm", ["half_pixel", "align_corners", "pytorch_half_pixel", "asymmetric"])
def test_resize_sizes(mode, sizes, ctm):
    x = randn(rng("rs", mode, sizes, ctm), 1, 2, 7, 6)
    _resize(x, {"mode": mode, "coordinate_transformation_mode": ctm}, sizes=[1, 2, *sizes])


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_keep_aspect_ratio_with_axes(mode, policy):
    x = randn(rng("rk", mode, policy), 1, 2, 7, 6)
    _resize(x, {"mode": mode, "axes": [2, 3], "keep_aspect_ratio_policy": policy}, sizes=[10, 15])


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [(2.0, 0.5), (0.7, 1.6)])
def test_resize_tf_crop_and_resize(mode, scales):
    x = randn(rng("rc", mode, scales), 1, 2, 6, 7)
    roi = np.array([0, 0, -0.2, 0.1, 1, 1, 0.8, 1.3], F32)  # crops partly outside -> extrapolation
    attrs = {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": -7.5}
    _resize(x, attrs, scales=[1.0, 1.0, *scales], roi=roi)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_2d_and_axes(mode):
    x = randn(rng("r2", mode), 5, 6)
    _resize(x, {"mode": mode}, scales=[2.0, 0.5])
    _resize(randn(rng("r2a", mode), 1, 3, 5, 6), {"mode": mode, "axes": [3, 2]}, scales=[1.5, 2.0])


def test_resize_nearest_3d_1d():
    _resize(randn(rng("r1"), 2, 3, 7), {"mode": "nearest"}, scales=[1.0, 1.0, 2.5])
    _resize(randn(rng("r3"), 1, 2, 3, 4, 5), {"mode": "nearest"}, scales=[1.0, 1.0, 2.0, 0.5, 1.5])


@pytest.mark.parametrize("scales", [(2.0, 2.0), (0.5, 0.6), (1.5, 0.75)])
@pytest.mark.parametrize("ctm", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"])
@pytest.mark.parametrize("exclude_outside", [0, 1])
def test_resize_cubic(scales, ctm, exclude_outside):
    x = randn(rng("rcu", scales, ctm, exclude_outside), 1, 2, 7, 6)
    attrs = {"mode": "cubic", "coordinate_transformation_mode": ctm, "exclude_outside": exclude_outside,
             "cubic_coeff_a": -0.5 if exclude_outside else -0.75}
    _resize(x, attrs, scales=[1.0, 1.0, *scales])


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("sizes", [(3, 2), (5, 4), (14, 3)])
def test_resize_antialias(mode, sizes):
    x = randn(rng("raa", mode, sizes), 1, 2, 9, 8)
    _resize(x, {"mode": mode, "antialias": 1}, sizes=[1, 2, *sizes])


def test_resize_nearest_antialias_is_refused():
    x = randn(rng("ru"), 1, 1, 4, 4)
    with pytest.raises(NotImplementedError, match="antialias"):
        ref_run_node("Resize", [x, None, np.array([1, 1, 0.5, 0.5], F32)], {"mode": "nearest", "antialias": 1})


def test_resize_traits():
    op = get_op("Resize")
    assert op.quant_kernel == "copy" and op.range_rule == "input"
    assert op.kernel_for(Node("n", "Resize", ["x"], ["y"], {"mode": "linear"})) == "float"
    assert op.kernel_for(Node("n", "Resize", ["x"], ["y"], {})) == "copy"


# ---------------------------------------------------------------------------------------------------------
# Pad


PAD_CASES = [
    ((2, 3, 4, 5), [0, 0, 1, 2, 0, 0, 2, 1], None),
    ((2, 3, 4, 5), [1, 0, 0, 3, 0, 2, 1, 0], None),
    ((3, 7), [2, 3, 1, 4], None),
    ((2, 3, 4, 5), [1, 2, 3, 1], [2, 3]),
    ((2, 3, 4, 5), [3, 1, 2, 0], [-1, 1]),  # negative axis, unsorted
    ((6,), [3, 5], None),
]


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("case", range(len(PAD_CASES)))
def test_pad(mode, case):
    shape, pads, axes = PAD_CASES[case]
    r = rng("pad", mode, case)
    x = randn(r, *shape)
    value = None if mode != "constant" or case % 2 else np.array(1.5, F32)
    inputs = [x, np.array(pads, np.int64), value, None if axes is None else np.array(axes, np.int64)]
    check_op("Pad", inputs, {"mode": mode}, const_inputs=(1, 2, 3))


@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_pad_negative_crops(mode):
    x = randn(rng("padneg", mode), 2, 3, 6, 5)
    check_op("Pad", [x, np.array([0, 0, -1, 2, 0, 0, 1, -2], np.int64)], {"mode": mode}, const_inputs=(1,))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_on_codes(mode):
    """Integer data pads like float data in ORT (uint8 Pad)."""
    x = rng("padq", mode).integers(0, 256, (1, 2, 4, 5)).astype(np.uint8)
    value = np.array(7, np.uint8) if mode == "constant" else None
    check_op("Pad", [x, np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), value], {"mode": mode}, const_inputs=(1, 2))


# ---------------------------------------------------------------------------------------------------------
# Integer kernels: Conv, Gemm, MatMul


def _qp(scale, zero_point, dtype, axis=None, narrow=False):
    from qmace.qmath import QuantParams

    return QuantParams(np.asarray(scale, F32), np.asarray(zero_point, np.int32), dtype, axis, narrow)


def _requant_ref(acc: np.ndarray, s_x, s_w, s_y, zp_y: int, channel_axis: int) -> np.ndarray:
    """y = clip(rint(float32(acc) * M) + zp_y, 0, 255), M = float32(float32(s_x * s_w[c]) / s_y); uint8 out."""
    m = (F32(s_x) * np.asarray(s_w, F32)).astype(F32) / F32(s_y)
    m = np.asarray(m, F32)
    if m.ndim:
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        m = m.reshape(shape)
    y = np.rint(acc.astype(F32) * m).astype(np.int64) + zp_y
    return np.clip(y, 0, 255).astype(np.uint8)


def _conv_acc_ref(qx, zp_x, qw, bias, stride, pads, dil, group) -> np.ndarray:
    """acc[n, m, o] = bias[m] + sum_{c, k} (qx - zp_x)[n, g(m)*Cg + c, o*s + k*d - pad] * qw[m, c, k], int64.

    2-D; x padded with zero point (0 after centring). Weights symmetric (zero point 0)."""
    x = qx.astype(np.int64) - zp_x
    w = qw.astype(np.int64)
    x = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    n, _, h, wd = x.shape
    m, cg, kh, kw = w.shape
    ho = (h - (kh - 1) * dil[0] - 1) // stride[0] + 1
    wo = (wd - (kw - 1) * dil[1] - 1) // stride[1] + 1
    mg = m // group
    acc = np.zeros((n, m, ho, wo), np.int64)
    for g in range(group):
        xg = x[:, g * cg:(g + 1) * cg]
        wg = w[g * mg:(g + 1) * mg]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dil[0]: i * dil[0] + (ho - 1) * stride[0] + 1: stride[0],
                           j * dil[1]: j * dil[1] + (wo - 1) * stride[1] + 1: stride[1]]
                acc[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch, wg[:, :, i, j])
    if bias is not None:
        acc += bias.astype(np.int64).reshape(1, -1, 1, 1)
    return acc


QCONV_CASES = [
    # (x shape, w shape, strides, pads, dilations, group)
    ((2, 8, 9, 10), (16, 8, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 16, 12, 11), (16, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 16),  # depthwise, stride 2
    ((1, 16, 10, 10), (32, 16, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise
    ((1, 3, 15, 14), (8, 3, 3, 3), (2, 2), (0, 1, 1, 0), (1, 1), 1),  # stem-like, asymmetric pads
    ((1, 8, 11, 12), (12, 2, 3, 2), (1, 2), (2, 1, 0, 1), (2, 2), 4),  # groups + dilation
    ((1, 64, 8, 8), (32, 64, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # K = 576
]


def _qconv_data(case: int):
    xs, ws, strides, pads, dil, group = QCONV_CASES[case]
    r = rng("qconv", case)
    qx = r.integers(0, 256, xs).astype(np.uint8)
    qw = r.integers(-127, 128, ws).astype(np.int8)
    bias = r.integers(-20000, 20000, ws[0]).astype(np.int32)
    s_x, zp_x = F32(0.02), int(r.integers(0, 256))
    s_w = (r.uniform(0.002, 0.02, ws[0])).astype(F32)
    k = ws[1] * ws[2] * ws[3]
    s_y, zp_y = F32(s_x * float(s_w.mean()) * np.sqrt(k) * 40), int(r.integers(60, 200))
    return qx, qw, bias, (s_x, zp_x), s_w, (s_y, zp_y), strides, pads, dil, group


def _qconv_qparams(x_params, s_w, y_params):
    xq = _qp(x_params[0], x_params[1], "uint8")
    wq = _qp(s_w, np.zeros(len(s_w)), "int8", axis=0, narrow=True)
    yq = _qp(y_params[0], y_params[1], "uint8")
    return xq, wq, yq


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", range(len(QCONV_CASES)))
def test_conv_integer_kernel_matches_int64_statement(case, with_bias):
    qx, qw, bias, xp, s_w, yp, strides, pads, dil, group = _qconv_data(case)
    bias = bias if with_bias else None
    xq, wq, yq = _qconv_qparams(xp, s_w, yp)
    node = Node("n", "Conv", ["x", "w"] + (["b"] if with_bias else []), ["y"],
                {"strides": list(strides), "pads": list(pads), "dilations": list(dil), "group": group})
    inputs = [qx, qw] + ([bias] if with_bias else [])
    got = get_op("Conv").run_quantized(node, inputs, [xq, wq, None], [yq])[0]
    acc = _conv_acc_ref(qx, xp[1], qw, bias, strides, pads, dil, group)
    want = _requant_ref(acc, xp[0], s_w, yp[0], yp[1], 1)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert 0.02 < np.mean((want > 0) & (want < 255))  # the case exercises the range, not only saturation


def _ort_qlinearconv(qx, qw, bias, xp, s_w, yp, attrs) -> np.ndarray:
    inits = [
        numpy_helper.from_array(np.array(xp[0], F32), "xs"), numpy_helper.from_array(np.array(xp[1], np.uint8), "xz"),
        numpy_helper.from_array(qw, "w"), numpy_helper.from_array(s_w, "ws"),
        numpy_helper.from_array(np.zeros(len(s_w), np.int8), "wz"),
        numpy_helper.from_array(np.array(yp[0], F32), "ys"), numpy_helper.from_array(np.array(yp[1], np.uint8), "yz"),
    ]
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        names.append("b")
    node = helper.make_node("QLinearConv", names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(qx.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    ort_exact(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": qx})[0]


@pytest.mark.parametrize("case", range(len(QCONV_CASES)))
def test_conv_integer_kernel_matches_ort_qlinearconv(case):
    """Measured bound: bit-exact (max difference 0 steps) with ORT 1.32's QLinearConv (u8 x s8, per channel)."""
    qx, qw, bias, xp, s_w, yp, strides, pads, dil, group = _qconv_data(case)
    attrs = {"strides": list(strides), "pads": list(pads), "dilations": list(dil), "group": group,
             "kernel_shape": list(qw.shape[2:])}
    xq, wq, yq = _qconv_qparams(xp, s_w, yp)
    node = Node("n", "Conv", ["x", "w", "b"], ["y"], attrs)
    got = get_op("Conv").run_quantized(node, [qx, qw, bias], [xq, wq, None], [yq])[0]
    want = _ort_qlinearconv(qx, qw, bias, xp, s_w, yp, attrs)
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() == 0, f"max diff {diff.max()} on {np.mean(diff > 0):.4%} of outputs"


def test_conv_integer_fused_relu_clamps_codes():
    qx, qw, bias, xp, s_w, yp, _, pads, _, _ = _qconv_data(0)
    xq, wq, yq = _qconv_qparams(xp, s_w, yp)
    attrs = {"pads": list(pads)}
    plain = get_op("Conv").run_quantized(Node("n", "Conv", ["x", "w", "b"], ["y"], attrs), [qx, qw, bias], [xq, wq, None], [yq])[0]
    relu_node = Node("n", "Conv", ["x", "w", "b"], ["y"], {**attrs, "qm_activation": "Relu"})
    relu = get_op("Conv").run_quantized(relu_node, [qx, qw, bias], [xq, wq, None], [yq])[0]
    np.testing.assert_array_equal(relu, np.maximum(plain, np.uint8(yp[1])))


def _gemm_data(key, m, k, n, per_channel):
    r = rng("qgemm", key)
    qa = r.integers(0, 256, (m, k)).astype(np.uint8)
    qb = r.integers(-127, 128, (k, n)).astype(np.int8)
    bias = r.integers(-30000, 30000, n).astype(np.int32)
    s_a, zp_a = F32(0.03), int(r.integers(0, 256))
    s_b = r.uniform(0.002, 0.02, n).astype(F32) if per_channel else F32(0.01)
    s_y, zp_y = F32(0.03 * 0.01 * np.sqrt(k) * 40), int(r.integers(60, 200))
    return qa, qb, bias, (s_a, zp_a), s_b, (s_y, zp_y)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_integer_kernel_matches_int64_statement(trans_a, trans_b, per_channel, with_bias):
    qa, qb, bias, ap, s_b, yp = _gemm_data((trans_a, trans_b, per_channel), 7, 300, 9, per_channel)
    acc = (qa.astype(np.int64) - ap[1]) @ qb.astype(np.int64)  # exact int64 (no BLAS)
    if with_bias:
        acc = acc + bias
    want = _requant_ref(acc, ap[0], s_b, yp[0], yp[1], 1)
    axis = (0 if trans_b else 1) if per_channel else None
    wq = _qp(s_b, np.zeros(np.shape(s_b)), "int8", axis=axis, narrow=True)
    a_in, b_in = (qa.T.copy() if trans_a else qa), (qb.T.copy() if trans_b else qb)
    node = Node("n", "Gemm", ["a", "b"] + (["c"] if with_bias else []), ["y"], {"transA": trans_a, "transB": trans_b})
    assert get_op("Gemm").weight_axis(node, 1) == (0 if trans_b else 1)
    got = get_op("Gemm").run_quantized(node, [a_in, b_in] + ([bias] if with_bias else []),
                                       [_qp(*ap, "uint8"), wq, None], [_qp(*yp, "uint8")])[0]
    np.testing.assert_array_equal(got, want)


def test_gemm_integer_rejects_alpha_beta():
    qa, qb, bias, ap, s_b, yp = _gemm_data("ab", 2, 4, 3, False)
    node = Node("n", "Gemm", ["a", "b", "c"], ["y"], {"alpha": 0.5})
    with pytest.raises(NotImplementedError, match="alpha"):
        get_op("Gemm").run_quantized(node, [qa, qb, bias], [_qp(*ap, "uint8"), _qp(s_b, 0, "int8"), None],
                                     [_qp(*yp, "uint8")])


def _ort_qlinearmatmul(qa, qb, ap, s_b, yp) -> np.ndarray:
    inits = [
        numpy_helper.from_array(np.array(ap[0], F32), "as"), numpy_helper.from_array(np.array(ap[1], np.uint8), "az"),
        numpy_helper.from_array(qb, "b"), numpy_helper.from_array(np.asarray(s_b, F32), "bs"),
        numpy_helper.from_array(np.zeros(np.shape(s_b), np.int8), "bz"),
        numpy_helper.from_array(np.array(yp[0], F32), "ys"), numpy_helper.from_array(np.array(yp[1], np.uint8), "yz"),
    ]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, list(qa.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    ort_exact(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(["y"], {"a": qa})[0]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("a_batch", [(), (2,), (2, 3)])
def test_matmul_integer_kernel(a_batch, per_channel):
    """Against the int64 statement (exact) and ORT's QLinearMatMul (measured: bit-exact)."""
    _, qb, _, ap, s_b, yp = _gemm_data(("mm", a_batch, per_channel), 5, 200, 6, per_channel)
    qa = rng("qmm-a", a_batch).integers(0, 256, (*a_batch, 5, 200)).astype(np.uint8)
    acc = np.matmul(qa.astype(np.int64) - ap[1], qb.astype(np.int64))
    want = _requant_ref(acc, ap[0], s_b, yp[0], yp[1], -1)
    wq = _qp(s_b, np.zeros(np.shape(s_b)), "int8", axis=1 if per_channel else None, narrow=True)
    node = Node("n", "MatMul", ["a", "b"], ["y"])
    got = get_op("MatMul").run_quantized(node, [qa, qb], [_qp(*ap, "uint8"), wq], [_qp(*yp, "uint8")])[0]
    np.testing.assert_array_equal(got, want)
    ort_y = _ort_qlinearmatmul(qa, qb, ap, s_b, yp)
    diff = np.abs(got.astype(np.int64) - ort_y.astype(np.int64))
    assert diff.max() == 0, f"max diff {diff.max()} on {np.mean(diff > 0):.4%} of outputs"


def test_matmul_integer_two_activations():
    """Activation x activation (no weight): both per tensor, asymmetric zero points on both sides."""
    r = rng("qmm2")
    qa = r.integers(0, 256, (2, 4, 30)).astype(np.uint8)
    qb = r.integers(0, 256, (2, 30, 5)).astype(np.uint8)
    ap, bp, yp = (F32(0.05), 120), (F32(0.04), 100), (F32(0.5), 128)
    acc = np.matmul(qa.astype(np.int64) - ap[1], qb.astype(np.int64) - bp[1])
    want = _requant_ref(acc, ap[0], bp[0], yp[0], yp[1], -1)
    got = get_op("MatMul").run_quantized(Node("n", "MatMul", ["a", "b"], ["y"]), [qa, qb],
                                         [_qp(*ap, "uint8"), _qp(*bp, "uint8")], [_qp(*yp, "uint8")])[0]
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# Code-moving kernels on quantized tensors: MaxPool, Pad, Resize


def test_quantized_copy_and_float_kernels():
    from qmace import qmath

    qp = _qp(0.05, 20, "uint8")
    q = rng("qcopy").integers(0, 256, (1, 2, 5, 6)).astype(np.uint8)
    # MaxPool on codes == quantize(MaxPool(dequantize)) (max is monotone), pads use the lowest code.
    mp = Node("n", "MaxPool", ["x"], ["y"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]})
    got = get_op("MaxPool").run_quantized(mp, [q], [qp], [qp])[0]
    np.testing.assert_array_equal(got, qmath.quantize(get_op("MaxPool").run(mp, [qmath.dequantize(q, qp)])[0], qp))
    # Pad: constant 0.0 -> the zero point; other constants -> their nearest code.
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    pn = Node("n", "Pad", ["x", "p"], ["y"])
    y = get_op("Pad").run_quantized(pn, [q, pads], [qp, None], [qp])[0]
    assert y.dtype == np.uint8 and np.all(y[..., 0, :] == 20) and np.array_equal(y[..., 1:-1, 1:-1], q)
    pv = Node("n", "Pad", ["x", "p", "v"], ["y"])
    y = get_op("Pad").run_quantized(pv, [q, pads, np.array(1.0, F32)], [qp, None, None], [qp])[0]
    assert np.all(y[..., 0, :] == 40)
    # Resize nearest moves codes; linear is dequantize -> float -> quantize.
    scales = np.array([1, 1, 2, 2], F32)
    rn = Node("n", "Resize", ["x", "", "s"], ["y"], {"mode": "nearest"})
    y = get_op("Resize").run_quantized(rn, [q, None, scales], [qp, None, None], [qp])[0]
    np.testing.assert_array_equal(y, q.repeat(2, axis=2).repeat(2, axis=3))
    rl = Node("n", "Resize", ["x", "", "s"], ["y"], {"mode": "linear"})
    y = get_op("Resize").run_quantized(rl, [q, None, scales], [qp, None, None], [qp])[0]
    np.testing.assert_array_equal(y, qmath.quantize(get_op("Resize").run(rl, [qmath.dequantize(q, qp), None, scales])[0], qp))
