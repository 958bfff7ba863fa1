"""Property-based fuzzing of every loader that reads user files: whatever the bytes, the loader either
returns or raises a ``QmaceError`` (a named, exit-2 error) — never another exception.

Fixed budget so CI stays fast: derandomized (the same examples every run), few examples, no deadline.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmace.errors import QmaceError
from tests.conftest import tiny_cnn, write_tiny_model, yaml_text

# QMACE_FUZZ_EXAMPLES=2000 runs a longer, randomized search locally; CI runs the fixed 60.
_DEEP = int(os.environ.get("QMACE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_DEEP or 60, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=list(HealthCheck))

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c, max_size=4)),
                       max_leaves=12)


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qmace-fuzz-"))


# ---- deployment YAML --------------------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=400))
def test_yaml_text(text):
    from qmace.config import load_config

    p = _workdir() / "m.yml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass") if False else p.write_bytes(
        text.encode("utf-8", "replace"))
    try:
        load_config(p)
    except QmaceError:
        pass


_KEYS = ["library_name", "models", "platform", "model_file_path", "model_sha256_checksum", "subgraphs",
         "input_tensors", "input_shapes", "input_ranges", "output_tensors", "quantize", "quantize_schema",
         "validation_threshold", "input_data_formats", "quantize_range_file"]


@FUZZ
@given(st.sampled_from(_KEYS), _values)
def test_yaml_one_key_replaced(key, value):
    """A valid YAML with one key, wherever it occurs, given a random value."""
    import yaml

    from qmace.config import load_config

    root = _workdir()
    t = write_tiny_model(root)
    doc = yaml.safe_load(t.yaml.read_text())

    def put(node):
        if isinstance(node, dict):
            for k in list(node):
                if k == key:
                    node[k] = value
                else:
                    put(node[k])
        elif isinstance(node, list):
            for x in node:
                put(x)

    put(doc)
    t.yaml.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        load_config(t.yaml).model().verify_model_file()
    except QmaceError:
        pass


# ---- range log and range file -----------------------------------------------------------------------------

_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**400, 10**400).map(str),
                 st.text(alphabet="0123456789.eE+-naif", max_size=8))
_range_line = st.builds(lambda name, lo, hi, sep: f"{name}@@{lo}{sep}{hi}", st.text(max_size=10), _num, _num,
                        st.sampled_from([",", ";", "", ",,"]))


@FUZZ
@given(st.lists(st.one_of(_range_line.map(lambda s: "I net.cc:1] Tensor range @@" + s), st.text(max_size=30)),
                max_size=12), st.floats(0, 49.9), st.booleans())
def test_range_log(lines, percentile, enhance):
    from qmace.quantize.ranges import parse_range_log, quantize_stat

    try:
        log = parse_range_log(lines, "log")
        quantize_stat(log, percentile=percentile, enhance=enhance)
    except QmaceError:
        pass


@FUZZ
@given(st.lists(st.one_of(_range_line, st.text(max_size=30)), max_size=12))
def test_range_file(lines):
    from qmace.quantize.ranges import read_range_file

    p = _workdir() / "r.txt"
    p.write_bytes("\n".join(lines).encode("utf-8", "replace"))
    try:
        read_range_file(p)
    except QmaceError:
        pass


# ---- model file -------------------------------------------------------------------------------------------


_MODEL_BYTES: dict[str, bytes] = {}


def _model_file() -> bytes:
    if "m" not in _MODEL_BYTES:
        from qmace.api import convert_model, save_model

        p = _workdir() / "m.qmace"
        save_model(convert_model(tiny_cnn()), p)
        _MODEL_BYTES["m"] = p.read_bytes()
    return _MODEL_BYTES["m"]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**9))
def test_model_file_bytes(flips, cut):
    from qmace.modelfile import load_graph

    data = bytearray(_model_file())
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data
    p = _workdir() / "m.qmace"
    p.write_bytes(bytes(data))
    try:
        load_graph(p)
    except QmaceError:
        pass


@FUZZ
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6), _values)
def test_model_file_forged_header(path, value):
    """A header edited at a random place and re-hashed (a careful forger): validation must hold."""
    from qmace.modelfile import HASH_KEY, content_sha256, load_graph
    from qmace.runtime import Session

    p = _workdir() / "m.qmace"
    p.write_bytes(_model_file())
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop(HASH_KEY)
    doc = json.loads(arrays.pop("__graph__").tobytes())
    node, key = doc, None
    for step in path:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = keys[step % len(keys)]
        if isinstance(node[key], (dict, list)) and step % 5:
            node = node[key]
            key = None
        else:
            break
    if key is not None:
        node[key] = value
    header = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    with open(p, "wb") as f:
        np.savez(f, __graph__=header, **arrays,
                 **{HASH_KEY: np.frombuffer(content_sha256(header, arrays).encode(), np.uint8)})
    try:
        g = load_graph(p)
        x = np.zeros((1, 3, 8, 8), np.float32)
        Session(g, backend="reference").run({"input": x})
    except QmaceError:
        pass


# ---- ONNX frontend ----------------------------------------------------------------------------------------


_OPS = ["Conv", "Relu", "Add", "Mul", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm", "Softmax", "Clip",
        "Reshape", "Transpose", "Concat", "BatchNormalization", "AveragePool", "Sigmoid", "Pad", "Resize"]


@FUZZ
@given(st.integers(0, 100), st.sampled_from(_OPS), st.integers(0, 100),
       st.lists(st.integers(-3, 40), max_size=5), st.integers(0, 3))
def test_onnx_mutated_graph(node_idx, op, init_idx, dims, what):
    """The tiny CNN with one node's op type swapped, or one initializer's shape changed, or one node's
    attributes dropped: convert must either work or name the problem."""
    from onnx import numpy_helper

    from qmace.api import convert_model

    m = tiny_cnn()
    nodes = m.graph.node
    n = nodes[node_idx % len(nodes)]
    if what == 0:
        n.op_type = op
    elif what == 1:
        init = m.graph.initializer[init_idx % len(m.graph.initializer)]
        arr = numpy_helper.to_array(init)
        size = int(np.prod(dims)) if dims and all(d >= 0 for d in dims) else -1
        if 0 <= size <= 4096:
            init.CopyFrom(numpy_helper.from_array(np.resize(arr, dims).astype(arr.dtype), init.name))
        else:
            del init.dims[:]
            init.dims.extend(dims)
    elif what == 2:
        del n.attribute[:]
    else:
        n.input[0] = n.output[0] if node_idx % 2 else nodes[-1].output[0]
    try:
        convert_model(m)
    except QmaceError:
        pass


def test_fuzz_workspaces_are_valid():
    """The fuzzers start from valid inputs (else they would only test the first check)."""
    from qmace.config import load_config
    from qmace.modelfile import load_graph

    root = _workdir()
    t = write_tiny_model(root)
    assert load_config(t.yaml).model().name == "tiny"
    assert yaml_text(t)
    p = root / "m.qmace"
    p.write_bytes(_model_file())
    assert load_graph(p).inputs == ["input"]
