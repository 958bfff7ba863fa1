"""The qmace model file: exact round trips (float and quantized graphs), errors, no pickle."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from qmace import qmath
from qmace.errors import ModelError
from qmace.ir import Graph, Node, Tensor
from qmace.modelfile import VERSION, load_graph, save_graph
from qmace.runtime import Session


def _graph() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph(name="g", inputs=["x"], outputs=["y"], metadata={"model_name": "m", "nested": {"a": [1, 2.5]}})
    g.add_tensor(Tensor("x", "float32", (None, 4)))
    g.add_tensor(Tensor("w", "float32", (4, 3), rng.standard_normal((4, 3)).astype(np.float32)))
    g.add_tensor(Tensor("idx", "int64", (), np.array(1, np.int64)))  # a 0-d constant keeps its shape
    g.add_tensor(Tensor("h", "float32", (None, 3)))
    g.add_tensor(Tensor("y", "float32", (None,)))
    g.nodes = [
        Node("mm", "MatMul", ["x", "w"], ["h"], {"qm_activation": "Clip", "qm_clip": [0.0, 6.0]}),
        Node("g", "Gather", ["h", "idx"], ["y"], {"axis": 1, "extra": np.arange(3, dtype=np.int64),
                                                   "nested": [np.float32(2.0), "s", [1, 2]]}),
    ]
    return g


def _same_graph(a: Graph, b: Graph) -> None:
    assert (a.name, a.inputs, a.outputs) == (b.name, b.inputs, b.outputs)
    assert json.dumps(a.metadata, sort_keys=True) == json.dumps(b.metadata, sort_keys=True)
    assert list(a.tensors) == list(b.tensors)
    for k, t in a.tensors.items():
        u = b.tensors[k]
        assert (t.dtype, t.shape) == (u.dtype, u.shape), k
        if t.data is None:
            assert u.data is None
        else:
            assert u.data.dtype == t.data.dtype and u.data.shape == t.data.shape, k
            np.testing.assert_array_equal(u.data, t.data)
        assert t.quant == u.quant, k
        if t.quant is not None:
            np.testing.assert_array_equal(np.asarray(u.quant.scale), np.asarray(t.quant.scale))
            assert np.asarray(u.quant.scale).dtype == np.asarray(t.quant.scale).dtype
            np.testing.assert_array_equal(np.asarray(u.quant.zero_point), np.asarray(t.quant.zero_point))
            assert (u.quant.dtype, u.quant.axis) == (t.quant.dtype, t.quant.axis)
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in a.nodes] == \
           [(n.name, n.op_type, n.inputs, n.outputs) for n in b.nodes]
    for n, m in zip(a.nodes, b.nodes):
        assert set(n.attrs) == set(m.attrs)
        for k, v in n.attrs.items():
            if isinstance(v, np.ndarray):
                assert isinstance(m.attrs[k], np.ndarray) and m.attrs[k].dtype == v.dtype
                np.testing.assert_array_equal(m.attrs[k], v)
            elif k == "nested":
                assert m.attrs[k] == [2.0, "s", [1, 2]]
            else:
                assert m.attrs[k] == v


def test_float_round_trip(tmp_path):
    g = _graph()
    path = save_graph(g, tmp_path / "sub" / "m.qmace")
    g2 = load_graph(path)
    _same_graph(g, g2)
    assert g2.tensors["idx"].data.shape == ()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    # (the extra test attributes are not ONNX attributes: run on the reference backend)
    np.testing.assert_array_equal(Session(g2, "reference").run({"x": x})["y"], Session(g, "reference").run({"x": x})["y"])


def test_quantized_round_trip_params_exact(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    per_channel = qmath.params_symmetric(w, 0, "int8")
    per_tensor = qmath.params_asymmetric(-1.3, 2.7, "uint8")
    g = Graph(name="q", inputs=["x"], outputs=["x"])
    g.add_tensor(Tensor("x", "float32", (1, 3, 4, 4)))
    g.add_tensor(Tensor("wq", "int8", w.shape, qmath.quantize(w, per_channel), per_channel))
    g.add_tensor(Tensor("a", "uint8", (1, 8, 4, 4), None, per_tensor))
    b_qp = qmath.bias_params(per_tensor, per_channel)
    g.add_tensor(Tensor("bq", "int32", (8,), qmath.quantize_bias(rng.standard_normal(8), per_tensor, per_channel),
                        b_qp))
    g2 = load_graph(save_graph(g, tmp_path / "q.qmace"))
    _same_graph(g, g2)
    assert g2.tensors["wq"].quant.is_per_channel and g2.tensors["wq"].quant.axis == 0
    assert g2.tensors["a"].is_quantized


def test_loaded_without_pickle(tmp_path, monkeypatch):
    path = save_graph(_graph(), tmp_path / "m.qmace")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert "__graph__" in z.files
        assert all(z[k].dtype != object for k in z.files)
    calls = []
    real_load = np.load

    def spy(*args, **kw):
        calls.append(kw.get("allow_pickle"))
        return real_load(*args, **kw)

    monkeypatch.setattr(np, "load", spy)
    load_graph(path)
    assert calls == [False]


def _rewrite_header(path, edit):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(arrays["__graph__"].tobytes())
    edit(doc)
    arrays["__graph__"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_version_mismatch(tmp_path):
    path = save_graph(_graph(), tmp_path / "m.qmace")
    _rewrite_header(path, lambda d: d.update(version=VERSION + 1))
    with pytest.raises(ModelError, match=rf"m.qmace: model file version {VERSION + 1} is not supported"):
        load_graph(path)


def test_wrong_format_name(tmp_path):
    path = save_graph(_graph(), tmp_path / "m.qmace")
    _rewrite_header(path, lambda d: d.update(format="other"))
    with pytest.raises(ModelError, match="not a qmace model file"):
        load_graph(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file(tmp_path, keep):
    path = save_graph(_graph(), tmp_path / "m.qmace")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match=r"m\.qmace: not a qmace model file, or truncated"):
        load_graph(path)


def test_other_bad_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_graph(tmp_path / "missing.qmace")
    (tmp_path / "text.qmace").write_text("hello")
    with pytest.raises(ModelError, match="text.qmace"):
        load_graph(tmp_path / "text.qmace")
    with zipfile.ZipFile(tmp_path / "zip.qmace", "w") as z:
        z.writestr("other.npy", b"")
    with pytest.raises(ModelError, match="zip.qmace"):
        load_graph(tmp_path / "zip.qmace")


def test_save_is_atomic(tmp_path):
    path = save_graph(_graph(), tmp_path / "m.qmace")
    before = path.read_bytes()
    g = _graph()
    g.metadata["bad"] = object()  # cannot be stored: the old file must survive intact, no temp left behind
    with pytest.raises(TypeError):
        save_graph(g, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qmace"]
