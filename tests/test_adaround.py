"""AdaRound + bias correction: lower layer reconstruction error, codes on the grid and in range, and the
quantizer keeps exactly the chosen codes."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace import qmath
from qmace.data import Sample
from qmace.frontends import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.adaround import InputStatistics, adaround
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session


def _model():
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((6, 8, 1, 1)) * 0.3).astype(np.float32), "w3"),
        numpy_helper.from_array((rng.standard_normal((6, 5)) * 0.3).astype(np.float32), "w4"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["c2", "w3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w4"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return optimize(onnx_to_graph(model))


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_adaround_lowers_error_and_quantizer_keeps_codes(schema):
    g = _model()
    rng = np.random.default_rng(0)
    # Spatially correlated inputs (like images): with white noise, rounding to nearest is already optimal.
    def smooth():
        coarse = rng.uniform(-1, 1, (1, 3, 5, 5))
        return (np.kron(coarse, np.ones((2, 2))) + 0.05 * rng.standard_normal((1, 3, 10, 10))).astype(np.float32)

    samples = [Sample(str(i), {"x": smooth()}) for i in range(16)]
    stats = InputStatistics(g)
    cal = make_calibrator("mace")
    assert calibrate(g, samples, cal, observers=[stats]) == 16
    g2, fixed, reports = adaround(g, stats, schema, iters=200)
    assert {r.node for r in reports} == {n.name for n in g.nodes if n.op_type in ("Conv", "Gemm")}
    for r in reports:
        assert r.final_loss <= r.nearest_loss + 1e-12
    assert any(r.final_loss < 0.9 * r.nearest_loss for r in reports), "AdaRound changed nothing anywhere"
    qg = quantize_graph(g2, cal.ranges(), QuantizeOptions(schema=schema, fixed_params=fixed, input_ranges={"x": (-1.2, 1.2)})).graph
    for wname, qp in fixed.items():
        w = g2.constant(wname)
        codes = qmath.quantize(w, qp)
        assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
        np.testing.assert_array_equal(qmath.dequantize(codes, qp), w)  # the weights are on the grid
        stored = [t for t in qg.tensors.values() if t.data is not None and t.quant == qp and t.shape == w.shape]
        assert any(np.array_equal(t.data, codes) for t in stored), f"{wname}: the quantizer re-rounded the codes"
    # and the quantized model still agrees with the float one
    x = samples[0].feeds
    ref = Session(g, "reference").run(x)["y"]
    out = Session(qg, "reference").run(x)["y"]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.95


def test_bias_correction_removes_the_mean_shift_of_weight_rounding():
    """With weights rounded (uint8 per-tensor: coarse), the corrected model's per-channel output means on
    the calibration data equal the float model's; uncorrected they do not."""
    from qmace.ops import get_op
    from qmace.quantize.bias_correction import ChannelMeans, correct_biases

    g = _model()
    rng = np.random.default_rng(1)
    samples = [Sample(str(i), {"x": rng.uniform(0, 1, (1, 3, 10, 10)).astype(np.float32)}) for i in range(8)]
    means = ChannelMeans(g)
    calibrate(g, samples, make_calibrator("mace"), observers=[means])
    corrected, n = correct_biases(g, means, "uint8")
    assert n == 4  # three convs and the Gemm

    def rounded(graph):  # the float graph with its Conv/Gemm weights replaced by their quantized values
        out = graph.copy()
        for node in out.nodes:
            if node.op_type in ("Conv", "Gemm"):
                w = out.constant(node.inputs[1])
                qp = get_op(node.op_type).weight_params(node, 1, w, "uint8")
                out.tensors[node.inputs[1]].data = qmath.dequantize(qmath.quantize(w, qp), qp)
        return out

    # Only the first conv sees the calibration inputs directly, so compare its output means exactly.
    first = g.nodes[0].outputs[0]

    def mean_of(graph):
        vals = [Session(graph, "reference").run(s.feeds, observe=[first])[first] for s in samples]
        return np.mean([v.mean(axis=(0, 2, 3)) for v in vals], axis=0)

    ref = mean_of(g)
    before = np.abs(mean_of(rounded(g)) - ref).max()
    after = np.abs(mean_of(rounded(corrected)) - ref).max()
    assert before > 1e-4
    # Not exact: the correction uses channel means for every tap (zero padding at the borders differs) and
    # the first conv has a fused ReLU after it. Measured: 0.0063 -> 0.0015.
    assert after < before / 3


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_adaround_without_iterations_rounds_as_the_quantizer(schema):
    """iters=0: every weight is rounded to nearest exactly as ``qmath.quantize`` rounds it (float32 division,
    half to even), so the rounded weights equal the plain quantizer's dequantized codes."""
    g = _model()
    rng = np.random.default_rng(1)
    samples = [Sample(str(i), {"x": rng.uniform(-1, 1, (1, 3, 10, 10)).astype(np.float32)}) for i in range(4)]
    stats = InputStatistics(g)
    calibrate(g, samples, make_calibrator("mace"), observers=[stats])
    g2, fixed, _ = adaround(g, stats, schema, iters=0)
    assert fixed
    for node in (n for n in g.nodes if n.op_type in ("Conv", "Gemm")):
        w = g.constant(node.inputs[1])
        name = next(n for n in g2.nodes if n.name == node.name).inputs[1]
        qp = fixed[name]
        np.testing.assert_array_equal(g2.constant(name), qmath.dequantize(qmath.quantize(w, qp), qp), err_msg=node.name)


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_adaround_corrects_layers_too_wide_to_optimise(schema):
    """A layer whose rows are longer than ``max_k`` (its K x K moments too large) is not skipped: it is rounded
    to nearest and gets the same bias correction ``correct_biases`` gives it, and is reported as not
    optimised; the other layers are still optimised."""
    from qmace.quantize.bias_correction import ChannelMeans, correct_biases

    g = _model()
    rng = np.random.default_rng(2)
    samples = [Sample(str(i), {"x": rng.uniform(-1, 1, (1, 3, 10, 10)).astype(np.float32)}) for i in range(4)]
    stats = InputStatistics(g, max_k=10)  # the first conv has K = 3 * 3 * 3 = 27
    means = ChannelMeans(g)
    calibrate(g, samples, None, observers=[stats, means])
    g2, fixed, reports = adaround(g, stats, schema, iters=20)
    first = g.nodes[0].name
    assert {r.node for r in reports} == {n.name for n in g.nodes if n.op_type in ("Conv", "Gemm")}
    assert [r.node for r in reports if not r.optimised] == [first]
    n2 = next(n for n in g2.nodes if n.name == first)
    w = g.constant(g.nodes[0].inputs[1])
    qp = fixed[n2.inputs[1]]
    np.testing.assert_array_equal(g2.constant(n2.inputs[1]), qmath.dequantize(qmath.quantize(w, qp), qp))
    bc, _ = correct_biases(g, means, schema)
    nb = next(n for n in bc.nodes if n.name == first)
    np.testing.assert_allclose(g2.constant(n2.inputs[2]), bc.constant(nb.inputs[2]), rtol=1e-5, atol=1e-7)
    assert not np.allclose(g2.constant(n2.inputs[2]), g.constant(g.nodes[0].inputs[2]))  # it was corrected


def test_adaround_means_only_layer_reads_channels_on_the_ops_axis():
    """A too-wide Gemm-like layer on a 3-D input (MatMul: channels last) takes its means over the last axis
    and is rounded to nearest (no crash, weights on the grid)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((12, 5)) * 0.3).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    g = optimize(onnx_to_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    samples = [Sample(str(i), {"x": rng.uniform(0, 1, (1, 7, 12)).astype(np.float32)}) for i in range(3)]
    stats = InputStatistics(g, max_k=8)
    calibrate(g, samples, None, observers=[stats])
    g2, fixed, reports = adaround(g, stats, "int8", iters=10)
    assert [r.optimised for r in reports] == [False]
    (wname, qp), = fixed.items()
    np.testing.assert_array_equal(g2.constant(wname), qmath.dequantize(qmath.quantize(w, qp), qp))
