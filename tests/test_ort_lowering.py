"""qmace.runtime.ort_lowering: MaxPool on codes and padding-heavy depthwise convolutions go through ONNX Runtime's
float kernels and must still give exactly the reference's codes (and ORT's integer kernels' codes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qmace.data import Sample
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.onnx_bridge import to_onnx
from qmace.passes import optimize
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session, ort_lowering
from qmace.runtime.session import ort_session
from tests.conftest import make_onnx, rand

C = 16


def _model(h: int, w: int, k: int = 5, relu_after: bool = False) -> onnx.ModelProto:
    """1x1 conv -> depthwise kxk (pad k//2) [-> Relu] -> MaxPool 2x2 -> 1x1 conv, on a [1, 8, h, w] input."""
    rng = np.random.default_rng(h * 100 + w)
    inits = {"w1": rand(rng, C, 8, 1, 1), "b1": rand(rng, C), "wd": rand(rng, C, 1, k, k), "bd": rand(rng, C),
             "w2": rand(rng, 8, C, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="expand"),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], name="depthwise", group=C, kernel_shape=[k, k],
                              pads=[k // 2] * 4),
             helper.make_node("MaxPool", ["dr" if relu_after else "d"], ["p"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="project")]
    if relu_after:
        nodes.insert(3, helper.make_node("Relu", ["d"], ["dr"], name="relu_after"))
    return make_onnx(nodes, {"x": (1, 8, h, w)}, ["y"], inits)


def _quantized(model: onnx.ModelProto, schema: str):
    g = optimize(onnx_to_graph(model))
    shape = tuple(g.tensors["x"].shape)
    rng = np.random.default_rng(1)
    cal = make_calibrator("mace", percentile=0.0)
    calibrate(g, [Sample(f"_{i}", {"x": rand(rng, *shape, scale=1.0)}) for i in range(4)], cal)
    res = quantize_graph(g, cal.ranges(), QuantizeOptions(schema=schema, input_ranges={"x": (-3.0, 3.0)}))
    assert res.fallbacks == []
    return res.graph, shape


@pytest.mark.parametrize("schema", ["int8", "uint8", "int8_w7"])
@pytest.mark.parametrize("h,relu_after", [(2, False), (3, False), (2, True)])
def test_padding_heavy_depthwise_and_maxpool_are_exact(schema, h, relu_after):
    """A 5x5 depthwise on a map 2 or 3 rows high reads padding with most taps: it (with a Relu after it) and
    the MaxPool are lowered to float kernels, and every quantized tensor equals the reference's codes on
    full-range inputs."""
    qg, shape = _quantized(_model(h, 24, relu_after=relu_after), schema)
    assert sorted(ort_lowering.lower_for_ort(to_onnx(qg))) == ["depthwise", "pool"]
    names = [n for n, t in qg.tensors.items() if t.is_quantized and n != "x"]
    fast, ref = Session(qg, backend="onnxruntime", num_threads=1), Session(qg, backend="reference")
    rng = np.random.default_rng(7)
    for _ in range(4):
        feeds = {"x": rand(rng, *shape, scale=2.0)}  # saturates some codes at both ends
        a, b = fast.run(feeds, observe=names), ref.run(feeds, observe=names)
        for n in names:
            np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_lowered_model_equals_onnx_runtimes_integer_kernels():
    """The rewritten model and the plain QDQ model (QLinearConv, uint8 MaxPool) give the same codes in ORT."""
    qg, shape = _quantized(_model(2, 40), "int8")
    plain = to_onnx(qg, extra_outputs=["d", "p"])
    lowered = onnx.ModelProto()
    lowered.CopyFrom(plain)
    assert ort_lowering.lower_for_ort(lowered)
    kinds = {n.op_type for n in lowered.graph.node}
    assert "Cast" in kinds and "Mul" in kinds
    s_plain = ort_session(plain.SerializeToString(), 1)
    s_low = ort_session(lowered.SerializeToString(), 1, disabled=ort_lowering.DISABLED_OPTIMIZERS)
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = rand(rng, *shape, scale=2.0)
        for a, b in zip(s_plain.run(None, {"x": x}), s_low.run(None, {"x": x})):
            np.testing.assert_array_equal(a, b)


def test_large_maps_keep_the_integer_kernel():
    """A 3x3 depthwise on a 16x16 map reads the map with 92% of its taps: it stays QLinearConv."""
    qg, _ = _quantized(_model(16, 16, k=3), "int8")
    assert ort_lowering.lower_for_ort(to_onnx(qg)) == ["pool"]


def test_sums_that_float32_cannot_hold_keep_the_integer_kernel():
    """A bias code of 2^24 would make the float accumulator inexact: the convolution is left alone."""
    qg, _ = _quantized(_model(2, 24), "int8")
    model = to_onnx(qg)
    conv = next(n for n in model.graph.node if n.name == "depthwise")
    bias_dq = next(n for n in model.graph.node if conv.input[2] in n.output)
    bias = next(t for t in model.graph.initializer if t.name == bias_dq.input[0])
    codes = numpy_helper.to_array(bias).copy()
    codes[0] = 2 ** 24
    bias.CopyFrom(numpy_helper.from_array(codes, bias.name))
    assert ort_lowering.lower_for_ort(model) == ["pool"]


@pytest.mark.parametrize("size,k,stride,pads,share", [(2, 5, 1, (2, 2), 0.4), (3, 5, 1, (2, 2), 0.6),
                                                      (16, 3, 1, (1, 1), 46 / 48), (4, 3, 2, (1, 1), 5 / 6),
                                                      (7, 1, 1, (0, 0), 1.0)])
def test_useful_tap_share(size, k, stride, pads, share):
    """Counted by hand: e.g. 2 rows, 5 taps, pad 2: each output row reads 2 of its 5 taps inside the map."""
    assert ort_lowering._useful_share(size, k, stride, *pads, 1) == pytest.approx(share)


def _tie_breaking_channels(n: int) -> tuple[np.float32, np.ndarray, np.float32, np.ndarray]:
    """Scales s_x, per-channel s_w, s_y and one accumulator per channel for which QLinearConv's multiplier
    ``(s_x * s_w) / s_y`` and the other float32 order ``s_x * (s_w / s_y)`` round ``acc * M`` differently."""
    rng = np.random.default_rng(11)
    sx, sy = np.float32(0.0173), np.float32(0.0419)
    sws, accs = [], []
    acc = np.arange(1, 1 << 20, dtype=np.float32)
    while len(sws) < n:
        sw = np.float32(rng.uniform(0.001, 0.01))
        m1, m2 = np.float32(sx * sw) / sy, sx * np.float32(sw / sy)
        if m1 == m2:
            continue
        hit = np.nonzero(np.rint(acc * m1) != np.rint(acc * m2))[0]
        if hit.size:
            sws.append(sw)
            accs.append(int(acc[hit[0]]))
    return sx, np.array(sws, np.float32), sy, np.array(accs, np.int32)


def _hand_depthwise(sx, sw, sy, acc, codes=np.uint8) -> onnx.ModelProto:
    """DQ(x) -> depthwise 5x5 Conv (zero weights, bias codes ``acc``) -> Q on a [1, c, 2, 8] map of ``codes``."""
    c = len(sw)
    t = numpy_helper.from_array
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(codes))
    inits = [t(np.zeros((c, 1, 5, 5), np.int8), "wq"), t(sw, "ws"), t(np.zeros(c, np.int8), "wz"), t(acc, "bq"),
             t(sx * sw, "bs"), t(sx, "xs"), t(codes(128), "xz"), t(sy, "ys"), t(codes(3), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dqw"),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], axis=0, name="dqb"),
             helper.make_node("Conv", ["x", "w", "b"], ["acc"], group=c, kernel_shape=[5, 5], pads=[2] * 4,
                              name="depthwise"),
             helper.make_node("QuantizeLinear", ["acc", "ys", "yz"], ["y"], name="q")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", elem, [1, c, 2, 8])],
                              [helper.make_tensor_value_info("y", elem, [1, c, 2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_requantization_multiplier_is_onnx_runtimes():
    """Accumulators chosen where the multiplier's float32 rounding decides the code: the lowered float route
    gives QLinearConv's codes (fails if the multiplier were computed in another order)."""
    sx, sw, sy, acc = _tie_breaking_channels(8)
    plain = _hand_depthwise(sx, sw, sy, acc)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(plain)
    assert ort_lowering.lower_for_ort(lowered) == ["depthwise"]
    xq = np.full((1, 8, 2, 8), 77, np.uint8)
    want = np.clip(np.rint(acc.astype(np.float32) * (np.float32(sx * sw) / sy)) + 3, 0, 255).astype(np.uint8)
    got_plain = ort_session(plain.SerializeToString(), 1).run(None, {"xq": xq})[0]
    got = ort_session(lowered.SerializeToString(), 1, disabled=ort_lowering.DISABLED_OPTIMIZERS).run(None, {"xq": xq})[0]
    np.testing.assert_array_equal(got_plain[0, :, 0, 0], want)
    np.testing.assert_array_equal(got, got_plain)


def test_sixteen_bit_activations_keep_their_lowering():
    """ORT runs a 16-bit QDQ convolution as a float island, not QLinearConv: the float route (QLinearConv's
    arithmetic) would change its codes, so such a convolution is left alone."""
    sx, sw, sy, acc = _tie_breaking_channels(2)
    assert ort_lowering.lower_for_ort(_hand_depthwise(sx, sw, sy, acc, codes=np.uint16)) == []
    assert ort_lowering.lower_for_ort(_hand_depthwise(sx, sw, sy, acc)) == ["depthwise"]
