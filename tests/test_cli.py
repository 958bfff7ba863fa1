"""The CLI end to end on a tiny model in tmp_path: convert, run, MACE's four quantization steps, one-shot
quantize, export; and every bad input (one stderr line naming the culprit, exit != 0, no traceback,
nothing half-written)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from qmace.runtime.session import ort_session
from tests.conftest import make_onnx, python_m_qmace, write_samples


def assert_bad(res, *needles: str) -> str:
    assert res.code != 0, res
    assert "Traceback" not in res.err and "Traceback" not in res.out
    # exactly one error line; anything else on stderr is a warning about something else (e.g. unknown keys)
    lines = [line for line in res.err_lines if not line.startswith("qmace: WARNING:")]
    assert len(lines) == 1 and lines[0].startswith("qmace: error: "), res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _src_outputs(t, x_nhwc: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(t.onnx_path.read_bytes(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]


# ---- convert / run ---------------------------------------------------------------------------------------


def test_convert_prints_summary_and_path(tiny, cli):
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    assert "model tiny:" in res.out and "parameters" in res.out and "Conv x2" in res.out
    assert "build/tinylib/model/tiny.qmace" in res.out
    assert tiny.model_file.is_file()


def test_convert_build_dir(tiny, cli, tmp_path):
    res = cli("convert", "--config", tiny.yaml, "--build_dir", tmp_path / "elsewhere")
    assert res.code == 0, res.err
    assert (tmp_path / "elsewhere" / "tinylib" / "model" / "tiny.qmace").is_file()
    assert not tiny.model_file.exists()
    res = cli("run", "--config", tiny.yaml, "--build-dir", tmp_path / "elsewhere")
    assert res.code == 0, res.err


@pytest.mark.parametrize("backend", ["onnxruntime", "reference"])
def test_run_validate(tiny, cli, backend):
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--validate", "--backend", backend)
    assert res.code == 0, res.err
    assert "cosine" in res.out and "SQNR" in res.out and "argmax" in res.out
    assert "validation passed" in res.out and "threshold: cosine >= 0.999" in res.out


def test_run_compares_backends_in_one_run(tiny, cli):
    """--backend a,b: both backends on every sample in turn, latency ratio and outputs vs the first."""
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--validate", "--benchmark", "--round", "2",
              "--backend", "onnxruntime,reference")
    assert res.code == 0, res.err
    assert "onnxruntime: 1 sample(s), 2 run(s)" in res.out and "reference: 1 sample(s), 2 run(s)" in res.out
    assert "median latency relative to onnxruntime" in res.out
    line = next(ln for ln in res.out.splitlines() if ln.strip().startswith("reference") and "outputs vs" in ln)
    cos = float(re.search(r"min cosine ([0-9.]+)", line).group(1))
    assert cos > 0.99999  # the float model: both backends compute the same float32 function
    assert res.out.count("validation passed") == 2


def test_run_unknown_backend(tiny, cli):
    res = cli("run", "--config", tiny.yaml, "--backend", "onnxruntime,tvm")
    assert res.code == 2 and "tvm" in res.err and "Traceback" not in res.err


def test_run_input_dir_output_dir_nhwc(tiny, cli, tmp_path):
    xs = write_samples(tmp_path / "in", tiny, 3)
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out")
    assert res.code == 0, res.err
    assert "3 sample(s)" in res.out and "wrote 3 output file(s)" in res.out
    for i, x in enumerate(xs):
        raw = np.fromfile(tmp_path / "out" / f"output_{i}", dtype=np.float32)
        npy = np.load(tmp_path / "out" / f"output_{i}.npy", allow_pickle=False)
        assert npy.shape == (1, 10) and raw.size == 10
        np.testing.assert_array_equal(raw.reshape(1, 10), npy)
        # the NHWC sample file was transposed to the model's NCHW layout
        np.testing.assert_allclose(npy, _src_outputs(tiny, x), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"output_{i}" for i in range(3)] + [f"output_{i}.npy" for i in range(3)])


def test_run_round_benchmark_reference(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--round", "3", "--benchmark", "--backend", "reference")
    assert res.code == 0, res.err
    assert "1 sample(s), 3 run(s)" in res.out and "p50" in res.out and "p99" in res.out
    assert "per-op time (reference backend" in res.out
    table = res.out.split("per-op time")[1]
    for op in ("Conv", "Gemm", "Softmax", "MaxPool"):
        assert re.search(rf"^\s+{op}\s+\d", table, re.MULTILINE), op


def test_run_example_flag_accepted(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--example")
    assert res.code == 0, res.err
    assert "1 sample(s)" in res.out


def test_python_m_qmace_smoke(tiny, tmp_path):
    res = python_m_qmace("convert", "--config", tiny.yaml, cwd=tmp_path)
    assert res.code == 0, res.err
    assert tiny.model_file.is_file()
    bad = python_m_qmace("run", "--config", tmp_path / "missing.yml", cwd=tmp_path)
    assert_bad(bad, "missing.yml")


# ---- quantization workflows ------------------------------------------------------------------------------


@pytest.mark.parametrize("stat_verb", ["quantize-stat", "quantize_stat"])
def test_mace_four_step_workflow(tiny, cli, tmp_path, stat_verb):
    write_samples(tmp_path / "samples", tiny, 6)
    assert cli("convert", "--config", tiny.yaml).code == 0
    # 1. range log
    res = cli("run", "--config", tiny.yaml, "--quantize_stat", "--input_dir", tmp_path / "samples")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines and all(line.startswith("Tensor range @@") for line in lines)
    assert sum(line.startswith("Tensor range @@relu1@@") for line in lines) == 6  # MACE names, one per sample
    (tmp_path / "range_log").write_text("some other MACE log line\n" + res.out)
    # 2. quantize_stat
    res = cli(stat_verb, "--log_file", tmp_path / "range_log", "--percentile", "5")
    assert res.code == 0, res.err
    ranges = dict(line.split("@@") for line in res.out.splitlines())
    assert {"relu1", "relu6", "add", "logits", "output"} <= set(ranges)
    (tmp_path / "overall_range").write_text(res.out)
    # 3. YAML with quantize: 1 + range file, convert
    tiny.write_yaml(quantize=1, quantize_range_file="overall_range")
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    assert "uint8" in res.out
    # 4. validate against the float source on both backends (MACE's quantized threshold)
    for backend in ("onnxruntime", "reference"):
        res = cli("run", "--config", tiny.yaml, "--validate", "--backend", backend, "--input_dir", tmp_path / "samples")
        assert res.code == 0, res.out + res.err
        assert "threshold: cosine >= 0.98)" in res.out and "validation passed" in res.out


def test_one_shot_quantize_and_export(tiny, cli, tmp_path):
    write_samples(tmp_path / "samples", tiny, 4)
    tiny.write_yaml(quantize_schema="int8")
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--percentile", "5")
    assert res.code == 0, res.err
    assert tiny.model_file.is_file()
    rfile = tiny.model_file.with_suffix(".ranges")
    assert rfile.is_file() and f"range file: {rfile.relative_to(tmp_path)}" in res.out
    assert all("@@" in line for line in rfile.read_text().splitlines())
    assert "int8" in res.out
    # export as QDQ ONNX: ORT gives what `run` gives
    res = cli("export", "--config", tiny.yaml, "--format", "onnx-qdq", "-o", tmp_path / "m.onnx")
    assert res.code == 0, res.err
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--output_dir", tmp_path / "out")
    assert res.code == 0, res.err
    sess = ort_session((tmp_path / "m.onnx").read_bytes())  # exact int8 kernels on every CPU (docs/quantization.md)
    assert {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    for i in range(4):
        x = np.fromfile(tmp_path / "samples" / f"input_{i}", dtype=np.float32).reshape(tiny.yaml_shape)
        got = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
        np.testing.assert_array_equal(got, np.load(tmp_path / "out" / f"output_{i}.npy"))


@pytest.mark.parametrize("extra", [["--adaround"], ["--no_bias_correction", "--method", "mse"], ["--float_nodes", "Gemm"],
                                   ["--sensitivity_16bit", "2", "--sensitivity_samples", "2"],
                                   ["--sensitivity_float_layers", "1", "--sensitivity_samples", "2"]])
def test_one_shot_quantize_options(tiny, cli, tmp_path, extra):
    write_samples(tmp_path / "samples", tiny, 4)
    tiny.write_yaml(quantize_schema="int8")
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", *extra)
    assert res.code == 0, res.err
    if "--float_nodes" in extra:
        assert "kept in float by request" in res.out
    if "--sensitivity_16bit" in extra:  # the summary counts the measured choices
        assert "2 calibration sensitivity" in res.out, res.out
    if "--sensitivity_float_layers" in extra:  # the summary lists the layer kept float, with the rule's reason
        assert "1 op(s) run in float" in res.out and "calibration sensitivity of its weights" in res.out, res.out
        # and the QDQ export runs it as float between DequantizeLinear and QuantizeLinear, as `run` does
        res = cli("export", "--config", tiny.yaml, "--format", "onnx-qdq", "-o", tmp_path / "m.onnx")
        assert res.code == 0, res.err
        res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--output_dir", tmp_path / "out")
        assert res.code == 0, res.err
        sess = ort_session((tmp_path / "m.onnx").read_bytes())
        x = np.fromfile(tmp_path / "samples" / "input_0", dtype=np.float32).reshape(tiny.yaml_shape)
        got = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
        np.testing.assert_allclose(got, np.load(tmp_path / "out" / "output_0.npy"), atol=1e-6)
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--validate")
    assert "validation" in res.out


def test_one_shot_quantize_equalizes_by_default(tiny, cli, tmp_path):
    from qmace.modelfile import load_graph

    write_samples(tmp_path / "samples", tiny, 4)
    tiny.write_yaml(quantize_schema="int8")
    counts = {}
    for extra in ([], ["--no_equalization"]):
        res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", *extra)
        assert res.code == 0, res.err
        path = res.out.split("model file: ")[1].splitlines()[0].strip()
        counts[bool(extra)] = load_graph(path).metadata["quantization"]["equalized_tensors"]
        assert ("--no_equalization" in res.out) != bool(extra)  # the range-file note only when equalized
    assert counts[True] == 0 and counts[False] > 0, counts


def test_quantize_large_weights_convert_and_validate(tiny, cli):
    # every weight of the tiny model is below the 1024-element minimum: all stay float, and the summary says so
    tiny.write_yaml(quantize_large_weights=1)
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    assert "DequantizeLinear" not in res.out
    assert "3 fewer than 1024 elements" in res.out and "0 weight(s) stored" in res.out
    res = cli("run", "--config", tiny.yaml, "--validate")
    assert res.code == 0, res.out + res.err


# ---- bad input -------------------------------------------------------------------------------------------


def _no_model_file(t):
    assert not t.model_file.exists()
    assert not list((t.root / "build").rglob("*")) or all(p.is_dir() for p in (t.root / "build").rglob("*"))


def test_missing_yaml(tiny, cli, tmp_path):
    assert_bad(cli("convert", "--config", tmp_path / "nope.yml"), "nope.yml", "not found")


def test_malformed_yaml(tiny, cli):
    tiny.yaml.write_text("library_name: x\nmodels: [\n  - a: b\n")
    assert_bad(cli("convert", "--config", tiny.yaml), str(tiny.yaml.name), "malformed YAML")
    _no_model_file(tiny)


def test_missing_required_key(tiny, cli):
    tiny.yaml.write_text(tiny.yaml.read_text().replace("    platform: onnx\n", ""))
    assert_bad(cli("convert", "--config", tiny.yaml), "models.tiny.platform", tiny.yaml.name)
    tiny.yaml.write_text(tiny.yaml.read_text().replace("models:", "modelz:"))
    assert_bad(cli("convert", "--config", tiny.yaml), "models")


def test_sha256_mismatch_shows_both_hashes(tiny, cli):
    wrong = "ab" * 32
    tiny.yaml.write_text(tiny.yaml.read_text().replace(tiny.sha256, wrong))
    line = assert_bad(cli("convert", "--config", tiny.yaml), "sha256", tiny.sha256, wrong, "tiny.onnx")
    assert "model_sha256_checksum" in line
    _no_model_file(tiny)


def test_model_file_missing(tiny, cli):
    tiny.onnx_path.unlink()
    assert_bad(cli("convert", "--config", tiny.yaml), "tiny.onnx", "not found")
    _no_model_file(tiny)


def _replace_model_bytes(t, data: bytes):
    import hashlib

    t.onnx_path.write_bytes(data)
    t.yaml.write_text(t.yaml.read_text().replace(t.sha256, hashlib.sha256(data).hexdigest()))


def test_truncated_model(tiny, cli):
    data = tiny.onnx_path.read_bytes()
    _replace_model_bytes(tiny, data[: len(data) // 2])
    assert_bad(cli("convert", "--config", tiny.yaml), "tiny.onnx", "truncated")
    _no_model_file(tiny)


def test_not_onnx_file(tiny, cli):
    _replace_model_bytes(tiny, b"this is a text file, not a protobuf\n" * 10)
    assert_bad(cli("convert", "--config", tiny.yaml), "tiny.onnx", "not an ONNX model")
    _no_model_file(tiny)


def test_input_shape_contradicts_model(tiny, cli):
    tiny.yaml.write_text(tiny.yaml.read_text().replace("input_shapes: 1,8,8,3", "input_shapes: 1,9,9,3"))
    assert_bad(cli("convert", "--config", tiny.yaml), "input_shapes[0]", "1,9,9,3", "'input'", "1x3x8x8")
    _no_model_file(tiny)


def test_input_and_output_names_not_in_model(tiny, cli):
    text = tiny.yaml.read_text()
    tiny.yaml.write_text(text.replace("input_tensors: input", "input_tensors: data"))
    assert_bad(cli("convert", "--config", tiny.yaml), "'data'", "inputs are: input")
    tiny.yaml.write_text(text.replace("output_tensors: output", "output_tensors: prob"))
    assert_bad(cli("convert", "--config", tiny.yaml), f"models.{tiny.name}.subgraphs[0].output_tensors: 'prob'",
               "outputs are: output")
    _no_model_file(tiny)


def test_input_dir_without_matching_files(tiny, cli, tmp_path):
    assert cli("convert", "--config", tiny.yaml).code == 0
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "image_0").write_bytes(b"\0" * 4)
    assert_bad(cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "in"), "in", "input")
    assert_bad(cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "nodir"), "nodir")


def test_raw_file_of_wrong_size(tiny, cli, tmp_path):
    assert cli("convert", "--config", tiny.yaml).code == 0
    (tmp_path / "in").mkdir()
    np.zeros(10, np.float32).tofile(tmp_path / "in" / "input_0")
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out")
    assert_bad(res, "input_0", "40 bytes", "expected 768")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_in_inputs_warns_and_completes(tiny, cli, tmp_path):
    assert cli("convert", "--config", tiny.yaml).code == 0
    write_samples(tmp_path / "in", tiny, 2)
    x = np.fromfile(tmp_path / "in" / "input_1", dtype=np.float32)
    x[3] = np.nan
    x.tofile(tmp_path / "in" / "input_1")
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "in")
    assert res.code == 0, res.err
    assert "2 sample(s)" in res.out
    warn = [line for line in res.err_lines if "NaN" in line]
    assert len(warn) == 1 and "input_1" in warn[0] and "Traceback" not in res.err


def test_unsupported_ops_all_listed(model_factory, cli):
    nodes = [helper.make_node("Relu", ["input"], ["a"]),
             helper.make_node("FooOp", ["a"], ["b"]), helper.make_node("FooOp", ["b"], ["c"]),
             helper.make_node("BarOp", ["c"], ["output"], domain="com.example")]
    model = make_onnx(nodes, {"input": (1, 3, 8, 8)}, ["output"])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    t = model_factory(model)
    assert_bad(cli("convert", "--config", t.yaml), "unsupported ops", "FooOp (2 nodes)", "com.example.BarOp (1 node)")
    _no_model_file(t)


def test_truncated_qmace_model_for_run(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    data = tiny.model_file.read_bytes()
    tiny.model_file.write_bytes(data[: len(data) // 2])
    assert_bad(cli("run", "--config", tiny.yaml), "tiny.qmace", "truncated")


def test_run_before_convert(tiny, cli):
    assert_bad(cli("run", "--config", tiny.yaml), "tiny.qmace", "convert")


# ---- bad input: quantization -----------------------------------------------------------------------------


def test_range_log_without_range_lines(tiny, cli, tmp_path):
    (tmp_path / "log").write_text("I mace.cc:12] hello\nnothing here\n")
    out = tmp_path / "overall"
    assert_bad(cli("quantize-stat", "--log_file", tmp_path / "log", "--output", out), "log", "no")
    assert not out.exists()
    assert_bad(cli("quantize-stat", "--log_file", tmp_path / "missing_log"), "missing_log")


def test_nan_in_range_log(tiny, cli, tmp_path):
    (tmp_path / "log").write_text("Tensor range @@a@@0.0,1.0\nTensor range @@b@@nan,1.0\n")
    assert_bad(cli("quantize-stat", "--log_file", tmp_path / "log"), "log", "b")


def test_malformed_range_log_line_names_line(tiny, cli, tmp_path):
    (tmp_path / "log").write_text("Tensor range @@a@@0.0,1.0\nTensor range @@a@@zero,1.0\n")
    assert_bad(cli("quantize-stat", "--log_file", tmp_path / "log"), "log:2")


@pytest.mark.parametrize("p", ["50", "-1"])
def test_percentile_out_of_range(tiny, cli, tmp_path, p):
    (tmp_path / "log").write_text("Tensor range @@a@@0.0,1.0\n")
    assert_bad(cli("quantize-stat", "--log_file", tmp_path / "log", "--percentile", p), "percentile", "[0, 50)")
    write_samples(tmp_path / "samples", tiny, 2)
    assert_bad(cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--percentile", p),
               "percentile")
    _no_model_file(tiny)


@pytest.mark.parametrize("content, needles", [
    ("relu1@@0,1\nthis is garbage\n", ["overall_range:2", "garbage"]),
    ("relu1@@1.0,0.5\n", ["overall_range:1", "relu1", "min"]),
    ("relu1@@0,1\nrelu6@@0,6\nrelu1@@0,2\n", ["overall_range:3", "relu1", "twice"]),
])
def test_bad_range_file(tiny, cli, tmp_path, content, needles):
    (tmp_path / "overall_range").write_text(content)
    tiny.write_yaml(quantize=1, quantize_range_file="overall_range")
    assert_bad(cli("convert", "--config", tiny.yaml), *needles)
    _no_model_file(tiny)


def test_range_file_missing_tensors(tiny, cli, tmp_path):
    (tmp_path / "overall_range").write_text("relu1@@0,4\n")
    tiny.write_yaml(quantize=1, quantize_range_file="overall_range")
    assert_bad(cli("convert", "--config", tiny.yaml), "no quantization range", "relu6", "logits")
    _no_model_file(tiny)


def test_unknown_range_file_names_warn_once(tiny, cli, tmp_path):
    write_samples(tmp_path / "samples", tiny, 2)
    assert cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples").code == 0
    ranges = tiny.model_file.with_suffix(".ranges").read_text() + "ghost1@@0,1\nghost2@@0,1\n"
    (tmp_path / "overall_range").write_text(ranges)
    tiny.write_yaml(quantize=1, quantize_range_file="overall_range")
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    warn = [line for line in res.err_lines if "ghost1" in line]
    assert len(warn) == 1 and "ghost2" in warn[0]


def test_empty_sample_directory_for_quantize(tiny, cli, tmp_path):
    (tmp_path / "samples").mkdir()
    assert_bad(cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples"), "samples")
    _no_model_file(tiny)


def test_nan_in_calibration_samples(tiny, cli, tmp_path):
    write_samples(tmp_path / "samples", tiny, 2)
    x = np.fromfile(tmp_path / "samples" / "input_1", dtype=np.float32)
    x[0] = np.inf
    x.tofile(tmp_path / "samples" / "input_1")
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples")
    line = assert_bad(res, str(tmp_path / "samples" / "input_1"))
    assert "NaN" in line or "Inf" in line
    _no_model_file(tiny)


def test_quantize_with_quantize_large_weights(tiny, cli):
    tiny.write_yaml(quantize=1, quantize_large_weights=1, quantize_range_file="overall_range")
    assert_bad(cli("convert", "--config", tiny.yaml), "quantize_large_weights", tiny.yaml.name)
    _no_model_file(tiny)


@pytest.mark.parametrize("schema", ["int8", "int8_w7"])
def test_quantize_schema_int8_w7_and_the_slow_path_warning(tiny, cli, tmp_path, schema):
    """int8_w7 quantizes and validates like int8; only full-range int8 weights on a CPU whose u8 x s8 kernels
    saturate take ONNX Runtime's slow exact path, and the run says so once, naming int8_w7."""
    from qmace.runtime.session import _warn_slow_exact_path, ort_u8s8_exact

    write_samples(tmp_path / "samples", tiny, 4)
    tiny.write_yaml(quantize_schema=schema)
    res = cli("quantize", "--config", tiny.yaml, "--input_dir", tmp_path / "samples")
    assert res.code == 0, res.err
    _warn_slow_exact_path.cache_clear()
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "samples", "--validate")
    assert res.code == 0, res.err
    warned = "int8_w7 (7-bit weights) is exact on the fast kernels" in res.err
    assert warned == (schema == "int8" and not ort_u8s8_exact()), res.err


def test_run_openvino_without_the_package(tiny, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    assert cli("convert", "--config", tiny.yaml).code == 0
    assert_bad(cli("run", "--config", tiny.yaml, "--backend", "openvino"), "qmace[openvino]")
