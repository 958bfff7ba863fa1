"""TensorFlow's GraphDef messages, built at run time through protobuf's descriptor API (no TensorFlow).

The subset of ``tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types,versions}
.proto`` that a frozen graph uses is declared below as a ``FileDescriptorProto`` with TensorFlow's own
field numbers and wire types, added to a private ``DescriptorPool`` (so it never clashes with TensorFlow's
classes when both are loaded) and turned into message classes by ``message_factory``. Fields outside the
subset (function libraries, debug info, resource handles) are kept by protobuf as unknown fields.

``tensor_to_numpy`` follows ``tensorflow::Tensor::FromProto``: ``tensor_content`` holds the raw
little-endian array; otherwise the typed ``*_val`` list holds the values, and a list shorter than the
shape repeats its last element (``tf.constant(0.0, shape=[3])`` stores one value).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED

# DataType enum values (types.proto); *_REF types are value + 100.
DATA_TYPES = {
    0: "DT_INVALID", 1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16", 6: "DT_INT8",
    7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL", 11: "DT_QINT8", 12: "DT_QUINT8",
    13: "DT_QINT32", 14: "DT_BFLOAT16", 15: "DT_QINT16", 16: "DT_QUINT16", 17: "DT_UINT16", 18: "DT_COMPLEX128",
    19: "DT_HALF", 20: "DT_RESOURCE", 21: "DT_VARIANT", 22: "DT_UINT32", 23: "DT_UINT64",
}
NUMPY_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
                10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
# Which repeated field of TensorProto holds the values of each dtype when tensor_content is empty.
_VALUE_FIELD = {1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val", 6: "int_val",
                9: "int64_val", 10: "bool_val", 17: "int_val", 19: "half_val", 22: "uint32_val", 23: "uint64_val"}

# message name -> [(field name, number, type, label, message/enum type name)]
_MESSAGES: dict[str, list[tuple]] = {
    "TensorShapeProto.Dim": [("size", 1, F.TYPE_INT64, _OPT, None), ("name", 2, F.TYPE_STRING, _OPT, None)],
    "TensorShapeProto": [("dim", 2, F.TYPE_MESSAGE, _REP, "TensorShapeProto.Dim"),
                         ("unknown_rank", 3, F.TYPE_BOOL, _OPT, None)],
    "TensorProto": [
        ("dtype", 1, F.TYPE_ENUM, _OPT, "DataType"), ("tensor_shape", 2, F.TYPE_MESSAGE, _OPT, "TensorShapeProto"),
        ("version_number", 3, F.TYPE_INT32, _OPT, None), ("tensor_content", 4, F.TYPE_BYTES, _OPT, None),
        ("float_val", 5, F.TYPE_FLOAT, _REP, None), ("double_val", 6, F.TYPE_DOUBLE, _REP, None),
        ("int_val", 7, F.TYPE_INT32, _REP, None), ("string_val", 8, F.TYPE_BYTES, _REP, None),
        ("int64_val", 10, F.TYPE_INT64, _REP, None), ("bool_val", 11, F.TYPE_BOOL, _REP, None),
        ("half_val", 13, F.TYPE_INT32, _REP, None), ("uint32_val", 16, F.TYPE_UINT32, _REP, None),
        ("uint64_val", 17, F.TYPE_UINT64, _REP, None),
    ],
    "AttrValue.ListValue": [
        ("s", 2, F.TYPE_BYTES, _REP, None), ("i", 3, F.TYPE_INT64, _REP, None), ("f", 4, F.TYPE_FLOAT, _REP, None),
        ("b", 5, F.TYPE_BOOL, _REP, None), ("type", 6, F.TYPE_ENUM, _REP, "DataType"),
        ("shape", 7, F.TYPE_MESSAGE, _REP, "TensorShapeProto"), ("tensor", 8, F.TYPE_MESSAGE, _REP, "TensorProto"),
    ],
    "AttrValue": [  # all in oneof "value"
        ("list", 1, F.TYPE_MESSAGE, _OPT, "AttrValue.ListValue"), ("s", 2, F.TYPE_BYTES, _OPT, None),
        ("i", 3, F.TYPE_INT64, _OPT, None), ("f", 4, F.TYPE_FLOAT, _OPT, None), ("b", 5, F.TYPE_BOOL, _OPT, None),
        ("type", 6, F.TYPE_ENUM, _OPT, "DataType"), ("shape", 7, F.TYPE_MESSAGE, _OPT, "TensorShapeProto"),
        ("tensor", 8, F.TYPE_MESSAGE, _OPT, "TensorProto"), ("placeholder", 9, F.TYPE_STRING, _OPT, None),
    ],
    "NodeDef.AttrEntry": [("key", 1, F.TYPE_STRING, _OPT, None), ("value", 2, F.TYPE_MESSAGE, _OPT, "AttrValue")],
    "NodeDef": [("name", 1, F.TYPE_STRING, _OPT, None), ("op", 2, F.TYPE_STRING, _OPT, None),
                ("input", 3, F.TYPE_STRING, _REP, None), ("device", 4, F.TYPE_STRING, _OPT, None),
                ("attr", 5, F.TYPE_MESSAGE, _REP, "NodeDef.AttrEntry")],
    "VersionDef": [("producer", 1, F.TYPE_INT32, _OPT, None), ("min_consumer", 2, F.TYPE_INT32, _OPT, None),
                   ("bad_consumers", 3, F.TYPE_INT32, _REP, None)],
    "GraphDef": [("node", 1, F.TYPE_MESSAGE, _REP, "NodeDef"), ("version", 3, F.TYPE_INT32, _OPT, None),
                 ("versions", 4, F.TYPE_MESSAGE, _OPT, "VersionDef")],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="qmace/tensorflow_graphdef_subset.proto", package="tensorflow",
                                            syntax="proto3")
    enum = fd.enum_type.add(name="DataType")
    for number, name in DATA_TYPES.items():
        enum.value.add(name=name, number=number)
    top = {n: fd.message_type.add(name=n) for n in _MESSAGES if "." not in n}
    for full, fields in _MESSAGES.items():
        parent, _, child = full.partition(".")
        if child:
            msg = top[parent].nested_type.add(name=child)
            if child == "AttrEntry":
                msg.options.map_entry = True
        else:
            msg = top[parent]
        if full == "AttrValue":
            msg.oneof_decl.add(name="value")
        for name, number, ftype, label, type_name in fields:
            f = msg.field.add(name=name, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".tensorflow.{type_name}"
            if full == "AttrValue":
                f.oneof_index = 0
            if label == _REP and ftype not in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
                f.options.packed = True
    return fd


@cache
def message_classes() -> dict[str, Any]:
    """Message classes of the subset: ``GraphDef``, ``NodeDef``, ``AttrValue``, ``TensorProto``, ..."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    names = [n for n in _MESSAGES if "." not in n]
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{n}")) for n in names}


def parse_graphdef(data: bytes):
    """Parse serialized bytes into a ``tensorflow.GraphDef`` message (raises protobuf's DecodeError).

    Args:
        data: a binary (serialized) GraphDef.

    Returns:
        The GraphDef message.

    Raises:
        google.protobuf.message.DecodeError: ``data`` is not a valid serialized message.
    """
    graph = message_classes()["GraphDef"]()
    graph.ParseFromString(data)
    return graph


def dtype_name(dtype: int) -> str:
    """TF's name of a DataType (reference types ``dtype + 100`` named as their base type), for messages.

    Args:
        dtype: a ``tensorflow.DataType`` enum value.

    Returns:
        Its name (``"DT_FLOAT"``, ...), or ``"DataType(<n>)"`` for an unknown value.
    """
    return DATA_TYPES.get(dtype % 100, f"DataType({dtype})")


def shape_of(shape_proto) -> tuple[int | None, ...] | None:
    """TensorShapeProto -> shape with None for unknown (-1) dimensions; None for an unknown rank.

    Args:
        shape_proto: a ``tensorflow.TensorShapeProto`` message.

    Returns:
        The dimensions (None where unknown), or None when the rank is unknown.
    """
    if shape_proto.unknown_rank:
        return None
    return tuple(int(d.size) if d.size >= 0 else None for d in shape_proto.dim)


def tensor_to_numpy(t) -> np.ndarray:
    """TensorProto -> numpy array (``tensorflow::Tensor::FromProto`` rules; see the module docstring).

    Args:
        t: a ``tensorflow.TensorProto`` message.

    Returns:
        Its value, with the TF dtype's numpy equivalent and the proto's shape.

    Raises:
        ValueError: an unsupported dtype, or a value count that does not fit the shape.
    """
    if t.dtype not in NUMPY_DTYPES:
        raise ValueError(f"tensor of type {dtype_name(t.dtype)} is not supported")
    dtype = np.dtype(NUMPY_DTYPES[t.dtype])
    shape = tuple(int(d.size) for d in t.tensor_shape.dim)
    size = int(np.prod(shape)) if shape else 1
    if t.tensor_content:
        arr = np.frombuffer(t.tensor_content, dtype=dtype.newbyteorder("<"))
        if arr.size != size:
            raise ValueError(f"tensor_content holds {arr.size} values, shape {list(shape)} needs {size}")
        return arr.astype(dtype).reshape(shape)
    values = list(getattr(t, _VALUE_FIELD[t.dtype]))
    if t.dtype == 19:  # half_val holds the raw 16-bit patterns
        vals = np.array(values, np.uint16).view(np.float16)
    else:
        vals = np.array(values, dtype)
    if vals.size == size:
        return vals.reshape(shape)
    if vals.size == 0:
        return np.zeros(shape, dtype)
    if vals.size > size:
        raise ValueError(f"tensor holds {vals.size} values, shape {list(shape)} needs {size}")
    out = np.empty(size, dtype)
    out[: vals.size] = vals
    out[vals.size:] = vals[-1]
    return out.reshape(shape)
