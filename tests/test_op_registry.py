"""The op registry (qmace/ops/base.py): every op has legal trait values and is exercised by a test; the traits
say what the planner and the passes do with an op, checked on tiny graphs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from qmace import qmath
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op, supported_ops
from qmace.ops.base import Kernel, Op, RangeRule, Sign, register, trait_errors
from qmace.qmath import Range
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.runtime import Session

TESTS = Path(__file__).resolve().parent


def test_every_op_has_legal_traits():
    bad = {op: trait_errors(get_op(op)) for op in supported_ops() if trait_errors(get_op(op))}
    assert not bad


def test_every_op_is_exercised_by_a_test():
    """Each op name appears quoted in a test file other than the registry's own, or in the ONNX node
    conformance selection (tests/onnx_node_selection.json)."""
    text = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    selection = {op for ops in json.loads((TESTS / "onnx_node_selection.json").read_text()).values() for op in ops}
    missing = [op for op in supported_ops()
               if op not in selection and not re.search(rf"[\"']{op}[\"']", text)]
    assert not missing


@pytest.mark.parametrize("traits, message", [
    ({"quant_kernel": "copy"}, "quant_kernel"),
    ({"range_rule": RangeRule.FIXED}, "fixed_range"),
    ({"fixed_range": (0.0, 1.0)}, "fixed_range"),
    ({"range_rule": RangeRule.FIXED, "fixed_range": (1.0, 0.0)}, "lo < hi"),
    ({"range_without_stats": RangeRule.INTERVAL}, "interval"),
    ({"fusable_activation": True}, "fusion_attrs"),
    ({"quant_kernel": Kernel.COPY}, "COPY"),
    ({"sign": "nonneg"}, "Sign"),
    ({"channelwise": 1}, "bool"),
    ({"channel_axis": 1}, "weight_rows"),
])
def test_register_rejects_illegal_traits(traits, message):
    cls = type("Bad", (Op,), {"op_type": "BadOpForTest", **traits})
    with pytest.raises(ValueError, match=message):
        register(cls)
    assert "BadOpForTest" not in supported_ops()


def test_kernel_enum_compares_with_its_yaml_strings():
    assert Kernel.ACCUMULATE == "accumulate" and RangeRule.UNION == "union" and Sign.FIRST == "first"
    assert get_op("Conv").quant_kernel is Kernel.ACCUMULATE and get_op("Sub").quant_kernel is Kernel.NONE


def _resize_graph(mode: str) -> Graph:
    g = Graph("g", inputs=["x"], outputs=["y"])
    g.add_tensor(Tensor("x", "float32", (1, 1, 2, 2)))
    g.add_tensor(Tensor("scales", "float32", (4,), np.array([1, 1, 2, 2], np.float32)))
    g.add_tensor(Tensor("y", "float32", (1, 1, 4, 4)))
    g.nodes.append(Node("resize", "Resize", ["x", "", "scales"], ["y"], {"mode": mode}))
    return g


@pytest.mark.parametrize("mode, shares", [("nearest", True), ("linear", False)])
def test_resize_kernel_per_node_and_the_planner_uses_it(mode, shares):
    """Resize moves codes only in nearest mode; linear is a FLOAT kernel (dequantize -> run -> quantize), so the
    planner lets it take output parameters fixed by the source instead of forcing the input's."""
    op = get_op("Resize")
    assert op.kernel_for(Node("r", "Resize", ["x"], ["y"], {"mode": mode})) is (
        Kernel.COPY if shares else Kernel.FLOAT)
    x_qp, y_qp = qmath.params_asymmetric(-1.0, 1.0, "uint8"), qmath.params_asymmetric(-0.5, 0.5, "uint8")
    res = quantize_graph(_resize_graph(mode), {}, QuantizeOptions(fixed_params={"x": x_qp, "y": y_qp}))
    resize = next(n for n in res.graph.nodes if n.name == "resize")
    assert res.graph.tensors[resize.outputs[0]].quant == (x_qp if shares else y_qp)
    x = np.array([[[[-1.0, -0.25], [0.25, 1.0]]]], np.float32)
    y = Session(res.graph, backend="reference").run({"x": x})["y"]
    out_qp = x_qp if shares else y_qp
    x_grid = qmath.dequantize(qmath.quantize(x, x_qp), x_qp)
    ref = op.run(resize, [x_grid, None, np.array([1, 1, 2, 2], np.float32)])[0]
    np.testing.assert_array_equal(y, qmath.dequantize(qmath.quantize(ref, out_qp), out_qp))


def test_gemm_with_alpha_falls_back_to_float_in_the_planner():
    g = Graph("g", inputs=["a"], outputs=["y"])
    g.add_tensor(Tensor("a", "float32", (1, 3)))
    g.add_tensor(Tensor("b", "float32", (3, 2), np.ones((3, 2), np.float32)))
    g.add_tensor(Tensor("y", "float32", (1, 2)))
    g.nodes.append(Node("fc", "Gemm", ["a", "b"], ["y"], {"alpha": 0.5}))
    res = quantize_graph(g, {"a": Range(-1.0, 1.0), "y": Range(-2.0, 2.0)}, QuantizeOptions())
    assert res.fallbacks == ["fc (Gemm): attributes without an integer kernel"]


def test_sign_traits():
    nonneg = {"p": True, "n": False}.__getitem__
    const = {"zero": np.array(0.0, np.float32), "neg": np.array(-1.0, np.float32)}.get
    assert get_op("Relu").output_nonneg(Node("a", "Relu", ["n"], ["y"]), const, nonneg)
    assert get_op("MaxPool").output_nonneg(Node("a", "MaxPool", ["p"], ["y"]), const, nonneg)
    assert not get_op("MaxPool").output_nonneg(Node("a", "MaxPool", ["n"], ["y"]), const, nonneg)
    assert get_op("Add").output_nonneg(Node("a", "Add", ["p", "p"], ["y"]), const, nonneg)
    assert not get_op("Add").output_nonneg(Node("a", "Add", ["p", "n"], ["y"]), const, nonneg)
    assert get_op("Clip").output_nonneg(Node("a", "Clip", ["n", "zero"], ["y"]), const, nonneg)
    assert not get_op("Clip").output_nonneg(Node("a", "Clip", ["n", "neg"], ["y"]), const, nonneg)
    assert not get_op("Conv").output_nonneg(Node("a", "Conv", ["p", "w"], ["y"]), const, nonneg)


def test_interval_rule_of_add_and_sub():
    a, b = Range(-1.0, 2.0), Range(0.5, 3.0)
    assert get_op("Add").interval(Node("n", "Add", ["a", "b"], ["y"]), [a, b]) == Range(-0.5, 5.0)
    assert get_op("Sub").interval(Node("n", "Sub", ["a", "b"], ["y"]), [a, b]) == Range(-4.0, 1.5)
    assert get_op("Mul").interval(Node("n", "Mul", ["a", "b"], ["y"]), [a, b]) is None


def test_gemm_with_alpha_is_not_quantizable():
    gemm = get_op("Gemm")
    assert gemm.quantizable(Node("g", "Gemm", ["a", "b", "c"], ["y"]))
    assert not gemm.quantizable(Node("g", "Gemm", ["a", "b", "c"], ["y"], {"alpha": 0.5}))
    assert not gemm.quantizable(Node("g", "Gemm", ["a", "b", "c"], ["y"], {"beta": 2.0}))
    assert gemm.quantizable(Node("g", "Gemm", ["a", "b"], ["y"], {"beta": 2.0}))  # no C: beta unused


@pytest.mark.parametrize("op_type, attrs, shape", [
    ("Conv", {"group": 2}, (4, 3, 2, 2)),
    ("Gemm", {"transB": 1}, (5, 3)),
    ("Gemm", {}, (3, 5)),
    ("MatMul", {}, (3, 5)),
])
def test_weight_rows_round_trip_and_match_the_layer(op_type, attrs, shape):
    """rows[g, m] . input_rows[g, r] is the layer's output (no bias), and weight_from_rows inverts rows."""
    rng = np.random.default_rng(0)
    op = get_op(op_type)
    node = Node("n", op_type, ["x", "w"], ["y"], attrs)
    w = rng.standard_normal(shape).astype(np.float32)
    rows = op.weight_rows(node, w)
    np.testing.assert_array_equal(op.weight_from_rows(node, rows, w.shape), w)
    x = rng.standard_normal((1, 6, 4, 4) if op_type == "Conv" else (2, 3)).astype(np.float32)
    cols = op.input_rows(node, x, w.shape)  # (G, R, K)
    g, mg = rows.shape[:2]
    y = np.einsum("grk,gmk->grm", cols, rows.reshape(g, mg, -1))  # (G, R, Mg)
    ref = op.run(node, [x, w])[0].astype(np.float64)
    if op_type == "Conv":  # (N, M, H, W) -> (G, N*H*W, Mg)
        ref = ref.reshape(1, g, mg, -1).transpose(1, 0, 3, 2).reshape(g, -1, mg)
    np.testing.assert_allclose(y, ref.reshape(y.shape), rtol=1e-5, atol=1e-5)


def test_channelwise_per_node():
    shapes = {"x": (1, 4, 1, 1), "y": (1, 4), "z": (1, 4, 2, 2)}.get
    flatten = get_op("Flatten")
    assert flatten.is_channelwise(Node("f", "Flatten", ["x"], ["y"]), shapes)
    assert not flatten.is_channelwise(Node("f", "Flatten", ["z"], ["y"]), shapes)  # mixes spatial into channels
    assert not get_op("MaxPool").is_channelwise(Node("m", "MaxPool", ["z"], ["y", "idx"]), shapes)
    assert get_op("Add").is_channelwise(Node("a", "Add", ["z", "z"], ["z"]), shapes)
    assert not get_op("Add").is_channelwise(Node("a", "Add", ["z", "x"], ["z"]), shapes)  # broadcasting
    assert not get_op("Mul").is_channelwise(Node("a", "Mul", ["z", "z"], ["z"]), shapes)


@pytest.mark.parametrize("op_type", ["Mish", "Relu", "Add"])
def test_transpose_sinking_asks_the_elementwise_trait(op_type):
    """NHWC -> NCHW Transpose, an elementwise op, and the inverse Transpose collapse to the op alone (Add with a
    per-channel constant, permuted with the data)."""
    from qmace.passes.transpose import sink_transposes

    assert get_op(op_type).elementwise
    g = Graph("g", inputs=["x"], outputs=["y"])
    g.add_tensor(Tensor("x", "float32", (1, 4, 4, 3)))
    for name in ("t", "e", "y"):
        g.add_tensor(Tensor(name, "float32", None))
    inputs = ["t"]
    if op_type == "Add":
        g.add_tensor(Tensor("c", "float32", (1, 3, 1, 1), np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1)))
        inputs.append("c")
    g.nodes += [Node("t1", "Transpose", ["x"], ["t"], {"perm": [0, 3, 1, 2]}),
                Node("op", op_type, inputs, ["e"]),
                Node("t2", "Transpose", ["e"], ["y"], {"perm": [0, 2, 3, 1]})]
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
    before = Session(g.copy(), backend="reference").run({"x": x})["y"]
    assert sink_transposes(g) > 0
    assert [n.op_type for n in g.nodes if n.op_type != "Identity"] == [op_type]  # the pair became an Identity
    np.testing.assert_allclose(Session(g, backend="reference").run({"x": x})["y"], before, rtol=1e-6, atol=1e-6)
