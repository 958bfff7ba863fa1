"""A hostile user's worst hour: bad inputs and filesystem faults across convert / run / quantize-stat /
quantize / export / qat, each run in-process through the CLI.

Every case asserts: the exit code (2 unless stated), exactly one ``qmace: error:`` line naming the culprit
(warnings about other things may precede it), no traceback, no file created or changed anywhere in the
workspace (so nothing written outside the build folder either), no temporary file left, and the good model
built before the case still byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import REPO, TinyModel, make_onnx, tiny_cnn, write_samples, write_tiny_model, yaml_text


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not p.exists():
            out[rel] = "link"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@dataclass
class Case:
    id: str
    setup: Callable[[TinyModel, Path], list]  # prepares the workspace, returns argv (after "qmace")
    needles: tuple[str, ...]
    code: int = 2
    qat: bool = False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _swap_model(t: TinyModel, model: onnx.ModelProto, **extra) -> None:
    """Replace the source ONNX and fix the YAML's checksum (a valid YAML for a hostile model)."""
    data = model.SerializeToString()
    t.onnx_path.write_bytes(data)
    t.yaml.write_text(yaml_text(t, sha=_sha(data), **extra))


def _yaml(t: TinyModel, text: str) -> list:
    t.yaml.write_text(text)
    return ["convert", "--config", t.yaml]


def _replace_yaml(t: TinyModel, old: str, new: str, verb: str = "convert") -> list:
    text = t.yaml.read_text()
    assert old in text
    t.yaml.write_text(text.replace(old, new))
    return [verb, "--config", t.yaml]


def _forge(t: TinyModel, edit) -> None:
    """Edit the built model file's header/arrays and recompute its content hash (a careful forger)."""
    from qmace.modelfile import HASH_KEY, content_sha256

    with np.load(t.model_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop(HASH_KEY)
    doc = json.loads(arrays.pop("__graph__").tobytes())
    edit(doc, arrays)
    header = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    arrays[HASH_KEY] = np.frombuffer(content_sha256(header, arrays).encode(), np.uint8)
    os.chmod(t.model_file, 0o644)
    with open(t.model_file, "wb") as f:
        np.savez(f, __graph__=header, **arrays)


def _tamper_weight(t: TinyModel) -> None:
    """Re-zip the model file with one weight value changed, the stored hash kept (an edit, not a forge)."""
    with np.load(t.model_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(arrays["__graph__"].tobytes())
    key = next(x["data"] for x in doc["tensors"] if x["data"] and arrays[x["data"]].dtype == np.float32)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] += 1.0
    with open(t.model_file, "wb") as f:
        np.savez(f, **arrays)


def _external(t: TinyModel, location: str, nbytes: int | None = None, offset: int = 0, make: bool = True,
              dims=(10, 8)) -> list:
    """The tiny model with its last weight (w3, 10x8 float32) stored as external data at ``location``."""
    m = tiny_cnn()
    init = next(i for i in m.graph.initializer if i.name == "w3")
    arr = numpy_helper.to_array(init)
    init.ClearField("raw_data")
    init.ClearField("float_data")
    del init.dims[:]
    init.dims.extend(dims)
    init.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if nbytes is not None:
        entries["length"] = str(nbytes)
    for k, v in entries.items():
        e = init.external_data.add()
        e.key, e.value = k, v
    if make:
        (t.onnx_path.parent / "w3.bin").write_bytes(arr.tobytes())
    _swap_model(t, m)
    return ["convert", "--config", t.yaml]


def _graph_model(nodes, inits=None, outputs=("output",)) -> onnx.ModelProto:
    return make_onnx(nodes, {"input": (1, 3, 8, 8)}, list(outputs), inits or {})


def _fault(monkeypatch, name: str, err: int) -> None:
    """Make the next fsync in qmace.fileio fail as the kernel would (disk full, read-only filesystem)."""
    import qmace.fileio

    def boom(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(qmace.fileio.os, "fsync", boom)


LOG_OK = "I net.cc:1] Tensor range @@conv1@@-1.0,2.0\n"


def _log(t: TinyModel, text: str | bytes, name: str = "range_log") -> Path:
    p = t.root / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


CASES: list[Case] = [
    # ---- convert: names and paths
    Case("library-name-dotdot", lambda t, w: _replace_yaml(t, "library_name: tinylib", "library_name: ../../x"),
         ("library_name", "path separator")),
    Case("library-name-absolute", lambda t, w: _replace_yaml(t, "library_name: tinylib",
                                                             f"library_name: {w / 'abs'}"), ("library_name",)),
    Case("library-name-is-dotdot", lambda t, w: _replace_yaml(t, "library_name: tinylib", "library_name: '..'"),
         ("library_name", "not a plain name")),
    Case("library-name-backslash", lambda t, w: _replace_yaml(t, "library_name: tinylib",
                                                              "library_name: 'a\\..\\b'"), ("path separator",)),
    Case("library-name-control-char", lambda t, w: _replace_yaml(t, "library_name: tinylib",
                                                                 'library_name: "a\\tb"'), ("control character",)),
    Case("model-name-escapes", lambda t, w: _replace_yaml(t, "  tiny:\n", "  ../../../x:\n"),
         ("model name", "path separator")),
    Case("model-name-tilde", lambda t, w: _replace_yaml(t, "  tiny:\n", "  '~root':\n"), ("model name", "'~'")),
    Case("model-path-nul", lambda t, w: _replace_yaml(t, "model_file_path: models/tiny.onnx",
                                                      'model_file_path: "models/ti\\0ny.onnx"'), ("NUL",)),
    # ---- convert: YAML bombs and limits
    Case("yaml-alias-bomb", lambda t, w: _yaml(t, "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
        + "library_name: [*i]\nmodels: {}\n"), ("alias",)),
    Case("yaml-deep-nesting", lambda t, w: _yaml(t, "library_name: " + "[" * 20000 + "]" * 20000 + "\n"),
         ("nested more than",)),
    Case("yaml-recursive-alias", lambda t, w: _yaml(t, "library_name: &a [*a]\nmodels: {}\n"), ()),
    Case("yaml-401-digit-range", lambda t, w: _replace_yaml(t, "input_ranges: -1,1", "input_ranges: [0, " + "9" * 401 + "]"),
         ("input_ranges",)),
    Case("yaml-5000-digit-int", lambda t, w: _replace_yaml(t, "input_ranges: -1,1", "input_ranges: [0, " + "9" * 5000 + "]"),
         ("malformed YAML value",)),
    Case("yaml-huge-input-shape", lambda t, w: _replace_yaml(t, "input_shapes: 1,8,8,3", "input_shapes: 1,100000,100000,3"),
         ("input_shapes", "memory budget")),
    Case("yaml-is-folder", lambda t, w: (t.yaml.unlink(), t.yaml.mkdir(), ["convert", "--config", t.yaml])[-1],
         ("is a directory",)),
    Case("yaml-binary", lambda t, w: (t.yaml.write_bytes(b"\xff\xfe\x00garbage"), ["convert", "--config", t.yaml])[-1],
         ("cannot read deployment file",)),
    Case("yaml-top-level-list", lambda t, w: _yaml(t, "- 1\n- 2\n"), ("top level must be a mapping",)),
    Case("bad-memory-budget", lambda t, w: ["--memory_budget", "lots", "convert", "--config", t.yaml],
         ("--memory_budget",)),
    # ---- convert: hostile ONNX
    Case("onnx-sha-mismatch", lambda t, w: (t.onnx_path.write_bytes(t.onnx_path.read_bytes() + b"\0"),
                                            ["convert", "--config", t.yaml])[-1], ("sha256 mismatch",)),
    Case("onnx-empty", lambda t, w: (_swap_model(t, onnx.ModelProto()), ["convert", "--config", t.yaml])[-1],
         ("tiny.onnx",)),
    Case("onnx-garbage", lambda t, w: (t.onnx_path.write_bytes(b"\x08" * 64), t.yaml.write_text(
        yaml_text(t, sha=_sha(b"\x08" * 64))), ["convert", "--config", t.yaml])[-1], ("not an ONNX model",)),
    Case("onnx-cycle", lambda t, w: (_swap_model(t, _graph_model([
        helper.make_node("Add", ["input", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Relu", ["a"], ["output"], name="out")])), ["convert", "--config", t.yaml])[-1],
         ("cycle",)),
    Case("onnx-undefined-input", lambda t, w: (_swap_model(t, _graph_model([
        helper.make_node("Add", ["input", "ghost"], ["output"], name="add")])), ["convert", "--config", t.yaml])[-1],
         ("'ghost'",)),
    Case("onnx-two-producers", lambda t, w: (_swap_model(t, _graph_model([
        helper.make_node("Relu", ["input"], ["output"], name="r1"),
        helper.make_node("Neg", ["input"], ["output"], name="r2")])), ["convert", "--config", t.yaml])[-1],
         ("writes tensor 'output'",)),
    Case("onnx-unsupported-op", lambda t, w: (_swap_model(t, _graph_model([
        helper.make_node("NonMaxSuppression", ["input"], ["output"], name="nms")])),
        ["convert", "--config", t.yaml])[-1], ("unsupported ops", "NonMaxSuppression")),
    Case("onnx-opset-too-old", lambda t, w: (_swap_model(t, make_onnx(
        [helper.make_node("Relu", ["input"], ["output"])], {"input": (1, 3, 8, 8)}, ["output"], opset=3)),
        ["convert", "--config", t.yaml])[-1], ("opset 3",)),
    Case("onnx-initializer-1e12", lambda t, w: (_swap_model(t, _huge_initializer()),
                                                ["convert", "--config", t.yaml])[-1],
         ("initializer 'big'", "memory budget")),
    Case("onnx-initializer-short-data", lambda t, w: (_swap_model(t, _short_initializer()),
                                                      ["convert", "--config", t.yaml])[-1],
         ("initializer 'w'",)),
    Case("onnx-constant-fold-error", lambda t, w: (_swap_model(t, _graph_model(
        [helper.make_node("Reshape", ["c", "s"], ["r"], name="bad_reshape"),
         helper.make_node("Add", ["input", "r"], ["output"], name="add")],
        {"c": np.zeros(5, np.float32), "s": np.array([2, 2], np.int64)})), ["convert", "--config", t.yaml])[-1],
         ("bad_reshape",)),
    Case("external-data-escapes", lambda t, w: _external(t, "../secret.bin"), ("leaves the model's folder",)),
    Case("external-data-absolute", lambda t, w: _external(t, str(w / "models" / "w3.bin")),
         ("leaves the model's folder",)),
    Case("external-data-missing", lambda t, w: _external(t, "w3.bin", make=False), ("not found",)),
    Case("external-data-past-end", lambda t, w: _external(t, "w3.bin", nbytes=320, offset=100), ("past the end",)),
    Case("external-data-wrong-size", lambda t, w: _external(t, "w3.bin", nbytes=100), ("needs 320",)),
    Case("external-data-huge-dims", lambda t, w: _external(t, "w3.bin", dims=(10 ** 6, 10 ** 6)), ("memory budget",)),
    # ---- convert: filesystem faults (every path named)
    Case("build-dir-is-a-file", lambda t, w: ((w / "afile").write_text("x"),
                                              ["convert", "--config", t.yaml, "--build_dir", w / "afile"])[-1],
         ("afile", "cannot create folder")),
    Case("build-dir-parent-is-a-file", lambda t, w: ((w / "afile").write_text("x"),
                                                     ["convert", "--config", t.yaml, "--build_dir", w / "afile" / "b"])[-1],
         ("cannot create folder",)),
    Case("model-target-is-a-folder", lambda t, w: (_make_dir(w / "b2" / "tinylib" / "model" / "tiny.qmace"),
                                                   ["convert", "--config", t.yaml, "--build_dir", w / "b2"])[-1],
         ("tiny.qmace", "is a folder")),
    # ---- run
    Case("run-unbuilt", lambda t, w: ["run", "--config", t.yaml, "--build_dir", w / "nothing"], ("no converted model",)),
    Case("run-stale-quantize", lambda t, w: (_rangefile(t), _replace_yaml(
        t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n    quantize_range_file: r.txt\n", "run"))[-1],
        ("stale build", "quantize", "qmace convert --config")),
    Case("run-stale-source", lambda t, w: (_swap_model(t, tiny_cnn(seed=1)), ["run", "--config", t.yaml])[-1],
         ("stale build", "source_sha256")),
    Case("run-stale-shape", lambda t, w: _replace_yaml(t, "input_data_formats", "x", "run")
         if False else _replace_yaml(t, "input_ranges: -1,1", "input_ranges: -1,1\n        input_data_formats: NCHW\n"
                                     "        input_shapes: 1,3,8,8", "run"),
         ("stale build",)),
    Case("run-tampered-weight", lambda t, w: (_tamper_weight(t), ["run", "--config", t.yaml])[-1],
         ("content hash mismatch",)),
    Case("run-header-lies-shape", lambda t, w: (_forge(t, lambda d, a: next(
        x for x in d["tensors"] if x["data"]).update(shape=[3, 3])), ["run", "--config", t.yaml])[-1],
        ("invalid graph header", "the header says")),
    Case("run-header-missing-key", lambda t, w: (_forge(t, lambda d, a: d.pop("nodes")),
                                                 ["run", "--config", t.yaml])[-1], ("'nodes' missing",)),
    Case("run-header-unknown-op", lambda t, w: (_forge(t, lambda d, a: d["nodes"][0].update(op_type="Evil")),
                                                ["run", "--config", t.yaml])[-1], ("unknown op type 'Evil'",)),
    Case("run-header-bad-dtype", lambda t, w: (_forge(t, lambda d, a: d["tensors"][0].update(dtype="object")),
                                               ["run", "--config", t.yaml])[-1], ("unknown dtype",)),
    Case("run-header-dangling-input", lambda t, w: (_forge(t, lambda d, a: d["nodes"][0]["inputs"].append("nope")),
                                                    ["run", "--config", t.yaml])[-1], ("'nope'",)),
    Case("run-header-cycle", lambda t, w: (_forge(t, _make_cycle), ["run", "--config", t.yaml])[-1], ("cycle",)),
    Case("run-header-bad-quant", lambda t, w: (_forge(t, lambda d, a: d["tensors"][0].update(quant={"x": 1})),
                                               ["run", "--config", t.yaml])[-1], ("invalid graph header",)),
    Case("run-header-not-json", lambda t, w: (_forge_raw(t, b"{not json"), ["run", "--config", t.yaml])[-1],
         ("corrupt graph header",)),
    Case("run-model-truncated", lambda t, w: (t.model_file.write_bytes(t.model_file.read_bytes()[:300]),
                                              ["run", "--config", t.yaml])[-1], ("truncated",)),
    Case("run-model-garbage", lambda t, w: (t.model_file.write_bytes(b"PK\x03\x04" + b"\0" * 50),
                                            ["run", "--config", t.yaml])[-1], ("not a qmace model file",)),
    Case("run-model-version-1", lambda t, w: (_forge(t, lambda d, a: d.update(version=1)),
                                              ["run", "--config", t.yaml])[-1], ("version 1",)),
    Case("run-num-threads-negative", lambda t, w: ["run", "--config", t.yaml, "--num_threads", "-3"], ("--num_threads",)),
    Case("run-round-zero", lambda t, w: ["run", "--config", t.yaml, "--round", "0"], ("--round",)),
    Case("run-input-dir-missing", lambda t, w: ["run", "--config", t.yaml, "--input_dir", w / "nope"],
         ("input directory not found",)),
    Case("run-input-wrong-size", lambda t, w: ((w / "in").mkdir(), (w / "in" / "input_0").write_bytes(b"\0" * 12),
                                               ["run", "--config", t.yaml, "--input_dir", w / "in"])[-1],
         ("input_0", "12 bytes")),
    Case("run-input-name-collision", lambda t, w: (write_samples(w / "in", t, 1), np.save(
        w / "in" / "input_0.npy", np.zeros(t.yaml_shape, np.float32)),
        ["run", "--config", t.yaml, "--input_dir", w / "in", "--output_dir", w / "out"])[-1],
        ("same sample",)),
    Case("run-input-structured-npy", lambda t, w: ((w / "in").mkdir(), np.save(
        w / "in" / "input_0.npy", np.zeros(192, dtype=[("a", "f4")])),
        ["run", "--config", t.yaml, "--input_dir", w / "in"])[-1], ("not a plain numeric array",)),
    Case("run-input-pickled-npy", lambda t, w: ((w / "in").mkdir(), np.save(
        w / "in" / "input_0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        ["run", "--config", t.yaml, "--input_dir", w / "in"])[-1], ("not a plain .npy array",)),
    Case("run-input-truncated-npy", lambda t, w: ((w / "in").mkdir(), (w / "in" / "input_0.npy").write_bytes(
        b"\x93NUMPY\x01\x00"), ["run", "--config", t.yaml, "--input_dir", w / "in"])[-1], ("input_0.npy",)),
    Case("run-output-dir-is-a-file", lambda t, w: (write_samples(w / "in", t, 1), (w / "out").write_text("x"),
                                                   ["run", "--config", t.yaml, "--input_dir", w / "in", "--output_dir",
                                                    w / "out"])[-1], ("out", "cannot create folder")),
    Case("run-output-target-is-a-folder", lambda t, w: (write_samples(w / "in", t, 1), _make_dir(w / "out" / "output_0"),
                                                        ["run", "--config", t.yaml, "--input_dir", w / "in",
                                                         "--output_dir", w / "out"])[-1], ("output_0", "is a folder")),
    Case("run-unknown-model-name", lambda t, w: ["run", "--config", t.yaml, "--model_name", "nope"], ("no model 'nope'",)),
    # ---- quantize-stat
    Case("stat-log-missing", lambda t, w: ["quantize-stat", "--log_file", w / "nope"], ("range log not found",)),
    Case("stat-log-inf", lambda t, w: ["quantize-stat", "--log_file", _log(t, LOG_OK + "Tensor range @@x@@-inf,1\n")],
         ("range_log:2", "'x'", "not finite")),
    Case("stat-log-huge-floats", lambda t, w: ["quantize-stat", "--log_file", _log(
        t, "Tensor range @@x@@-1.7e308,1.7e308\nTensor range @@x@@1.7e308,1.7e308\n"), "--percentile", "25"],
        ("range_log: tensor 'x'", "not finite")),
    Case("stat-log-empty", lambda t, w: ["quantize-stat", "--log_file", _log(t, "")], ("no 'Tensor range",)),
    Case("stat-log-binary", lambda t, w: ["quantize-stat", "--log_file", _log(t, b"\xff\x00\xfe" * 100)],
         ("no 'Tensor range",)),
    Case("stat-log-malformed", lambda t, w: ["quantize-stat", "--log_file", _log(t, "Tensor range @@x@@1\n")],
         ("range_log:1", "malformed")),
    Case("stat-log-min-gt-max", lambda t, w: ["quantize-stat", "--log_file", _log(t, "Tensor range @@x@@2,1\n")],
         ("min 2.0 > max 1.0",)),
    Case("stat-percentile-out-of-range", lambda t, w: ["quantize-stat", "--log_file", _log(t, LOG_OK),
                                                       "--percentile", "60"], ("percentile",)),
    Case("stat-enhance-ratio-negative", lambda t, w: ["quantize-stat", "--log_file", _log(t, LOG_OK), "--enhance",
                                                      "--enhance_ratio", "-1"], ("enhance_ratio",)),
    Case("stat-output-is-a-folder", lambda t, w: (_make_dir(w / "rf"), ["quantize-stat", "--log_file", _log(t, LOG_OK),
                                                                         "--output", w / "rf"])[-1],
         ("rf", "is a folder")),
    Case("stat-log-is-a-folder", lambda t, w: (_make_dir(w / "lg"), ["quantize-stat", "--log_file", w / "lg"])[-1],
         ("range log not found",)),
    # ---- convert with quantize: 1
    Case("quantize-no-range-file", lambda t, w: _replace_yaml(t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n"),
         ("quantize_range_file",)),
    Case("quantize-range-file-missing", lambda t, w: _replace_yaml(
        t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n    quantize_range_file: nope.txt\n"),
        ("nope.txt", "cannot read range file")),
    Case("quantize-range-file-malformed", lambda t, w: ((w / "r.txt").write_text("conv1@@1\n"), _replace_yaml(
        t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n    quantize_range_file: r.txt\n"))[-1],
        ("r.txt:1", "malformed")),
    Case("quantize-range-file-duplicate", lambda t, w: ((w / "r.txt").write_text("a@@0,1\na@@0,2\n"), _replace_yaml(
        t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n    quantize_range_file: r.txt\n"))[-1],
        ("r.txt:2", "twice")),
    Case("quantize-range-file-nan", lambda t, w: ((w / "r.txt").write_text("a@@nan,1\n"), _replace_yaml(
        t, "    runtime: cpu\n", "    runtime: cpu\n    quantize: 1\n    quantize_range_file: r.txt\n"))[-1],
        ("r.txt:1", "not finite")),
    # ---- quantize (one-shot)
    Case("oneshot-float-nodes-unknown", lambda t, w: (write_samples(w / "cal", t, 2),
                                                      ["quantize", "--config", t.yaml, "--input_dir", w / "cal",
                                                       "--float_nodes", "NoSuchNode"])[-1], ("NoSuchNode",)),
    Case("oneshot-input-dir-missing", lambda t, w: ["quantize", "--config", t.yaml, "--input_dir", w / "nope"],
         ("input directory not found",)),
    Case("oneshot-nan-sample", lambda t, w: ((w / "cal").mkdir(), np.full(t.yaml_shape, np.nan, np.float32).tofile(
        w / "cal" / "input_0"), ["quantize", "--config", t.yaml, "--input_dir", w / "cal"])[-1],
        ("input_0", "NaN or Inf")),
    Case("oneshot-range-file-is-a-folder", lambda t, w: (write_samples(w / "cal", t, 2), _make_dir(w / "rf"),
                                                         ["quantize", "--config", t.yaml, "--input_dir", w / "cal",
                                                          "--range_file", w / "rf", "--build_dir", w / "b3"])[-1],
         ("rf", "is a folder")),
    Case("oneshot-float-layers-negative", lambda t, w: (write_samples(w / "cal", t, 2), [
        "quantize", "--config", t.yaml, "--input_dir", w / "cal", "--sensitivity_float_layers", "-1"])[-1],
        ("sensitivity_float_layers must be >= 0",)),
    Case("oneshot-num-threads-zero", lambda t, w: ["quantize", "--config", t.yaml, "--input_dir", w, "--num_threads", "0"],
         ("--num_threads",)),
    Case("oneshot-percentile-with-entropy", lambda t, w: (write_samples(w / "cal", t, 2), [
        "quantize", "--config", t.yaml, "--input_dir", w / "cal", "--method", "entropy", "--percentile", "1"])[-1],
        ("--percentile applies",)),
    Case("oneshot-library-escapes", lambda t, w: (write_samples(w / "cal", t, 2), _replace_yaml(
        t, "library_name: tinylib", "library_name: ../up"))[-1][:0] + [
        "quantize", "--config", t.yaml, "--input_dir", w / "cal"], ("library_name",)),
    # ---- export
    Case("export-qdq-of-float", lambda t, w: ["export", "--config", t.yaml, "-o", w / "x.onnx"],
         ("needs a quantized model",)),
    Case("export-output-is-a-folder", lambda t, w: (_make_dir(w / "xo"), ["export", "--config", t.yaml, "--format",
                                                                           "onnx", "-o", w / "xo"])[-1],
         ("xo", "is a folder")),
    Case("export-output-parent-is-a-file", lambda t, w: ((w / "f").write_text("x"), [
        "export", "--config", t.yaml, "--format", "onnx", "-o", w / "f" / "x.onnx"])[-1], ("cannot create folder",)),
    Case("export-unbuilt", lambda t, w: ["export", "--config", t.yaml, "--format", "onnx", "--build_dir", w / "nb",
                                         "-o", w / "x.onnx"], ("no converted model",)),
    Case("export-stale", lambda t, w: (_swap_model(t, tiny_cnn(seed=2)),
                                       ["export", "--config", t.yaml, "--format", "onnx", "-o", w / "x.onnx"])[-1],
         ("stale build",)),
    # ---- qat (errors found before any training)
    Case("qat-negative-epochs", lambda t, w: (write_samples(w / "tr", t, 2), [
        "qat", "--config", t.yaml, "--train_dir", w / "tr", "--epochs", "-1"])[-1], ("--epochs",), qat=True),
    Case("qat-negative-lr", lambda t, w: (write_samples(w / "tr", t, 2), [
        "qat", "--config", t.yaml, "--train_dir", w / "tr", "--lr", "-1"])[-1], ("--lr",), qat=True),
    Case("qat-train-dir-missing", lambda t, w: ["qat", "--config", t.yaml, "--train_dir", w / "nope"],
         ("input directory not found",), qat=True),
    Case("qat-library-escapes", lambda t, w: (write_samples(w / "tr", t, 2), _replace_yaml(
        t, "library_name: tinylib", "library_name: /tmp/x"))[-1][:0] + [
        "qat", "--config", t.yaml, "--train_dir", w / "tr"], ("library_name",), qat=True),
    Case("qat-model-name-escapes", lambda t, w: (write_samples(w / "tr", t, 2), _replace_yaml(
        t, "  tiny:\n", "  ../x:\n"))[-1][:0] + ["qat", "--config", t.yaml, "--train_dir", w / "tr"],
        ("model name",), qat=True),
]


def _make_dir(p: Path) -> None:
    p.mkdir(parents=True)


def _rangefile(t: TinyModel) -> None:
    (t.root / "r.txt").write_text("input@@-1,1\n")


def _forge_raw(t: TinyModel, header: bytes) -> None:
    from qmace.modelfile import HASH_KEY, content_sha256

    with np.load(t.model_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in (HASH_KEY, "__graph__")}
    h = np.frombuffer(header, np.uint8)
    with open(t.model_file, "wb") as f:
        np.savez(f, __graph__=h, **arrays,
                 **{HASH_KEY: np.frombuffer(content_sha256(h, arrays).encode(), np.uint8)})


def _make_cycle(doc, arrays) -> None:
    first, last = doc["nodes"][0], doc["nodes"][-1]
    first["inputs"][0] = last["outputs"][0]


def _huge_initializer() -> onnx.ModelProto:
    m = _graph_model([helper.make_node("Add", ["input", "big"], ["output"], name="add")])
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[10 ** 6, 10 ** 6])
    m.graph.initializer.append(big)
    return m


def _short_initializer() -> onnx.ModelProto:
    m = _graph_model([helper.make_node("Add", ["input", "w"], ["output"], name="add")])
    m.graph.initializer.append(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 3, 8, 8], raw_data=b"\0" * 12))
    return m


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, tmp_path, monkeypatch, cli):
    if case.qat:
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    t = write_tiny_model(tmp_path)
    assert cli("convert", "--config", t.yaml).code == 0
    good = t.model_file.read_bytes()
    argv = case.setup(t, tmp_path)
    before = _snapshot(tmp_path)
    current = t.model_file.read_bytes()  # the good model, or the damaged one the case is about
    res = cli(*argv)
    assert res.code == case.code, (res.code, res.err)
    assert "Traceback" not in res.err + res.out
    lines = [ln for ln in res.err_lines if not ln.startswith("qmace: WARNING:")]
    assert len(lines) == 1 and lines[0].startswith("qmace: error: "), res.err
    for n in case.needles:
        assert n in lines[0], (n, lines[0])
    assert len(lines[0]) < 1000
    after = _snapshot(tmp_path)
    assert after == before, {k: after.get(k) for k in set(after) ^ set(before)}
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert t.model_file.read_bytes() == current
    if not case.id.startswith("run-"):
        assert current == good


# ---- faults that need more than a workspace edit -------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EIO])
@pytest.mark.parametrize("verb", ["convert", "quantize-stat", "export"])
def test_write_faults_named_and_cleaned(err, verb, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    t = write_tiny_model(tmp_path)
    assert cli("convert", "--config", t.yaml).code == 0
    good = t.model_file.read_bytes()
    argv = {"convert": ["convert", "--config", t.yaml],
            "quantize-stat": ["quantize-stat", "--log_file", _log(t, LOG_OK), "--output", tmp_path / "r.txt"],
            "export": ["export", "--config", t.yaml, "--format", "onnx", "-o", tmp_path / "x.onnx"]}[verb]
    target = {"convert": Path("build/tinylib/model/tiny.qmace"), "quantize-stat": tmp_path / "r.txt", "export": tmp_path / "x.onnx"}[verb]
    _fault(monkeypatch, verb, err)
    res = cli(*argv)
    assert res.code == 2, res.err
    assert res.err_lines == [f"qmace: error: {target}: cannot write: {os.strerror(err)}"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert t.model_file.read_bytes() == good


def test_unreadable_input_file_is_named(tiny, cli, tmp_path, monkeypatch):
    write_samples(tmp_path / "in", tiny, 1)
    assert cli("convert", "--config", tiny.yaml).code == 0
    real = np.fromfile

    def eio(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(np, "fromfile", eio)
    res = cli("run", "--config", tiny.yaml, "--input_dir", tmp_path / "in")
    monkeypatch.setattr(np, "fromfile", real)
    assert res.code == 2 and res.err_lines == [
        f"qmace: error: {tmp_path / 'in' / 'input_0'}: cannot read: {os.strerror(errno.EIO)}"]


def test_quantize_stat_without_input_dir_warns(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--quantize_stat")
    assert res.code == 0
    assert "Tensor range @@" in res.out
    warnings = [ln for ln in res.err_lines if "WARNING" in ln]
    assert len(warnings) == 1 and "one random sample" in warnings[0] and "--input_dir" in warnings[0]


def test_files_honour_umask(tiny, cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("convert", "--config", tiny.yaml).code == 0
        assert (tiny.model_file.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert cli("export", "--config", tiny.yaml, "--format", "onnx", "-o", tmp_path / "x.onnx").code == 0
        assert ((tmp_path / "x.onnx").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_external_data_resolved_beside_the_model(tiny, cli, tmp_path, monkeypatch):
    """A valid external-data model converts from any working directory, and validates against ORT."""
    _external(tiny, "w3.bin")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli("convert", "--config", tiny.yaml, "--build_dir", tmp_path / "build")
    assert res.code == 0, res.err
    res = cli("run", "--config", tiny.yaml, "--build_dir", tmp_path / "build", "--validate")
    assert res.code == 0 and "validation passed" in res.out, res.err


def test_memory_budget_flag_lowers_the_limit(tiny, cli):
    res = cli("--memory_budget", "100", "convert", "--config", tiny.yaml)
    assert res.code == 2 and "memory budget of 100 B" in res.err, res.err
    assert cli("--memory_budget", "1M", "convert", "--config", tiny.yaml).code == 0


def test_range_log_line_limit(tmp_path, cli, monkeypatch):
    from qmace import limits

    monkeypatch.setattr(limits, "MAX_RANGE_LOG_LINES", 3)
    p = tmp_path / "log"
    p.write_text(LOG_OK * 5)
    res = cli("quantize-stat", "--log_file", p)
    assert res.code == 2 and res.err_lines[0].startswith(f"qmace: error: {p}:4: more than 3 range lines"), res.err


def test_yaml_size_limit(tiny, cli, monkeypatch):
    from qmace import limits

    monkeypatch.setattr(limits, "MAX_YAML_BYTES", 100)
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 2 and "over the limit of 100" in res.err


def test_alias_bomb_is_fast_and_short(tiny, cli):
    case = next(c for c in CASES if c.id == "yaml-alias-bomb")
    case.setup(tiny, tiny.root)
    t0 = time.perf_counter()
    res = cli("convert", "--config", tiny.yaml)
    assert time.perf_counter() - t0 < 2.0
    assert res.code == 2 and len(res.err) < 500


def test_unsorted_onnx_nodes_are_sorted(tiny, cli):
    m = tiny_cnn()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    _swap_model(tiny, m)
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    assert cli("run", "--config", tiny.yaml, "--validate").code == 0


def test_stale_range_file_detected(tiny, cli):
    assert cli("convert", "--config", tiny.yaml).code == 0
    log = cli("run", "--config", tiny.yaml, "--quantize_stat").out
    (tiny.root / "log").write_text(log)
    assert cli("quantize-stat", "--log_file", tiny.root / "log", "--output", tiny.root / "r.txt").code == 0
    tiny.write_yaml(quantize=1, quantize_range_file="r.txt")
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 0, res.err
    assert cli("run", "--config", tiny.yaml).code == 0
    (tiny.root / "r.txt").write_text((tiny.root / "r.txt").read_text() + "extra@@0,1\n")
    res = cli("run", "--config", tiny.yaml)
    assert res.code == 2 and "quantize_range_file_sha256" in res.err and "qmace convert --config" in res.err


def test_sigterm_mid_write_leaves_no_temp_file(tmp_path):
    """A real process killed with SIGTERM while it writes the model file: exit 143, no temporary file."""
    t = write_tiny_model(tmp_path)
    code = (
        "import sys, time, numpy as np, qmace.modelfile as mf\n"
        "real = np.savez\n"
        "def slow(f, **kw):\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(30)\n"
        "mf.np.savez = slow\n"
        "from qmace.cli.main import main\n"
        f"sys.exit(main(['convert', '--config', {str(t.yaml)!r}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert list((tmp_path / "build").rglob("*.tmp"))  # the temporary file exists mid-write
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "qmace: terminated" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp"))
    assert not t.model_file.exists()
