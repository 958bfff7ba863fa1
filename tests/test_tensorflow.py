"""platform: tensorflow — frozen GraphDefs read without TensorFlow, against TensorFlow's own outputs.

The .pb fixtures and TensorFlow's outputs on them (tests/data/tf/*.npz) are made by
scripts/gen_tf_fixtures.py; these tests never import TensorFlow (validation falls back to qmace's float
reference when it is absent, which is checked too).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmace import api
from qmace.frontends.tensorflow import graphdef_to_graph, read_graphdef
from qmace.frontends.tensorflow.fakequant import tf_fake_quant, tf_nudge
from qmace.frontends.tensorflow.graphdef import message_classes, tensor_to_numpy
from qmace.passes import optimize
from qmace.runtime import Session

DATA = Path(__file__).parent / "data" / "tf"


def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def write_model(root: Path, pb: bytes | Path, inputs: str = "input", outputs: str = "output",
                shape: str = "1,8,8,3", name: str = "net", **extra) -> Path:
    data = pb.read_bytes() if isinstance(pb, Path) else pb
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / f"{name}.pb").write_bytes(data)
    lines = "".join(f"    {k}: {v}\n" for k, v in extra.items())
    yml = root / f"{name}.yml"
    yml.write_text(
        "library_name: tflib\ntarget_abis: [host]\nmodels:\n"
        f"  {name}:\n    platform: tensorflow\n    model_file_path: models/{name}.pb\n"
        f"    model_sha256_checksum: {hashlib.sha256(data).hexdigest()}\n    runtime: cpu\n{lines}"
        f"    subgraphs:\n      - input_tensors: {inputs}\n        input_shapes: {shape}\n"
        f"        input_ranges: -1,1\n        output_tensors: {outputs}\n")
    return yml


def run_converted(yml: Path, x_nhwc: np.ndarray, inputs: str, outputs: str, root: Path) -> np.ndarray:
    res = api.convert(yml, build_dir=root / "build")
    sess = Session(res.graph, backend="reference")
    return np.concatenate([sess.run({inputs: x_nhwc[i:i + 1].transpose(0, 3, 1, 2)})[outputs]
                           for i in range(len(x_nhwc))])


# ---- GraphDef reading -------------------------------------------------------------------------------------

def test_graphdef_messages_roundtrip_and_tensor_values():
    c = message_classes()
    g = c["GraphDef"]()
    n = g.node.add(name="k", op="Const")
    t = n.attr["value"].tensor
    t.dtype = 1
    t.tensor_shape.dim.add(size=3)
    t.float_val.append(2.5)  # one value fills the shape (TensorFlow's rule)
    n2 = g.node.add(name="i", op="Const")
    t2 = n2.attr["value"].tensor
    t2.dtype = 9
    t2.tensor_shape.dim.add(size=2)
    t2.tensor_content = np.array([7, -3], "<i8").tobytes()
    back = c["GraphDef"]()
    back.ParseFromString(g.SerializeToString())
    assert tensor_to_numpy(back.node[0].attr["value"].tensor).tolist() == [2.5, 2.5, 2.5]
    v = tensor_to_numpy(back.node[1].attr["value"].tensor)
    assert v.dtype == np.int64 and v.tolist() == [7, -3]


@pytest.mark.parametrize("name, inp, out, nodes_left", [
    ("convnet", "input", "output", None),
    ("keras3", "input:0", "Identity:0", {"Conv": 2, "Add": 1, "Gemm": 1, "GlobalAveragePool": 1, "Flatten": 1}),
])
def test_float_graph_matches_tensorflow(name, inp, out, nodes_left):
    d = fixture(name)
    g = graphdef_to_graph(read_graphdef(DATA / f"{name}.pb"), name, [inp], [out], ["NHWC"], ["NHWC"], [None])
    g.tensors[inp].shape = (1, 3, 8, 8)
    opt = optimize(g)
    if nodes_left is not None:  # Keras 3's Rsqrt/Mul/Sub/AddV2 batch norm is folded into the convolutions
        assert opt.op_counts() == nodes_left
    # every Transpose pair (the conv wrappers, the ONNX-style pair around the residual add) cancels; one
    # remains in convnet before the Reshape that flattens NHWC
    assert opt.op_counts().get("Transpose", 0) <= 1
    for backend in ("reference", "onnxruntime"):
        y = Session(opt, backend=backend).run({inp: d["x"].transpose(0, 3, 1, 2)})[out]
        np.testing.assert_allclose(y, d["y"], atol=2e-6)


def test_convnet_covers_shape_arithmetic_and_int64():
    gd = read_graphdef(DATA / "convnet.pb")
    ops = {n.op for n in gd.node}
    assert {"StridedSlice", "Pack", "Tile", "Rsqrt", "Transpose", "ConcatV2", "Pad", "ResizeBilinear",
            "FusedBatchNormV3", "DepthwiseConv2dNative", "BiasAdd"} <= ops
    assert any(n.op == "Const" and n.attr["value"].tensor.dtype == 9 for n in gd.node)  # int64


# ---- the CLI verbs on a TensorFlow model --------------------------------------------------------------------

@pytest.mark.parametrize("inp, out", [("input", "output"), ("input:0", "output:0")])
def test_convert_and_validate_with_either_tensor_spelling(tmp_path, cli, inp, out):
    d = fixture("convnet")
    yml = write_model(tmp_path, DATA / "convnet.pb", inp, out)
    y = run_converted(yml, d["x"], inp, out, tmp_path)
    np.testing.assert_allclose(y, d["y"], atol=2e-6)
    r = cli("run", "--config", yml, "--validate", "--build_dir", tmp_path / "build")
    assert r.code == 0, r.err
    if shutil.which("python3") and not _has_tf():
        assert "float reference" in r.out + r.err and "qmace[tf]" in r.err


def _has_tf() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def test_range_log_names_are_tf_tensor_names(tmp_path, cli):
    yml = write_model(tmp_path, DATA / "convnet.pb")
    assert cli("convert", "--config", yml, "--build_dir", tmp_path / "build").code == 0
    r = cli("run", "--config", yml, "--quantize_stat", "--build_dir", tmp_path / "build")
    assert r.code == 0, r.err
    names = [line.split("@@")[1] for line in r.out.splitlines() if "@@" in line]
    # node:0 names; a transposed copy of a channels-first result is node:0/nhwc
    assert names and all(n.removesuffix("/nhwc").endswith(":0") or n == "output" for n in names), names
    assert "Relu6:0" in names  # the first conv + bias + relu6 takes the Relu6's name, as in MACE


# ---- FakeQuant (QAT graphs) ----------------------------------------------------------------------------------

def test_tf_nudge_matches_the_documented_example():
    n = tf_nudge(np.float32(-5.9047), np.float32(5.9274), 8, False)
    assert int(n["zero_point"]) == 127
    np.testing.assert_allclose([n["nudged_min"], n["nudged_max"]], [-5.89285, 5.93925], atol=2e-5)
    x = np.linspace(-7, 7, 101, dtype=np.float32)
    y = tf_fake_quant(x, n, None)
    codes = (y - n["nudged_min"]) / n["scale"]
    assert np.allclose(codes, np.round(codes), atol=1e-3) and y.min() >= n["nudged_min"] - 1e-6


def _steps_off(y: np.ndarray, ref: np.ndarray, step: float) -> np.ndarray:
    return np.abs(y - ref) / step


@pytest.mark.parametrize("name, inp, out, step", [
    ("fakequant_v1", "input", "output", (2.7 + 3.1) / 255),
    ("tfmot_qat", "input", "Identity", None),
])
def test_qat_graph_reproduces_tensorflow_fake_quant(tmp_path, name, inp, out, step):
    d = fixture(name)
    yml = write_model(tmp_path, DATA / f"{name}.pb", inp, out, quantize=1, quantize_schema="int8")
    y = run_converted(yml, d["x"], inp, out, tmp_path)
    if step is None:  # tfmot: the Dense output's FakeQuant step, from the graph
        g = graphdef_to_graph(read_graphdef(DATA / f"{name}.pb"), name, [inp], [out], ["NHWC"], ["NHWC"], [2])
        step = min(v["scale"] for v in (qp.to_json() for qp in g.fixed_params.values()) if v.get("axis") is None
                   and v["dtype"] == "uint8")
    off = _steps_off(y, d["y"], step)
    assert off.max() <= 1.01, off.max()
    assert np.mean(off > 0.01) <= 0.01
    assert (y.argmax(1) == d["y"].argmax(1)).all()


def test_qat_weights_keep_the_learned_grid(tmp_path):
    yml = write_model(tmp_path, DATA / "fakequant_v1.pb", quantize=1, quantize_schema="int8")
    g = api.convert(yml, build_dir=tmp_path / "build").graph
    convs = [n for n in g.nodes if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 3
    for n in convs:
        w = g.tensors[n.inputs[1]]
        assert w.dtype == "int8" and w.quant.narrow_range and int(np.abs(w.data).max()) <= 127
    # the depthwise range had shape [1]; after folding its batch norm it is per channel (scale * |bn scale|)
    dw = g.tensors[convs[1].inputs[1]]
    assert dw.quant.axis == 0 and dw.quant.scale.shape == (8,)


def test_uint8_schema_warns_once_about_the_weight_grid(tmp_path, cli):
    yml = write_model(tmp_path, DATA / "fakequant_v1.pb", quantize=1)
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    assert r.code == 0, r.err
    assert r.err.count("weight grid learned by fake quantization cannot be kept") == 1


def test_missing_ranges_listed_in_one_error(tmp_path, cli):
    """tfmot leaves the input without a FakeQuant-free range? No: its input has one. Cut the graph at the
    Dense input so nothing ranges the new input, and ask for a tensor the range file must provide."""
    yml = write_model(tmp_path, DATA / "convnet.pb", quantize=1, quantize_schema="int8",
                      quantize_range_file="ranges.txt")
    (tmp_path / "ranges.txt").write_text("Relu6:0@@0.0,6.0\n")
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    assert r.code == 2 and len(r.err_lines) == 1 and "have no quantization range" in r.err
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("*.qmace"))


# ---- bad input -------------------------------------------------------------------------------------------

def _graph(*nodes: tuple) -> bytes:
    """A GraphDef of (name, op, inputs, attrs) where attrs maps a name to a callable filling the AttrValue."""
    c = message_classes()
    g = c["GraphDef"]()
    for name, op, inputs, attrs in nodes:
        n = g.node.add(name=name, op=op)
        n.input.extend(inputs)
        for k, fill in attrs.items():
            fill(n.attr[k])
    return g.SerializeToString()


def _placeholder(a):
    a.shape.dim.add(size=1)
    a.shape.dim.add(size=4)


def _const(value):
    def fill(a):
        t = a.tensor
        v = np.asarray(value, np.float32)
        t.dtype = 1
        for d in v.shape:
            t.tensor_shape.dim.add(size=d)
        t.tensor_content = v.tobytes()
    return fill


def _fq_graph(lo: float, hi: float, bits: int = 8) -> bytes:
    def nb(a):
        a.i = bits
    return _graph(("input", "Placeholder", [], {"shape": _placeholder}),
                  ("mn", "Const", [], {"value": _const(lo)}), ("mn/read", "Identity", ["mn"], {}),
                  ("mx", "Const", [], {"value": _const(hi)}),
                  ("fq", "FakeQuantWithMinMaxVars", ["input", "mn/read", "mx"], {"num_bits": nb}),
                  ("output", "Relu", ["fq"], {}))


@pytest.mark.parametrize("make, expect", [
    (lambda root: write_model(root, (DATA / "convnet.pb").read_bytes()[:5000]), "truncated"),
    (lambda root: write_model(root, b"\x08\x96\x01 plainly not a graph"), "not a TensorFlow GraphDef"),
    (lambda root: write_model(root, b'node {\n  name: "input"\n  op: "Placeholder"\n}\n'), "text-format"),
    (lambda root: write_model(root, _graph(("input", "Placeholder", [], {"shape": _placeholder}),
                                           ("v", "VarHandleOp", [], {}), ("r", "ReadVariableOp", ["v"], {}),
                                           ("output", "Mul", ["input", "r"], {}))), "freeze it first"),
    (lambda root: write_model(root, _graph(("input", "Placeholder", [], {"shape": _placeholder}),
                                           ("p", "Placeholder", [], {}), ("s", "Switch", ["input", "p"], {}),
                                           ("output", "Merge", ["s", "s:1"], {}))), "control flow"),
    (lambda root: write_model(root, _fq_graph(1.0, -1.0)), "min 1.0 > max -1.0"),
    (lambda root: write_model(root, _fq_graph(-1.0, 1.0, 4)), "num_bits=4"),
    (lambda root: write_model(root, _graph(("input", "Placeholder", [], {"shape": _placeholder}),
                                           ("a", "Erfinv", ["input"], {}), ("b", "Erfinv", ["a"], {}),
                                           ("output", "Atan2", ["b", "input"], {}))),
     "Atan2 (1 node), Erfinv (2 nodes)"),
], ids=["truncated", "garbage", "pbtxt", "variables", "control-flow", "fq-min-max", "fq-bits", "unsupported"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, cli, make, expect):
    yml = make(tmp_path)
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert expect in r.err and "net.pb" in r.err
    assert not (tmp_path / "build").exists()


def test_saved_model_directory_says_how_to_freeze(tmp_path, cli):
    d = tmp_path / "models" / "sm"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"\x08\x01")
    yml = write_model(tmp_path, b"x")
    text = yml.read_text().replace("models/net.pb", "models/sm")
    yml.write_text(text)
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "SavedModel" in r.err and "convert_variables_to_constants" in r.err


def test_ir_op_table_covers_every_emitter():
    from qmace.frontends.tensorflow.ops import EMITTERS, IR_OPS
    from qmace.ops import is_supported

    assert set(EMITTERS) == set(IR_OPS)
    assert all(is_supported(op) for ops in IR_OPS.values() for op in ops)


@pytest.mark.parametrize("out", ["Relu", "Relu:0"])
def test_rank4_output_comes_back_in_the_yaml_layout(tmp_path, out):
    """An NHWC output of rank 4 is channels-first in the IR (the model layout) whichever name spelling."""
    yml = write_model(tmp_path, DATA / "convnet.pb", outputs=out)
    g = api.convert(yml, build_dir=tmp_path / "build").graph
    assert g.outputs == [out] and g.tensors[out].shape == (1, 8, 4, 4)
    assert "Transpose" not in g.op_counts()


def _mixed_graph() -> bytes:
    """input -> FakeQuant -> Conv2D (constant filter) -> Relu -> output: the Relu output has no FakeQuant."""
    def strides(a):
        a.list.i.extend([1, 1, 1, 1])

    def same(a):
        a.s = b"SAME"

    def shape(a):
        for d in (1, 4, 4, 2):
            a.shape.dim.add(size=d)

    w = np.random.default_rng(5).normal(0, 0.5, (3, 3, 2, 3)).astype(np.float32)
    return _graph(("input", "Placeholder", [], {"shape": shape}),
                  ("mn", "Const", [], {"value": _const(-1.0)}), ("mx", "Const", [], {"value": _const(1.0)}),
                  ("fq", "FakeQuantWithMinMaxVars", ["input", "mn", "mx"], {}),
                  ("w", "Const", [], {"value": _const(w)}),
                  ("conv", "Conv2D", ["fq", "w"], {"strides": strides, "padding": same}),
                  ("output", "Relu", ["conv"], {}))


def test_fake_quant_ranges_mix_with_the_range_file(tmp_path, cli):
    """MACE's "mixing usage": tensors without a FakeQuant take the range file's range; without one, a single
    error names them."""
    pb = _mixed_graph()
    yml = write_model(tmp_path, pb, shape="1,4,4,2", quantize=1, quantize_schema="int8")
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    errors = [line for line in r.err_lines if "WARNING" not in line]  # the filter has no FakeQuant: one warning
    assert r.code == 2 and len(errors) == 1 and "output" in errors[0] and "no quantization range" in errors[0]
    (tmp_path / "ranges.txt").write_text("output@@0.0,3.0\n")
    yml = write_model(tmp_path, pb, shape="1,4,4,2", quantize=1, quantize_schema="int8",
                      quantize_range_file="ranges.txt")
    g = api.convert(yml, build_dir=tmp_path / "build").graph
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    x_qp = g.tensors[conv.inputs[0]].quant
    # TensorFlow nudges (-1, 1) to (-0.9960785, 1.0039216) in float32: zero point 127, not 128
    assert x_qp is not None and int(x_qp.zero_point) == 127 and np.isclose(float(x_qp.scale), 2 / 255)
    y_qp = g.tensors[conv.outputs[0]].quant
    assert np.isclose(float(y_qp.scale), 3 / 255)  # from the range file


def test_qat_graph_warns_about_weights_without_fake_quant(tmp_path, cli):
    """A QAT graph whose convolution weight has no FakeQuant (tfmot's Conv -> ReLU freeze): one warning naming
    it under quantize: 1; none for a float conversion, none for the tfmot fixture (every weight quantized)."""
    (tmp_path / "ranges.txt").write_text("output@@0.0,3.0\n")
    yml = write_model(tmp_path, _mixed_graph(), shape="1,4,4,2", quantize=1, quantize_schema="int8",
                      quantize_range_file="ranges.txt")
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build")
    assert r.code == 0, r.err
    assert r.err.count("have no FakeQuant in this QAT graph") == 1 and "'conv'" in r.err
    yml = write_model(tmp_path, _mixed_graph(), shape="1,4,4,2", name="float")
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build_f")
    assert r.code == 0 and "have no FakeQuant" not in r.err, r.err
    yml = write_model(tmp_path, DATA / "tfmot_qat.pb", inputs="input", outputs="Identity", name="tfmot",
                      quantize=1, quantize_schema="int8")
    r = cli("convert", "--config", yml, "--build_dir", tmp_path / "build_t")
    assert r.code == 0 and "have no FakeQuant" not in r.err, r.err
