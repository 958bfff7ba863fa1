"""Read a ``.tflite`` file with the ``tflite`` package's flatbuffer accessors into plain typed records.

Everything the converter needs is copied out of the flatbuffer here, once, and checked:
- the file identifier ``TFL3`` (bytes 4..8) and a readable root table;
- one subgraph (the model's ``main``; control-flow subgraphs are not supported);
- every constant's bytes lie inside the file and hold exactly ``prod(shape)`` elements of its type
  (a truncated file fails here, naming the tensor); sparse constants (``sparsity``) are densified;
- quantization parameters: ``scale`` (float32), ``zero_point`` (int64), ``quantized_dimension``.
Builtin options stay the ``tflite`` package's accessor objects (``TflOp.options``); the op converters read
the fields they need. Nothing here knows about qmace's IR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.errors import ModelError

try:  # the accessors are a dependency of qmace; this guard only makes the message readable
    import tflite as _tfl
except ImportError:  # pragma: no cover - tflite is in qmace's dependencies
    _tfl = None

__all__ = ["TflModel", "TflOp", "TflQuant", "TflTensor", "read_tflite"]

# TensorType enum -> numpy dtype (types qmace can hold; others are named in the error)
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
           10: "float64", 15: "uint32", 16: "uint16"}
_TYPE_NAMES = {0: "FLOAT32", 1: "FLOAT16", 2: "INT32", 3: "UINT8", 4: "INT64", 5: "STRING", 6: "BOOL",
               7: "INT16", 8: "COMPLEX64", 9: "INT8", 10: "FLOAT64", 11: "COMPLEX128", 12: "UINT64",
               13: "RESOURCE", 14: "VARIANT", 15: "UINT32", 16: "UINT16", 17: "INT4", 18: "BFLOAT16"}
SUPPORTED_DTYPES = frozenset(_DTYPES.values())
CUSTOM = 32  # BuiltinOperator.CUSTOM
# Errors the generated accessors raise on bytes that are not a valid flatbuffer (offsets past the end, ...)
_READ_ERRORS = (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError, AttributeError)


@dataclass(frozen=True)
class TflQuant:
    """``real = scale * (q - zero_point)``; per tensor when ``scale`` has one entry, else along ``axis``."""

    scale: np.ndarray  # float32 (K,)
    zero_point: np.ndarray  # int64 (K,)
    axis: int  # quantized_dimension (meaningful when K > 1)

    @property
    def per_axis(self) -> bool:
        """True when there is one scale per index of ``axis``."""
        return self.scale.size > 1


@dataclass
class TflTensor:
    """One tensor of a ``.tflite`` subgraph: index, name, dtype, static (NHWC) shape and shape signature (-1:
    dynamic), data for constants (densified), quantization parameters.
    """
    index: int
    name: str
    dtype: str  # numpy dtype name; TFLite's type name (e.g. "STRING") for types qmace cannot hold
    shape: tuple[int, ...]  # static shape as stored (NHWC for images)
    signature: tuple[int, ...]  # shape_signature: -1 marks a dynamic dimension
    data: np.ndarray | None = None  # constants only, already densified, shaped ``shape``
    quant: TflQuant | None = None


@dataclass
class TflOp:
    """One operator: builtin name (or ``CUSTOM`` with its code and options), input/output tensor indices
    (-1: omitted optional input), and the parsed options table.
    """
    index: int
    op: str  # builtin name ("CONV_2D") or "CUSTOM"
    inputs: list[int]  # tensor indices, -1 = omitted optional input
    outputs: list[int]
    options: object | None = None  # the tflite package's options table (e.g. tflite.Conv2DOptions)
    custom_code: str = ""
    custom_options: bytes = b""

    @property
    def label(self) -> str:
        """The operator's name for messages (``CONV_2D``, ``CUSTOM 'name'``)."""
        return f"CUSTOM {self.custom_code!r}" if self.op == "CUSTOM" else self.op


@dataclass
class TflModel:
    """A read ``.tflite`` file: its path, schema version, description, the main subgraph's tensors, operators and
    input/output indices, and its metadata entries.
    """
    path: Path
    version: int
    description: str
    tensors: list[TflTensor]
    ops: list[TflOp]
    inputs: list[int]
    outputs: list[int]
    metadata: dict[str, str] = field(default_factory=dict)


def _options_classes() -> dict[int, type]:
    return {v: getattr(_tfl, k) for k, v in vars(_tfl.BuiltinOptions).items()
            if not k.startswith("_") and isinstance(v, int) and hasattr(_tfl, k)}


def _op_name(code) -> tuple[int, str]:
    # builtin_code (int32) superseded deprecated_builtin_code (int8) at 127 operators; take the larger
    builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
    if builtin == CUSTOM:
        return builtin, "CUSTOM"
    return builtin, _tfl.BUILTIN_OPCODE2NAME.get(builtin, f"BUILTIN_{builtin}")


def _union_vector(kind: int, table) -> np.ndarray:
    """Values of a sparsity index vector (union of Int32Vector / Uint16Vector / Uint8Vector)."""
    cls = {1: _tfl.Int32Vector, 2: _tfl.Uint16Vector, 3: _tfl.Uint8Vector}.get(kind)
    if cls is None or table is None:
        return np.zeros(0, np.int64)
    v = cls()
    v.Init(table.Bytes, table.Pos)
    if v.ValuesLength() == 0:
        return np.zeros(0, np.int64)
    return np.asarray(v.ValuesAsNumpy(), np.int64)


def densify(values: np.ndarray, shape: tuple[int, ...], sparsity) -> np.ndarray:
    """TFLite's sparse tensor format -> dense array of ``shape``.

    ``traversal_order`` lists the stored dimensions (the tensor's, then block dimensions); dimension k of
    the traversal is DENSE (``dense_size`` entries) or SPARSE_CSR (entries ``indices[segments[p] :
    segments[p + 1]]`` below parent position ``p``). Values are stored in traversal order. A block
    dimension ``b`` (``block_map[b - rank]`` = the tensor dimension it splits) adds ``i_b`` to
    ``i_d * block_size``.

    Args:
        values: the stored values, in traversal order.
        shape: the dense shape.
        sparsity: the tflite package's ``SparsityParameters``.

    Returns:
        The dense array.

    Raises:
        ValueError: sparsity metadata that does not fit the values (``read_tflite`` turns it into ModelError).
    """
    rank = len(shape)
    order = [int(x) for x in sparsity.TraversalOrderAsNumpy()]
    block_map = [int(x) for x in sparsity.BlockMapAsNumpy()] if sparsity.BlockMapLength() else []
    dims = [sparsity.DimMetadata(k) for k in range(sparsity.DimMetadataLength())]
    if len(dims) != len(order):
        raise ValueError("dim_metadata and traversal_order differ in length")
    block_size = {block_map[b]: dims[order.index(rank + b)].DenseSize() for b in range(len(block_map))}
    dense = np.zeros(shape, values.dtype)
    coords = np.zeros((1, 0), np.int64)  # one row per stored position so far, one column per level
    positions = np.zeros(1, np.int64)  # position of each row in its level's storage
    for md in dims:
        if md.Format() == 0:  # DENSE: every parent position has dense_size children
            size = int(md.DenseSize())
            lane = np.tile(np.arange(size, dtype=np.int64), len(positions))
            coords = np.column_stack([np.repeat(coords, size, axis=0), lane])
            positions = np.repeat(positions, size) * size + lane
        else:  # SPARSE_CSR: parent p owns entries segments[p] .. segments[p + 1] of indices
            seg = _union_vector(md.ArraySegmentsType(), md.ArraySegments())
            idx = _union_vector(md.ArrayIndicesType(), md.ArrayIndices())
            counts = seg[positions + 1] - seg[positions]
            parent = np.repeat(np.arange(len(positions)), counts)
            j = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
            j += np.repeat(seg[positions], counts)
            coords = np.column_stack([coords[parent], idx[j]])
            positions = j
    if len(coords) != values.size:
        raise ValueError(f"sparse layout addresses {len(coords)} values, the buffer holds {values.size}")
    index = np.zeros((len(coords), rank), np.int64)
    for k, dim in enumerate(order):
        if dim < rank:
            index[:, dim] += coords[:, k] * block_size.get(dim, 1)
        else:
            index[:, block_map[dim - rank]] += coords[:, k]
    dense[tuple(index.T)] = values.reshape(-1)
    return dense


def _quant(t) -> TflQuant | None:
    q = t.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    scale = np.asarray(q.ScaleAsNumpy(), np.float32).reshape(-1)
    zp = np.asarray(q.ZeroPointAsNumpy(), np.int64).reshape(-1) if q.ZeroPointLength() else np.zeros(scale.shape, np.int64)
    if zp.size == 1 and scale.size > 1:
        zp = np.full(scale.shape, int(zp[0]), np.int64)
    return TflQuant(scale, zp, int(q.QuantizedDimension()))


def _constant(model, data: bytes, t, path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    bi = int(t.Buffer())
    if bi <= 0 or bi >= model.BuffersLength():  # buffer 0 is the empty sentinel
        return None
    buf = model.Buffers(bi)
    offset, size = int(buf.Offset()), int(buf.Size())
    if offset > 1:  # large models keep buffers after the flatbuffer (offset from the file start)
        if offset + size > len(data):
            raise ModelError(f"{path}: tensor {name!r}: buffer {bi} ends at byte {offset + size}, past the end "
                             f"of the file ({len(data)} bytes): the file is truncated")
        raw = data[offset:offset + size]
    elif buf.DataLength() == 0:
        return None
    else:
        try:
            raw = bytes(buf.DataAsNumpy())
        except ValueError as e:  # numpy refuses a vector that runs past the end of the bytes
            raise ModelError(f"{path}: tensor {name!r}: buffer {bi} runs past the end of the file: the file is "
                             "truncated") from e
    values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    sp = t.Sparsity()
    if sp is not None:
        try:
            return densify(values, shape, sp)
        except (ValueError, IndexError) as e:
            raise ModelError(f"{path}: tensor {name!r}: unreadable sparse layout ({e})") from e
    count = int(np.prod(shape, dtype=np.int64))
    if values.size != count:
        raise ModelError(f"{path}: tensor {name!r}: buffer {bi} holds {values.size} {dtype} values, shape "
                         f"{list(shape)} needs {count}: the file is truncated or corrupt")
    return values.reshape(shape)


def _read_tensor(model, data: bytes, sg, i: int, path: Path) -> TflTensor:
    t = sg.Tensors(i)
    name = (t.Name() or b"").decode("utf-8") or f"tensor_{i}"
    ttype = int(t.Type())
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    signature = tuple(int(d) for d in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else shape
    if ttype not in _DTYPES:
        # a tensor qmace cannot hold; reported only if an op of the model uses it (converter)
        return TflTensor(i, name, _TYPE_NAMES.get(ttype, f"type {ttype}"), shape, signature)
    dtype = _DTYPES[ttype]
    return TflTensor(i, name, dtype, shape, signature, _constant(model, data, t, path, name, dtype, shape), _quant(t))


def read_tflite(path: str | Path) -> TflModel:
    """Read and check a ``.tflite`` file (see the module docstring).

    Args:
        path: the file.

    Returns:
        The TflModel.

    Raises:
        ModelError: naming the file and the tensor or operator that is wrong (or the file missing, not a
            flatbuffer, with several subgraphs, ...).
    """
    path = Path(path)
    if _tfl is None:  # pragma: no cover
        raise ModelError(f"{path}: reading .tflite files needs the 'tflite' package (pip install tflite)")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        got = data[4:8] if len(data) >= 8 else data
        raise ModelError(f"{path}: not a TFLite flatbuffer (file identifier {got!r}, expected b'TFL3')")
    try:
        model = _tfl.Model.GetRootAsModel(data, 0)
        n_sub = model.SubgraphsLength()
        if n_sub == 0:
            raise ModelError(f"{path}: the TFLite model has no subgraph")
        sg = model.Subgraphs(0)
        opts = _options_classes()
        codes = [_op_name(model.OperatorCodes(k)) + (model.OperatorCodes(k),) for k in range(model.OperatorCodesLength())]
        tensors = [_read_tensor(model, data, sg, i, path) for i in range(sg.TensorsLength())]
        ops = []
        for k in range(sg.OperatorsLength()):
            o = sg.Operators(k)
            ci = int(o.OpcodeIndex())
            if ci >= len(codes):
                raise ModelError(f"{path}: operator {k}: opcode index {ci} out of range")
            builtin, name, code = codes[ci]
            options = None
            table = o.BuiltinOptions()
            kind = int(o.BuiltinOptionsType())
            if table is not None and kind in opts:
                options = opts[kind]()
                options.Init(table.Bytes, table.Pos)
            custom = (code.CustomCode() or b"").decode("utf-8") if builtin == CUSTOM else ""
            copts = bytes(o.CustomOptionsAsNumpy()) if o.CustomOptionsLength() else b""
            ins = [int(x) for x in o.InputsAsNumpy()] if o.InputsLength() else []
            outs = [int(x) for x in o.OutputsAsNumpy()] if o.OutputsLength() else []
            for ti in ins + outs:
                if ti >= len(tensors):
                    raise ModelError(f"{path}: operator {k} ({name}): tensor index {ti} out of range")
            ops.append(TflOp(k, name, ins, outs, options, custom, copts))
        inputs = [int(x) for x in sg.InputsAsNumpy()] if sg.InputsLength() else []
        outputs = [int(x) for x in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
        meta = {}
        for k in range(model.MetadataLength()):
            md = model.Metadata(k)
            meta[(md.Name() or b"").decode("utf-8", "replace")] = str(md.Buffer())
        desc = (model.Description() or b"").decode("utf-8", "replace")
        version = int(model.Version())
    except ModelError:
        raise
    except _READ_ERRORS as e:
        raise ModelError(f"{path}: truncated or corrupt TFLite flatbuffer of {len(data)} bytes "
                         f"({type(e).__name__}: {e})") from e
    if n_sub > 1:
        used = {op.op for op in ops}
        if used & {"WHILE", "IF", "CALL_ONCE", "CALL"}:
            raise ModelError(f"{path}: control flow ({', '.join(sorted(used & {'WHILE', 'IF', 'CALL_ONCE', 'CALL'}))}) "
                             "over several subgraphs is not supported")
    return TflModel(path, version, desc, tensors, ops, inputs, outputs, meta)
