"""qmace's YAML keys ``quantize_float_nodes`` / ``quantize_16bit_tensors``: what ``qmace quantize`` chose (float
nodes, the sensitivity rules' float layers and 16-bit activations) survives quantizing again from the range
file (``convert``) and ``qmace qat``'s start and output YAML."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from qmace.modelfile import load_graph
from qmace.runtime import Session
from tests.conftest import write_samples
from tests.test_cli import assert_bad


def _dtypes(graph) -> dict[str, str]:
    return {k: t.dtype for k, t in graph.tensors.items() if t.data is None and t.quant is not None}


def _quantize_with_choices(tiny, cli, tmp_path):
    """`qmace quantize` keeping conv2 float by request and 2 activations 16-bit by the rule, without the
    steps a range file cannot carry (equalization, bias correction); returns (its output, its graph)."""
    write_samples(tmp_path / "samples", tiny, 4)
    tiny.write_yaml(quantize_schema="int8")
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--no_equalization",
              "--no_bias_correction", "--float_nodes", "conv2", "--sensitivity_16bit", "2",
              "--sensitivity_samples", "2")
    assert res.code == 0, res.err
    return res.out, load_graph(tiny.model_file)


def _keys(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("to keep these float nodes"))
    return {k: v for line in lines[start + 1:start + 3] for k, v in yaml.safe_load(line).items()}


def test_quantize_prints_the_keys_and_convert_with_them_rebuilds_the_same_model(tiny, cli, tmp_path):
    out, first = _quantize_with_choices(tiny, cli, tmp_path)
    keys = _keys(out)
    wide = set(first.metadata["quantization"]["wide_activations"])  # tensor -> reason, before output renaming
    assert keys["quantize_float_nodes"] == ["conv2"]
    assert keys["quantize_16bit_tensors"] and set(keys["quantize_16bit_tensors"]) <= set(wide)
    assert "to keep these float nodes" in out and f"models.{tiny.name}" in out
    rfile = tiny.model_file.with_suffix(".ranges")
    # the range file alone loses the choices ...
    tiny.write_yaml(quantize_schema="int8", quantize=1, quantize_range_file=rfile)
    assert cli("convert", "--config", tiny.yaml).code == 0
    plain = load_graph(tiny.model_file)
    assert "uint16" not in _dtypes(plain).values()
    assert "conv2" not in [n.name for n in plain.nodes if n.op_type == "Conv" and not plain.tensors[n.inputs[0]].quant]
    # ... the printed keys keep them: the same integer model, output for output
    tiny.write_yaml(quantize_schema="int8", quantize=1, quantize_range_file=rfile,
                    quantize_float_nodes=keys["quantize_float_nodes"],
                    quantize_16bit_tensors="[" + ", ".join(keys["quantize_16bit_tensors"]) + "]")
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    again = load_graph(tiny.model_file)
    assert _dtypes(again) == _dtypes(first)
    assert "kept in float by request" in res.out
    a, b = Session(first, backend="reference"), Session(again, backend="reference")
    for i in range(4):
        x = np.fromfile(tmp_path / "samples" / f"input_{i}", dtype=np.float32).reshape(tiny.yaml_shape)
        feeds = {tiny.input_name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
        np.testing.assert_array_equal(a.run(feeds)["output"], b.run(feeds)["output"])
    # editing a key makes the built model stale for `run` (it records them)
    assert again.metadata["built_from"]["quantize_float_nodes"] == ["conv2"]


@pytest.mark.parametrize("key, value, needle", [
    ("quantize_float_nodes", "[conv_2]", "no node or op type 'conv_2' (did you mean 'conv2'?)"),
    ("quantize_16bit_tensors", "[relu_1]", "no activation 'relu_1' (did you mean 'relu1'?)"),
    ("quantize_16bit_tensors", "[[a]]", "quantize_16bit_tensors[0]: must be a tensor name"),
])
def test_bad_names_are_one_line_naming_the_key(tiny, cli, tmp_path, key, value, needle):
    write_samples(tmp_path / "samples", tiny, 2)
    tiny.write_yaml(quantize_schema="int8", **{key: value})
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples")
    line = assert_bad(res, f"models.{tiny.name}.{key}", needle)
    assert res.code == 2 and not tiny.model_file.exists(), line


def test_qat_keeps_the_start_choices_and_writes_them_into_its_yaml(tmp_path, capsys):
    pytest.importorskip("torch")
    from qmace.api import convert
    from qmace.cli.main import main
    from tests.test_qat import _qat_workspace

    d = _qat_workspace(tmp_path)
    out = tmp_path / "out"
    rc = main(["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--epochs", "1",
               "--batch_size", "3", "--output_dir", str(out), "--sensitivity_float_layers", "1",
               "--sensitivity_16bit", "1", "--sensitivity_samples", "2", "--no_equalization"])
    assert rc == 0, capsys.readouterr().err
    entry = yaml.safe_load((out / "m_qat.yml").read_text())["models"]["m"]
    assert len(entry["quantize_float_nodes"]) == 1 and len(entry["quantize_16bit_tensors"]) >= 1
    res = convert(out / "m_qat.yml", build_dir=tmp_path / "build")
    layer = entry["quantize_float_nodes"][0]
    node = next(n for n in res.graph.nodes if n.name == layer)
    assert res.graph.tensors[node.inputs[1]].quant is None  # float weights: the layer stayed float
    assert set(entry["quantize_16bit_tensors"]) <= set(res.graph.metadata["quantization"]["wide_activations"])
    # the output YAML is a valid deployment file pointing at the fine-tuned model
    onnx_file = out / entry["model_file_path"]
    assert entry["model_sha256_checksum"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()


def test_qat_rejects_negative_sensitivity_counts(tmp_path, capsys):
    pytest.importorskip("torch")
    from qmace.cli.main import main
    from tests.test_qat import _qat_workspace

    d = _qat_workspace(tmp_path)
    rc = main(["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--output_dir",
               str(tmp_path / "out"), "--sensitivity_float_layers", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--sensitivity_float_layers must be >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
