"""``platform: caffe`` end to end: files and YAML in tmp_path, the CLI verbs, the OpenCV oracle, and every
bad input (one line naming file and layer, exit 2)."""

from __future__ import annotations

import numpy as np
import pytest

from qmace.frontends.caffe import parse_prototxt
from tests.caffe_util import caffe_yaml, input_layer, write_caffe_files
from tests.test_cli import assert_bad

RNG = np.random.default_rng(7)

NET = input_layer((1, 3, 8, 8)) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "add" type: "Eltwise" bottom: "pool1" bottom: "conv2" top: "add" }
layer { name: "pool2" type: "Pooling" bottom: "add" top: "pool2" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _blobs():
    f = np.float32
    return {
        "conv1": [RNG.standard_normal((4, 3, 3, 3)).astype(f) * 0.3, RNG.standard_normal(4).astype(f) * 0.1],
        "bn1": [RNG.standard_normal(4).astype(f), (RNG.random(4) + 0.5).astype(f), np.ones(1, f)],
        "scale1": [(RNG.random(4) + 0.5).astype(f), RNG.standard_normal(4).astype(f) * 0.1],
        "conv2": [RNG.standard_normal((4, 4, 1, 1)).astype(f) * 0.3, RNG.standard_normal(4).astype(f) * 0.1],
        "fc": [RNG.standard_normal((3, 4)).astype(f), RNG.standard_normal(3).astype(f) * 0.1],
    }


@pytest.fixture
def caffe_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proto, model = write_caffe_files(tmp_path / "models", NET, _blobs())
    return caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob")


def test_convert_run_validate_against_opencv(caffe_model, cli):
    pytest.importorskip("cv2")
    res = cli("convert", "--config", caffe_model)
    assert res.code == 0, res.err
    assert "Conv x2" in res.out and "BatchNormalization" not in res.out
    res = cli("run", "--config", caffe_model, "--validate")
    assert res.code == 0, res.err
    assert "validation against OpenCV" in res.out and "validation passed" in res.out


def test_intermediate_in_place_version_as_yaml_output(tmp_path, cli, monkeypatch):
    """A YAML output naming an earlier version of an in-place blob (BatchNorm's, before Scale and ReLU)
    is kept and validated against the layer that wrote it."""
    pytest.importorskip("cv2")
    monkeypatch.chdir(tmp_path)
    proto, model = write_caffe_files(tmp_path / "models", NET, _blobs())
    path = caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "[conv1/bn1, prob]")
    assert cli("convert", "--config", path).code == 0
    res = cli("run", "--config", path, "--validate")
    assert res.code == 0, res.err
    assert "conv1/bn1" in res.out and "validation passed" in res.out


def test_validate_without_opencv_uses_labelled_float_reference(caffe_model, cli, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("no cv2")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    assert cli("convert", "--config", caffe_model).code == 0
    res = cli("run", "--config", caffe_model, "--validate")
    assert res.code == 0, res.err
    assert "qmace's float reference" in res.out and "qmace[caffe]" in res.err


def test_opencv_matches_every_layer_version(tmp_path):
    """The oracle asks OpenCV for in-place intermediate versions by their writing layer."""
    pytest.importorskip("cv2")
    from types import SimpleNamespace

    from qmace.frontends.caffe import caffe_oracle, load_caffe_files
    from qmace.runtime import Session

    proto, model = write_caffe_files(tmp_path, NET, _blobs())
    names = ["conv1/conv1", "conv1/bn1", "conv1/scale1", "conv1", "pool1", "add", "prob"]
    g = load_caffe_files(proto, model, keep=names)  # kept: no BatchNorm + Scale merge
    g.outputs = names
    x = RNG.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    ours = Session(g, backend="reference").run({"data": x})
    oracle = caffe_oracle(SimpleNamespace(model_file_path=proto, weight_file_path=model))
    for name, ref in zip(names, oracle.run(names, {"data": x})):
        np.testing.assert_allclose(ours[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)


MANY = input_layer((1, 4, 7, 6)) + """
layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "dil" type: "Convolution" bottom: "up" top: "dil"
        convolution_param { num_output: 6 kernel_size: 3 dilation: 2 pad: 2 group: 2 } }
layer { name: "prelu" type: "PReLU" bottom: "dil" top: "dil" }
layer { name: "ave" type: "Pooling" bottom: "dil" top: "ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max" type: "Pooling" bottom: "dil" top: "max" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "sl" type: "Slice" bottom: "ave" top: "a0" top: "a1" slice_param { slice_point: 2 } }
layer { name: "cat" type: "Concat" bottom: "a1" bottom: "a0" bottom: "max" top: "cat" }
layer { name: "crop" type: "Crop" bottom: "cat" bottom: "max" top: "crop" crop_param { axis: 1 offset: 3 offset: 0 offset: 0 } }
layer { name: "pw" type: "Power" bottom: "crop" top: "pw" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "mx" type: "Eltwise" bottom: "pw" bottom: "max" top: "mx" eltwise_param { operation: MAX } }
layer { name: "ws" type: "Eltwise" bottom: "mx" bottom: "max" top: "ws" eltwise_param { coeff: 0.5 coeff: -2 } }
layer { name: "sig" type: "Sigmoid" bottom: "ws" top: "sig" }
layer { name: "flat" type: "Flatten" bottom: "sig" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "tanh" type: "TanH" bottom: "fc" top: "tanh" }
"""


def test_opencv_agrees_on_more_layers(tmp_path):
    """A second implementation of Caffe's semantics (OpenCV DNN) on the layers beyond NET."""
    pytest.importorskip("cv2")
    from types import SimpleNamespace

    from qmace.frontends.caffe import caffe_oracle, load_caffe_files
    from qmace.runtime import Session

    f = np.float32
    blobs = {"up": [RNG.standard_normal((4, 2, 3, 3)).astype(f) * 0.3, RNG.standard_normal(4).astype(f)],
             "dil": [RNG.standard_normal((6, 2, 3, 3)).astype(f) * 0.3, RNG.standard_normal(6).astype(f)],
             "prelu": [RNG.uniform(0, 0.5, 6).astype(f)],
             "fc": [RNG.standard_normal((5, 252)).astype(f) * 0.1, RNG.standard_normal(5).astype(f)]}
    proto, model = write_caffe_files(tmp_path, MANY, blobs)
    g = load_caffe_files(proto, model)
    names = ["up", "dil", "ave", "max", "a0", "a1", "cat", "crop", "pw", "mx", "ws", "fc", "tanh"]
    g.outputs = names
    x = RNG.uniform(-1, 1, (1, 4, 7, 6)).astype(np.float32)
    ours = Session(g, backend="onnxruntime").run({"data": x})
    oracle = caffe_oracle(SimpleNamespace(model_file_path=proto, weight_file_path=model))
    for name, ref in zip(names, oracle.run(names, {"data": x})):
        assert ours[name].shape == ref.shape, name
        np.testing.assert_allclose(ours[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)


def test_quantize_stat_and_quantized_convert(caffe_model, cli, tmp_path):
    """MACE's four steps on a Caffe model: range log, quantize_stat, quantize: 1 convert, run."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(4):
        RNG.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32).tofile(samples / f"data_{i}")
    assert cli("convert", "--config", caffe_model).code == 0
    res = cli("run", "--config", caffe_model, "--quantize_stat", "--input_dir", samples)
    assert res.code == 0, res.err
    log = tmp_path / "range_log"
    log.write_text(res.out + res.err)
    res = cli("quantize-stat", "--log_file", log, "--percentile", "5")
    assert res.code == 0, res.err
    (tmp_path / "overall_range").write_text(res.out)
    text = caffe_model.read_text().replace("    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n"
                                           "    quantize_range_file: overall_range\n")
    caffe_model.write_text(text)
    res = cli("convert", "--config", caffe_model)
    assert res.code == 0, res.err
    assert "uint8" in res.out and "Conv x2" in res.out
    res = cli("run", "--config", caffe_model, "--input_dir", samples, "--validate")
    assert res.code == 0, res.err
    assert "threshold: cosine >= 0.98" in res.out


def test_quantize_and_export_verbs(caffe_model, cli, tmp_path):
    """`qmace quantize` (int8) and export to ONNX QDQ take a Caffe model like an ONNX one (every verb loads
    the model through the same ``load_float_graph``; `qmace qat` is tested on ONNX in test_qat.py)."""
    import onnx

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(4):
        np.save(samples / f"data_{i}.npy", RNG.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32))
    res = cli("quantize", "--config", caffe_model, "--input_dir", samples, "--schema", "int8")
    assert res.code == 0, res.err
    assert "int8" in res.out
    res = cli("export", "--config", caffe_model, "--format", "onnx-qdq", "-o", tmp_path / "q.onnx")
    assert res.code == 0, res.err
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


# ---- bad input ----------------------------------------------------------------------------------------------


def test_prototxt_syntax_error_names_line_and_column(tmp_path, cli):
    proto, model = write_caffe_files(tmp_path, NET.replace('top: "pool1"', 'top: "pool1" }', 1), _blobs())
    res = cli("convert", "--config", caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob"))
    line = assert_bad(res, "tiny.prototxt:8:", "syntax error", "Expected identifier or number")
    assert res.code == 2, line


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda b: b.pop("conv2"), ("tiny.caffemodel", "layer 'conv2' (Convolution)", "no weights")),
    (lambda b: b["fc"].pop(), ("layer 'fc' (InnerProduct)", "1 weight blob(s)", "needs 2")),
    (lambda b: b["bn1"].append(np.zeros(1, np.float32)), ("layer 'bn1' (BatchNorm)", "4 weight blob(s)")),
    (lambda b: b.__setitem__("conv1", [np.zeros((4, 3, 5, 5), np.float32), np.zeros(4, np.float32)]),
     ("layer 'conv1' (Convolution)", "weight blob has shape (4x3x5x5)", "needs (4x3x3x3)")),
])
def test_caffemodel_not_matching_prototxt(tmp_path, cli, edit, needles):
    blobs = _blobs()
    edit(blobs)
    proto, model = write_caffe_files(tmp_path, NET, blobs)
    res = cli("convert", "--config", caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob"))
    assert_bad(res, *needles)
    assert res.code == 2


def test_unsupported_layer_types_named_together(tmp_path, cli):
    net = NET + """
layer { name: "lrn1" type: "LRN" bottom: "prob" top: "lrn1" lrn_param { local_size: 3 } }
layer { name: "lrn2" type: "LRN" bottom: "lrn1" top: "lrn2" }
layer { name: "py" type: "Python" bottom: "lrn2" top: "py" }
"""
    proto, model = write_caffe_files(tmp_path, net, _blobs())
    res = cli("convert", "--config", caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob"))
    line = assert_bad(res, "unsupported Caffe layer types: LRN (2 layers), Python (1 layer)")
    assert res.code == 2 and line.count("LRN") == 1


def test_weight_sha256_mismatch(tmp_path, cli):
    proto, model = write_caffe_files(tmp_path, NET, _blobs())
    res = cli("convert", "--config", caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob",
                                                weight_sha="a" * 64))
    assert_bad(res, "tiny.caffemodel", "sha256 mismatch", "weight_sha256_checksum")
    assert res.code == 2


def test_caffe_needs_weight_file(tmp_path, cli):
    proto, model = write_caffe_files(tmp_path, NET, _blobs())
    path = caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob")
    text = "".join(line for line in path.read_text().splitlines(True) if not line.strip().startswith("weight_"))
    path.write_text(text)
    res = cli("convert", "--config", path)
    assert_bad(res, "models.tiny.weight_file_path", "required for platform caffe")
    assert res.code == 2


def test_caffemodel_is_not_protobuf(tmp_path, cli):
    proto, model = write_caffe_files(tmp_path, NET, _blobs())
    model.write_bytes(b"\xff\xff\xff\xff not a caffemodel")
    res = cli("convert", "--config", caffe_yaml(tmp_path, proto, model, "data", "1,3,8,8", "prob"))
    assert_bad(res, "tiny.caffemodel", "not a binary caffemodel")


def test_unknown_fields_are_skipped_with_a_warning(caplog):
    net = parse_prototxt(input_layer((1, 2)) + 'layer { name: "x" type: "LRN" bottom: "data" top: "x"\n'
                         '  lrn_param { local_size: 3 }\n  transform_param { mirror: true } }', "n.prototxt")
    assert net.layer[1].type == "LRN"
    warned = [r.getMessage() for r in caplog.records]
    assert any("n.prototxt:3:3" in m and "lrn_param" in m for m in warned), warned
    assert any("n.prototxt:4:3" in m and "transform_param" in m for m in warned), warned


def test_phase_rules_and_missing_bottom():
    from qmace.errors import ModelError
    from tests.caffe_util import convert

    net = input_layer((1, 2)) + """
layer { name: "train_only" type: "Dropout" bottom: "data" top: "t" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "data" top: "r" include { phase: TEST } }
layer { name: "not_test" type: "TanH" bottom: "data" top: "n" exclude { phase: TEST } }
"""
    g = convert(net)
    assert [n.name for n in g.nodes] == ["test_only"] and g.outputs == ["r"]
    with pytest.raises(ModelError, match="layer 'bad' \\(ReLU\\): bottom blob\\(s\\) 'nothing'"):
        convert(input_layer((1, 2)) + 'layer { name: "bad" type: "ReLU" bottom: "nothing" top: "y" }')
