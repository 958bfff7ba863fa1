"""The qmace model file: one versioned file, no pickle.

Layout: an uncompressed NumPy ``.npz`` archive (a zip) holding
- ``__graph__``: UTF-8 JSON as a uint8 array — format name, version, graph name, inputs, outputs, metadata,
  tensors (name, dtype, shape, quantization parameters, key of their data) and nodes (op type, inputs,
  outputs, attributes);
- ``t<i>``: one array per constant tensor, ``a<i>`` one per array-valued attribute.
It loads with ``np.load(allow_pickle=False)``; the file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qmace.errors import ModelError
from qmace.fileio import atomic_write
from qmace.ir import Graph, Node, Tensor

FORMAT = "qmace-model"
VERSION = 1
EXTENSION = ".qmace"


def _encode_attr(v: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(v, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = v
        return {"__ndarray__": key}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_encode_attr(x, arrays) for x in v]
    return v


def _decode_attr(v: Any, arrays) -> Any:
    if isinstance(v, dict) and "__ndarray__" in v:
        return arrays[v["__ndarray__"]]
    if isinstance(v, list):
        return [_decode_attr(x, arrays) for x in v]
    return v


def save_graph(graph: Graph, path: str | Path) -> Path:
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    tensors = []
    for t in graph.tensors.values():
        key = None
        if t.data is not None:
            key = f"t{len(tensors)}"
            arrays[key] = np.asarray(t.data, order="C")
        tensors.append({
            "name": t.name,
            "dtype": t.dtype,
            "shape": None if t.shape is None else list(t.shape),
            "data": key,
            "quant": None if t.quant is None else t.quant.to_json(),
        })
    nodes = [
        {"name": n.name, "op_type": n.op_type, "inputs": n.inputs, "outputs": n.outputs,
         "attrs": {k: _encode_attr(v, arrays) for k, v in n.attrs.items()}}
        for n in graph.nodes
    ]
    doc = {
        "format": FORMAT, "version": VERSION, "name": graph.name, "inputs": graph.inputs,
        "outputs": graph.outputs, "metadata": graph.metadata, "tensors": tensors, "nodes": nodes,
    }
    header = np.frombuffer(json.dumps(doc, default=_json_default).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path, "wb") as f:
        np.savez(f, __graph__=header, **arrays)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a qmace model file")


def load_graph(path: str | Path) -> Graph:
    from qmace.quantize.qmath import QuantParams

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (run `qmace convert` first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ModelError(f"{path}: not a qmace model file, or truncated ({e})") from e
    if "__graph__" not in arrays:
        raise ModelError(f"{path}: not a qmace model file (no graph header)")
    try:
        doc = json.loads(arrays.pop("__graph__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: corrupt graph header ({e})") from e
    if doc.get("format") != FORMAT:
        raise ModelError(f"{path}: not a qmace model file (format {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise ModelError(f"{path}: model file version {doc.get('version')} is not supported (expected {VERSION})")
    g = Graph(name=doc["name"], inputs=doc["inputs"], outputs=doc["outputs"], metadata=doc["metadata"])
    for t in doc["tensors"]:
        g.add_tensor(Tensor(
            t["name"], t["dtype"], None if t["shape"] is None else tuple(t["shape"]),
            arrays[t["data"]] if t["data"] else None,
            QuantParams.from_json(t["quant"]) if t["quant"] else None,
        ))
    for n in doc["nodes"]:
        g.nodes.append(Node(n["name"], n["op_type"], n["inputs"], n["outputs"],
                            {k: _decode_attr(v, arrays) for k, v in n["attrs"].items()}))
    return g
