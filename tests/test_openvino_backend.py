"""The openvino backend (optional: ``pip install qmace[openvino]``) runs the lowered QDQ model with OpenVINO's
own int8 kernels, whose arithmetic is not qmace's definition (docs/quantization.md, "The openvino
backend"). These tests state its measured bound against the reference backend on a small CNN, per schema."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qmace.data import Sample
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.recipe import calibrate
from qmace.runtime import Session
from qmace.runtime.openvino_backend import available
from tests.conftest import make_onnx, rand

pytestmark = pytest.mark.skipif(not available(), reason="openvino is not installed (pip install qmace[openvino])")
SHAPE = (1, 16, 12, 12)


def _cnn():
    """x -> Conv3x3(16->32)+Relu -> Conv1x1(32->32)+Relu -> Add(residual) -> GlobalAveragePool -> Gemm(10)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rand(rng, 32, 16, 3, 3, scale=0.3), "b1": rand(rng, 32, scale=0.1),
             "w2": rand(rng, 32, 32, 1, 1, scale=0.3), "b2": rand(rng, 32, scale=0.1),
             "w3": rand(rng, 10, 32), "b3": rand(rng, 10, scale=0.1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1)]
    return make_onnx(nodes, {"x": SHAPE}, ["logits"], inits)


def _samples(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [Sample(f"_{i}", {"x": rng.uniform(-1, 1, SHAPE).astype(np.float32)}) for i in range(n)]


@pytest.fixture(scope="module")
def graphs():
    g = optimize(onnx_to_graph(_cnn()))
    cal = make_calibrator("mace", percentile=0.0)
    calibrate(g, _samples(8, 0), cal)
    table = cal.ranges()
    return {s: quantize_graph(g, table, QuantizeOptions(schema=s, input_ranges={"x": (-1.0, 1.0)})).graph
            for s in ("uint8", "int8", "int8_w7")}


def _steps(graph, backend: str) -> np.ndarray:
    """|openvino - reference| of the quantized logits in steps of their scale, over 16 samples."""
    ref, ov = Session(graph, "reference"), Session(graph, backend, num_threads=1)
    out = graph.outputs[0]
    scale = float(next(graph.tensors[n.inputs[0]] for n in graph.nodes if out in n.outputs).quant.scale)
    diffs = [np.abs(ref.run(s.feeds)[out] - ov.run(s.feeds)[out]) / scale for s in _samples(16, 1)]
    return np.round(np.concatenate([d.ravel() for d in diffs])).astype(int)


@pytest.mark.parametrize("schema", ["uint8", "int8_w7", "int8"])
def test_openvino_within_one_step_of_reference(graphs, schema):
    """Bound: <= 1 step of the output scale on the quantized logits (measured on an AMD EPYC, AVX2 without
    VNNI, openvino 2026.4.1: 0 steps on all 160 for uint8 and int8_w7). Full-range int8 weights on a CPU
    without VNNI saturate in oneDNN's u8 x s8 kernels as in ONNX Runtime's (measured there: up to 4 steps,
    112 of 160 logits differ), so that case is only asserted where ONNX Runtime's probe finds no
    saturation."""
    from qmace.runtime.session import ort_u8s8_exact

    steps = _steps(graphs[schema], "openvino")
    if schema == "int8" and not ort_u8s8_exact():
        pytest.skip(f"u8 x s8 saturates on this CPU (no VNNI): openvino differs by up to {steps.max()} steps")
    assert steps.max() <= 1


def test_run_compares_onnxruntime_and_openvino(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--benchmark", "--validate", "--backend", "onnxruntime,openvino")
    assert res.code == 0, res.err
    assert "openvino: 1 sample(s)" in res.out and "median latency relative to onnxruntime" in res.out
    assert res.out.count("validation passed") == 2
