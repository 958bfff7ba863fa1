"""ConvTranspose with kernel == stride becomes a 1x1 Conv + DepthToSpace (qmace.passes.deconv): same float
function as ONNX Runtime on the source model, its bias Add / BatchNormalization / Relu absorbed, other
geometries left alone, and the quantized model has no float fallback and equal codes on both backends."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from qmace.data import Sample
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.dense import saturating_input_ranges
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

SHAPE = (1, 6, 5, 7)


def _model(kernel: int = 2, stride: int = 2, pads=(0, 0, 0, 0), head: bool = True):
    """x -> ConvTranspose (no bias input) -> Add(bias (C,1,1)) -> BatchNormalization -> Relu -> [ConvTranspose
    to 1 channel -> Sigmoid]."""
    rng = np.random.default_rng(0)
    c = 4
    inits = {"w": rand(rng, 6, c, kernel, kernel), "bias": rand(rng, c, 1, 1, scale=0.2),
             "g": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32), "be": rand(rng, c, scale=0.1),
             "mu": rand(rng, c, scale=0.1), "var": (1 + 0.1 * rng.random(c)).astype(np.float32),
             "w2": rand(rng, c, 1, 2, 2), "b2": rand(rng, 1, scale=0.1)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="up", kernel_shape=[kernel, kernel],
                              strides=[stride, stride], pads=list(pads)),
             helper.make_node("Add", ["t", "bias"], ["tb"], name="bias_add"),
             helper.make_node("BatchNormalization", ["tb", "g", "be", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu")]
    out = "r"
    if head:
        nodes += [helper.make_node("ConvTranspose", ["r", "w2", "b2"], ["logits"], name="up2", kernel_shape=[2, 2],
                                   strides=[2, 2]),
                  helper.make_node("Sigmoid", ["logits"], ["prob"], name="sig")]
        out = "prob"
    return make_onnx(nodes, {"x": SHAPE}, [out], inits)


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).uniform(-1, 1, size=SHAPE).astype(np.float32)}


def test_kernel_equal_stride_becomes_conv_and_depth_to_space():
    model = _model()
    g = optimize(onnx_to_graph(model))
    assert g.op_counts() == {"Conv": 2, "DepthToSpace": 2, "Sigmoid": 1}, g.op_counts()
    assert g.metadata["passes"]["deconvs"] == 2 and g.metadata["passes"]["deconv_biases"] == 1
    first = next(n for n in g.nodes if n.op_type == "Conv")
    assert first.attrs["qm_activation"] == "Relu"  # BN folded, Relu fused, both carried to the Conv
    d2s = [n for n in g.nodes if n.op_type == "DepthToSpace"]
    assert [n.outputs[0] for n in d2s] == ["r", "logits"]  # the ConvTransposes' (fused) output names are kept
    src = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        feeds = _feeds(seed)
        want = src.run(["prob"], feeds)[0]
        for backend in ("reference", "onnxruntime"):
            got = Session(g, backend=backend).run(feeds)["prob"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=backend)


@pytest.mark.parametrize("kernel, stride, pads", [(3, 2, (0, 0, 0, 0)), (2, 2, (1, 1, 0, 0)), (2, 1, (0, 0, 0, 0))])
def test_other_geometries_stay_conv_transpose(kernel, stride, pads):
    model = _model(kernel, stride, pads, head=False)
    g = optimize(onnx_to_graph(model))
    assert g.op_counts().get("ConvTranspose") == 1 and "DepthToSpace" not in g.op_counts()
    src = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(5)
    np.testing.assert_allclose(Session(g, backend="reference").run(feeds)["r"], src.run(["r"], feeds)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schema", ["int8_w7", "uint8"])
def test_quantized_rewrite_has_no_fallback_and_equal_codes(schema):
    g = optimize(onnx_to_graph(_model()))
    cal = make_calibrator("percentile", percentile=99.95)
    calibrate(g, [Sample(f"_{i}", _feeds(10 + i)) for i in range(6)], cal)
    table, changed = saturating_input_ranges(g, cal.ranges(), cal.extrema())
    # the Sigmoid reads a DepthToSpace output, whose parameters are its input's: the rule reaches the Conv's output
    assert set(changed) == {"logits", "logits_blocks"}
    res = quantize_graph(g, table, QuantizeOptions(schema=schema, input_ranges={"x": (-1.0, 1.0)}))
    assert res.fallbacks == []
    qg = res.graph
    for seed in range(3):
        feeds = _feeds(20 + seed)
        ref = Session(qg, backend="reference").run(feeds)["prob"]
        fast = Session(qg, backend="onnxruntime", num_threads=1).run(feeds)["prob"]
        flt = Session(g, backend="reference").run(feeds)["prob"]
        np.testing.assert_array_equal(fast, ref)  # Conv (exact accumulation), DepthToSpace (copy), QLinearSigmoid
        assert np.abs(ref - flt).max() < 0.05
