"""Calibration for dense outputs (issue 10 item 4): the inputs of saturating fixed-range ops keep their rare
high values (qmace.quantize.dense), and equalization / bias correction / AdaRound run on feature-pyramid
graphs (Resize, ConvTranspose, Concat) without changing the float function."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from qmace.data import Sample
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.metrics import compare
from qmace.passes import optimize
from qmace.quantize.adaround import InputStatistics, adaround
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.dense import saturating_input_ranges
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import Range
from qmace.quantize.recipe import calibrate, equalize_on
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

H = W = 100


def _prob_map():
    """x (1,1,100,100) -> Conv 1x1 (w=2, b=-1) -> logits -> Sigmoid -> prob."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"], name="head"),
             helper.make_node("Sigmoid", ["logits"], ["prob"], name="sig")]
    inits = {"w": np.full((1, 1, 1, 1), 2.0, np.float32), "b": np.full(1, -1.0, np.float32)}
    return optimize(onnx_to_graph(make_onnx(nodes, {"x": (1, 1, H, W)}, ["prob"], inits)))


def _page(rng, text_pixels: int) -> np.ndarray:
    """Background logits (2x - 1) in [-4, -2]; ``text_pixels`` rare pixels at logit 3 to 5 (little text)."""
    x = rng.uniform(-1.5, -0.5, size=(1, 1, H, W)).astype(np.float32)
    idx = rng.choice(H * W, size=text_pixels, replace=False)
    x.reshape(-1)[idx] = rng.uniform(2, 3, size=text_pixels)
    return x


def test_percentile_clips_rare_text_pixels_and_the_rule_keeps_them():
    g = _prob_map()
    rng = np.random.default_rng(0)
    calib = [Sample(f"_{i}", {"x": _page(rng, 1)}) for i in range(8)]  # 1 pixel in 10^4: beyond 99.95%
    cal = make_calibrator("percentile", percentile=99.95)
    calibrate(g, calib, cal)
    table = cal.ranges()
    assert table["logits"].max < 0  # the percentile's upper bound is background: text is clipped
    fixed, changed = saturating_input_ranges(g, table, cal.extrema())
    assert changed == ["logits"]
    assert fixed["logits"].max == pytest.approx(cal.extrema()["logits"].max)  # max < 6.23: not capped
    assert fixed["logits"].min == pytest.approx(cal.extrema()["logits"].min)
    opts = QuantizeOptions(schema="int8", input_ranges={"x": (-1.5, 3.0)})
    page = _page(np.random.default_rng(1), 20)
    want = Session(g, backend="reference").run({"x": page})["prob"]
    text = want > 0.9
    assert int(text.sum()) == 20
    errors = []
    for tab in (table, fixed):
        qg = quantize_graph(g, tab, opts).graph
        got = Session(qg, backend="onnxruntime", num_threads=1).run({"x": page})["prob"]
        errors.append(float(np.abs(got - want)[text].max()))
    # percentile: every text pixel reads sigmoid(0) = 0.5 (the clipped range widened to include 0);
    # the rule: within a few output steps (1/255) of the float probability
    assert errors[0] > 0.4 and errors[1] < 0.02, errors


def _unary(op: str, **attrs):
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), helper.make_node(op, ["t"], ["y"], name="act",
                                                                                        **attrs)]
    g = optimize(onnx_to_graph(make_onnx(nodes, {"x": (1, 1, 4, 4)}, ["y"], {"w": np.ones((1, 1, 1, 1), np.float32)})))
    return g


@pytest.mark.parametrize("op, attrs, lo, hi", [
    ("Sigmoid", {}, -math.log(509), math.log(509)),
    ("Tanh", {}, -0.5 * math.log(509), 0.5 * math.log(509)),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, -2.5, 2.5),
    ("Softmax", {"axis": 1}, -20.0, 20.0),
])
def test_each_saturating_op_caps_at_its_useful_interval(op, attrs, lo, hi):
    g = _unary(op, **attrs)
    table = {"x": Range(-1, 1), "t": Range(-1.0, 1.0)}
    fixed, changed = saturating_input_ranges(g, table, {"x": Range(-20, 20), "t": Range(-20.0, 20.0)})
    assert changed == ["t"] and "x" not in changed
    assert fixed["t"].min == pytest.approx(lo) and fixed["t"].max == pytest.approx(hi)
    assert table["t"] == Range(-1.0, 1.0)  # the input table is not changed


def test_tensor_with_another_reader_keeps_its_range():
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
             helper.make_node("Sigmoid", ["t"], ["s"], name="sig"),
             helper.make_node("Conv", ["t", "w"], ["u"], name="conv2"),
             helper.make_node("Add", ["s", "u"], ["y"], name="add")]
    g = optimize(onnx_to_graph(make_onnx(nodes, {"x": (1, 1, 4, 4)}, ["y"], {"w": np.ones((1, 1, 1, 1), np.float32)})))
    table = {"t": Range(-1.0, 1.0)}
    fixed, changed = saturating_input_ranges(g, table, {"t": Range(-20.0, 20.0)})
    assert changed == [] and fixed == table


# ---- equalization, bias correction, AdaRound on a feature pyramid ------------------------------------


def _pyramid():
    """A DB-style head: two stride levels, the coarse one upsampled (Resize nearest), convolved and concatenated
    with the fine one, a ConvTranspose x2, a Sigmoid map."""
    rng = np.random.default_rng(3)
    inits = {"w1": rand(rng, 8, 3, 3, 3), "b1": rand(rng, 8, scale=0.1),
             "w2": rand(rng, 8, 8, 3, 3, scale=0.3), "b2": rand(rng, 8, scale=0.1),
             "w3": rand(rng, 8, 8, 1, 1, scale=0.3), "b3": rand(rng, 8, scale=0.1),
             "w4": rand(rng, 8, 16, 1, 1, scale=0.3), "b4": rand(rng, 8, scale=0.1),
             "wt": rand(rng, 8, 1, 3, 3, scale=0.5), "bt": rand(rng, 1, scale=0.1),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    inits["w2"][0] *= 8  # one wide channel: something for equalization to do
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], name="up", mode="nearest"),
        helper.make_node("Conv", ["up", "w3", "b3"], ["c3"], name="c3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="r3"),
        helper.make_node("Concat", ["r1", "r3"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w4", "b4"], ["c4"], name="c4"),
        helper.make_node("Relu", ["c4"], ["r4"], name="r4"),
        helper.make_node("ConvTranspose", ["r4", "wt", "bt"], ["logits"], name="deconv", strides=[2, 2],
                         pads=[1, 1, 1, 1], output_padding=[1, 1]),  # 3x3 stride 2: stays a ConvTranspose
        helper.make_node("Sigmoid", ["logits"], ["prob"], name="sig"),
    ]
    return optimize(onnx_to_graph(make_onnx(nodes, {"x": (1, 3, 16, 16)}, ["prob"], inits)))


def _samples(n, seed):
    rng = np.random.default_rng(seed)
    return [Sample(f"_{i}", {"x": rng.uniform(-1, 1, size=(1, 3, 16, 16)).astype(np.float32)}) for i in range(n)]


@pytest.mark.parametrize("refine", ["equalize+bias_correction", "adaround"])
def test_refinements_run_on_a_feature_pyramid(refine):
    g = _pyramid()
    assert {"Resize", "Concat", "ConvTranspose"} <= set(g.op_counts())
    calib, evals = _samples(8, 0), _samples(6, 1)
    if refine == "adaround":
        stats = InputStatistics(g)
        cal = make_calibrator("percentile", percentile=99.95)
        calibrate(g, calib, cal, observers=[stats])
        g2, fixed, reports = adaround(g, stats, "int8", iters=50)
        assert len(reports) == 4  # the four Convs (ConvTranspose has no integer kernel)
    else:
        g2, groups = equalize_on(g, calib)
        # c2's output (wide channel 0) reaches c3 through Relu and the Resize: one group, channel 0 rescaled;
        # the Concat's inputs are left alone (a Concat reader is not a Conv)
        assert [sorted(gr.tensors) for gr in groups] == [["r2", "up"]]
        for s in evals:  # equalization keeps the float function
            a = Session(g, backend="reference").run(s.feeds)["prob"]
            b = Session(g2, backend="reference").run(s.feeds)["prob"]
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        means = ChannelMeans(g2)
        cal = make_calibrator("percentile", percentile=99.95)
        calibrate(g2, calib, cal, observers=[means])
        g2, corrected = correct_biases(g2, means, "int8")
        assert corrected == 4
        fixed = {}
    table, _ = saturating_input_ranges(g2, cal.ranges(), cal.extrema())
    res = quantize_graph(g2, table, QuantizeOptions(schema="int8", input_ranges={"x": (-1.0, 1.0)},
                                                    fixed_params=fixed))
    for s in evals:
        ref = Session(g, backend="reference").run(s.feeds)["prob"]
        got = Session(res.graph, backend="onnxruntime", num_threads=1).run(s.feeds)["prob"]
        assert compare(ref, got).cosine > 0.99
