"""QDQ import: models holding QuantizeLinear/DequantizeLinear pairs convert with ``quantize: 1`` and keep
the parameters they hold. The QDQ models come from ONNX Runtime's ``quantize_static`` (QDQ format)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from qmace import qmath
from qmace.api import convert
from qmace.errors import QuantizationError
from qmace.frontends import load_onnx, onnx_to_graph
from qmace.passes import optimize
from qmace.qmath import QuantParams
from qmace.runtime import Session
from qmace.runtime.session import ort_session

SHAPE = (1, 3, 8, 8)


def _float_model(path: Path) -> None:
    """Conv+Relu, Conv, Add+Relu, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(0)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [init("W1", rng.normal(0, 0.3, (4, 3, 3, 3))), init("B1", rng.normal(0, 0.1, 4)),
             init("W2", rng.normal(0, 0.3, (4, 4, 1, 1))), init("B2", rng.normal(0, 0.1, 4)),
             init("W3", rng.normal(0, 0.3, (5, 4))), init("B3", rng.normal(0, 0.1, 5))]
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["r1", "c2"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["ar"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["ar"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["output"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


class _Reader(CalibrationDataReader):
    """Eight uniform(-1, 1) calibration inputs of ``shape`` for ORT's ``quantize_static``."""

    def __init__(self, shape: tuple[int, ...] = SHAPE, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.data = iter([{"input": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(8)])

    def get_next(self):
        return next(self.data, None)


def _qdq_model(tmp_path: Path, per_channel: bool) -> tuple[Path, Path]:
    fpath, qpath = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    _float_model(fpath)
    quantize_static(str(fpath), str(qpath), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fpath, qpath


def _yaml(tmp_path: Path, model: Path, range_file: Path | None = None, input_shape: str = "1,3,8,8",
          output_shape: str = "1,5") -> Path:
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    rf = f"    quantize_range_file: {range_file}\n" if range_file else ""
    text = f"""\
library_name: qdq
target_abis: [host]
model_graph_format: file
model_data_format: file
models:
  net:
    platform: onnx
    model_file_path: {model}
    model_sha256_checksum: {sha}
    runtime: cpu
    quantize: 1
    quantize_schema: int8
{rf}    subgraphs:
      - input_tensors: [input]
        input_shapes: ["{input_shape}"]
        input_data_formats: [NCHW]
        input_ranges: ["-1,1"]
        output_tensors: [output]
        output_shapes: ["{output_shape}"]
"""
    path = tmp_path / "deploy.yml"
    path.write_text(text)
    return path


def _file_params(model: onnx.ModelProto, node: onnx.NodeProto) -> QuantParams:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = inits[node.input[1]].astype(np.float32)
    zp = inits[node.input[2]]
    axis = None
    if scale.ndim == 1 and scale.size > 1:
        axis = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("axis", 1)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    return QuantParams(scale, zp.astype(np.int32), str(zp.dtype), axis)


def _quant_of(graph, name: str) -> QuantParams:
    t = graph.tensors.get(name)
    if t is not None and t.quant is not None:
        return t.quant
    return graph.tensors[f"{name}__quant"].quant


def _inputs(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(-1, 1, SHAPE).astype(np.float32) for _ in range(n)]


# Tensors whose parameters depend on GlobalAveragePool's output: the quantizer ignores fixed parameters of
# ops with range_rule INPUT (see test_pooled_params_and_bit_exact_vs_ort).
_AFTER_POOL = {"p", "f", "B3"}


def _check_file_params(g, qpath: Path, per_channel: bool, skip: set[str]) -> tuple[int, int, int]:
    """Compare the converted graph's parameters and codes with the QDQ file's; returns the counts checked."""
    qm = onnx.load(qpath)
    inits = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
    outputs = {o.name for o in qm.graph.output}
    dq_of = {n.input[0]: n for n in qm.graph.node if n.op_type == "DequantizeLinear"}
    n_act = n_w = n_b = 0
    for n in qm.graph.node:
        if n.op_type == "QuantizeLinear":  # activation pairs: x -> Q -> DQ -> y
            dq = dq_of[n.output[0]]
            name = dq.output[0] if dq.output[0] in outputs else n.input[0]
            if name in skip:
                continue
            assert _quant_of(g, name) == _file_params(qm, n), name
            n_act += 1
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] not in skip:
            qt = g.tensors[f"{n.output[0]}__quant"]
            assert np.array_equal(qt.data, inits[n.input[0]]), n.output[0]  # the file's codes, exactly
            if inits[n.input[0]].dtype == np.int8:  # weights: the file's parameters
                assert qt.quant == _file_params(qm, n)
                assert qt.quant.is_per_channel == per_channel
                n_w += 1
            else:  # int32 biases: recomputed from s_x * s_w, equal to the file's codes
                n_b += 1
    return n_act, n_w, n_b


@pytest.mark.parametrize("per_channel", [False, True])
def test_convert_keeps_qdq_params(tmp_path, per_channel):
    _, qpath = _qdq_model(tmp_path, per_channel)
    res = convert(_yaml(tmp_path, qpath), build_dir=tmp_path / "build")
    assert res.fallbacks == []
    assert _check_file_params(res.graph, qpath, per_channel, _AFTER_POOL) == (5, 3, 2)


@pytest.mark.parametrize("per_channel", [False, True])
def test_pooled_params_and_bit_exact_vs_ort(tmp_path, per_channel):
    _, qpath = _qdq_model(tmp_path, per_channel)
    g = convert(_yaml(tmp_path, qpath), build_dir=tmp_path / "build").graph
    assert _check_file_params(g, qpath, per_channel, {"f"}) == (6, 3, 3)
    assert _quant_of(g, "f") == _quant_of(g, "p")  # Flatten moves codes: its input's parameters
    sess = Session(g, "reference")
    oracle = ort_session(qpath.read_bytes())  # the source file, with exact int8 kernels on every CPU
    out_scale = float(_quant_of(g, "output").scale)
    worst = 0.0
    for x in _inputs(20):
        ours = sess.run({"input": x})["output"]
        ref = oracle.run(["output"], {"input": x})[0]
        worst = max(worst, float(np.max(np.abs(ours - ref))) / out_scale)
    # Measured (with the quantizer taking GlobalAveragePool's QDQ params): 0 steps, bit-exact with ORT on
    # the QDQ file, for both per-tensor and per-channel weights.
    assert worst == 0.0, worst


@pytest.mark.parametrize("per_channel", [False, True])
def test_float_graph_is_the_dequantized_float_model(tmp_path, per_channel):
    """Stripping Q/DQ gives the source's float math with dequantized weights, including the Relus that
    ORT's quantizer dropped into the Q clamps; BN-free fusion leaves every recorded name in place."""
    fpath, qpath = _qdq_model(tmp_path, per_channel)
    g = optimize(load_onnx(qpath))
    assert set(g.fixed_params) >= {"input", "r1", "c2", "ar", "ar__pre_relu", "p", "output"}
    assert g.op_counts().get("QuantizeLinear", 0) == 0 and g.op_counts().get("DequantizeLinear", 0) == 0
    relus = [n for n in g.nodes if n.op_type == "Relu"]  # conv1's restored Relu is fused back; Add's stays
    assert [n.outputs for n in relus] == [["ar"]]
    assert next(n for n in g.nodes if n.outputs == ["r1"]).attrs["qm_activation"] == "Relu"
    # the float model with the QDQ file's dequantized weights and biases
    qm = onnx.load(qpath)
    inits = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
    deq = {}
    for n in qm.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            src = n.input[0].removesuffix("_quantized")
            code = inits[n.input[0]]
            deq[src] = qmath.dequantize(code, _file_params(qm, n)) if code.dtype != np.int32 else \
                (code.astype(np.float32) * inits[n.input[1]].astype(np.float32))
    fm = onnx.load(fpath)
    for i in fm.graph.initializer:
        i.CopyFrom(numpy_helper.from_array(deq[i.name].astype(np.float32), i.name))
    ref = ort.InferenceSession(fm.SerializeToString(), providers=["CPUExecutionProvider"])
    sess = Session(g, "reference")
    for x in _inputs(3):
        np.testing.assert_allclose(sess.run({"input": x})["output"], ref.run(["output"], {"input": x})[0],
                                   rtol=1e-5, atol=1e-6)
    # relu restored: the float graph has no negative values where the QDQ model clamped at 0
    assert g.fixed_params["r1"].to_json()["zero_point"] == [0]


def _drop_pair(qpath: Path, tensor: str, out: Path) -> None:
    m = onnx.load(qpath)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == dq.output[0]:
                n.input[k] = tensor
    m.graph.node.remove(q)
    m.graph.node.remove(dq)
    onnx.save(m, out)


def test_missing_pair_errors_then_range_file_mixes(tmp_path):
    _, qpath = _qdq_model(tmp_path, True)
    partial = tmp_path / "partial.onnx"
    _drop_pair(qpath, "c2", partial)
    with pytest.raises(QuantizationError, match=r"1 tensor\(s\) have no quantization range: c2 "):
        convert(_yaml(tmp_path, partial), build_dir=tmp_path / "build")
    rf = tmp_path / "ranges.txt"
    rf.write_text("c2@@-1.5,2.25\n")
    res = convert(_yaml(tmp_path, partial, rf), build_dir=tmp_path / "build")
    assert _quant_of(res.graph, "c2") == qmath.params_asymmetric(-1.5, 2.25, "uint8")
    qm = onnx.load(qpath)
    q_r1 = next(n for n in qm.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    assert _quant_of(res.graph, "r1") == _file_params(qm, q_r1)  # QDQ params still win elsewhere


def test_pytorch_style_fake_quant_weights(tmp_path):
    """``W_float -> Q -> DQ`` on an initializer (PyTorch's fake-quant export), per-channel int8, plus an
    activation pair on a graph input (uint8) and one on the graph output."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w_scale, "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.01, np.float32), "x_s"),
             numpy_helper.from_array(np.array(120, np.uint8), "x_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "y_s"),
             numpy_helper.from_array(np.array(100, np.uint8), "y_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "w_s", "w_zp"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_s", "w_zp"], ["wdq"], axis=0),
             helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xdq"]),
             helper.make_node("Conv", ["xdq", "wdq"], ["conv_out"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["conv_out", "y_s", "y_zp"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["y"])]
    g = helper.make_graph(nodes, "torchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    path = tmp_path / "torchy.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    graph = load_onnx(path)
    wqp = QuantParams(w_scale, np.zeros(4, np.int32), "int8", 0)
    np.testing.assert_array_equal(graph.tensors["wdq"].data, qmath.dequantize(qmath.quantize(w, wqp), wqp))
    params = dict(graph.fixed_params)
    assert params == {"wdq": wqp, "x": QuantParams(np.float32(0.01), np.int32(120), "uint8"),
                      "y": QuantParams(np.float32(0.05), np.int32(100), "uint8")}
    assert graph.outputs == ["y"] and [n.op_type for n in graph.nodes] == ["Conv"]
    assert graph.nodes[0].outputs == ["y"]
    # ... and converts, with those parameters
    yml = _yaml(tmp_path, path).read_text().replace("[input]", "[x]").replace("[output]", "[y]")
    yml = yml.replace('"1,5"', '"1,4,8,8"')
    (tmp_path / "deploy.yml").write_text(yml)
    res = convert(tmp_path / "deploy.yml", build_dir=tmp_path / "build")
    # the input's QDQ parameters win over the YAML's input_ranges (-1,1 would give 2/255, 128)
    assert _quant_of(res.graph, "y") == params["y"] and _quant_of(res.graph, "x") == params["x"]
    assert res.graph.tensors["wdq__quant"].quant == wqp
    sess = Session(res.graph, "reference")
    oracle = ort_session(path.read_bytes())  # the source file, with exact int8 kernels on every CPU
    x = _inputs(1)[0]
    diff = np.abs(sess.run({"x": x})["y"] - oracle.run(["y"], {"x": x})[0]).max()
    assert diff <= 0.05 + 1e-6, diff  # one step of y (measured: 0, bit-exact)


@pytest.mark.parametrize("case", ["per_tensor_int16", "per_axis_uint8", "blocked_int8", "runtime_scale"])
def test_standalone_quantize_dequantize_are_ops(case):
    """Q/DQ nodes that are not a Q->DQ pair (codes leave or enter the model) stay as ops: both backends match
    ONNX Runtime on the same file, for 16-bit codes, per-axis and blocked scales and run-time scales."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (2, 4, 6)).astype(np.float32)
    feeds, extra = {"x": x}, []
    if case == "per_tensor_int16":
        scale, zp, attrs = np.array(0.01, np.float32), np.array(-7, np.int16), {}
    elif case == "per_axis_uint8":
        scale, zp, attrs = rng.uniform(0.02, 0.1, 4).astype(np.float32), np.arange(4).astype(np.uint8), {}
    elif case == "blocked_int8":
        scale = rng.uniform(0.02, 0.1, (2, 4, 2)).astype(np.float32)
        zp, attrs = rng.integers(-3, 3, (2, 4, 2)).astype(np.int8), {"axis": 2, "block_size": 4}
    else:
        scale, zp, attrs = np.array(0.05, np.float32), np.array(128, np.uint8), {}
        feeds["s"] = scale
        extra = [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    inits = [numpy_helper.from_array(zp, "z")] + ([] if case == "runtime_scale" else [numpy_helper.from_array(scale, "s")])
    code = helper.np_dtype_to_tensor_dtype(zp.dtype)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **attrs),
             helper.make_node("Mul", ["d", "d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape), *extra],
                              [helper.make_tensor_value_info("q", code, x.shape),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["q", "y"], feeds)
    g = optimize(onnx_to_graph(model, "standalone.onnx"))
    assert [n.op_type for n in g.nodes] == ["QuantizeLinear", "DequantizeLinear", "Mul"]
    for backend in ("reference", "onnxruntime"):
        got = Session(g, backend=backend).run(feeds)
        np.testing.assert_array_equal(got["q"], want[0])
        np.testing.assert_array_equal(got["y"], want[1])


def test_fixed_params_follow_renames_copies_removals_and_the_model_file(tmp_path):
    """Graph.fixed_params is typed state of the graph: rename_tensor carries an entry, remove_unused drops the
    entries of removed tensors, copy() and the model file keep them."""
    from qmace.ir import Graph, Node, Tensor
    from qmace.modelfile import load_graph, save_graph

    g = Graph("g", inputs=["x"], outputs=["y"])
    for name in ("x", "t", "dead", "y"):
        g.add_tensor(Tensor(name, "float32", (1, 4)))
    g.nodes += [Node("a", "Relu", ["x"], ["t"]), Node("b", "Relu", ["t"], ["y"])]
    qp, qp2 = QuantParams(np.float32(0.1), np.int32(3), "uint8"), QuantParams(np.float32(0.2), np.int32(0), "uint8")
    g.fixed_params = {"t": qp, "dead": qp2, "y": qp2}
    g.rename_tensor("t", "t2")
    assert g.fixed_params == {"t2": qp, "dead": qp2, "y": qp2} and g.has_fixed_params("t2")
    g.remove_unused()
    assert g.fixed_params == {"t2": qp, "y": qp2}
    c = g.copy()
    c.fixed_params.pop("y")
    assert set(g.fixed_params) == {"t2", "y"}
    back = load_graph(save_graph(g, tmp_path / "m.qmace"))
    assert back.fixed_params == g.fixed_params and "qdq_params" not in back.metadata
    assert not back.is_quantized
