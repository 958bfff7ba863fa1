"""The qmace model file: one versioned file, no pickle.

Layout: an uncompressed NumPy ``.npz`` archive (a zip) holding
- ``__graph__``: UTF-8 JSON as a uint8 array — format name, version, graph name, inputs, outputs, metadata,
  tensors (name, dtype, shape, quantization parameters, key of their data) and nodes (op type, inputs,
  outputs, attributes);
- ``t<i>``: one array per constant tensor, ``a<i>`` one per array-valued attribute;
- ``__sha256__``: the hex sha256 over the header bytes and, in key order, every array's key, dtype, shape and
  bytes. ``load_graph`` recomputes it, so a file edited after it was written (one weight changed, a header that
  lies about a shape) is refused.
It loads with ``np.load(allow_pickle=False)``; the file is written to a temporary name and renamed. The header
is validated before any graph object is built: types, tensor shapes x dtypes against the stored arrays, op
names known to qmace, every node input defined, no cycle, each array within the memory budget.
Version 2 added the content hash (version 1 files are refused with the command that rebuilds them).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qmace import limits
from qmace.errors import ModelError, ModelFileError, first_line
from qmace.fileio import atomic_write
from qmace.ir import Graph, Node, Tensor, check_structure

FORMAT = "qmace-model"
VERSION = 2
HASH_KEY = "__sha256__"
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
    """Write ``graph`` to ``path`` in the format above (temporary file + rename, with the content hash).

    Args:
        graph: the graph to save (tensors, nodes, quantization parameters, metadata).
        path: the file to write.

    Returns:
        The path written.

    Raises:
        FileAccessError: naming the path when it cannot be written.
        TypeError: metadata that JSON cannot hold (a bug of the caller).
    """
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
    metadata = dict(graph.metadata)
    if graph.fixed_params:  # stored as before the field existed: metadata "qdq_params", name -> JSON
        metadata["qdq_params"] = {k: qp.to_json() for k, qp in graph.fixed_params.items()}
    doc = {
        "format": FORMAT, "version": VERSION, "name": graph.name, "inputs": graph.inputs,
        "outputs": graph.outputs, "metadata": metadata, "tensors": tensors, "nodes": nodes,
    }
    header = np.frombuffer(json.dumps(doc, default=_json_default).encode("utf-8"), dtype=np.uint8)
    digest = content_sha256(header, arrays)
    with atomic_write(path, "wb") as f:
        np.savez(f, __graph__=header, **arrays, **{HASH_KEY: np.frombuffer(digest.encode("ascii"), np.uint8)})
    return path


def content_sha256(header: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    """The model file's content hash.

    sha256 over the header bytes, then per array (sorted by key): key, dtype, shape, C-order bytes.

    Args:
        header: the JSON header as a uint8 array (with the hash field left empty).
        arrays: the stored arrays by key.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(header).tobytes())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"\n{key}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a qmace model file")


def load_graph(path: str | Path) -> Graph:
    """Read, verify and validate a ``.qmace`` file.

    Args:
        path: the model file.

    Returns:
        Its graph.

    Raises:
        ModelError, ModelFileError: naming the file for a missing, truncated, tampered (content hash) or
            malformed (header schema, unknown ops, cycles) file.
        ResourceLimitError: an array over the memory budget.
    """
    from qmace.qmath import QuantParams

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (run `qmace convert` first)")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                limits.check_tensor_bytes(info.file_size, f"{path}: array {info.filename!r}")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, KeyError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: zipfile on a flipped "encrypted" flag bit
        raise ModelFileError(f"{path}: not a qmace model file, or truncated ({first_line(e, 200)})") from e
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from e
    if "__graph__" not in arrays:
        raise ModelFileError(f"{path}: not a qmace model file (no graph header)")
    header = arrays.pop("__graph__")
    stored = arrays.pop(HASH_KEY, None)
    try:
        doc = json.loads(header.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt graph header ({type(e).__name__})") from e
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: corrupt graph header (not a JSON object)")
    if doc.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a qmace model file (format {str(doc.get('format'))[:40]!r})")
    if doc.get("version") != VERSION:
        raise ModelFileError(f"{path}: model file version {str(doc.get('version'))[:20]} is not supported "
                             f"(expected {VERSION}); rebuild it with `qmace convert`")
    if stored is None or stored.dtype != np.uint8:
        raise ModelFileError(f"{path}: no content hash; the file was not written by qmace {VERSION}")
    if bytes(stored).decode("ascii", "replace") != content_sha256(header, arrays):
        raise ModelFileError(f"{path}: content hash mismatch: the file was modified after qmace wrote it "
                             "(rebuild it with `qmace convert`)")
    _validate(doc, arrays, path)
    try:
        metadata = dict(doc["metadata"])
        fixed = metadata.pop("qdq_params", None) or {}
        g = Graph(name=doc["name"], inputs=list(doc["inputs"]), outputs=list(doc["outputs"]),
                  metadata=metadata, fixed_params={k: QuantParams.from_json(v) for k, v in dict(fixed).items()})
        for t in doc["tensors"]:
            g.add_tensor(Tensor(
                t["name"], t["dtype"], None if t["shape"] is None else tuple(t["shape"]),
                arrays[t["data"]] if t["data"] else None,
                QuantParams.from_json(t["quant"]) if t["quant"] else None,
            ))
        for n in doc["nodes"]:
            g.nodes.append(Node(n["name"], n["op_type"], list(n["inputs"]), list(n["outputs"]),
                                {k: _decode_attr(v, arrays) for k, v in n["attrs"].items()}))
    except ModelError:
        raise
    except Exception as e:  # QuantizationError from malformed params, or anything _validate let through
        raise ModelFileError(f"{path}: invalid graph header: {first_line(e, 200)}") from e
    check_structure(g, path)
    return g


_DTYPES = frozenset({"float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                     "int64", "uint64", "bool"})


def _validate(doc: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    """The header's schema: every field of the right type, constants matching their stored arrays (dtype and
    shape), op types known to qmace, names resolving. ModelFileError naming the file and the entry."""
    from qmace.ops import is_supported

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: invalid graph header: {what}")

    def names(v: Any, what: str) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise bad(f"{what} must be a list of names")
        return v

    for key, typ in (("name", str), ("inputs", list), ("outputs", list), ("metadata", dict), ("tensors", list),
                     ("nodes", list)):
        if not isinstance(doc.get(key), typ):
            raise bad(f"{key!r} missing or not a {typ.__name__}")
    tensors: set[str] = set()
    for i, t in enumerate(doc["tensors"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tensors[{i}] is not a tensor entry with a name")
        where = f"tensor {t['name'][:80]!r}"
        if t["name"] in tensors:
            raise bad(f"{where} listed twice")
        tensors.add(t["name"])
        if not isinstance(t.get("dtype"), str) or t["dtype"] not in _DTYPES:
            raise bad(f"{where}: unknown dtype {str(t.get('dtype'))[:40]!r}")
        shape = t.get("shape")
        if shape is not None and (not isinstance(shape, list) or not all(
                d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape)):
            raise bad(f"{where}: shape must be a list of non-negative integers")
        if shape is not None and all(d is not None for d in shape):
            limits.check_tensor_bytes(math.prod(shape) * np.dtype(t["dtype"]).itemsize, f"{path}: {where}")
        key = t.get("data")
        if key is not None:
            if not isinstance(key, str) or key not in arrays:
                raise bad(f"{where}: its data {str(key)[:40]!r} is not in the file")
            arr = arrays[key]
            if str(arr.dtype) != t["dtype"] or shape is None or list(arr.shape) != shape:
                raise bad(f"{where}: the header says {t['dtype']} {shape}, the stored array is "
                          f"{arr.dtype} {list(arr.shape)}")
        if t.get("quant") is not None and not isinstance(t["quant"], dict):
            raise bad(f"{where}: quantization parameters must be a mapping")
    for i, n in enumerate(doc["nodes"]):
        if not isinstance(n, dict) or not isinstance(n.get("name"), str) or not isinstance(n.get("op_type"), str):
            raise bad(f"nodes[{i}] is not a node entry with a name and an op type")
        where = f"node {n['name'][:80]!r}"
        if not is_supported(n["op_type"]):
            raise bad(f"{where}: unknown op type {n['op_type'][:40]!r}")
        for field_ in ("inputs", "outputs"):
            for x in names(n.get(field_), f"{where} {field_}"):
                if x and x not in tensors:
                    raise bad(f"{where}: {field_[:-1]} {x[:80]!r} is not a tensor of the file")
        if not isinstance(n.get("attrs"), dict):
            raise bad(f"{where}: attrs must be a mapping")
        for k, v in n["attrs"].items():
            _check_attr(v, arrays, lambda what, k=k, w=where: bad(f"{w} attribute {k[:40]!r}: {what}"))
    for field_ in ("inputs", "outputs"):
        for x in names(doc[field_], field_):
            if x not in tensors:
                raise bad(f"graph {field_[:-1]} {x[:80]!r} is not a tensor of the file")


def _check_attr(v: Any, arrays: dict[str, np.ndarray], bad, depth: int = 0) -> None:
    if depth > 4:
        raise bad("nested too deeply")
    if isinstance(v, dict):
        if set(v) != {"__ndarray__"} or not isinstance(v["__ndarray__"], str) or v["__ndarray__"] not in arrays:
            raise bad("not a value qmace writes")
    elif isinstance(v, list):
        for x in v:
            _check_attr(x, arrays, bad, depth + 1)
    elif v is not None and not isinstance(v, (str, int, float, bool)):
        raise bad("not a value qmace writes")
