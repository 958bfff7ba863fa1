"""Mish: the float kernel against ONNX Runtime, and the quantized op (Kernel.FLOAT) planned, run by the
reference and lowered to ONNX Runtime."""

from __future__ import annotations

import numpy as np

from qmace import qmath
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.ops.base import Kernel
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import Range
from qmace.runtime import Session
from tests.opcheck import check_op

RNG = np.random.default_rng(0)


def test_mish_vs_ort():
    x = np.concatenate([RNG.standard_normal(200) * 4, [-100.0, -30.0, -1.19, 0.0, 30.0, 100.0]])
    check_op("Mish", [x.astype(np.float32).reshape(2, 103)], rtol=1e-6, atol=1e-7)


def test_mish_quantized_reference_and_ort_agree():
    g = Graph("g", inputs=["x"], outputs=["y"])
    g.add_tensor(Tensor("x", "float32", (1, 3, 8, 8)))
    g.add_tensor(Tensor("y", "float32", (1, 3, 8, 8)))
    g.nodes.append(Node("mish", "Mish", ["x"], ["y"]))
    assert get_op("Mish").quant_kernel is Kernel.FLOAT
    res = quantize_graph(g, {"x": Range(-4.0, 4.0), "y": Range(-0.31, 4.0)}, QuantizeOptions(schema="int8"))
    assert res.fallbacks == []
    x = RNG.uniform(-4.5, 4.5, (1, 3, 8, 8)).astype(np.float32)
    ref = Session(res.graph, backend="reference").run({"x": x})["y"]
    ort = Session(res.graph, backend="onnxruntime").run({"x": x})["y"]
    y_qp = qmath.params_asymmetric(-0.31, 4.0, "uint8")
    # ORT's float Mish differs from the float64 one by float32 ulps, which may move a value across a
    # rounding boundary: at most one code apart, and rarely.
    codes_ref, codes_ort = qmath.quantize(ref, y_qp).astype(int), qmath.quantize(ort, y_qp).astype(int)
    assert np.max(np.abs(codes_ref - codes_ort)) <= 1 and np.mean(codes_ref != codes_ort) < 0.02
    x_grid = qmath.dequantize(qmath.quantize(x, qmath.params_asymmetric(-4.0, 4.0, "uint8")),
                              qmath.params_asymmetric(-4.0, 4.0, "uint8"))
    expected = qmath.dequantize(qmath.quantize(get_op("Mish").run(None, [x_grid])[0], y_qp), y_qp)
    np.testing.assert_array_equal(ref, expected)  # the FLOAT kernel's definition, exactly
