"""ONNX frontend: an ONNX file (opsets 7 to 28) -> ``ir.Graph`` with opset-21 semantics.

Older models are first converted to opset 21 with ONNX's version converter, so every kernel implements
one form of each op. Newer models (22 to 28) are read as they are: for the ops qmace supports, opsets
22-28 only add element types, except for five attributes that have an opset-21 equivalent and are
translated by ``_to_opset21`` (or refused with a named error when their value has none). Initializers and
Constant nodes become constant tensors; every unsupported op is reported in one error with its node count.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePath

import onnx
from onnx import TensorProto

from qmace import limits
from qmace.errors import FileAccessError, ModelError, PathError, UnsupportedOpsError, first_line
from qmace.fileio import os_reason
from qmace.ir import Graph, check_structure
from qmace.onnx_bridge import attr_value, declared_bytes, graph_from_onnx
from qmace.ops import get_op, is_supported

log = logging.getLogger(__name__)

# MAX_OPSET: the newest opset whose schemas of every supported op were compared with opset 21
# (tests/test_onnx_frontend_opsets.py fails when the installed onnx changes one of them beyond it).
MIN_OPSET, MAX_OPSET, TARGET_OPSET = 7, 28, 21


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file, with its external data.

    Tensors stored as external data are read from files beside it (never from outside its folder). Every
    declared tensor is checked against the memory budget before anything is allocated.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The ``onnx.ModelProto`` with all tensor data loaded.

    Raises:
        ModelError: missing, empty, truncated or not ONNX; bad tensor declarations or external data.
        PathError: external data located outside the model's folder.
        FileAccessError: the file or its external data cannot be read.
        ResourceLimitError: a tensor over the memory budget.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileAccessError(f"{path}: cannot read: {os_reason(e)}") from None
    if not data:
        raise ModelError(f"{path}: model file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise ModelError(f"{path}: not an ONNX model, or truncated ({type(e).__name__})") from e
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model, or truncated (no graph nodes)")
    load_external_data(model, path)
    return model


def _all_tensors(model: onnx.ModelProto):
    """Initializers and tensor-valued node attributes of the main graph, with a label for messages."""
    for t in model.graph.initializer:
        yield f"initializer {t.name!r}", t
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield f"node {n.name or n.op_type!r} attribute {a.name!r}", a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    yield f"node {n.name or n.op_type!r} attribute {a.name!r}", t


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every tensor against the memory budget and read external data relative to the model file's folder.

    Args:
        model: the parsed model; its external-data tensors are filled in place.
        path: the model file (its folder is where external data must live).

    Raises:
        PathError: a location that is absolute or leaves the folder.
        ModelError: a missing file, a block past its end, a size that contradicts the shape, bad metadata.
        FileAccessError: the data file cannot be read.
        ResourceLimitError: a tensor over the memory budget.
    """
    base = path.parent.resolve()
    external = False
    for label, t in _all_tensors(model):
        where = f"{path}: {label}"
        nbytes = declared_bytes(t, where)
        limits.check_tensor_bytes(nbytes, where)
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or "\0" in loc:
            raise ModelError(f"{where}: external data without a valid location")
        if os.path.isabs(loc) or PurePath(loc).is_absolute() or ".." in PurePath(loc.replace("\\", "/")).parts:
            raise PathError(f"{where}: external data location {loc!r} leaves the model's folder {base}")
        file = (base / loc).resolve()
        if not file.is_relative_to(base):
            raise PathError(f"{where}: external data location {loc!r} leaves the model's folder {base}")
        if not file.is_file():
            raise ModelError(f"{where}: external data file {file} not found")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else file.stat().st_size - offset
        except ValueError:
            raise ModelError(f"{where}: external data offset/length are not integers") from None
        size = file.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(f"{where}: external data block (offset {offset}, length {length}) lies past the "
                             f"end of {file} ({size} bytes)")
        if length != nbytes:
            raise ModelError(f"{where}: external data holds {length} bytes, the tensor's shape "
                             f"{list(t.dims)} needs {nbytes}")
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(base))
        except OSError as e:
            raise FileAccessError(f"{path}: cannot read external data: {os_reason(e)}") from None


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain.

    Args:
        model: the model.

    Returns:
        The version imported for ``""``/``ai.onnx``, 1 when none is.
    """
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


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


def _check_arity(model: onnx.ModelProto, path: Path) -> None:
    """Each node's input/output count and required attributes against its ONNX schema (at the model's
    opset): a malformed node is named here instead of failing inside a pass or a kernel."""
    opset = default_opset(model)
    for i, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue  # an op unknown to this opset: the upgrade/support checks above have named it
        where = f"{path}: node {n.name or f'{n.op_type}_{i}'!r} ({n.op_type})"
        n_in = len(n.input)
        while n_in and not n.input[n_in - 1]:  # trailing optional inputs may be written as ""
            n_in -= 1
        if not schema.min_input <= n_in <= schema.max_input:
            raise ModelError(f"{where}: {n_in} input(s), the op takes {schema.min_input} to {schema.max_input}")
        if not schema.min_output <= len(n.output) <= schema.max_output:
            raise ModelError(f"{where}: {len(n.output)} output(s), the op gives {schema.min_output} to "
                             f"{schema.max_output}")
        given = {a.name for a in n.attribute}
        missing = [k for k, a in schema.attributes.items() if a.required and k not in given]
        if missing:
            raise ModelError(f"{where}: required attribute(s) missing: {', '.join(missing)}")


# Attributes added after opset 21 to ops qmace supports: name -> (op types, values meaning the opset-21
# behaviour). Cast.round_mode only rounds to float8e8m0; SpaceToDepth.mode DCR is opset 21's order; Q.precision / DQ.output_dtype name a float type
# (0 = the scale's, which is float32 here); Range.stash_type is the accumulation precision (float32 or
# wider: qmace accumulates in the input type, as ORT does).
_NEWER_ATTRS: dict[str, tuple[tuple[str, ...], tuple]] = {
    "round_mode": (("Cast",), ("up", "down")),
    "precision": (("QuantizeLinear",), (0, TensorProto.FLOAT)),
    "output_dtype": (("DequantizeLinear",), (0, TensorProto.FLOAT)),
    "stash_type": (("Range",), (0, TensorProto.FLOAT, TensorProto.DOUBLE)),
    "mode": (("SpaceToDepth",), ("DCR",)),  # opset 28; DCR is the only order before it
}


def _to_opset21(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """A model of opset 22-28 with opset-21 attributes (see ``_NEWER_ATTRS``); the graph is otherwise kept."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        if not is_supported(n.op_type):
            continue  # _check_supported names it
        try:
            schema = onnx.defs.get_schema(n.op_type, max(TARGET_OPSET, get_op(n.op_type).onnx_opset))
        except onnx.defs.SchemaError:  # an installed onnx older than the op: shape inference reports it
            continue
        known = set(schema.attributes)
        for a in list(n.attribute):
            if a.name in known:
                continue
            ops, ok = _NEWER_ATTRS.get(a.name, ((), ()))
            value = attr_value(a)
            if n.op_type not in ops or value not in ok:
                raise ModelError(f"{path}: {n.op_type} node {n.name!r}: attribute {a.name}={value!r} "
                                 f"(opset {default_opset(model)}) is not supported")
            n.attribute.remove(a)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = TARGET_OPSET
    return model


def upgrade_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model at opset-21 semantics: older opsets converted up, 22-28 translated (``_to_opset21``).

    Args:
        model: the model as read.
        path: its file, for messages.

    Returns:
        The model at opset 21.

    Raises:
        ModelError: the version converter fails, or an opset-22+ attribute has no opset-21 equivalent.
    """
    opset = default_opset(model)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        raise ModelError(f"{path}: opset {opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}")
    if opset == TARGET_OPSET:
        return model
    if opset > TARGET_OPSET:
        return _to_opset21(model, path)
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, TARGET_OPSET)
    except Exception as e:
        raise ModelError(f"{path}: could not convert opset {opset} to {TARGET_OPSET}: {first_line(e)}") from e


def onnx_to_graph(model: onnx.ModelProto, path: str | Path = "<model>") -> Graph:
    """Convert an in-memory ONNX model to the IR (opset upgrade, op check, constants, shapes).

    Args:
        model: the model (its tensors already loaded).
        path: its file, for messages.

    Returns:
        The float (or QDQ-stripped) Graph at opset-21 semantics.

    Raises:
        UnsupportedOpsError: ops qmace has no kernel for (listed with counts).
        ModelError: malformed nodes (input/output counts, required attributes), cycles, shape inference
            failures, invalid Q/DQ patterns.
        ResourceLimitError: a declared shape over the memory budget.
    """
    path = Path(path)
    _check_supported(model, path)
    source_opset = default_opset(model)
    model = upgrade_opset(model, path)
    _check_supported(model, path)
    _check_arity(model, path)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # shape inference is advisory here; the IR passes re-run it
        log.debug("ONNX shape inference failed on %s: %s", path, e)
    graph = graph_from_onnx(model, path, {"source": str(path), "source_opset": source_opset})
    check_structure(graph, path)
    from qmace.frontends.qdq_import import strip_qdq  # QuantizeLinear/DequantizeLinear -> fixed params

    return strip_qdq(graph)


def load_onnx(path: str | Path) -> Graph:
    """Read an ONNX file and convert it to the IR (``read_onnx`` then ``onnx_to_graph``).

    Args:
        path: the ``.onnx`` file.

    Returns:
        The Graph.

    Raises:
        ModelError, UnsupportedOpsError, PathError, FileAccessError, ResourceLimitError: as for
            ``read_onnx`` and ``onnx_to_graph``.
    """
    path = Path(path)
    return onnx_to_graph(read_onnx(path), path)
