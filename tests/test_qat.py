"""QAT: the prepared torch module simulates exactly the quantized graph qmace's quantizer produces."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.quantizer import QuantizeOptions
from qmace.quantize.recipe import calibrate
from qmace.runtime.reference import execute

INPUT_RANGE = (-1.0, 1.0)


def _model(seed: int = 0) -> onnx.ModelProto:
    """Conv+BN+Relu, depthwise Conv + Clip(0,6), Add residual, MaxPool, Concat, Exp (float fallback),
    GlobalAveragePool, Flatten, Gemm, Sigmoid; 1x3x12x12 -> 1x5."""
    rng = np.random.default_rng(seed)
    inits = []

    def c(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32) if np.asarray(arr).dtype.kind == "f"
                                             else np.asarray(arr), name))
        return name

    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", c("w1", w(8, 3, 3, 3)), c("b1", w(8))], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", c("g", 1 + 0.1 * w(8)), c("be", w(8)),
                                                c("mu", 0.1 * w(8)), c("var", 1 + np.abs(w(8)))], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", c("wd", w(8, 1, 3, 3)), c("bd", w(8))], ["dw"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["dw", c("lo", np.float32(0)), c("hi", np.float32(6))], ["r6"]),
        helper.make_node("Conv", ["r6", c("wp", w(8, 8, 1, 1))], ["pw"]),
        helper.make_node("Add", ["pw", "r1"], ["res"]),
        helper.make_node("MaxPool", ["res"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", c("w2", w(4, 8, 3, 3)), c("b2", w(4))], ["c2"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Concat", ["mp", "c2"], ["cat"], axis=1),
        helper.make_node("Exp", [helper.make_node("Mul", ["cat", c("k", np.float32(0.1))], ["catk"]).output[0]], ["ex"]),
        helper.make_node("GlobalAveragePool", ["ex"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["fl"]),
        helper.make_node("Gemm", ["fl", c("wf", w(5, 12)), c("bf", w(5))], ["fc"], transB=1),
        helper.make_node("Sigmoid", ["fc"], ["y"]),
    ]
    nodes.insert(10, helper.make_node("Mul", ["cat", "k"], ["catk"]))
    graph = helper.make_graph(nodes, "qat_test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inputs(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32) for _ in range(n)]


def _converted(model: onnx.ModelProto):
    """``model`` converted (optimized graph) with MACE ranges from 8 samples; shared by the QAT test files."""
    graph = optimize(onnx_to_graph(model))
    cal = make_calibrator("mace")
    calibrate(graph, [SimpleNamespace(name=str(i), feeds={"x": x}) for i, x in enumerate(_inputs(8, 7))], cal)
    return graph, cal.ranges()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    return (model, *_converted(model))


def _prepare(graph, ranges, schema):
    from qmace.qat import prepare

    return prepare(graph, ranges, QuantizeOptions(schema=schema, input_ranges={"x": INPUT_RANGE}))


@pytest.mark.parametrize("schema", ["uint8", "int8"])
def test_exact_forward_equals_reference(setup, schema):
    _, graph, ranges = setup
    m = _prepare(graph, ranges, schema)
    assert m.fallbacks, "the test model must have a float fallback"
    ops = {n.op_type for n in m.qgraph.nodes}
    assert {"Conv", "Add", "MaxPool", "Concat", "GlobalAveragePool", "Flatten", "Gemm", "Sigmoid", "Exp"} <= ops
    qg = m.quantized_graph()
    # bit-exact before training, and after the weights and ranges moved
    for step in range(2):
        if step == 1:
            with torch.no_grad():
                for p in m.weights:
                    p.add_(0.01 * torch.randn_like(p))
                m.act_max.mul_(1.1)
                m.act_min.mul_(0.9)
            qg = m.quantized_graph()
        for x in _inputs(6, 3 + step):
            ref = execute(qg, {"x": x})["y"]
            got = m(torch.from_numpy(x), exact=True).numpy()
            np.testing.assert_array_equal(got, ref)
            # the training-mode simulation agrees to within a few output steps (torch float32 kernels)
            sim = m(torch.from_numpy(x)).detach().numpy()
            assert np.max(np.abs(sim - ref)) <= 3 / 255 + 1e-6


def test_exact_forward_equals_reference_through_integer_hardswish_se_and_resize():
    """A mobile block (Conv, HardSwish, squeeze-excite: global AveragePool, HardSigmoid, Mul; residual Add;
    bilinear Resize): the module's exact mode equals the reference on ``quantized_graph()``, whose HardSwish and
    HardSigmoid keep the integer form (QAT's learned parameters are qmace's own, not a source model's)."""
    from qmace.ops.activation import QLINEAR
    from qmace.ops.base import ARITH

    rng = np.random.default_rng(4)
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w1": w(8, 3, 3, 3), "b1": w(8), "ws": w(8, 8, 1, 1), "bs": w(8), "w2": w(8, 8, 1, 1)}.items()]
    inits.append(numpy_helper.from_array(np.array([1, 8, 24, 24], np.int64), "sizes"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c1"], ["h"]),
             helper.make_node("AveragePool", ["h"], ["p"], kernel_shape=[12, 12]),
             helper.make_node("Conv", ["p", "ws", "bs"], ["s"]),
             helper.make_node("HardSigmoid", ["s"], ["g"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["h", "g"], ["se"]),
             helper.make_node("Conv", ["se", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "h"], ["r"]),
             helper.make_node("Resize", ["r", "", "", "sizes"], ["y"], mode="linear")]
    graph = helper.make_graph(nodes, "mobile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 24, 24])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    g, ranges = _converted(model)
    m = _prepare(g, ranges, "uint8")
    assert not m.fallbacks
    with torch.no_grad():
        m.act_max.mul_(1.05)  # as after training: parameters the quantizer did not choose from the ranges
    qg = m.quantized_graph()
    marked = {n.op_type for n in qg.nodes if n.attrs.get(ARITH) == QLINEAR}
    assert marked == {"HardSwish", "HardSigmoid"}
    for x in _inputs(4, 9):
        np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(), execute(qg, {"x": x})["y"])


@pytest.mark.parametrize("schema", ["uint8", "int8"])
def test_gradients_reach_weights_and_ranges(setup, schema):
    _, graph, ranges = setup
    m = _prepare(graph, ranges, schema)
    x = torch.from_numpy(np.concatenate(_inputs(4, 5)))
    loss = (m(x) ** 2).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.weights)
    assert m.act_max.grad is not None and (m.act_max.grad != 0).sum() >= len(m.act_max) // 2
    assert (m.act_min.grad != 0).any() or (m.act_max.grad != 0).all()


def test_distillation_reduces_loss(setup):
    from qmace.qat import train

    _, graph, ranges = setup
    m = _prepare(graph, ranges, "uint8")
    xs = np.concatenate(_inputs(16, 9))
    batches = [xs[i:i + 8] for i in range(0, 16, 8)]
    # a teacher the student must move towards: the float model with shifted logits
    from qmace.qat.losses import float_teacher

    base = float_teacher(m)

    def teacher(x):
        return base(x) * 4.0
    losses = train(m, batches, epochs=6, lr=3e-3, teacher=teacher)
    assert losses[-1] < losses[0]


def test_train_outputs_return_an_inner_tensor_in_training_mode_only(setup):
    from qmace.qat.forward import forward_train

    _, graph, ranges = setup
    m = _prepare(graph, ranges, "int8")
    x = torch.from_numpy(np.concatenate(_inputs(3, 5)))
    y = m(x).detach()
    m.train_outputs = ["fc"]  # the Gemm's logits before the Sigmoid
    logits = m(x)
    assert logits.shape == (3, 5) and logits.requires_grad
    torch.testing.assert_close(logits.detach(), forward_train(m, {"x": x})["fc"].detach(), rtol=0, atol=0)
    assert torch.max(torch.abs(torch.sigmoid(logits.detach()) - y)) <= 1 / 255 + 1e-6  # y: Sigmoid's 8-bit codes
    exact = m(x[:1], exact=True).numpy()  # exact mode and the quantized graph keep the graph outputs
    np.testing.assert_array_equal(exact, execute(m.quantized_graph(), {"x": x[:1].numpy()})["y"])


def test_per_position_distillation_is_a_kl_per_row_along_the_axis():
    from qmace.qat.losses import distillation

    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.normal(0, 2, (2, 3, 7)).astype(np.float32))
    t = torch.from_numpy(rng.normal(0, 2, (2, 3, 7)).astype(np.float32))

    def loss(student, teacher, axis):
        return distillation(student, teacher, "softmax", axis, temperature=2.0)

    got = loss(s, t, -1)
    T = 2.0  # by hand: one KL(softmax(t/T) || softmax(s/T)) per (sample, timestep), averaged, times T^2
    q = torch.softmax(t / T, -1)
    kl = (q * (torch.log(q) - torch.log_softmax(s / T, -1))).sum(-1)
    torch.testing.assert_close(got, kl.mean() * T**2)
    # the class axis may be any axis: the same loss with classes on axis 1
    torch.testing.assert_close(loss(s.transpose(1, 2), t.transpose(1, 2), 1), got)
    # None keeps one distribution per sample (over 3 x 7 values): a different loss
    assert not torch.allclose(loss(s, t, None), got)
    # for (N, C) outputs axis -1 is the default's loss
    s2, t2 = s[:, 0], t[:, 0]
    torch.testing.assert_close(loss(s2, t2, -1), loss(s2, t2, None))


def test_sigmoid_distillation_is_a_bernoulli_kl_per_element():
    from qmace.qat.losses import distillation

    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.normal(0, 3, (2, 1, 5, 6)).astype(np.float32))
    t = torch.from_numpy(rng.normal(0, 3, (2, 1, 5, 6)).astype(np.float32))

    def loss(student, teacher, T=2.0):
        return distillation(student, teacher, "sigmoid", temperature=T)

    T = 2.0  # by hand: KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T))) per pixel, averaged, times T^2
    q, p = torch.sigmoid(t / T), torch.sigmoid(s / T)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    torch.testing.assert_close(loss(s, t), kl.mean() * T**2, rtol=1e-5, atol=1e-6)
    assert float(loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)  # no loss at the teacher
    # a near-zero map (probabilities ~1e-6, as a text detector's on an image without text) still has a gradient
    far = torch.full((1, 1, 4, 4), -14.0, requires_grad=True)
    loss(far, torch.full((1, 1, 4, 4), -12.0), T=1.0).backward()
    assert far.grad is not None and float(far.grad.abs().sum()) > 0


def test_fit_refuses_an_unknown_distillation_loss(setup):
    from qmace.qat.trainer import fit

    _, graph, ranges = setup
    m = _prepare(graph, ranges, "uint8")
    with pytest.raises(ValueError, match="distill must be one of softmax, sigmoid"):
        fit(m, [np.concatenate(_inputs(2, 3))], epochs=1, lr=1e-3, distill="mse")


def test_fit_keeps_tiny_weight_tensors_fixed_below_freeze_below_and_warns_of_them(setup, caplog):
    """Adam moves every weight by about lr per step: a layer of ~1e-6 weights is rewritten at lr 1e-3. Without
    freeze_below one warning names it; with it the layer stays bit-identical while the others train."""
    import logging

    from qmace.qat.trainer import fit

    _, graph, ranges = setup
    g = graph.copy()
    names = list(_prepare(g, ranges, "int8").kernel_weights())
    everything = set(_prepare(g, ranges, "int8")._weight_index)
    assert names and everything - set(names)  # biases are trainable but are not kernel weights
    tiny = names[-1]  # the Gemm's weight
    g.tensors[tiny].data = g.tensors[tiny].data * 1e-6
    batches = [np.concatenate(_inputs(8, s)) for s in (3, 4)]

    def run(freeze):
        m = _prepare(g, ranges, "int8")
        start = {n: w.detach().clone() for n, w in m.kernel_weights().items()}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qmace.qat.trainer"):
            res = fit(m, batches, epochs=2, lr=1e-3, freeze_below=freeze)
        return m, start, res

    m, start, res = run(0.0)
    assert res.frozen == [] and tiny in caplog.text and "freeze_below" in caplog.text
    moved = float((m.weight(tiny).detach() - start[tiny]).abs().max())
    assert moved > 100 * float(start[tiny].abs().max())  # the layer's weights are rewritten, not tuned
    m, start, res = run(1e-3)
    assert res.frozen == [tiny] and tiny not in caplog.text
    torch.testing.assert_close(m.weight(tiny), start[tiny], rtol=0, atol=0)
    assert any(not torch.equal(m.weight(n), start[n]) for n in names if n != tiny)


def test_ema_mode_tracks_ranges(setup):
    _, graph, ranges = setup
    from qmace.qat import prepare

    m = prepare(graph, ranges, QuantizeOptions(input_ranges={"x": INPUT_RANGE}), range_mode="ema")
    before = m.act_max.clone()
    m.train()
    m(torch.from_numpy(np.concatenate(_inputs(4, 5))) * 3)
    assert not torch.equal(before, m.act_max)
    x = _inputs(1, 2)[0]
    np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(),
                                  execute(m.quantized_graph(), {"x": x})["y"])


def test_qdrop_skips_activation_fake_quant_in_training_only(setup):
    _, graph, ranges = setup
    m = _prepare(graph, ranges, "int8")
    x = torch.from_numpy(np.concatenate(_inputs(4, 5)))
    m.train()
    quantized = m(x)
    quantized.square().sum().backward()
    range_grad = m.act_max.grad.abs().sum() + m.act_min.grad.abs().sum()
    m.zero_grad()
    quantized = quantized.detach()
    # every activation element keeps its float value: the ranges only reach the output through the
    # int32 bias grid (s_x * s_w), so their gradient collapses and moving them barely moves the output
    m.act_drop = 1.0
    dropped = m(x)
    assert not torch.allclose(dropped, quantized, atol=1e-3)
    dropped.square().sum().backward()
    assert m.act_max.grad.abs().sum() + m.act_min.grad.abs().sum() < 1e-3 * range_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.weights)
    with torch.no_grad():
        m.act_max.mul_(1.5)
        torch.testing.assert_close(m(x), dropped, rtol=0, atol=1e-4)
    m.act_drop = 0.5  # half the elements: between the two, and a fresh mask per call
    torch.manual_seed(0)
    a, b = m(x).detach(), m(x).detach()
    assert not torch.equal(a, b)
    m.eval()  # never in eval mode, nor in exact mode / the quantized graph
    np.testing.assert_array_equal(m(x[:1], exact=True).numpy(), execute(m.quantized_graph(), {"x": x[:1].numpy()})["y"])
    with torch.no_grad():
        m.act_max.div_(1.5)
    m.act_drop = 0.0
    m.train()
    reference = m(x).detach()
    m.act_drop = 0.5
    m.eval()
    torch.testing.assert_close(m(x).detach(), reference, rtol=0, atol=0)


@pytest.mark.parametrize("schema", ["uint8", "int8"])
def test_export_yaml_convert_reproduces(setup, tmp_path, schema):
    import yaml

    from qmace.api import convert
    from qmace.qat import export_qat

    _, graph, ranges = setup
    m = _prepare(graph, ranges, schema)
    with torch.no_grad():
        for p in m.weights:
            p.add_(0.01 * torch.randn_like(p))
        m.act_max.mul_(1.05)
    onnx_path, range_path = export_qat(m, tmp_path / "m_qat.onnx", tmp_path / "m_qat.ranges")
    cfg = {
        "library_name": "t", "target_abis": ["host"], "model_graph_format": "file", "model_data_format": "file",
        "models": {"m": {
            "platform": "onnx", "model_file_path": onnx_path.name,
            "model_sha256_checksum": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "subgraphs": [{"input_tensors": ["x"], "input_shapes": ["1,3,12,12"], "input_data_formats": ["NCHW"],
                           "input_ranges": [f"{INPUT_RANGE[0]},{INPUT_RANGE[1]}"], "output_tensors": ["y"],
                           "output_shapes": ["1,5"]}],
            "runtime": "cpu", "quantize": 1, "quantize_range_file": range_path.name, "quantize_schema": schema}},
    }
    ypath = tmp_path / "m_qat.yml"
    ypath.write_text(yaml.safe_dump(cfg))
    res = convert(ypath, build_dir=tmp_path / "build")
    qg = m.quantized_graph()
    for x in _inputs(5, 11):
        a = execute(res.graph, {"x": x})["y"]
        b = execute(qg, {"x": x})["y"]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(), a)


def _qat_workspace(tmp_path):
    """The test model as m.onnx, its int8 deployment YAML m.yml and 6 training samples in train/ under
    ``tmp_path``; returns the training directory."""
    import yaml

    (tmp_path / "m.onnx").write_bytes(_model().SerializeToString())
    cfg = {
        "library_name": "t", "target_abis": ["host"], "model_graph_format": "file", "model_data_format": "file",
        "models": {"m": {
            "platform": "onnx", "model_file_path": "m.onnx",
            "model_sha256_checksum": hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest(),
            "subgraphs": [{"input_tensors": ["x"], "input_shapes": ["1,3,12,12"], "input_data_formats": ["NCHW"],
                           "output_tensors": ["y"]}],
            "runtime": "cpu", "quantize_schema": "int8"}},
    }
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    d = tmp_path / "train"
    d.mkdir()
    for i, x in enumerate(_inputs(6, 21)):
        np.save(d / f"x_{i}.npy", x)
    return d


def test_cli_qat_end_to_end(tmp_path, capsys):
    from qmace.api import convert
    from qmace.cli.main import main

    d = _qat_workspace(tmp_path)
    (tmp_path / "labels.txt").write_text("".join(f"{i % 5}\n" for i in range(6)))
    out = tmp_path / "out"
    rc = main(["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--labels",
               str(tmp_path / "labels.txt"), "--epochs", "1", "--batch_size", "3", "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "m_qat.yml" in text and (out / "m_qat.ranges").is_file() and (out / "m_qat.ckpt").is_file()
    res = convert(out / "m_qat.yml", build_dir=tmp_path / "build")
    assert res.graph.metadata["quantization"]["schema"] == "int8"


@pytest.mark.parametrize("schema", ["uint8", "int8"])
def test_prepared_module_is_the_ptq_model_for_non_float32_ranges(setup, schema):
    """Ranges that are not float32 numbers (histogram calibrators give such) must reach the module
    unrounded: its exact forward equals the PTQ model built from the same ranges (regression: ranges stored
    as float32 changed the scales)."""
    from qmace.quantize.quantizer import quantize_graph
    from qmace.quantize.ranges import Range

    _, graph, ranges = setup

    def scale(lo, hi):
        return np.float32((max(hi, 0.0) - min(lo, 0.0)) / 255.0)

    def odd_range(r):  # move max within one float32 ulp until rounding it to float32 changes the scale
        ulp = float(np.spacing(np.float32(r.max)))
        for k in range(1, 400):
            hi = r.max + k * ulp / 400
            if scale(r.min, hi) != scale(float(np.float32(r.min)), float(np.float32(hi))):
                return Range(r.min, hi)
        return r

    odd = {k: odd_range(r) for k, r in ranges.items()}
    changed = sum(odd[k] != ranges[k] for k in ranges)
    assert changed >= len(ranges) // 2, "the test needs ranges whose float32 rounding changes the scale"
    opts = QuantizeOptions(schema=schema, input_ranges={"x": INPUT_RANGE})
    ptq = quantize_graph(graph, odd, opts).graph
    m = _prepare(graph, odd, schema)
    qg = m.quantized_graph()
    differing = [k for k, t in ptq.tensors.items() if t.quant is not None and t.data is None
                 and (k not in qg.tensors or qg.tensors[k].quant != t.quant)]
    assert not differing, f"activation parameters differ from PTQ's: {differing}"
    for x in _inputs(3, 11):
        want = execute(ptq, {"x": x})["y"]
        np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(), want)
        np.testing.assert_array_equal(execute(qg, {"x": x})["y"], want)


def test_cli_qat_equalizes_the_start_unless_disabled(tmp_path, capsys):
    """`qmace qat` rescales activation channels before the initial calibration (as `qmace quantize`), and
    `--no_equalization` turns it off: with 0 epochs the exported float models compute the same function, but
    the equalized one has different weights and ranges."""
    from qmace.cli.main import main
    from qmace.quantize.ranges import read_range_file
    from qmace.runtime import Session

    d = _qat_workspace(tmp_path)
    runs = {}
    for flag in ([], ["--no_equalization"]):
        out = tmp_path / ("plain" if flag else "eq")
        rc = main(["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--epochs", "0",
                   "--output_dir", str(out), *flag])
        text = capsys.readouterr().out
        assert rc == 0
        assert ("equalization" in text) != bool(flag), text
        onnx_model = onnx.load(out / "m_qat.onnx")
        weights = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
        graph = optimize(onnx_to_graph(onnx_model))
        ys = [Session(graph).run({"x": x})["y"] for x in _inputs(4, 5)]
        runs[bool(flag)] = (weights, read_range_file(out / "m_qat.ranges"), ys)
    (w_eq, r_eq, y_eq), (w_plain, r_plain, y_plain) = runs[False], runs[True]
    for a, b in zip(y_eq, y_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    same_weights = sorted(w_eq) == sorted(w_plain) and all(np.array_equal(w_eq[k], w_plain[k]) for k in w_eq)
    assert not same_weights, "equalization did not rescale any weight"
    assert r_eq != r_plain


def _layernorm_model() -> onnx.ModelProto:
    """x (1, 6, 8) -> MatMul -> + x -> LayerNormalization -> MatMul -> y: the structural 16-bit rule widens
    the LayerNorm input (the residual sum)."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array((1 + 0.1 * rng.normal(size=8)).astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.normal(size=8)).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.4, (8, 5)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "x"], ["res"]),
             helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1),
             helper.make_node("MatMul", ["ln", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "qat_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("extra", [False, True])
def test_exact_forward_keeps_16_bit_activations(extra):
    """Tensors the plan gives uint16 (the structural rule; measured choices in ``wide_extra``) are simulated
    and exported with uint16 codes, so exact mode still equals the quantized graph bit for bit."""
    from qmace.qat import prepare

    graph = optimize(onnx_to_graph(_layernorm_model()))
    rng = np.random.default_rng(4)
    xs = [rng.normal(0, 1, (1, 6, 8)).astype(np.float32) for _ in range(6)]
    cal = make_calibrator("mace")
    calibrate(graph, [SimpleNamespace(name=str(i), feeds={"x": x}) for i, x in enumerate(xs)], cal)
    opts = QuantizeOptions(schema="int8", input_ranges={"x": (-4.0, 4.0)},
                           wide_extra={"m1": "test"} if extra else {})
    m = prepare(graph, cal.ranges(), opts)
    qg = m.quantized_graph()
    wide = {t.name for t in qg.tensors.values() if t.quant is not None and t.quant.dtype == "uint16"}
    assert "res" in wide and (("m1" in wide) == extra)
    for x in xs[:3]:
        np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(), execute(qg, {"x": x})["y"])


def test_exact_forward_after_training_with_a_16_bit_input_and_a_bias():
    """An accumulate op reading a uint16 activation runs DQ -> float op -> Q, dequantizing its int32 bias with the
    bias scale s_x * s_w: after the weights moved (new per-channel s_w) exact mode must use the current bias
    scale, not the prepared graph's, to stay bit-exact with quantized_graph()."""
    from qmace.qat import prepare

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (5, 4, 3, 3)), ("b2", (5,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "wide_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6, 6])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = optimize(onnx_to_graph(model))
    xs = [rng.uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32) for _ in range(4)]
    cal = make_calibrator("mace")
    calibrate(graph, [SimpleNamespace(name=str(i), feeds={"x": x}) for i, x in enumerate(xs)], cal)
    m = prepare(graph, cal.ranges(), QuantizeOptions(schema="int8", input_ranges={"x": INPUT_RANGE},
                                                     wide_extra={"c1": "test"}))
    assert m.quantized_graph().tensors["c1"].quant.dtype == "uint16"
    with torch.no_grad():  # every channel's max |w| (so its scale) changes, the float biases stay
        for p in m.weights:
            if p.ndim == 4:
                p.mul_(torch.linspace(0.6, 1.7, p.shape[0]).reshape(-1, 1, 1, 1))
    qg = m.quantized_graph()
    for x in xs:
        np.testing.assert_array_equal(m(torch.from_numpy(x), exact=True).numpy(), execute(qg, {"x": x})["y"])
