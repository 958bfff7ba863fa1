"""HardSigmoid / HardSwish fusion (qmace.passes.hardswish): each decomposed spelling exporters write becomes
one node, the float function is kept (against ONNX Runtime on the source model), intermediates with other
readers stop the rewrite, and the quantized graph has no fallback and matches the reference codes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from qmace.data import Sample
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

SHAPE = (1, 4, 6, 6)


def _consts() -> dict[str, np.ndarray]:
    return {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
            "sixth": np.array(1.0 / 6.0, np.float32)}


def _r6(x: str, out: str, swap: bool = False) -> list:
    """out = Clip(Add(x, 3), 0, 6)."""
    return [helper.make_node("Add", ["three", x] if swap else [x, "three"], [out + "_a"], name=out + "_add"),
            helper.make_node("Clip", [out + "_a", "zero", "six"], [out], name=out + "_clip")]


def _conv() -> tuple[list, dict]:
    rng = np.random.default_rng(0)
    return ([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])],
            {"w": rand(rng, 4, 4, 3, 3, scale=1.5), "b": rand(rng, 4)})


def _spelling(kind: str):
    """A Conv followed by one spelling of HardSwish / HardSigmoid, output y."""
    nodes, inits = _conv()
    inits.update(_consts())
    if kind == "paddle":  # Div(Mul(x, r6(x)), 6)
        nodes += _r6("c", "r6") + [helper.make_node("Mul", ["c", "r6"], ["m"], name="mul"),
                                   helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    elif kind == "torch_mul_sixth":  # Mul(Mul(r6(x), x), 1/6), Add's constant first
        nodes += _r6("c", "r6", swap=True) + [helper.make_node("Mul", ["r6", "c"], ["m"], name="mul"),
                                              helper.make_node("Mul", ["m", "sixth"], ["y"], name="scale")]
    elif kind == "x_times_hardsigmoid":  # Mul(x, Div(r6(x), 6))
        nodes += _r6("c", "r6") + [helper.make_node("Div", ["r6", "six"], ["hs"], name="div"),
                                   helper.make_node("Mul", ["c", "hs"], ["y"], name="mul")]
    elif kind == "native_hardsigmoid_mul":  # Mul(HardSigmoid(x, 1/6, 0.5), x)
        nodes += [helper.make_node("HardSigmoid", ["c"], ["hs"], name="hsig", alpha=1.0 / 6.0, beta=0.5),
                  helper.make_node("Mul", ["hs", "c"], ["y"], name="mul")]
    elif kind == "hardsigmoid_only":  # Div(r6(x), 6)
        nodes += _r6("c", "r6") + [helper.make_node("Div", ["r6", "six"], ["y"], name="div")]
    else:
        raise AssertionError(kind)
    return make_onnx(nodes, {"x": SHAPE}, ["y"], inits)


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).uniform(-3, 3, size=SHAPE).astype(np.float32)}


@pytest.mark.parametrize("kind, op", [("paddle", "HardSwish"), ("torch_mul_sixth", "HardSwish"),
                                      ("x_times_hardsigmoid", "HardSwish"), ("native_hardsigmoid_mul", "HardSwish"),
                                      ("hardsigmoid_only", "HardSigmoid")])
def test_each_spelling_fuses_and_keeps_the_function(kind, op):
    model = _spelling(kind)
    g = optimize(onnx_to_graph(model))
    assert g.op_counts() == {"Conv": 1, op: 1}, g.op_counts()
    assert g.metadata["passes"]["hardswish"] >= 1
    assert g.outputs == ["y"]
    unfused = onnx_to_graph(model)
    src = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        feeds = _feeds(seed)
        want = src.run(["y"], feeds)[0]
        for backend in ("reference", "onnxruntime"):
            got = Session(g, backend=backend).run(feeds)["y"]
            same_conv = Session(unfused, backend=backend).run(feeds)["y"]
            # x*clip(x/6+0.5,0,1) vs x*clip(x+3,0,6)/6 on the same Conv output: float32 rounding only, which
            # near the knee x = -3 (1 - 1/2 cancellation) reaches ~1e-7 * max|x| absolute
            np.testing.assert_allclose(got, same_conv, rtol=1e-6, atol=2e-7 * np.abs(want).max(), err_msg=backend)
            # vs ORT on the source model: also the Conv's summation order differs (test_passes' tolerances)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=backend)


def test_intermediate_with_another_reader_is_not_fused():
    nodes, inits = _conv()
    inits.update(_consts())
    nodes += _r6("c", "r6") + [helper.make_node("Mul", ["c", "r6"], ["m"], name="mul"),
                               helper.make_node("Div", ["m", "six"], ["y"], name="div"),
                               helper.make_node("Relu", ["r6"], ["z"], name="other_reader")]
    g = optimize(onnx_to_graph(make_onnx(nodes, {"x": SHAPE}, ["y", "z"], inits)))
    assert "HardSwish" not in g.op_counts() and "HardSigmoid" not in g.op_counts()
    assert g.metadata["passes"]["hardswish"] == 0


def test_other_constants_are_not_fused():
    """Clip(x + 3, 0, 6) / 5 is not a HardSigmoid: left alone."""
    nodes, inits = _conv()
    inits.update(_consts())
    inits["five"] = np.array(5.0, np.float32)
    nodes += _r6("c", "r6") + [helper.make_node("Div", ["r6", "five"], ["y"], name="div")]
    g = optimize(onnx_to_graph(make_onnx(nodes, {"x": SHAPE}, ["y"], inits)))
    assert g.metadata["passes"]["hardswish"] == 0 and "Div" in g.op_counts()


@pytest.mark.parametrize("schema", ["uint8", "int8"])
def test_fused_graph_quantizes_without_fallback(schema):
    g = optimize(onnx_to_graph(_spelling("paddle")))
    cal = make_calibrator("mace", percentile=0.0)
    calibrate(g, [Sample(f"_{i}", _feeds(10 + i)) for i in range(6)], cal)
    res = quantize_graph(g, cal.ranges(), QuantizeOptions(schema=schema, input_ranges={"x": (-3.0, 3.0)}))
    assert res.fallbacks == []
    qg = res.graph
    for seed in range(3):
        feeds = _feeds(20 + seed)
        ref = Session(qg, backend="reference").run(feeds)["y"]
        fast = Session(qg, backend="onnxruntime", num_threads=1).run(feeds)["y"]
        flt = Session(g, backend="reference").run(feeds)["y"]
        step = float(np.ptp(flt)) / 255
        # ORT's float HardSwish vs numpy's: the same codes but for rare 1-step rounding ties
        assert np.abs(fast - ref).max() <= step * 1.01
        assert np.abs(ref - flt).max() <= 4 * step


def _one_op_graph(op: str, lo: float, hi: float, alpha: float = 1.0 / 6.0):
    """x -> op -> y, quantized with x on [lo, hi] (MACE min/max ranges: y's from calibrating on that interval)."""
    attrs = {"alpha": alpha, "beta": 0.5} if op == "HardSigmoid" else {}
    g = optimize(onnx_to_graph(make_onnx([helper.make_node(op, ["x"], ["y"], name="act", **attrs)],
                                         {"x": (1, 1, 16, 16)}, ["y"])))
    cal = make_calibrator("mace", percentile=0.0)
    grid = np.linspace(lo, hi, 256, dtype=np.float32).reshape(1, 1, 16, 16)
    calibrate(g, [Sample("_0", {"x": grid})], cal)
    return quantize_graph(g, cal.ranges(), QuantizeOptions(schema="uint8", input_ranges={"x": (lo, hi)})).graph


@pytest.mark.parametrize("op", ["HardSwish", "HardSigmoid"])
def test_integer_form_runs_as_qlinear_kernels_within_one_step_on_every_code(op, tmp_path):
    """uint8 HardSwish / [0, 1] HardSigmoid lower to QLinearAdd (+ QLinearMul) instead of a float island; on every
    input code of 15 ranges ONNX Runtime's kernels and the reference (run_quantized) agree within one step on at
    most 0.1% of codes (QLinearAdd's fixed-point scale ratios, docs/quantization.md), and the reference stays
    within half a step plus the HardSigmoid factor's nudge and rounding of the float function."""
    from qmace import qmath
    from qmace.onnx_bridge import to_onnx

    differing = []
    rng = np.random.default_rng(7)
    ranges = [(-3.0, 3.0), (-6.0, 9.0), (-0.7, 11.3), (-20.0, 1.5), (-1.0, 1.0)]  # "nice" scales: many exact ties
    ranges += [(-float(a), float(b)) for a, b in rng.uniform(0.05, 12.0, (10, 2))]  # calibrated-looking ones
    for lo, hi in ranges:
        qg = _one_op_graph(op, lo, hi)
        opt = tmp_path / f"{op}_{lo}.onnx"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(to_onnx(qg).SerializeToString(), so, providers=["CPUExecutionProvider"])
        kinds = {n.op_type for n in __import__("onnx").load(str(opt)).graph.node}
        assert "QLinearAdd" in kinds and not kinds & {"HardSwish", "HardSigmoid", "Mul", "Add"}, kinds
        assert ("QLinearMul" in kinds) == (op == "HardSwish")
        xq = qg.tensors[qg.inputs[0]]
        x_qp = qg.tensors[next(n.outputs[0] for n in qg.nodes if n.op_type == "QuantizeLinear")].quant
        codes = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
        feeds = {xq.name: qmath.dequantize(codes, x_qp)}
        ref = Session(qg, backend="reference").run(feeds)["y"]
        fast = Session(qg, backend="onnxruntime", num_threads=1).run(feeds)["y"]
        y_qp = qg.tensors[next(n.inputs[0] for n in qg.nodes if n.op_type == "DequantizeLinear"
                               and n.outputs[0] == "y")].quant
        step = float(y_qp.scale)
        diff = np.abs(fast - ref) / step
        assert diff.max() <= 1.0 + 1e-3, (lo, hi, diff.max())
        differing.append(float(np.mean(diff > 0.5)))
        x = feeds[xq.name].astype(np.float64)
        exact = x * np.clip(x / 6 + 0.5, 0, 1) if op == "HardSwish" else np.clip(x / 6 + 0.5, 0, 1)
        exact = np.clip(exact, *(float(v) for v in qmath.nudged_range(y_qp)))  # the output's saturation
        # the factor's nudge (1/16 of its step) and, for HardSwish, its rounding to 1/255: |x| (1/510 + 1/4080)
        # for |x| < 3 (none beyond: the factor is 1 exactly); HardSigmoid: step / 16
        h_err = 1 / 510 + 1 / (255 * 16)
        slack = np.where(np.abs(x) < 3, np.abs(x) * h_err, 0.0) if op == "HardSwish" else step / 16
        assert np.all(np.abs(ref - exact) <= 0.5 * step + slack + 1e-6), (lo, hi)
    # measured: 0 differing codes on every range (the nudged beta removes the systematic ties, activation.py)
    assert np.mean(differing) <= 0.001, differing


def test_a_source_fixed_hardswish_keeps_its_island_even_when_marked_before():
    """A tensor whose parameters a source model's Q/DQ fixed keeps the float island, and a mark left on the node by
    an earlier quantization of the graph is removed, not carried over."""
    from qmace.ops.activation import QLINEAR
    from qmace.ops.base import ARITH
    from qmace.qmath import Range, params_asymmetric

    g = optimize(onnx_to_graph(make_onnx([helper.make_node("HardSwish", ["x"], ["y"], name="act")],
                                         {"x": (1, 1, 16, 16)}, ["y"])))
    hs = next(n for n in g.nodes if n.op_type == "HardSwish")
    hs.attrs[ARITH] = QLINEAR
    ranges = {"y": Range(-0.4, 3.0)}
    marked = quantize_graph(g, ranges, QuantizeOptions(schema="uint8", input_ranges={"x": (-3.0, 3.0)})).graph
    assert next(n for n in marked.nodes if n.op_type == "HardSwish").attrs.get(ARITH) == QLINEAR
    g.fixed_params = {"x": params_asymmetric(-3.0, 3.0, "uint8")}  # as the QDQ importer records a source Q/DQ
    q = quantize_graph(g, ranges, QuantizeOptions(schema="uint8", input_ranges={"x": (-3.0, 3.0)},
                                                  fixed_params=dict(g.fixed_params))).graph
    assert ARITH not in next(n for n in q.nodes if n.op_type == "HardSwish").attrs
