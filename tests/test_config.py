"""qmace.config: the MACE deployment YAML read as MACE reads it. Every file lives under tmp_path."""

from __future__ import annotations

import hashlib
import logging
import textwrap
from pathlib import Path

import pytest

from qmace.config import (
    SUPPORTED_PLATFORMS,
    DeploymentConfig,
    ModelConfig,
    SubgraphConfig,
    input_name_format,
    load_config,
    verify_checksum,
)
from qmace.errors import ConfigError, ModelError

SHA = "a" * 64

GOOD = f"""\
library_name: mobilenet
target_abis: [host]
model_graph_format: file
model_data_format: file
models:
  mobilenet:
    platform: onnx
    model_file_path: models/mobilenet.onnx
    model_sha256_checksum: {SHA.upper()}
    runtime: cpu
    quantize: 1
    quantize_range_file: ../ranges/overall_range
    quantize_schema: ""
    change_concat_ranges: 1
    validation_threshold:
      cpu: 0.999
      GPU: 0.99
      Quantize: 0.97
    subgraphs:
      - input_tensors:
          - input
          - mask:0
        input_shapes:
          - 1,224,224,3
          - [1, 10]
        input_ranges:
          - -1,1
          - 0,255
        input_data_formats: [NHWC, none]
        input_data_types: [float32, int32]
        output_tensors: [prob, "495"]
        output_shapes: ["1,1001", "1,2"]
        output_data_formats: NCHW
        check_tensors: [conv1]
        check_shapes: ["1,112,112,32"]
        validation_inputs_data: [data/in.bin]
"""


def write(tmp_path: Path, text: str, name: str = "model.yml") -> Path:
    path = tmp_path / "cfg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**model_extra: str) -> str:
    """A minimal valid YAML; keyword arguments add `key: value` lines to the model."""
    extra = "".join(f"    {k}: {v}\n" for k, v in model_extra.items())
    return (
        "library_name: lib\n"
        "models:\n"
        "  net:\n"
        "    platform: onnx\n"
        "    model_file_path: net.onnx\n"
        f"    model_sha256_checksum: {SHA}\n"
        f"{extra}"
        "    subgraphs:\n"
        "      - input_tensors: input\n"
        "        input_shapes: 1,3,8,8\n"
        "        output_tensors: output\n"
    )


def with_subgraph(body: str) -> str:
    """A valid YAML whose only subgraph is `body` (YAML mapping lines, no indentation)."""
    lines = textwrap.dedent(body).strip().splitlines()
    sub = "      - " + "\n        ".join(lines) + "\n"
    return ("library_name: lib\nmodels:\n  mobilenet:\n    platform: onnx\n    model_file_path: m.onnx\n"
            f"    model_sha256_checksum: {SHA}\n    subgraphs:\n{sub}")


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path.resolve()) in message  # every error names the file
    return message


# ------------------------------------------------------------------------------------------- good input


def test_full_yaml_list_form(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(path)
    assert isinstance(cfg, DeploymentConfig)
    assert cfg.path == path.resolve()
    assert cfg.library_name == "mobilenet"
    assert cfg.target_abis == ("host",)
    assert (cfg.model_graph_format, cfg.model_data_format) == ("file", "file")
    assert list(cfg.models) == ["mobilenet"]

    m = cfg.model(None)
    assert isinstance(m, ModelConfig)
    assert m is cfg.model("mobilenet")
    assert m.name == "mobilenet" and m.key == "models.mobilenet"
    assert m.platform == "onnx"
    cfg_dir = path.parent.resolve()
    assert m.model_file_path == cfg_dir / "models" / "mobilenet.onnx"
    assert m.model_sha256_checksum == SHA
    assert m.quantize_range_file == (cfg_dir.parent / "ranges" / "overall_range").resolve()
    assert m.quantize is True and m.quantize_large_weights is False
    assert m.quantize_schema == "uint8"
    assert m.change_concat_ranges is True
    assert m.runtime == "cpu"
    assert m.validation_threshold == {"CPU": 0.999, "GPU": 0.99, "QUANTIZE": 0.97}
    assert m.threshold_for(True) == 0.97 and m.threshold_for(False) == 0.999
    assert m.yaml_path == path.resolve()

    s = m.subgraph
    assert isinstance(s, SubgraphConfig)
    assert s.key == "models.mobilenet.subgraphs[0]"
    assert s.input_tensors == ("input", "mask:0")
    assert s.input_shapes == ((1, 224, 224, 3), (1, 10))
    assert s.input_ranges == ((-1.0, 1.0), (0.0, 255.0))
    assert s.input_data_formats == ("NHWC", "NONE")
    assert s.input_data_types == ("float32", "int32")
    assert s.output_tensors == ("prob", "495")
    assert s.output_shapes == ((1, 1001), (1, 2))
    assert s.output_data_formats == ("NCHW", "NCHW")
    assert s.output_data_types == ("float32", "float32")
    assert s.check_tensors == ("conv1",)
    assert s.check_shapes == ((1, 112, 112, 32),)
    assert s.validation_inputs_data == (cfg_dir / "data" / "in.bin",)


def test_defaults_and_single_string_forms(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg.target_abis == ("host",)
    m = cfg.model(None)
    assert m.runtime == "cpu" and m.data_type == "fp32_fp32"
    assert m.quantize is False and m.quantize_large_weights is False and m.change_concat_ranges is False
    assert m.quantize_schema == "uint8" and m.quantize_range_file is None
    assert m.weight_file_path is None and m.weight_sha256_checksum is None
    assert m.validation_threshold == {"CPU": 0.999, "GPU": 0.995, "QUANTIZE": 0.980}
    assert m.threshold_for(False) == 0.999 and m.threshold_for(True) == 0.980
    s = m.subgraph
    assert s.input_tensors == ("input",) and s.output_tensors == ("output",)
    assert s.input_shapes == ((1, 3, 8, 8),)
    assert s.input_ranges == ((-1.0, 1.0),)
    assert s.input_data_formats == ("NHWC",) and s.input_data_types == ("float32",)
    assert s.output_shapes is None and s.output_data_formats == ("NHWC",)
    assert s.check_tensors == () and s.check_shapes is None and s.validation_inputs_data == ()


def test_dict_subgraphs_first_used_with_warning(tmp_path, caplog):
    text = minimal().split("    subgraphs:\n")[0] + (
        "    subgraphs:\n"
        "      main:\n"
        "        input_tensors: [a, b]\n"
        "        input_shapes: [\"1,4\", \"1,5\"]\n"
        "        input_ranges: [[0, 6], \"-2.5,2.5\"]\n"
        "        input_data_formats: NCHW\n"
        "        output_tensors: 7\n"
        "      other:\n"
        "        input_tensors: x\n"
        "        input_shapes: 1\n"
        "        output_tensors: y\n"
    )
    with caplog.at_level(logging.WARNING, logger="qmace.config"):
        cfg = load_config(write(tmp_path, text))
    s = cfg.model("net").subgraph
    assert s.key == "models.net.subgraphs.main"
    assert s.input_tensors == ("a", "b") and s.output_tensors == ("7",)
    assert s.input_shapes == ((1, 4), (1, 5))
    assert s.input_ranges == ((0.0, 6.0), (-2.5, 2.5))
    assert s.input_data_formats == ("NCHW", "NCHW")
    assert any("only the first" in r.getMessage() and "models.net.subgraphs" in r.getMessage()
               for r in caplog.records)


def test_list_subgraphs_more_than_one_warns(tmp_path, caplog):
    text = minimal() + "      - input_tensors: z\n        input_shapes: 1\n        output_tensors: w\n"
    with caplog.at_level(logging.WARNING, logger="qmace.config"):
        cfg = load_config(write(tmp_path, text))
    assert cfg.model(None).subgraph.input_tensors == ("input",)
    assert [r for r in caplog.records if "only the first (models.net.subgraphs[0])" in r.getMessage()]


def test_models_keep_order_and_lookup(tmp_path):
    second = minimal().split("models:\n")[1].replace("  net:", "  alpha:")
    cfg = load_config(write(tmp_path, minimal() + second))
    assert list(cfg.models) == ["net", "alpha"]
    assert cfg.model(None).name == "net"
    assert cfg.model("alpha").name == "alpha"
    with pytest.raises(ConfigError, match=r"no model 'zeta'.*net, alpha"):
        cfg.model("zeta")


def test_threshold_single_number_is_cpu(tmp_path):
    m = load_config(write(tmp_path, minimal(validation_threshold="0.9"))).model(None)
    assert m.validation_threshold == {"CPU": 0.9, "GPU": 0.995, "QUANTIZE": 0.980}


def test_weight_file_and_int8_and_large_weights(tmp_path):
    m = load_config(write(tmp_path, minimal(
        weight_file_path="w/net.caffemodel", weight_sha256_checksum="b" * 64,
        quantize_schema="INT8", quantize_large_weights=1))).model(None)
    assert m.weight_file_path == (tmp_path / "cfg" / "w" / "net.caffemodel").resolve()
    assert m.weight_sha256_checksum == "b" * 64
    assert m.quantize_schema == "int8" and m.quantize_large_weights is True and m.quantize is False


def test_input_name_format():
    assert input_name_format("input:0") == "input_0"
    assert input_name_format("model/conv-1.out") == "model_conv_1_out"
    assert input_name_format("abc123") == "abc123"


# -------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_malformed_yaml_names_line(tmp_path):
    message = error_of(tmp_path, "library_name: x\nmodels:\n  net: [1, 2\n  other: 3\n")
    assert "malformed YAML" in message and "line 4" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_not_mapping(tmp_path, text):
    assert "top level must be a mapping" in error_of(tmp_path, text)


@pytest.mark.parametrize(("text", "key"), [
    ("library_name: x\n", "models: missing"),
    ("library_name: x\nmodels: {}\n", "models: no models"),
    (minimal().replace("library_name: lib\n", ""), "library_name: missing"),
    (minimal().replace("    model_file_path: net.onnx\n", ""), "models.net.model_file_path: missing"),
    (minimal().replace(f"    model_sha256_checksum: {SHA}\n", ""),
     "models.net.model_sha256_checksum: missing"),
    (minimal().replace(SHA, "abc123"), "models.net.model_sha256_checksum: must be a sha256"),
    (minimal().split("    subgraphs:")[0], "models.net.subgraphs: missing"),
    (minimal().replace("        output_tensors: output\n", ""), "models.net.subgraphs[0].output_tensors: missing"),
    (minimal(weight_file_path="w.caffemodel"), "models.net.weight_sha256_checksum: missing"),
])
def test_missing_required(tmp_path, text, key):
    assert key in error_of(tmp_path, text)


@pytest.mark.parametrize(("body", "expected"), [
    ("input_tensors: input\ninput_shapes: [\"1,3\", \"1,4\"]\noutput_tensors: out",
     "models.mobilenet.subgraphs[0].input_shapes: 2 shapes for 1 input tensor"),
    ("input_tensors: [a, b]\ninput_shapes: 1,3\noutput_tensors: out",
     "models.mobilenet.subgraphs[0].input_shapes: 1 shape for 2 input tensors"),
    ("input_tensors: [a, b]\ninput_shapes: [\"1\", \"2\"]\ninput_ranges: -1,1\noutput_tensors: out",
     "models.mobilenet.subgraphs[0].input_ranges: 1 range for 2 input tensors"),
    (("input_tensors: [a, b, c]\ninput_shapes: [\"1\", \"2\", \"3\"]\ninput_data_formats: [NHWC, NCHW]\n"
      "output_tensors: out"),
     "models.mobilenet.subgraphs[0].input_data_formats: 2 data formats for 3 input tensors"),
    ("input_tensors: a\ninput_shapes: 1\noutput_tensors: [o, p]\noutput_shapes: [\"1,2\", \"1\", \"3\"]",
     "models.mobilenet.subgraphs[0].output_shapes: 3 shapes for 2 output tensors"),
    ("input_tensors: a\ninput_shapes: 1\noutput_tensors: [o, p]\noutput_data_formats: [NHWC, NHWC, NHWC]",
     "models.mobilenet.subgraphs[0].output_data_formats: 3 data formats for 2 output tensors"),
    ("input_tensors: a\ninput_shapes: 1\noutput_tensors: o\ncheck_tensors: [c]\ncheck_shapes: [\"1\", \"2\"]",
     "models.mobilenet.subgraphs[0].check_shapes: 2 shapes for 1 check tensor"),
])
def test_count_mismatch_names_key_path(tmp_path, body, expected):
    assert expected in error_of(tmp_path, with_subgraph(body))


@pytest.mark.parametrize("shape", ['"1,224,x,3"', '"1,0,3"', '"1,-2"', '"1,2.5"', '"1,,3"', '""', "[1, 2.0]"])
def test_bad_shape(tmp_path, shape):
    body = f"input_tensors: [a, b]\ninput_shapes: [\"1,2\", {shape}]\noutput_tensors: o"
    message = error_of(tmp_path, with_subgraph(body))
    assert "models.mobilenet.subgraphs[0].input_shapes[1]: must be a shape" in message


@pytest.mark.parametrize(("value", "fragment"), [
    ('"1,-1"', "min must be less than max"),
    ('"2,2"', "min must be less than max"),
    ('"0,1,2"', "two numbers"),
    ('"a,b"', "two numbers"),
    ('"-inf,1"', "finite"),
])
def test_bad_range(tmp_path, value, fragment):
    body = f"input_tensors: a\ninput_shapes: 1\ninput_ranges: {value}\noutput_tensors: o"
    message = error_of(tmp_path, with_subgraph(body))
    assert "models.mobilenet.subgraphs[0].input_ranges:" in message and fragment in message


@pytest.mark.parametrize("platform", ["megengine", "pytorch"])
def test_unsupported_platform(tmp_path, platform):
    message = error_of(tmp_path, minimal().replace("platform: onnx", f"platform: {platform}"))
    assert (f"models.net.platform: platform '{platform}' is not supported yet (supported: "
            f"{', '.join(SUPPORTED_PLATFORMS)})" in message)
    assert "onnx" in SUPPORTED_PLATFORMS and "tflite" in SUPPORTED_PLATFORMS and "caffe" in SUPPORTED_PLATFORMS
    assert "tensorflow" in SUPPORTED_PLATFORMS


def test_unknown_platform_lists_known(tmp_path):
    message = error_of(tmp_path, minimal().replace("platform: onnx", "platform: paddle"))
    assert "models.net.platform: unknown platform 'paddle'" in message
    assert "tensorflow" in message and "caffe" in message and "onnx" in message


@pytest.mark.parametrize("url", ["https://example.com/m.onnx", "http://example.com/m.onnx"])
def test_url_model_path(tmp_path, url):
    message = error_of(tmp_path, minimal().replace("model_file_path: net.onnx", f"model_file_path: {url}"))
    assert "models.net.model_file_path" in message
    assert "offline" in message and "download" in message and "local path" in message


@pytest.mark.parametrize("schema", ["int16", "uint16", "mace_apu_16bit_per_tensor"])
def test_16bit_weight_schema_not_supported(tmp_path, schema):
    message = error_of(tmp_path, minimal(quantize_schema=schema))
    assert "models.net.quantize_schema" in message and "not supported yet" in message
    assert "mace_htp_u16a_s8w" in message  # names the 16-bit schema that is supported
    assert "--sensitivity_float_layers" in message  # and the way to keep the weights that matter unrounded
    assert ("MACE's APU schema" in message) == (schema == "mace_apu_16bit_per_tensor")


def test_mace_u16_activation_schema_maps_to_int8_with_16_bit_activations(tmp_path):
    m = load_config(write(tmp_path, minimal(quantize_schema="mace_htp_u16a_s8w"))).model(None)
    assert m.quantize_schema == "int8" and m.wide_activations == "all"
    assert load_config(write(tmp_path, minimal())).model(None).wide_activations == "rule"


def test_unknown_schema(tmp_path):
    assert "models.net.quantize_schema: 'fp8' is not one of" in error_of(tmp_path, minimal(quantize_schema="fp8"))


def test_quantize_and_large_weights_exclusive(tmp_path):
    message = error_of(tmp_path, minimal(quantize=1, quantize_large_weights=1))
    assert "models.net.quantize" in message and "exclusive" in message


@pytest.mark.parametrize(("extra", "key"), [
    ({"quantize": '"yes"'}, "models.net.quantize: must be 0 or 1"),
    ({"quantize": "2"}, "models.net.quantize: must be 0 or 1"),
    ({"change_concat_ranges": "0.5"}, "models.net.change_concat_ranges: must be 0 or 1"),
    ({"validation_threshold": "{CPU: high}"}, "models.net.validation_threshold.CPU: must be a number"),
    ({"validation_threshold": "{NPU: 0.9}"}, "models.net.validation_threshold.NPU: unknown device"),
    ({"validation_threshold": "1.5"}, "models.net.validation_threshold: must be a number between 0 and 1"),
    ({"data_type": "int4"}, "models.net.data_type: 'int4' is not one of"),
])
def test_wrong_types_name_key_path(tmp_path, extra, key):
    assert key in error_of(tmp_path, minimal(**extra))


@pytest.mark.parametrize(("line", "key"), [
    ("input_data_formats: NWHC", "input_data_formats: 'NWHC' is not one of"),
    ("input_data_types: float64", "input_data_types: 'float64' is not one of"),
    ("check_tensors: [1.5]", "check_tensors[0]: must be a tensor name"),
])
def test_bad_subgraph_values(tmp_path, line, key):
    body = f"input_tensors: a\ninput_shapes: 1\noutput_tensors: o\n{line}"
    assert f"models.mobilenet.subgraphs[0].{key}" in error_of(tmp_path, with_subgraph(body))


def test_duplicate_input_names(tmp_path):
    body = "input_tensors: [a, a]\ninput_shapes: [\"1\", \"1\"]\noutput_tensors: o"
    assert "input_tensors: given more than once: a" in error_of(tmp_path, with_subgraph(body))


# --------------------------------------------------------------------------------- warnings and notes


def test_unknown_keys_warn_with_key_path(tmp_path, caplog):
    text = "colour: blue\n" + minimal(qunatize=1).replace(
        "        output_tensors: output\n", "        output_tensors: output\n        input_shape: 1\n")
    with caplog.at_level(logging.INFO, logger="qmace.config"):
        load_config(write(tmp_path, text))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert any("unknown key colour" in w for w in warnings)
    assert any("unknown key models.net.qunatize" in w and "'quantize'" in w for w in warnings)
    assert any("unknown key models.net.subgraphs[0].input_shape " in w and "'input_shapes'" in w
               for w in warnings)


def test_not_applicable_keys_reported_once(tmp_path, caplog):
    text = "target_socs: [sdm845]\nembed_model_data: 0\n" + minimal(
        runtime="gpu", winograd=4, obfuscate=0, opencl_mem_type="image", dsp_mode=0,
        limit_opencl_kernel_time=0, graph_optimize_options="[]")
    text += text.split("models:\n")[1].replace("  net:", "  second:")  # a second model with the same keys
    with caplog.at_level(logging.INFO, logger="qmace.config"):
        cfg = load_config(write(tmp_path, text))
    assert cfg.model(None).runtime == "gpu"
    notes = [r for r in caplog.records if "not applicable here" in r.getMessage()]
    assert len(notes) == 1
    message = notes[0].getMessage()
    for key in ("target_socs", "embed_model_data", "models.net.runtime=gpu", "models.net.winograd=4",
                "models.net.obfuscate=0", "models.net.opencl_mem_type=image", "models.second.dsp_mode=0",
                "models.second.limit_opencl_kernel_time", "models.net.graph_optimize_options"):
        assert key in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_host_cpu_yaml_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="qmace.config"):
        load_config(write(tmp_path, minimal()))
    assert caplog.records == []


# ---------------------------------------------------------------------------------------------- checksums


def test_verify_checksum(tmp_path):
    data = tmp_path / "model.onnx"
    data.write_bytes(b"\x08\x07" * 100_000)
    good = hashlib.sha256(data.read_bytes()).hexdigest()
    verify_checksum(data, good, "models.net.model_sha256_checksum")
    verify_checksum(data, good.upper(), "models.net.model_sha256_checksum")

    with pytest.raises(ModelError) as e:
        verify_checksum(data, SHA, "models.net.model_sha256_checksum")
    message = str(e.value)
    assert good in message and SHA in message
    assert "models.net.model_sha256_checksum" in message and str(data) in message

    with pytest.raises(ModelError, match="not found") as e:
        verify_checksum(tmp_path / "missing.onnx", SHA, "k")
    assert str(tmp_path / "missing.onnx") in str(e.value)


def test_model_verify_model_file(tmp_path):
    path = write(tmp_path, minimal())
    onnx_file = path.parent / "net.onnx"
    onnx_file.write_bytes(b"not really onnx")
    m = load_config(path).model(None)
    with pytest.raises(ModelError) as e:
        m.verify_model_file()
    actual = hashlib.sha256(b"not really onnx").hexdigest()
    assert actual in str(e.value) and SHA in str(e.value)
    assert "models.net.model_sha256_checksum" in str(e.value) and str(path.resolve()) in str(e.value)

    path.write_text(minimal().replace(SHA, actual))
    load_config(path).model(None).verify_model_file()


def test_dataclass_defaults_fill_per_tensor():
    s = SubgraphConfig(input_tensors=("a", "b"), input_shapes=((1,), (2,)), output_tensors=("o",))
    assert s.input_ranges == ((-1.0, 1.0), (-1.0, 1.0))
    assert s.input_data_formats == ("NHWC", "NHWC") and s.input_data_types == ("float32", "float32")
    assert s.output_data_formats == ("NHWC",) and s.output_data_types == ("float32",)
