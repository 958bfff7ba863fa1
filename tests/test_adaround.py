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


def _sequence_model(bias_add: bool = True):
    """x (1, 5, 6) -> MatMul W (6, 4) [-> Add b (4,)] -> y: a linear layer as paddle2onnx/torch export it for
    a (batch, time, channels) sequence, the bias as a separate Add (MatMul has no bias input)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((6, 4)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if bias_add else "y"])]
    if bias_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits[:1 + bias_add])
    return optimize(onnx_to_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))


def _sequence_samples(n: int = 8):
    """Channels with distinct non-zero means (on the last axis) that differ from the time axis' means."""
    rng = np.random.default_rng(2)
    offs = np.array([0.9, -0.7, 0.5, 1.3, -1.1, 0.2], np.float32)
    return [Sample(str(i), {"x": (rng.standard_normal((1, 5, 6)) * 0.2 + offs).astype(np.float32)}) for i in range(n)]


def test_bias_correction_reaches_a_matmul_through_its_bias_add():
    """A MatMul (no bias input) followed by ``Add(bias)``: the Add's constant absorbs ``-dW E[x]``, with E[x]
    over the input's last axis (the MatMul's channels), so the output mean of the rounded model equals the float
    model's. Before: silently not corrected (and means taken over axis 1, the time axis)."""
    from qmace.ops import get_op
    from qmace.quantize.bias_correction import ChannelMeans, can_shift_bias, correct_biases

    g = _sequence_model()
    samples = _sequence_samples()
    means = ChannelMeans(g)
    calibrate(g, samples, None, observers=[means])
    np.testing.assert_allclose(means.mean("x"), np.mean([s.feeds["x"][0].mean(0) for s in samples], 0), atol=1e-6)
    corrected, n = correct_biases(g, means, "uint8")
    assert n == 1
    mm = next(x for x in corrected.nodes if x.op_type == "MatMul")
    w = corrected.constant(mm.inputs[1])
    qp = get_op("MatMul").weight_params(mm, 1, w, "uint8")
    for graph in (g, corrected):  # rounded weights in both; only the corrected one keeps the float mean
        graph.tensors[next(x for x in graph.nodes if x.op_type == "MatMul").inputs[1]].data = \
            qmath.dequantize(qmath.quantize(w, qp), qp)
    ref = _sequence_model()
    out = {k: np.mean([Session(m, "reference").run(s.feeds)["y"][0].mean(0) for s in samples], 0)
           for k, m in (("ref", ref), ("plain", g), ("corrected", corrected))}
    before, after = np.abs(out["plain"] - out["ref"]).max(), np.abs(out["corrected"] - out["ref"]).max()
    assert before > 1e-3 and after < 1e-5 * max(1.0, before) + 1e-6
    assert can_shift_bias(ref, next(x for x in ref.nodes if x.op_type == "MatMul"))
    bare = _sequence_model(bias_add=False)
    assert not can_shift_bias(bare, bare.nodes[0])  # nothing can absorb it: the output is the graph's


def test_adaround_covers_matmul_layers_and_wide_layers():
    """Every layer with a constant weight is refined: a MatMul's shift goes into its bias Add; a layer with more
    than ``max_k`` inputs per output gets nearest rounding plus bias correction (before: skipped silently)."""
    from qmace.ops import get_op

    g = _sequence_model()
    samples = _sequence_samples()
    stats = InputStatistics(g, max_k=4)  # K = 6 > 4: the wide path
    calibrate(g, samples, None, observers=[stats])
    g2, fixed, reports = adaround(g, stats, "uint8", iters=50)
    assert [r.node for r in reports] == [n.name for n in g.nodes if n.op_type == "MatMul"] and len(fixed) == 1
    add = next(n for n in g2.nodes if n.op_type == "Add")
    assert add.inputs[1].endswith("_corrected") and not np.array_equal(g2.constant(add.inputs[1]), g.constant("b"))
    out = {k: np.mean([Session(m, "reference").run(s.feeds)["y"][0].mean(0) for s in samples], 0) for k, m in
           (("ref", g), ("refined", g2))}
    np.testing.assert_allclose(out["refined"], out["ref"], atol=1e-5)  # the mean shift is removed
    # without a bias to absorb it, AdaRound minimises the whole E||dW x||^2 (not the covariance part only)
    bare = _sequence_model(bias_add=False)
    stats = InputStatistics(bare)
    calibrate(bare, samples, None, observers=[stats])
    _, _, reps = adaround(bare, stats, "uint8", iters=200)
    w = bare.constant(bare.nodes[0].inputs[1])
    qp = get_op("MatMul").weight_params(bare.nodes[0], 1, w, "uint8")
    dw = qmath.dequantize(qmath.quantize(w, qp), qp).astype(np.float64) - w
    rows = np.concatenate([s.feeds["x"][0] for s in samples]).astype(np.float64)  # (R, K)
    whole = np.mean(np.sum((rows @ dw) ** 2, axis=1))  # E||dW x||^2, mean term included
    centred = rows - rows.mean(0)
    assert whole > 2 * np.mean(np.sum((centred @ dw) ** 2, axis=1))  # the covariance part alone is much less
    np.testing.assert_allclose(reps[0].nearest_loss, whole, rtol=1e-4)
    assert reps[0].final_loss <= reps[0].nearest_loss + 1e-12


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_adaround_corrects_layers_too_wide_to_optimise(schema):
    """A layer whose rows are longer than ``max_k`` (its K x K moments too large) is not skipped: it is rounded
    to nearest, its bias absorbs ``-dW E[row]`` over its im2col rows (padding zeros included, so exact where
    ``correct_biases``' per-channel means are not), and it is reported as not optimised; the other layers are
    still optimised."""
    from qmace.ops import get_op

    g = _model()
    rng = np.random.default_rng(2)
    samples = [Sample(str(i), {"x": rng.uniform(-1, 1, (1, 3, 10, 10)).astype(np.float32)}) for i in range(4)]
    stats = InputStatistics(g, max_k=10)  # the first conv has K = 3 * 3 * 3 = 27
    calibrate(g, samples, None, observers=[stats])
    g2, fixed, reports = adaround(g, stats, schema, iters=20)
    first = g.nodes[0].name
    assert {r.node for r in reports} == {n.name for n in g.nodes if n.op_type in ("Conv", "Gemm")}
    assert [r.node for r in reports if not r.optimised] == [first]
    n2 = next(n for n in g2.nodes if n.name == first)
    w = g.constant(g.nodes[0].inputs[1])
    qp = fixed[n2.inputs[1]]
    np.testing.assert_array_equal(g2.constant(n2.inputs[1]), qmath.dequantize(qmath.quantize(w, qp), qp))
    rows = np.concatenate([get_op("Conv").input_rows(g.nodes[0], s.feeds["x"], w.shape)[0] for s in samples])
    dw = (g2.constant(n2.inputs[1]).astype(np.float64) - w).reshape(w.shape[0], -1)  # (M, K), rows' order
    want = g.constant(g.nodes[0].inputs[2]) - dw @ rows.astype(np.float64).mean(0)
    np.testing.assert_allclose(g2.constant(n2.inputs[2]), want, rtol=1e-5, atol=1e-7)
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
