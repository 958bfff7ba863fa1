"""Help text and the Python surface a newcomer meets first: every flag explained, one entry per verb,
--version, py.typed, docstrings on the public API, the in-memory API."""

from __future__ import annotations

import argparse
import inspect
import re

import numpy as np
import pytest

from tests.conftest import REPO, tiny_cnn


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help():
    from qmace.cli.main import build_parser

    ap = build_parser()
    missing = [f"qmace {' '.join(a.option_strings)}" for a in ap._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    for verb, p in _subparsers(ap).items():
        missing += [f"qmace {verb} {a.option_strings[0]}" for a in p._actions
                    if a.option_strings and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing, missing


def test_help_lists_each_verb_once(cli):
    res = cli("--help")
    assert res.code == 0
    listed = re.findall(r"^    (\S+)", res.out, re.MULTILINE)
    assert listed == ["convert", "run", "quantize-stat", "quantize", "export", "qat"], res.out
    assert "quantize_stat" in res.out  # the MACE spelling is shown as the alias
    assert cli("quantize_stat", "--help").code == 0


def test_version(cli):
    from qmace import __version__

    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"qmace {__version__}"


def test_py_typed_shipped():
    assert (REPO / "qmace" / "py.typed").is_file()
    text = (REPO / "pyproject.toml").read_text()
    assert "py.typed" in text


PUBLIC = [
    ("qmace.api", ["convert", "run", "load_converted", "model_file_path", "build_settings", "convert_model",
                   "run_model", "load_model"]),
    ("qmace.api", ["quantize_one_shot", "export"]),
    ("qmace.quantize.recipe", ["calibrate", "quantize_for_config"]),
    ("qmace.config", ["load_config", "verify_checksum"]),
    ("qmace.modelfile", ["save_graph", "load_graph"]),
]


@pytest.mark.parametrize(("module", "names"), PUBLIC, ids=[m for m, _ in PUBLIC])
def test_public_functions_document_args_returns_errors(module, names):
    import importlib

    mod = importlib.import_module(module)
    for name in names:
        doc = inspect.getdoc(getattr(mod, name)) or ""
        assert len(doc.splitlines()) >= 3, f"{module}.{name}: docstring too short"
        if name in ("convert", "run", "quantize_one_shot", "export", "load_config", "convert_model", "run_model",
                    "load_model", "load_graph"):
            assert "Raises" in doc or "raises" in doc, f"{module}.{name}: errors not documented"


def test_in_memory_api_round_trip(tmp_path):
    """ONNX model in memory -> converted graph -> numpy in, numpy out; matches ONNX Runtime."""
    import onnxruntime as ort

    from qmace import api

    model = tiny_cnn()
    g = api.convert_model(model, input_shapes={"input": (1, 3, 8, 8)})
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    out = api.run_model(g, {"input": x})
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(out["output"], ref, rtol=1e-5, atol=1e-6)
    out_ref = api.run_model(g, {"input": x}, backend="reference")
    np.testing.assert_allclose(out_ref["output"], ref, rtol=1e-4, atol=1e-5)
    path = tmp_path / "m.qmace"
    api.save_model(g, path)
    np.testing.assert_array_equal(api.run_model(api.load_model(path), {"input": x})["output"], out["output"])


def test_in_memory_api_errors():
    from qmace import api
    from qmace.errors import InputDataError, ModelError

    g = api.convert_model(tiny_cnn(), input_shapes={"input": (1, 3, 8, 8)})
    with pytest.raises(InputDataError, match="'input'"):
        api.run_model(g, {"input": np.zeros((1, 3, 4, 4), np.float32)})
    with pytest.raises(InputDataError, match="missing"):
        api.run_model(g, {})
    with pytest.raises(ModelError, match="'nope'"):
        api.convert_model(tiny_cnn(), input_shapes={"nope": (1, 3, 8, 8)})


def test_docs_yaml_example_is_complete_and_valid(tmp_path):
    """The example in docs/deployment-yaml.md loads as written (with a real file and checksum)."""
    import hashlib

    from qmace.config import load_config

    text = (REPO / "docs" / "deployment-yaml.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = tiny_cnn().SerializeToString()
    (tmp_path / "mobilenet_v2.onnx").write_bytes(data)
    (tmp_path / "overall_range").write_text("input@@-1,1\n")
    block = re.sub(r"model_sha256_checksum: \S+.*", f"model_sha256_checksum: {hashlib.sha256(data).hexdigest()}", block)
    (tmp_path / "m.yml").write_text(block)
    cfg = load_config(tmp_path / "m.yml")
    m = cfg.model()
    assert cfg.library_name == "mobilenet" and m.name == "mobilenet_v2" and m.quantize_schema == "int8"
    assert m.subgraph.input_ranges == ((-2.1179, 2.64),)
    m.verify_model_file()
    errors = (REPO / "docs" / "errors.md").read_text()
    import qmace.errors as E

    for name in dir(E):
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, E.QmaceError) and obj is not E.QmaceError:
            assert f"`{name}`" in errors, f"docs/errors.md does not describe {name}"


def test_validation_table_stays_aligned_with_long_names(tiny, cli, tmp_path):
    from tests.conftest import write_samples

    write_samples(tmp_path / "in", tiny, 1)
    (tmp_path / "in" / "input_0").rename(tmp_path / "in" / "input_a_photo_name_much_longer_than_sixteen")
    (tmp_path / "in" / "input_1").write_bytes((tmp_path / "in" / "input_a_photo_name_much_longer_than_sixteen").read_bytes())
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--validate", "--input_dir", tmp_path / "in")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("sample"))
    table = lines[start:start + 3]
    assert len({len(ln) for ln in table}) == 1, table  # every row ends at the same column
    assert len({ln.index("cosine") + len("cosine") for ln in table[:1]} | {
        ln.index(" 1.000000") + len(" 1.000000") for ln in table[1:]}) == 1, table
