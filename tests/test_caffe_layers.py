"""Caffe layers, one tiny net each, built in the test: qmace's converted graph (reference kernels and ONNX
Runtime) against numpy written from Caffe's layer definitions."""

from __future__ import annotations

import numpy as np
import pytest

from qmace.passes import optimize
from tests.caffe_util import conv_ref, convert, deconv_ref, input_layer, pool_ref, run_both

RNG = np.random.default_rng(14)


def _rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _check(prototxt, blobs, feeds, expected: dict[str, np.ndarray], atol=1e-4):
    for got in run_both(prototxt, blobs, feeds):
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.parametrize(("conv_param", "group", "stride", "pad", "dilation", "kernel", "bias"), [
    ("kernel_size: 3 pad: 1", 1, (1, 1), (1, 1), (1, 1), (3, 3), True),
    ("kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2", 2, (2, 2), (2, 2), (2, 2), (3, 3), True),
    ("kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 bias_term: false", 1, (2, 1), (1, 0),
     (1, 1), (3, 1), False),
    ("kernel_size: 3 group: 4 pad: 1", 4, (1, 1), (1, 1), (1, 1), (3, 3), True),  # depthwise
])
def test_convolution(conv_param, group, stride, pad, dilation, kernel, bias):
    x = _rand(1, 4, 9, 8)
    w, b = _rand(4, 4 // group, *kernel, scale=0.3), _rand(4, scale=0.1)
    net = input_layer((1, 4, 9, 8)) + (
        f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        f'convolution_param {{ num_output: 4 {conv_param} }} }}')
    want = conv_ref(x, w, b if bias else None, stride, pad, dilation, group)
    _check(net, {"conv": [w, b] if bias else [w]}, {"data": x}, {"conv": want})


@pytest.mark.parametrize(("param", "group", "stride", "pad", "dilation"), [
    ("kernel_size: 4 stride: 2 pad: 1", 1, (2, 2), (1, 1), (1, 1)),
    ("kernel_size: 3 stride: 2 dilation: 2 group: 2", 2, (2, 2), (0, 0), (2, 2)),
])
def test_deconvolution(param, group, stride, pad, dilation):
    x = _rand(1, 4, 5, 6)
    k = 4 if "kernel_size: 4" in param else 3
    w, b = _rand(4, 6 // group, k, k, scale=0.3), _rand(6, scale=0.1)
    net = input_layer((1, 4, 5, 6)) + (
        f'layer {{ name: "up" type: "Deconvolution" bottom: "data" top: "up" '
        f'convolution_param {{ num_output: 6 {param} }} }}')
    _check(net, {"up": [w, b]}, {"data": x}, {"up": deconv_ref(x, w, b, stride, pad, dilation, group)})


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product(transpose):
    x = _rand(2, 3, 4, 5)
    w, b = _rand(7, 60, scale=0.2), _rand(7)
    net = input_layer((2, 3, 4, 5)) + (
        'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        f'inner_product_param {{ num_output: 7 transpose: {str(transpose).lower()} }} }}')
    _check(net, {"fc": [w.T.copy() if transpose else w, b]}, {"data": x}, {"fc": x.reshape(2, -1) @ w.T + b})


@pytest.mark.parametrize(("method", "k", "s", "p", "size", "round_mode"), [
    ("MAX", 3, 2, 0, 112, "CEIL"),  # open_nsfw's pool1: ceil gives 56, floor would give 55
    ("MAX", 3, 2, 1, 7, "CEIL"),
    ("AVE", 3, 2, 1, 8, "CEIL"),  # the last window is clipped to in + pad: divisor counts pad, not overhang
    ("AVE", 3, 2, 0, 8, "CEIL"),  # overhang past the data without pad: divisor is the clipped window
    ("AVE", 2, 2, 1, 5, "CEIL"),  # the window that would start in the end pad is dropped
    ("AVE", 3, 3, 1, 10, "CEIL"),
    ("MAX", 3, 2, 0, 8, "FLOOR"),
    ("AVE", 7, 1, 0, 7, "CEIL"),
])
def test_pooling(method, k, s, p, size, round_mode):
    x = _rand(1, 2, size, size + 1)
    net = input_layer((1, 2, size, size + 1)) + (
        f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
        f'pooling_param {{ pool: {method} kernel_size: {k} stride: {s} pad: {p} round_mode: {round_mode} }} }}')
    want = pool_ref(x, method, (k, k), (s, s), (p, p), ceil=round_mode == "CEIL")
    _check(net, None, {"data": x}, {"pool": want})


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = _rand(2, 3, 5, 4)
    net = input_layer((2, 3, 5, 4)) + (
        f'layer {{ name: "gp" type: "Pooling" bottom: "data" top: "gp" '
        f'pooling_param {{ pool: {method} global_pooling: true }} }}')
    want = x.max(axis=(2, 3), keepdims=True) if method == "MAX" else x.mean(axis=(2, 3), keepdims=True)
    _check(net, None, {"data": x}, {"gp": want})


def test_pooling_window_in_padding_only_is_rejected():
    net = input_layer((1, 1, 5, 5)) + (
        'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
        'pooling_param { pool: MAX kernel_size: 1 stride: 3 } }')
    with pytest.raises(Exception, match="pool.*wholly in the padding"):
        convert(net)


def test_activations():
    x = _rand(2, 3, 4, 4)
    slope, shared = _rand(3), _rand(1)
    net = input_layer((2, 3, 4, 4)) + """
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
layer { name: "leaky" type: "ReLU" bottom: "data" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "prelu" }
layer { name: "prelu_shared" type: "PReLU" bottom: "data" top: "prelu_shared" prelu_param { channel_shared: true } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.3 } }
"""
    want = {
        "relu": np.maximum(x, 0), "leaky": np.where(x > 0, x, 0.1 * x),
        "prelu": np.where(x > 0, x, slope.reshape(1, 3, 1, 1) * x), "prelu_shared": np.where(x > 0, x, shared * x),
        "sig": 1 / (1 + np.exp(-x)), "tanh": np.tanh(x), "abs": np.abs(x), "drop": x,
    }
    _check(net, {"prelu": [slope], "prelu_shared": [shared]}, {"data": x}, want)


def test_batchnorm_scale_fold_into_conv_in_place():
    """conv -> BatchNorm -> Scale -> ReLU, all in place on one blob: folded and fused into one Conv, and
    the blob's name is the final (post-ReLU) value, as Caffe's net.blobs['conv'] after forward."""
    x = _rand(1, 3, 6, 6)
    w, b = _rand(4, 3, 3, 3, scale=0.3), _rand(4)
    mean, var, factor = _rand(4), (RNG.random(4) + 0.5).astype(np.float32), np.array([2.5], np.float32)
    gamma, beta = _rand(4), _rand(4)
    net = input_layer((1, 3, 6, 6)) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
"""
    blobs = {"conv": [w, b], "bn": [mean * factor, var * factor, factor], "scale": [gamma, beta]}
    y = conv_ref(x, w, b, (1, 1), (0, 0), (1, 1), 1)
    bn = (y - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + 1e-3)
    want = np.maximum(bn * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1), 0)
    _check(net, blobs, {"data": x}, {"conv": want})
    g = convert(net, blobs)
    assert g.outputs == ["conv"]
    assert [n.outputs[0] for n in g.nodes] == ["conv/conv", "conv/scale", "conv"]  # Scale merged into BatchNorm
    assert optimize(g).op_counts() == {"Conv": 1}


def test_batchnorm_scale_pair_without_conv_is_one_node():
    """BatchNorm + Scale after an Eltwise (nothing to fold into): merged into one BatchNormalization."""
    a, b = _rand(1, 3, 4, 4), _rand(1, 3, 4, 4)
    mean, var, gamma, beta = _rand(3), (RNG.random(3) + 0.5).astype(np.float32), _rand(3), _rand(3)
    net = input_layer((1, 3, 4, 4), "a") + input_layer((1, 3, 4, 4), "b") + """
layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "add" }
layer { name: "bn" type: "BatchNorm" bottom: "add" top: "add" }
layer { name: "sc" type: "Scale" bottom: "add" top: "add" scale_param { bias_term: true } }
"""
    blobs = {"bn": [mean, var, np.ones(1, np.float32)], "sc": [gamma, beta]}
    c = lambda v: v.reshape(1, 3, 1, 1)
    want = (a + b - c(mean)) / np.sqrt(c(var) + 1e-5) * c(gamma) + c(beta)
    _check(net, blobs, {"a": a, "b": b}, {"add": want})
    assert convert(net, blobs).op_counts() == {"Add": 1, "BatchNormalization": 1}


def test_batchnorm_zero_scale_factor_and_scale_on_other_axes():
    x = _rand(2, 3, 4, 5)
    mean, var = _rand(3), (RNG.random(3) + 0.5).astype(np.float32)
    s2 = _rand(4, 5)
    net = input_layer((2, 3, 4, 5)) + """
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
layer { name: "s2" type: "Scale" bottom: "data" top: "s2" scale_param { axis: 2 num_axes: 2 } }
layer { name: "b" type: "Bias" bottom: "data" top: "b" }
"""
    bias = _rand(3)
    blobs = {"bn": [mean, var, np.zeros(1, np.float32)], "s2": [s2], "b": [bias]}
    _check(net, blobs, {"data": x}, {"bn": x / np.sqrt(1e-5), "s2": x * s2, "b": x + bias.reshape(1, 3, 1, 1)},
           atol=1e-2)


def test_scale_by_second_bottom():
    x, f = _rand(2, 3, 4, 4), _rand(2, 3)
    net = input_layer((2, 3, 4, 4)) + input_layer((2, 3), "f") + (
        'layer { name: "s" type: "Scale" bottom: "data" bottom: "f" top: "s" scale_param { axis: 0 } }')
    _check(net, None, {"data": x, "f": f}, {"s": x * f.reshape(2, 3, 1, 1)})


def test_eltwise():
    a, b, c = _rand(1, 2, 3, 3), _rand(1, 2, 3, 3), _rand(1, 2, 3, 3)
    net = input_layer((1, 2, 3, 3), "a") + input_layer((1, 2, 3, 3), "b") + input_layer((1, 2, 3, 3), "c") + """
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "sum" }
layer { name: "wsum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "wsum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: 1 coeff: -2 } }
layer { name: "diff" type: "Eltwise" bottom: "a" bottom: "b" top: "diff" eltwise_param { coeff: 1 coeff: -1 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "max" eltwise_param { operation: MAX } }
"""
    want = {"sum": a + b + c, "wsum": 0.5 * a + b - 2 * c, "diff": a - b, "prod": a * b * c,
            "max": np.maximum(np.maximum(a, b), c)}
    _check(net, None, {"a": a, "b": b, "c": c}, want)


def test_shape_layers():
    x = _rand(2, 6, 4, 5)
    net = input_layer((2, 6, 4, 5)) + input_layer((1, 1, 2, 3), "ref") + """
layer { name: "cat" type: "Concat" bottom: "data" bottom: "data" top: "cat" concat_param { axis: 2 } }
layer { name: "sl" type: "Slice" bottom: "data" top: "s0" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 1 slice_point: 4 } }
layer { name: "eq" type: "Slice" bottom: "data" top: "e0" top: "e1" slice_param { axis: -1 slice_point: 2 } }
layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" }
layer { name: "flat2" type: "Flatten" bottom: "data" top: "flat2" flatten_param { axis: 2 } }
layer { name: "rs" type: "Reshape" bottom: "data" top: "rs" reshape_param { shape { dim: 0 dim: -1 dim: 10 } } }
layer { name: "rs2" type: "Reshape" bottom: "data" top: "rs2" reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 3 } } }
layer { name: "crop" type: "Crop" bottom: "data" bottom: "ref" top: "crop" crop_param { axis: 2 offset: 1 offset: 2 } }
layer { name: "sm" type: "Softmax" bottom: "data" top: "sm" }
layer { name: "sm3" type: "Softmax" bottom: "data" top: "sm3" softmax_param { axis: 3 } }
layer { name: "pw" type: "Power" bottom: "data" top: "pw" power_param { power: 2 scale: 0.5 shift: 3 } }
layer { name: "pw1" type: "Power" bottom: "data" top: "pw1" power_param { scale: -1 } }
"""

    def softmax(v, axis):
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    want = {
        "cat": np.concatenate([x, x], axis=2), "s0": x[:, :1], "s1": x[:, 1:4], "s2": x[:, 4:],
        "e0": x[..., :2], "e1": x[..., 2:], "flat": x.reshape(2, -1), "flat2": x.reshape(2, 6, 20),
        "rs": x.reshape(2, -1, 10), "rs2": x.reshape(2, 2, 3, 4, 5), "crop": x[:, :, 1:3, 2:5],
        "sm": softmax(x, 1), "sm3": softmax(x, 3), "pw": (3 + 0.5 * x) ** 2, "pw1": -x,
    }
    _check(net, None, {"data": x, "ref": np.zeros((1, 1, 2, 3), np.float32)}, want)


def test_v1_layers_with_legacy_blobs():
    """The deprecated ``layers`` format (enum types) with 4-D legacy blob shapes in the caffemodel."""
    x = _rand(1, 3, 5, 5)
    w, b = _rand(4, 3, 3, 3, scale=0.3), _rand(4)
    fw, fb = _rand(2, 16, scale=0.2), _rand(2)  # pool: ceil((3 - 2) / 2) + 1 = 2
    net = """name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 5 input_dim: 5
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool" top: "fc" inner_product_param { num_output: 2 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" top: "loss" include { phase: TRAIN } }
"""
    y = np.maximum(conv_ref(x, w, b, (1, 1), (0, 0), (1, 1), 1), 0)
    p = pool_ref(y, "MAX", (2, 2), (2, 2), (0, 0))
    logits = p.reshape(1, -1) @ fw.T + fb
    e = np.exp(logits - logits.max())
    want = e / e.sum()
    for got in run_both(net, {"conv": [w, b], "fc": [fw, fb]}, {"data": x}, legacy=True, v1=True):
        np.testing.assert_allclose(got["prob"], want, rtol=1e-4, atol=1e-6)
