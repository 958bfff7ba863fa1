"""ONNX frontend: an ONNX file (opsets 7 to 21) -> ``ir.Graph`` with opset-21 semantics.

Older models are first converted to opset 21 with ONNX's version converter, so every kernel implements
one form of each op. Initializers and Constant nodes become constant tensors; every unsupported op is
reported in one error with its node count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qmace.errors import ModelError, UnsupportedOpsError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import is_supported

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET, TARGET_OPSET = 7, 21, 21


def read_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: model file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise ModelError(f"{path}: not an ONNX model, or truncated ({type(e).__name__})") from e
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model, or truncated (no graph nodes)")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _np_dtype(elem_type: int) -> str:
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _attr_value(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list):
        return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v]
    return v


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


# Old op types that ONNX's version converter rewrites into supported ones (Upsample -> Resize).
_UPGRADED_AWAY = {"Upsample"}


def _check_supported(model: onnx.ModelProto, path: Path) -> None:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        name = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        if n.op_type in ("Constant", *_UPGRADED_AWAY) and n.domain in ("", "ai.onnx"):
            continue
        if n.domain not in ("", "ai.onnx") or not is_supported(n.op_type):
            counts[name] = counts.get(name, 0) + 1
    if counts:
        items = ", ".join(f"{k} ({v} node{'s' if v > 1 else ''})" for k, v in sorted(counts.items()))
        raise UnsupportedOpsError(f"{path}: unsupported ops: {items}; see docs/supported-ops.md")


def _constant_node_value(n: onnx.NodeProto) -> np.ndarray:
    a = n.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), np.float32)
    if a.name == "value_int":
        return np.array(a.i, np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), np.int64)
    raise ModelError(f"Constant node {n.name!r}: attribute {a.name!r} is not supported")


def upgrade_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    opset = default_opset(model)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        raise ModelError(f"{path}: opset {opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}")
    if opset == TARGET_OPSET:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, TARGET_OPSET)
    except Exception as e:
        raise ModelError(f"{path}: could not convert opset {opset} to {TARGET_OPSET}: {str(e).splitlines()[0]}") from e


def onnx_to_graph(model: onnx.ModelProto, path: str | Path = "<model>") -> Graph:
    """Convert an in-memory ONNX model to the IR (opset upgrade, op check, constants, shapes)."""
    path = Path(path)
    _check_supported(model, path)
    model = upgrade_opset(model, path)
    _check_supported(model, path)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # shape inference is advisory here; the IR passes re-run it
        log.debug("ONNX shape inference failed on %s: %s", path, e)
    g = model.graph
    graph = Graph(name=g.name or path.stem, metadata={"source": str(path), "source_opset": default_opset(model)})
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        graph.add_tensor(Tensor(init.name, str(arr.dtype), tuple(arr.shape), arr))
    for vi in list(g.input):
        if vi.name in graph.tensors:  # old models list initializers as inputs too
            continue
        graph.add_tensor(Tensor(vi.name, _np_dtype(vi.type.tensor_type.elem_type), _shape_of(vi)))
        graph.inputs.append(vi.name)
    for vi in list(g.value_info) + list(g.output):
        if vi.name not in graph.tensors and vi.type.tensor_type.elem_type:
            graph.add_tensor(Tensor(vi.name, _np_dtype(vi.type.tensor_type.elem_type), _shape_of(vi)))
    used_names: set[str] = set()
    for i, n in enumerate(g.node):
        if n.op_type == "Constant":
            arr = _constant_node_value(n)
            graph.add_tensor(Tensor(n.output[0], str(arr.dtype), tuple(arr.shape), arr))
            continue
        name = n.name or f"{n.op_type}_{i}"
        while name in used_names:
            name = f"{name}_{i}"
        used_names.add(name)
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        graph.nodes.append(Node(name, n.op_type, list(n.input), list(n.output), attrs))
        for o in n.output:
            if o and o not in graph.tensors:
                graph.add_tensor(Tensor(o))
    graph.outputs = [o.name for o in g.output]
    for o in graph.outputs:
        if o not in graph.tensors:
            raise ModelError(f"{path}: graph output {o!r} is produced by no node")
    from qmace.frontends.qdq_import import strip_qdq  # QuantizeLinear/DequantizeLinear -> fixed params

    return strip_qdq(graph)


def load_onnx(path: str | Path) -> Graph:
    path = Path(path)
    return onnx_to_graph(read_onnx(path), path)
