"""Activation equalization: the float function is unchanged, small channels get rescaled up to the widest,
ineligible tensors are left alone, and per-tensor 8-bit quantization gets measurably more accurate."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace.data import Sample
from qmace.frontends import onnx_to_graph
from qmace.metrics import compare
from qmace.passes import optimize
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session

C = 8


def _model(tail: str = "conv"):
    """x -> expand Conv+ReLU6 -> depthwise Conv+ReLU6 -> project Conv -> (+ skip Conv) -> Conv -> y.

    Channel scales differ by up to 128x (weight rows scaled) and the next layer's columns compensate, as in
    BN-folded layers of a trained network: every channel matters downstream."""
    rng = np.random.default_rng(7)
    sv = (2.0 ** -np.arange(C) * 3).astype(np.float32)  # 3 ... 3/128
    spread = sv[:, None, None, None]
    inits = [
        numpy_helper.from_array((rng.standard_normal((C, 3, 1, 1)) * spread).astype(np.float32), "we"),
        numpy_helper.from_array((rng.uniform(0, 0.3, C) * spread[:, 0, 0, 0]).astype(np.float32), "be"),
        numpy_helper.from_array((rng.standard_normal((C, 1, 3, 3)) * 0.4).astype(np.float32), "wd"),
        numpy_helper.from_array((rng.standard_normal((C, C, 1, 1)) * 0.3 * spread / sv[None, :, None, None]).astype(np.float32),
                                "wp"),
        numpy_helper.from_array((rng.standard_normal((C, 3, 1, 1)) * spread).astype(np.float32), "ws"),
        numpy_helper.from_array((rng.standard_normal((4, C, 1, 1)) * 0.5 / sv[None, :, None, None]).astype(np.float32), "wo"),
        numpy_helper.from_array((rng.standard_normal((4, C)) * 0.5 / sv[None, :]).astype(np.float32), "wg"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
        helper.make_node("Conv", ["e6", "wd"], ["d"], pads=[1, 1, 1, 1], group=C),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
        helper.make_node("Conv", ["d6", "wp"], ["p"]),
        helper.make_node("Conv", ["x", "ws"], ["s"]),
        helper.make_node("Add", ["p", "s"], ["r"]),
    ]
    if tail == "gap":  # the residual group ends in a graph output
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["y"]))
    elif tail == "gemm":  # channel-wise ops carry the group to a Gemm
        nodes += [helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("GlobalAveragePool", ["mp"], ["gp"]),
                  helper.make_node("Flatten", ["gp"], ["fl"]),
                  helper.make_node("Gemm", ["fl", "wg"], ["y"], transB=1)]
    else:
        nodes.append(helper.make_node("Conv", ["r", "wo"], ["y"]))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return optimize(onnx_to_graph(model))


def _samples(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(str(i), {"x": rng.uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)}) for i in range(n)]


def _maxima(g, samples):
    mx = ChannelMaxima(g)
    assert calibrate(g, samples, None, observers=[mx]) == len(samples)
    return mx


def _run(g, samples):
    s = Session(g, backend="reference")
    return np.concatenate([s.run(x.feeds)[g.outputs[0]] for x in samples])


def test_float_function_unchanged_and_channels_levelled():
    g, cal = _model(), _samples()
    mx = _maxima(g, cal)
    ge, groups = equalize_activations(g, mx, strength=1.0, free_strength=1.0, max_scale=1e6)
    eq_tensors = {t for gr in groups for t in gr.tensors}
    assert {"e6", "d6"} <= eq_tensors and {"p", "s", "r"} <= eq_tensors  # the residual group is one group
    assert any(set(gr.tensors) == {"p", "s", "r"} for gr in groups)
    # the float function is unchanged on the calibration data and on fresh data inside its ranges
    for data in (cal, _samples(8, seed=1)):
        np.testing.assert_allclose(_run(ge, data), _run(g, data), rtol=1e-4, atol=1e-5)
    # with full strength every channel of a rescaled tensor now reaches the tensor's widest channel
    after = _maxima(ge, cal)
    for t in ("e6", "d6"):
        m0, m1 = mx.maxima[t], after.maxima[t]
        assert m0.max() / m0.min() > 8, "the test model must have uneven channels"
        np.testing.assert_allclose(m1, m0.max(), rtol=1e-4)
        assert m1.max() <= 6.0 + 1e-5  # the fused ReLU6 never clips a rescaled calibration value


def test_strength_and_cap_bound_the_scales():
    g, cal = _model(), _samples()
    mx = _maxima(g, cal)
    _, full = equalize_activations(g, mx, strength=1.0, free_strength=1.0, max_scale=1e6)
    _, half = equalize_activations(g, mx, strength=0.5, free_strength=0.5, max_scale=1e6)
    _, capped = equalize_activations(g, mx, strength=1.0, free_strength=1.0, max_scale=4.0)
    by = lambda groups: {tuple(gr.tensors): gr for gr in groups}
    for k, gr in by(full).items():
        assert by(half)[k].max_scale == pytest.approx(gr.max_scale ** 0.5, rel=1e-6)
        assert by(capped)[k].max_scale == pytest.approx(min(4.0, gr.max_scale))
        assert gr.min_scale == pytest.approx(1.0)  # the widest channel is never rescaled
    _, none = equalize_activations(g, mx, strength=0.0, free_strength=0.0)
    assert none == []
    with pytest.raises(ValueError, match="strength"):
        equalize_activations(g, mx, strength=1.5)


def test_ineligible_tensors_are_left_alone():
    g, cal = _model(tail="gap"), _samples()
    mx = _maxima(g, cal)
    ge, groups = equalize_activations(g, mx, strength=1.0, free_strength=1.0)
    eq_tensors = {t for gr in groups for t in gr.tensors}
    # the residual group ends in a graph output (nothing downstream can absorb the scale): untouched
    assert not eq_tensors & {"p", "s", "r"}
    assert {"e6", "d6"} <= eq_tensors
    producers = ge.producers()
    assert ge.constant(producers["s"].inputs[1]) is g.constant(g.producers()["s"].inputs[1])
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)


def test_clip_with_negative_floor_is_not_rescaled():
    g, cal = _model(), _samples()
    g.producers()["e6"].attrs["qm_clip"] = [-1.0, 6.0]
    _, groups = equalize_activations(g, _maxima(g, cal))
    assert "e6" not in {t for gr in groups for t in gr.tensors}


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_equalization_makes_per_tensor_quantization_more_accurate(schema):
    g, cal, ev = _model(), _samples(), _samples(16, seed=2)
    ref = _run(g, ev)

    def quantized_sqnr(graph):
        c, means = make_calibrator("mace"), ChannelMeans(graph)
        calibrate(graph, cal, c, observers=[means])
        gb, _ = correct_biases(graph, means, schema)
        qg = quantize_graph(gb, c.ranges(), QuantizeOptions(schema=schema, input_ranges={"x": (-1.0, 1.0)})).graph
        return compare(ref, _run(qg, ev)).sqnr_db

    ge, _ = equalize_activations(g, _maxima(g, cal), per_tensor_weights=schema == "uint8")  # as run_ptq does
    plain, equalized = quantized_sqnr(g), quantized_sqnr(ge)
    assert equalized > plain + 3.0, (plain, equalized)


def test_group_follows_channelwise_ops_to_a_gemm():
    g, cal = _model(tail="gemm"), _samples()
    mx = _maxima(g, cal)
    ge, groups = equalize_activations(g, mx, strength=1.0, free_strength=1.0, max_scale=1e6)
    res = next(gr for gr in groups if "r" in gr.tensors)
    assert set(res.tensors) == {"p", "s", "r", "mp", "gp", "fl"}
    assert ge.producers()["y"].name in res.consumers
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)
    after = _maxima(ge, cal)
    np.testing.assert_allclose(after.maxima["r"], mx.maxima["r"].max(), rtol=1e-4)


def _graph(nodes, inits, shape):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return optimize(onnx_to_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))


def _x_samples(shape, n=16):
    rng = np.random.default_rng(3)
    return [Sample(str(i), {"x": rng.uniform(-1, 1, shape).astype(np.float32)}) for i in range(n)]


def test_a_matmul_contracting_the_last_axis_does_not_read_channels():
    """Conv output (N, C, H, W) -> MatMul with a (W, K) weight contracts W, not the channels (axis 1): the
    layer's channel_axis (-1) is not axis 1 of its 4-D input, so the group is left alone."""
    rng = np.random.default_rng(0)
    spread = (2.0 ** -np.arange(C)).astype(np.float32)
    inits = {"w": (rng.standard_normal((C, 3, 1, 1)) * spread[:, None, None, None]).astype(np.float32),
             "m": rng.standard_normal((12, 4)).astype(np.float32)}
    g = _graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("MatMul", ["c", "m"], ["y"])],
               inits, [1, 3, 12, 12])
    cal = _x_samples((1, 3, 12, 12))
    ge, groups = equalize_activations(g, _maxima(g, cal), strength=1.0, free_strength=1.0)
    assert groups == []
    np.testing.assert_array_equal(_run(ge, cal), _run(g, cal))


def test_gemm_layers_with_2d_outputs_are_equalized():
    """Gemm -> Relu -> Gemm: a linear layer whose channels are axis 1 of its 2-D output produces a group, the
    next Gemm's columns compensate, and the float function is unchanged."""
    rng = np.random.default_rng(1)
    spread = (2.0 ** -np.arange(C)).astype(np.float32)
    inits = {"w1": (rng.standard_normal((C, 6)) * spread[:, None]).astype(np.float32),
             "b1": (rng.uniform(0, 0.1, C) * spread).astype(np.float32),
             "w2": (rng.standard_normal((C, 3)) / spread[:, None]).astype(np.float32)}
    g = _graph([helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
                helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("MatMul", ["r", "w2"], ["y"])], inits, [2, 6])
    cal = _x_samples((2, 6))
    ge, groups = equalize_activations(g, _maxima(g, cal), strength=1.0, free_strength=1.0, max_scale=1e6)
    assert [gr.tensors for gr in groups] == [["r"]] and groups[0].max_scale > 8
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)


def _outlier_model():
    """x -> Conv+ReLU6 -> depthwise Conv+ReLU6 -> Conv -> y, where depthwise channel 0 is a BatchNorm-folded
    outlier: its input channel is dead (the expand row is zero, bias 0), its weight row is 40x the others and
    its small output comes from its bias alone. The row sets the depthwise layer's per-tensor weight range.
    The expand layer's other channels all reach about the same maximum (nothing to equalize there)."""
    rng = np.random.default_rng(11)
    we = rng.standard_normal((C, 3, 1, 1))
    we = (we / np.abs(we).sum(axis=1, keepdims=True)).astype(np.float32)  # the other channels reach ~1.5
    we[0] = 0.0
    be = np.full(C, 0.5, np.float32)
    be[0] = 0.0
    wd = (rng.standard_normal((C, 1, 3, 3)) * 0.4).astype(np.float32)
    wd[0] = 16.0 * np.sign(rng.standard_normal((1, 3, 3)))
    bd = np.full(C, 0.1, np.float32)
    bd[0] = 0.005
    inits = {"we": we, "be": be, "wd": wd, "bd": bd,
             "wp": (rng.standard_normal((4, C, 1, 1)) * 0.5).astype(np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"]),
             helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
             helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=C),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             helper.make_node("Conv", ["d6", "wp"], ["y"])]
    return _graph(nodes, inits, [1, 3, 12, 12])


def test_per_tensor_weights_keep_every_producer_range():
    """uint8 weights are per tensor: equalization must not multiply up the row that sets a producer's range
    (the benchmark C collapse: a depthwise range grew 3.6x and 63 of its 64 rows rounded to zero)."""
    g, cal = _outlier_model(), _samples()
    mx = _maxima(g, cal)
    wmax = lambda graph, node: float(np.abs(graph.constant(graph.producers()[node].inputs[1])).max())
    old, _ = equalize_activations(g, mx)  # the per-channel rules
    assert wmax(old, "d6") > 2.0 * wmax(g, "d6"), "the model must trigger the range blow-up"
    ge, groups = equalize_activations(g, mx, per_tensor_weights=True)
    assert "d6" in {t for gr in groups for t in gr.tensors}  # still rescaled, within the headroom
    for t in ("e6", "d6"):
        assert wmax(ge, t) == pytest.approx(wmax(g, t), rel=1e-6)
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)


def _uint8_sqnr(g, cal, ev, equalize: bool) -> float:
    """Output SQNR on ``ev`` of ``run_ptq``'s uint8 model of ``g`` (input range [-1, 1], no bias correction),
    with or without the schema's equalization."""
    from qmace.quantize.recipe import PTQRecipe, run_ptq

    res = run_ptq(g, cal, PTQRecipe(equalize=equalize, bias_correction=False, schema="uint8"),
                  QuantizeOptions(schema="uint8", input_ranges={"x": (-1.0, 1.0)}))
    return compare(_run(g, ev), _run(res.graph, ev)).sqnr_db


def test_uint8_recipe_equalization_does_not_collapse_an_outlier_layer():
    g, cal, ev = _outlier_model(), _samples(), _samples(16, seed=2)
    plain, equalized = _uint8_sqnr(g, cal, ev, False), _uint8_sqnr(g, cal, ev, True)
    assert plain > 20.0, plain
    assert equalized > plain - 1.0, (plain, equalized)
