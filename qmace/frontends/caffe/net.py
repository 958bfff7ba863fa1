"""A Caffe net (prototxt + caffemodel) -> ``ir.Graph``.

Steps: keep the layers that run in the TEST phase (Caffe's include/exclude rules on a net state with phase
TEST, level 0, no stages); attach every layer's weight blobs from the caffemodel by layer name (as Caffe's
``CopyTrainedLayersFrom``: caffemodel layers the prototxt lacks are ignored); give every blob version a
tensor name of its own (SSA): a blob written in place by several layers (``bottom == top``: BatchNorm,
Scale, ReLU after a convolution) keeps its Caffe name for its last version, the versions before it are
named ``<blob>/<layer that wrote it>``; then convert layer by layer (``qmace.frontends.caffe.graph`` with the
converters of ``qmace.frontends.caffe.layers``) tracking static shapes, and merge each Scale into the BatchNorm it follows. Every unsupported layer type is reported at once, with its layer count.
Graph outputs: the blobs no later layer reads (Caffe's net outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmace.errors import ModelError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op

log = logging.getLogger(__name__)

TEST_PHASE = 1

# V1 (``layers``) enum names -> the LayerParameter type strings of the same layers.
V1_TYPES = {
    "ABSVAL": "AbsVal", "CONCAT": "Concat", "CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout", "ELTWISE": "Eltwise", "FLATTEN": "Flatten", "INNER_PRODUCT": "InnerProduct",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH", "LRN": "LRN", "DATA": "Data",
    "ACCURACY": "Accuracy", "SOFTMAX_LOSS": "SoftmaxWithLoss", "MEMORY_DATA": "MemoryData",
    "IMAGE_DATA": "ImageData", "HDF5_DATA": "HDF5Data", "DUMMY_DATA": "DummyData", "ARGMAX": "ArgMax",
    "BNLL": "BNLL", "EXP": "Exp", "MVN": "MVN", "THRESHOLD": "Threshold",
}


@dataclass
class Layer:
    """One layer of either format. ``msg`` is the LayerParameter / V1LayerParameter: the ``*_param``
    fields the converters read have the same names in both."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Any
    blobs: list[Any] = field(default_factory=list)  # BlobProto, from the caffemodel (or the prototxt)

    def __str__(self) -> str:
        return f"layer {self.name!r} ({self.type})"


def _rule_meets(rule: Any) -> bool:
    """Caffe's StateMeetsRule for the state {phase: TEST, level: 0, stage: []}."""
    if rule.HasField("phase") and rule.phase != TEST_PHASE:
        return False
    if rule.HasField("min_level") and 0 < rule.min_level:
        return False
    if rule.HasField("max_level") and 0 > rule.max_level:
        return False
    return not rule.stage


def _in_test_phase(msg: Any) -> bool:
    if msg.include:
        return any(_rule_meets(r) for r in msg.include)
    return not any(_rule_meets(r) for r in msg.exclude)


def _layer_type(msg: Any, v1: bool) -> str:
    if not v1:
        return msg.type
    name = msg.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[msg.type].name
    return V1_TYPES.get(name, name)


def net_layers(net: Any) -> list[Layer]:
    """The TEST-phase layers of a NetParameter (new ``layer`` format, or V1 ``layers``), in order.

    Args:
        net: a parsed ``NetParameter``.

    Returns:
        The layers as ``Layer``.
    """
    out = []
    for msgs, v1 in ((net.layers, True), (net.layer, False)):
        for i, msg in enumerate(msgs):
            if not _in_test_phase(msg):
                continue
            name = msg.name or f"{_layer_type(msg, v1).lower()}_{i}"
            out.append(Layer(name, _layer_type(msg, v1), list(msg.bottom), list(msg.top), msg, list(msg.blobs)))
    return out


def blob_array(blob: Any) -> np.ndarray:
    """A BlobProto's values (``data``, else ``double_data``) as float32.

    Shaped by ``shape`` or, in old files, by the legacy (num, channels, height, width).

    Args:
        blob: a ``BlobProto``.

    Returns:
        The array.
    """
    data = np.asarray(blob.data, np.float32) if len(blob.data) else np.asarray(blob.double_data, np.float32)
    return data.reshape(blob_shape(blob)) if data.size == int(np.prod(blob_shape(blob))) else data


def blob_shape(blob: Any) -> tuple[int, ...]:
    """A BlobProto's shape: ``shape.dim``, else the legacy (num, channels, height, width).

    Args:
        blob: a ``BlobProto``.

    Returns:
        The shape.
    """
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return (blob.num, blob.channels, blob.height, blob.width)


def shape_matches(blob: Any, expected: Sequence[int]) -> bool:
    """Caffe's Blob::ShapeEquals: exact shape, or for a legacy 4-D blob the expected shape left-padded with 1s.

    Args:
        blob: a ``BlobProto``.
        expected: the shape the layer needs.

    Returns:
        Whether they match.
    """
    if blob.HasField("shape"):
        return blob_shape(blob) == tuple(expected)
    if len(expected) > 4:
        return False
    return blob_shape(blob) == (1,) * (4 - len(expected)) + tuple(expected)


@dataclass
class Context:
    """What a layer converter works with: the graph being built, static shapes, weights."""

    graph: Graph
    path: Path  # the prototxt, for messages
    weight_path: Path | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def fail(self, layer: Layer, message: str) -> ModelError:
        """The error for a layer the converter rejects (raise it).

        Args:
            layer: the layer.
            message: what is wrong.

        Returns:
            A ModelError ``<prototxt>: <layer>: <message>``.
        """
        return ModelError(f"{self.path}: {layer}: {message}")

    def shape(self, name: str) -> tuple[int, ...]:
        """The static shape of tensor ``name``.

        Args:
            name: the tensor.

        Returns:
            Its shape.

        Raises:
            KeyError: the shape is not known.
        """
        return self.shapes[name]

    def const(self, base: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        """Add a constant tensor to the graph under a fresh name.

        Args:
            base: the wanted name.
            value: its data.
            dtype: the dtype it is stored in.

        Returns:
            The tensor's name.
        """
        value = np.ascontiguousarray(np.asarray(value, dtype))
        name = self.graph.unique_name(base)
        self.graph.add_tensor(Tensor(name, str(value.dtype), tuple(value.shape), value))
        return name

    def tmp(self, base: str) -> str:
        """Add an intermediate tensor (no data, unknown shape) under a fresh name.

        Args:
            base: the wanted name.

        Returns:
            The tensor's name.
        """
        name = self.graph.unique_name(base)
        self.graph.add_tensor(Tensor(name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str,
             shapes: Sequence[Sequence[int]] | None = None, **attrs: Any) -> Node:
        """Append a node to the graph and declare its float32 outputs.

        Args:
            op_type: the IR (ONNX) op.
            inputs: its input tensor names.
            outputs: its output tensor names.
            name: the node's name (made unique if taken).
            shapes: the outputs' static shapes, if known.
            **attrs: the node's attributes.

        Returns:
            The node.
        """
        node = Node(self.graph.unique_name(name) if any(n.name == name for n in self.graph.nodes) else name,
                    op_type, list(inputs), list(outputs), attrs)
        self.graph.nodes.append(node)
        for i, o in enumerate(outputs):
            shape = tuple(int(d) for d in shapes[i]) if shapes is not None else None
            self.graph.add_tensor(Tensor(o, "float32", shape))
            if shape is not None:
                self.shapes[o] = shape
        return node

    def weights(self, layer: Layer, expected: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray]:
        """The layer's blobs, checked against ``expected`` (role, shape) in count and shape.

        Args:
            layer: the layer.
            expected: ``(role, shape)`` per blob, e.g. ``("weights", (M, C, kh, kw))``.

        Returns:
            The blobs as float32 arrays.

        Raises:
            ModelError: naming the layer and the weight file when blobs are missing or of the wrong shape.
        """
        source = self.weight_path or self.path
        if not layer.blobs and expected:
            raise ModelError(f"{source}: {layer}: no weights for this layer (expected "
                             f"{', '.join(f'{r} {_dims(s)}' for r, s in expected)}); is it the caffemodel of "
                             f"{self.path.name}?")
        if len(layer.blobs) != len(expected):
            raise ModelError(f"{source}: {layer}: {len(layer.blobs)} weight blob(s), the prototxt needs "
                             f"{len(expected)} ({', '.join(f'{r} {_dims(s)}' for r, s in expected)})")
        out = []
        for blob, (role, shape) in zip(layer.blobs, expected):
            if not shape_matches(blob, shape):
                raise ModelError(f"{source}: {layer}: {role} blob has shape {_dims(blob_shape(blob))}, the "
                                 f"prototxt needs {_dims(shape)}")
            arr = blob_array(blob)
            if arr.size != int(np.prod(shape)):
                raise ModelError(f"{source}: {layer}: {role} blob holds {arr.size} values for shape {_dims(shape)}")
            out.append(arr.reshape(tuple(shape)))
        return out


def _dims(shape: Sequence[int]) -> str:
    return "(" + "x".join(str(int(d)) for d in shape) + ")"


def _ssa_names(layers: list[Layer], inputs: list[str]) -> list[list[str]]:
    """Tensor name of every top of every layer (see the module docstring)."""
    writers: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for top in layer.tops:
            writers.setdefault(top, []).append(i)
    taken = set(writers) | set(inputs)
    names = []
    for i, layer in enumerate(layers):
        row = []
        for top in layer.tops:
            if writers[top][-1] == i and top not in inputs:
                row.append(top)
                continue
            name, k = f"{top}/{layer.name}", 1
            while name in taken:
                name, k = f"{top}/{layer.name}_{k}", k + 1
            taken.add(name)
            row.append(name)
        names.append(row)
    return names


def _net_inputs(net: Any, layers: list[Layer], yaml_shapes: dict[str, tuple[int, ...]], path: Path
                ) -> tuple[dict[str, tuple[int, ...] | None], list[Layer]]:
    """Input blob -> declared shape (None if the prototxt gives none), and the layers minus Input layers."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    dims = list(net.input_dim)
    for i, name in enumerate(net.input):
        if i < len(net.input_shape):
            shapes[name] = tuple(int(d) for d in net.input_shape[i].dim)
        elif len(dims) >= 4 * (i + 1):
            shapes[name] = tuple(int(d) for d in dims[4 * i: 4 * i + 4])
        else:
            shapes[name] = None
    rest = []
    for layer in layers:
        if layer.type != "Input":
            rest.append(layer)
            continue
        declared = list(layer.msg.input_param.shape)
        for j, top in enumerate(layer.tops):
            if declared:
                shapes[top] = tuple(int(d) for d in declared[j if len(declared) > 1 else 0].dim)
            else:
                shapes[top] = None
    for name, shape in shapes.items():
        if shape is None or any(d <= 0 for d in shape):
            if name not in yaml_shapes:
                raise ModelError(f"{path}: input blob {name!r} has no shape in the prototxt; give it in the "
                                 f"YAML's input_tensors/input_shapes")
            shapes[name] = yaml_shapes[name]
    return shapes, rest


def merge_affine_batchnorms(graph: Graph, keep: set[str] = frozenset()) -> int:
    """Merge a BatchNormalization that is a pure affine map (a Caffe Scale: mean 0, var 1, epsilon 0) into
    the BatchNormalization before it (a Caffe BatchNorm) when it is that one's only reader:
    ``s2 (s1 (x - m) / sqrt(v + e) + b1) + b2 = (s2 s1)(x - m) / sqrt(v + e) + (s2 b1 + b2)``.
    A BatchNorm + Scale pair that follows no convolution then stays one node (one range, one float op).

    Args:
        graph: the graph, changed in place.
        keep: tensors that must survive (not merged away).

    Returns:
        The number of merges.
    """
    merged = 0
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    producers = graph.producers()
    for node in list(graph.nodes):
        if node.op_type != "BatchNormalization" or float(get_op(node.op_type).attr(node, "epsilon")) != 0.0:
            continue
        s2, b2, mean2, var2 = (graph.constant(n) for n in node.inputs[1:5])
        if mean2 is None or var2 is None or np.any(mean2 != 0) or np.any(var2 != 1):
            continue
        first = producers.get(node.inputs[0])
        if (first is None or first.op_type != "BatchNormalization" or readers.get(node.inputs[0]) != 1
                or node.inputs[0] in graph.outputs or node.inputs[0] in keep):
            continue
        s1, b1 = graph.constant(first.inputs[1]), graph.constant(first.inputs[2])
        first.inputs[1] = _replace_const(graph, first.inputs[1], (s2 * s1).astype(np.float32))
        first.inputs[2] = _replace_const(graph, first.inputs[2], (s2 * b1 + b2).astype(np.float32))
        graph.tensors.pop(first.outputs[0], None)
        first.outputs[0] = node.outputs[0]
        graph.nodes.remove(node)
        producers = graph.producers()
        merged += 1
    if merged:
        graph.remove_unused()
    return merged


def _replace_const(graph: Graph, name: str, value: np.ndarray) -> str:
    new = graph.unique_name(f"{name}_merged")
    graph.add_tensor(Tensor(new, "float32", tuple(value.shape), value))
    return new


def net_layers_all(net: Any) -> list[Layer]:
    """Every layer of a caffemodel NetParameter (both formats, any phase): weights are found by name.

    Args:
        net: a parsed ``NetParameter``.

    Returns:
        The layers as ``Layer``.
    """
    out = []
    for msgs, v1 in ((net.layers, True), (net.layer, False)):
        for msg in msgs:
            out.append(Layer(msg.name, _layer_type(msg, v1), list(msg.bottom), list(msg.top), msg, list(msg.blobs)))
    return out
