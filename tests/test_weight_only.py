"""quantize_large_weights (weight-only 8-bit storage): MACE's op set (depthwise, grouped, ConvTranspose and
shared weights stay float), the per-channel int8 / per-tensor uint8 storage, the minimum size, the convert
summary, the YAML key and `run --validate`."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qmace import qmath
from qmace.api import ConvertResult
from qmace.config import load_config
from qmace.errors import ConfigError
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.metrics import compare
from qmace.modelfile import load_graph, save_graph
from qmace.passes import optimize
from qmace.quantize.weight_only import DECONV, DEPTHWISE, SHARED, describe, quantize_large_weights
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

# weight -> number of elements; which rule applies is in _EXPECTED
_SHAPES = {
    "w_pw": (64, 32, 1, 1),    # 2048, Conv group 1                -> 8-bit
    "w_dw": (64, 1, 5, 5),     # 1600, depthwise Conv (group 64)  -> float: MACE's DepthwiseConv2d
    "w_grp": (64, 32, 1, 1),   # 2048, Conv group 2               -> float: grouped
    "w_1024": (16, 64, 1, 1),  # 1024, Conv group 1, at the minimum -> 8-bit
    "w_small": (8, 16, 1, 1),  # 128, Conv group 1                -> float: below the minimum
    "w_dc": (8, 16, 3, 3),     # 1152, ConvTranspose              -> float: MACE's Deconv2D
    "w_sh": (16, 64),          # 1024, read by two MatMuls        -> float: not a single consumer
    "w_fc": (64, 32),          # 2048, Gemm (transB 0)            -> 8-bit, channels on axis 1
}
_QUANTIZED = {"w_pw", "w_1024", "w_fc"}
_EXPECTED = {DEPTHWISE: ["w_dw", "w_grp"], DECONV: ["w_dc"], SHARED: ["w_sh"],
             "fewer than 1024 elements (saves too little)": ["w_small"]}


def _mixed_model():
    """x (1,32,6,6) -> Conv 1x1 -> depthwise Conv 5x5 -> grouped Conv (2 groups) -> Conv 1x1 (1024 weights) ->
    Conv 1x1 (128 weights) -> ConvTranspose 3x3 -> GlobalAveragePool -> Flatten -> two MatMuls sharing one
    weight (one behind a Relu) -> Add -> Gemm -> output (1,32)."""
    rng = np.random.default_rng(3)
    inits = {k: rand(rng, *s, scale=0.2) for k, s in _SHAPES.items()}
    nodes = [
        helper.make_node("Conv", ["x", "w_pw"], ["a"], name="pw"),
        helper.make_node("Conv", ["a", "w_dw"], ["b"], name="dw", group=64, pads=[2, 2, 2, 2]),
        helper.make_node("Conv", ["b", "w_grp"], ["c"], name="grp", group=2),
        helper.make_node("Conv", ["c", "w_1024"], ["d"], name="c1024"),
        helper.make_node("Conv", ["d", "w_small"], ["e"], name="small"),
        helper.make_node("ConvTranspose", ["e", "w_dc"], ["f"], name="deconv"),
        helper.make_node("GlobalAveragePool", ["f"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "w_sh"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["flat"], ["rf"], name="relu"),
        helper.make_node("MatMul", ["rf", "w_sh"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m1", "m2"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "w_fc"], ["output"], name="fc"),
    ]
    return make_onnx(nodes, {"x": (1, 32, 6, 6)}, ["output"], inits)


@pytest.fixture(scope="module")
def graph():
    return optimize(onnx_to_graph(_mixed_model()))


def _stored(g) -> dict[str, qmath.QuantParams]:
    """Source weight name -> parameters of its 8-bit copy."""
    return {k.removesuffix("__quant"): t.quant for k, t in g.tensors.items()
            if t.data is not None and t.dtype in ("int8", "uint8")}


def test_mace_op_set_depthwise_grouped_deconv_shared_stay_float(graph):
    lw = quantize_large_weights(graph)
    assert set(_stored(lw)) == _QUANTIZED
    meta = lw.metadata["quantization"]
    assert meta["float_weights"] == _EXPECTED
    assert meta["quantized_weights"] == len(_QUANTIZED)
    for name in ("w_dw", "w_grp", "w_dc", "w_sh", "w_small"):
        assert lw.tensors[name].dtype == "float32" and lw.tensors[name].data is not None
    # the depthwise rule does not depend on size: no minimum puts depthwise weights into 8 bits
    lw0 = quantize_large_weights(graph, "uint8", min_elements=0)
    assert set(_stored(lw0)) == _QUANTIZED | {"w_small"}
    assert lw0.metadata["quantization"]["float_weights"][DEPTHWISE] == ["w_dw", "w_grp"]


def test_int8_is_symmetric_per_output_channel(graph):
    lw = quantize_large_weights(graph, "int8")
    stored = _stored(lw)
    for name, axis in (("w_pw", 0), ("w_1024", 0), ("w_fc", 1)):  # Gemm without transB: channels are columns
        w = graph.tensors[name].data
        qp = stored[name]
        assert qp.dtype == "int8" and qp.axis == axis and qp.narrow_range and not np.any(qp.zero_point)
        other = tuple(i for i in range(w.ndim) if i != axis)
        np.testing.assert_array_equal(qp.scale, (np.abs(w.astype(np.float64)).max(axis=other) / 127).astype(np.float32))
        err = np.abs(qmath.dequantize(lw.tensors[f"{name}__quant"].data, qp) - w)
        bound = np.expand_dims(qp.scale, other) / 2 * (1 + 1e-5)
        assert np.all(err <= bound)


def test_uint8_is_mace_per_tensor_storage(graph):
    stored = _stored(quantize_large_weights(graph, "uint8"))
    for name in _QUANTIZED:
        w = graph.tensors[name].data.astype(np.float64)
        qp = stored[name]
        assert qp.dtype == "uint8" and qp.axis is None
        assert qp.scale == np.float32((max(w.max(), 0) - min(w.min(), 0)) / 255)


def test_min_elements_boundary(graph):
    # 1024 elements are stored at min 1024 (above); at 1025 that weight stays float with the reason
    lw = quantize_large_weights(graph, min_elements=1025)
    assert set(_stored(lw)) == _QUANTIZED - {"w_1024"}
    assert lw.metadata["quantization"]["float_weights"]["fewer than 1025 elements (saves too little)"] == \
        ["w_1024", "w_small"]


@pytest.mark.parametrize("schema", ["int8", "uint8"])
def test_saved_model_runs_close_to_float_on_both_backends(graph, schema, tmp_path):
    lw = load_graph(save_graph(quantize_large_weights(graph, schema), tmp_path / "lw.qmace"))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.uniform(-1, 1, (1, 32, 6, 6)).astype(np.float32)}
    want = Session(graph, backend="reference").run(feeds)["output"]
    got = {b: Session(lw, backend=b).run(feeds)["output"] for b in ("reference", "onnxruntime")}
    assert compare(got["reference"], got["onnxruntime"]).cosine > 1 - 1e-6
    assert compare(want, got["onnxruntime"]).cosine > 0.999


def test_summary_groups_float_weights_and_gives_size_vs_float(graph, tmp_path):
    lw = quantize_large_weights(graph)
    f_size = save_graph(graph, tmp_path / "f.qmace").stat().st_size
    q_path = save_graph(lw, tmp_path / "q.qmace")
    q_size = q_path.stat().st_size
    wb = lw.metadata["quantization"]["weight_bytes"]
    # the float size the summary states is within 3% of the float model file
    assert abs(q_size - wb["stored"] + wb["float"] - f_size) < 0.03 * f_size, (q_size, wb, f_size)
    text = ConvertResult(q_path, lw, q_size).summary()
    assert "weight-only quantized (inference in float): 3 weight(s) stored int8 symmetric per channel" in text
    assert "5 weight(s) kept float:" in text
    for reason, names in _EXPECTED.items():  # one line per reason, with its count
        assert sum(f"{len(names)} {reason}: " in line for line in text.splitlines()) == 1
    lines = describe(lw.metadata["quantization"], q_size, max_names=1)
    assert f"  2 {DEPTHWISE}: w_dw (+1 more)" in lines


def _write_mixed(model_factory, **extra):
    return model_factory(_mixed_model(), name="mixed", quantize_large_weights=1, **extra)


def test_yaml_key_chooses_storage_and_validate_uses_quantize_threshold(model_factory, cli):
    t = _write_mixed(model_factory, quantize_large_weights_schema="UINT8")
    assert load_config(t.yaml).model().quantize_large_weights_schema == "uint8"
    res = cli("convert", "--config", t.yaml)
    assert res.code == 0, res.err
    assert "3 weight(s) stored uint8 asymmetric per tensor" in res.out and "DequantizeLinear x3" in res.out
    res = cli("run", "--config", t.yaml, "--validate")
    assert res.code == 0, res.out + res.err
    assert "cosine >= 0.98)" in res.out  # validation_threshold QUANTIZE, as MACE for quantize_large_weights


def test_yaml_key_bad_value(model_factory, cli):
    t = _write_mixed(model_factory, quantize_large_weights_schema="int4")
    with pytest.raises(ConfigError, match="quantize_large_weights_schema"):
        load_config(t.yaml)
    res = cli("convert", "--config", t.yaml)
    assert res.code == 2 and "quantize_large_weights_schema" in res.err and "Traceback" not in res.err
