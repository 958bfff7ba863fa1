"""A frozen TensorFlow GraphDef (``.pb``) -> ``ir.Graph``, without TensorFlow.

MACE's rules for ``platform: tensorflow``: ``input_tensors``/``output_tensors`` are written ``name`` or
``name:0``; the IR graph's inputs and outputs carry the names as the YAML spells them, every other tensor
is named ``node:k`` (as in MACE's range logs). Rank-4 inputs and outputs whose YAML data format is NHWC or
NCHW are channels-first in the IR (the model's layout, like ONNX models): a Transpose to TF's NHWC follows
each such input and one back precedes each such output; the passes cancel them against the transposes
around the convolutions. Only the nodes the outputs depend on are converted.

Fixed quantization parameters from FakeQuant nodes land in ``graph.fixed_params`` as the ONNX
QDQ import does it (see ``qmace.frontends.qdq_import`` and ``fakequant``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qmace.errors import ModelError, UnsupportedOpsError
from qmace.frontends.tensorflow.builder import Builder, tensor_ref
from qmace.frontends.tensorflow.fakequant import FAKE_QUANT_OPS
from qmace.frontends.tensorflow.graphdef import NUMPY_DTYPES, parse_graphdef, shape_of, tensor_to_numpy
from qmace.frontends.tensorflow.ops import (
    CONTROL_FLOW_OPS,
    EMITTERS,
    FORWARD_OPS,
    TO_NCHW,
    TO_NHWC,
    VARIABLE_OPS,
    TfNode,
)
from qmace.ir import Graph, Tensor

if TYPE_CHECKING:
    from qmace.config import ModelConfig

log = logging.getLogger(__name__)

FREEZE_HINT = ("freeze it first: tf.compat.v1.graph_util.convert_variables_to_constants (TF1), or "
               "tensorflow.python.framework.convert_to_constants.convert_variables_to_constants_v2 on a "
               "concrete function (TF2), and write graph_def.SerializeToString() to a .pb")


def read_graphdef(path: str | Path):
    """Read a binary frozen GraphDef; ModelError naming the file for anything else.

    Args:
        path: the ``.pb`` file.

    Returns:
        The parsed ``tensorflow.GraphDef`` message.

    Raises:
        ModelError: a missing, empty, text-format, truncated or non-GraphDef file, a directory or a
            SavedModel.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            raise ModelError(f"{path}: a SavedModel directory, not a frozen graph; {FREEZE_HINT}")
        raise ModelError(f"{path}: a directory, not a frozen GraphDef .pb file")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: model file is empty")
    head = data[:64].lstrip()
    if head.startswith((b"node {", b"node{", b"versions {", b"library {")) or path.suffix == ".pbtxt":
        raise ModelError(f"{path}: a text-format GraphDef (.pbtxt); write the binary form "
                         "(tf.io.write_graph(graph_def, dir, name, as_text=False))")
    from google.protobuf.message import DecodeError

    try:
        graph_def = parse_graphdef(data)
    except DecodeError as e:
        raise ModelError(f"{path}: not a TensorFlow GraphDef, or truncated ({e})") from e
    if not graph_def.node or any(not n.op or not n.name for n in graph_def.node):
        raise ModelError(f"{path}: not a TensorFlow GraphDef, or truncated (no valid nodes)")
    if path.name == "saved_model.pb":
        raise ModelError(f"{path}: a SavedModel, not a frozen graph; {FREEZE_HINT}")
    return graph_def


def _attr_value(a):
    kind = a.WhichOneof("value")
    if kind is None:
        return None
    v = getattr(a, kind)
    if kind == "s":
        return v.decode("utf-8", "replace")
    if kind == "shape":
        return shape_of(v)
    if kind == "tensor":
        return v
    if kind == "list":
        for f in ("s", "i", "f", "b", "type", "shape"):
            items = list(getattr(v, f))
            if items:
                if f == "s":
                    return [x.decode("utf-8", "replace") for x in items]
                return [shape_of(x) for x in items] if f == "shape" else items
        return []
    return v


def _tf_nodes(graph_def) -> dict[str, TfNode]:
    nodes = {}
    for n in graph_def.node:
        attrs = {k: _attr_value(v) for k, v in n.attr.items()}
        nodes[n.name] = TfNode(n.name, n.op, [i for i in n.input if not i.startswith("^")], attrs)
    return nodes


def _needed(nodes: dict[str, TfNode], outputs: list[str], inputs: set[str], path: Path) -> list[TfNode]:
    """Nodes the outputs depend on (stopping at the configured inputs), in topological order."""
    order: list[TfNode] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for out in outputs:
        stack = [(out, False)]
        while stack:
            name, expanded = stack.pop()
            if name not in nodes:
                raise ModelError(f"{path}: tensor {name!r} is produced by no node of the graph")
            if expanded:
                state[name] = 2
                order.append(nodes[name])
                continue
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                raise ModelError(f"{path}: node {name!r} is part of a cycle (control flow is not supported)")
            state[name] = 1
            stack.append((name, True))
            if name not in inputs:
                for i in nodes[name].inputs:
                    src = tensor_ref(i).rpartition(":")[0]
                    if state.get(src) != 2:
                        stack.append((src, False))
    return order


def _check_ops(order: list[TfNode], inputs: set[str], path: Path) -> None:
    flow = sorted({n.op for n in order if n.op in CONTROL_FLOW_OPS})
    if flow:
        first = next(n.name for n in order if n.op in CONTROL_FLOW_OPS)
        raise ModelError(f"{path}: node {first!r}: control flow ({', '.join(flow)}) is not supported; export "
                         "a graph without loops or conditionals")
    var = next((n for n in order if n.op in VARIABLE_OPS), None)
    if var is not None:
        raise ModelError(f"{path}: node {var.name!r} ({var.op}): variables are not frozen; {FREEZE_HINT}")
    known = {*EMITTERS, *FORWARD_OPS, "Const", "Placeholder", "NoOp"}
    counts: dict[str, int] = {}
    for n in order:
        if n.name not in inputs and n.op not in known:
            counts[n.op] = counts.get(n.op, 0) + 1
    if counts:
        items = ", ".join(f"{k} ({v} node{'s' if v > 1 else ''})" for k, v in sorted(counts.items()))
        raise UnsupportedOpsError(f"{path}: unsupported TensorFlow ops: {items}; see docs/supported-ops.md")


def _channels_first(fmt: str, rank: int | None) -> bool:
    return fmt in ("NHWC", "NCHW") and rank == 4


def graphdef_to_graph(graph_def, path: str | Path, input_tensors: list[str], output_tensors: list[str],
                      input_formats: list[str], output_formats: list[str], output_ranks: list[int | None],
                      keep_weight_grid: bool = True) -> Graph:
    """Convert the part of a GraphDef between the given inputs and outputs (see the module docstring).

    Args:
        graph_def: the parsed GraphDef.
        path: the model file (for messages).
        input_tensors: the YAML input tensor names (``node`` or ``node:k``), the graph's input names.
        output_tensors: the YAML output tensor names, the graph's output names.
        input_formats: each input's YAML data format (``NHWC``, ``NCHW``, ``NONE``); a rank-4 input
            whose format is not ``NONE`` is channels-first in the graph and transposed to NHWC inside.
        output_formats: each output's data format, with the same rule (transposed back to NCHW).
        output_ranks: each output's rank if the YAML states its shape, else None (inferred).
        keep_weight_grid: record FakeQuant weight parameters (int8 schema); False re-quantizes them.

    Returns:
        The float IR graph; FakeQuant parameters in ``graph.fixed_params``.

    Raises:
        ModelError: a named tensor or node is missing, control flow, unfrozen variables, a cycle, an
            output that is a constant, or a node an emitter rejects.
        UnsupportedOpsError: ops the frontend does not convert (all listed).
    """
    path = Path(path)
    nodes = _tf_nodes(graph_def)
    in_nodes = {tensor_ref(t).rpartition(":")[0]: t for t in input_tensors}
    for node_name, yaml_name in in_nodes.items():
        if node_name not in nodes:
            raise ModelError(f"{path}: input tensor {yaml_name!r}: no node {node_name!r} in the graph")
    out_nodes = [tensor_ref(t).rpartition(":")[0] for t in output_tensors]
    order = _needed(nodes, out_nodes, set(in_nodes), path)
    _check_ops(order, set(in_nodes), path)
    graph = Graph(name=path.stem, metadata={"source": str(path), "source_format": "tensorflow"})
    b = Builder(graph, str(path))
    b.keep_weight_grid = keep_weight_grid
    for (node_name, yaml_name), fmt in zip(in_nodes.items(), input_formats):
        n = nodes[node_name]
        b.node_name = node_name
        shape = n.attr("shape") if n.op == "Placeholder" else None
        dtype = NUMPY_DTYPES.get(int(n.attr("dtype", 1)), np.float32)
        rank = len(shape) if shape is not None else None
        nchw = _channels_first(fmt, rank)
        ir_shape = tuple(shape[p] for p in TO_NCHW) if nchw else shape
        graph.add_tensor(Tensor(yaml_name, str(np.dtype(dtype)), ir_shape))
        graph.inputs.append(yaml_name)
        b.alias(node_name, b.transpose(yaml_name, TO_NHWC) if nchw else yaml_name)
    for n in order:
        if n.name in in_nodes:
            continue
        b.node_name = n.name
        if n.op == "Const":
            t = n.attr("value")
            try:
                value = tensor_to_numpy(t)
            except ValueError as e:
                raise b.error(f"Const: {e}") from e
            b.alias(n.name, b.add_const(value, f"{n.name}:0"))
        elif n.op in FORWARD_OPS:
            b.alias(n.name, b.ir(n.inputs[0]))
            for k in range(1, len(n.inputs)):  # IdentityN-like forwarding of further inputs
                b.alias(f"{n.name}:{k}", b.ir(n.inputs[k]))
        elif n.op == "Placeholder":
            raise ModelError(f"{path}: node {n.name!r} (Placeholder) is needed by the outputs but is not in "
                             "input_tensors")
        elif n.op == "NoOp":
            continue
        else:
            before = set(graph.tensors)
            outs = EMITTERS[n.op](b, n, [b.ir(i) for i in n.inputs])
            outs = b.name_outputs(outs, set(graph.tensors) - before)
            for k, o in enumerate(outs):
                b.alias(f"{n.name}:{k}", o)
    if any(r is None and f != "NONE" for r, f in zip(output_ranks, output_formats)):
        output_ranks = _ranks_of(graph, b, output_tensors, output_ranks)
    for yaml_name, fmt, rank in zip(output_tensors, output_formats, output_ranks):
        b.node_name = tensor_ref(yaml_name).rpartition(":")[0]
        src = b.ir(yaml_name)
        if graph.constant(src) is not None:
            raise b.error(f"output {yaml_name!r} is a constant")
        if _channels_first(fmt, rank):
            if src == yaml_name:  # the YAML spells the internal name (node:0): that one becomes the NHWC copy
                graph.rename_tensor(src, f"{src}/nhwc")
                if src in b.params:
                    b.params[f"{src}/nhwc"] = b.params[src]
                src = f"{src}/nhwc"
            b.emit1("Transpose", [src], {"perm": list(TO_NCHW)}, out=yaml_name)
        elif src != yaml_name:
            b.emit1("Identity", [src], out=yaml_name)
        if src in b.params and src != yaml_name:  # the identity pass gives the producer the output's name
            b.params[yaml_name] = b.params[src]
        graph.outputs.append(yaml_name)
    graph.remove_unused()
    if b.params:
        graph.fixed_params = {k: qp for k, qp in b.params.items() if k in graph.tensors}
        log.info("%s: %d FakeQuant parameter sets recorded", path, len(graph.fixed_params))
    return graph


def _ranks_of(graph: Graph, b: Builder, outputs: list[str], ranks: list[int | None]) -> list[int | None]:
    """Output ranks the YAML does not state (no output_shapes), from ONNX shape inference of the IR."""
    from qmace.passes.shapes import infer_shapes  # passes sit below the frontends (tests/test_layers.py)

    probe = graph.copy()
    probe.outputs = [b.ir(o) for o in outputs]
    probe.remove_unused()
    infer_shapes(probe)
    got = []
    for name, rank in zip(probe.outputs, ranks):
        t = probe.tensors.get(name)
        got.append(rank if rank is not None else (len(t.shape) if t is not None and t.shape is not None else None))
    return got


WEIGHT_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "Conv2DBackpropInput")


def weights_without_fake_quant(graph_def) -> list[str]:
    """In a graph that has FakeQuant nodes: the convolution / matmul nodes whose weight is a plain constant.

    TensorFlow's fake-quantized graph computes those layers with float weights, which no integer model
    can reproduce; tfmot 0.8 freezes every ``Conv2D``/``DepthwiseConv2D`` followed by a ``ReLU`` layer this
    way (its ``LayerReLUQuantize`` transform drops the layer's weight quantizer).

    Args:
        graph_def: the parsed GraphDef.

    Returns:
        The names of such nodes, in graph order; empty when the graph has no FakeQuant node.
    """
    nodes = _tf_nodes(graph_def)
    if not any(n.op in FAKE_QUANT_OPS for n in nodes.values()):
        return []
    bare = []
    for n in nodes.values():
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2:
            continue
        src = nodes.get(tensor_ref(n.inputs[1]).rpartition(":")[0])  # the filter (input 1 of each op)
        while src is not None and (src.op in FORWARD_OPS or src.op == "ReadVariableOp") and src.inputs:
            src = nodes.get(tensor_ref(src.inputs[0]).rpartition(":")[0])
        if src is not None and src.op == "Const":
            bare.append(n.name)
    return bare


def load_tensorflow(m: ModelConfig) -> Graph:
    """The frontend's ``load``: the YAML model entry's frozen graph -> float IR graph.

    Args:
        m: the YAML model entry (``platform: tensorflow``).

    Returns:
        The float IR graph (see :func:`graphdef_to_graph`).

    Raises:
        ModelError: as for :func:`read_graphdef` and :func:`graphdef_to_graph`.
        UnsupportedOpsError: as for :func:`graphdef_to_graph`.
    """
    sub = m.subgraph
    ranks = [len(s) if s is not None else None for s in (sub.output_shapes or [None] * len(sub.output_tensors))]
    graph_def = read_graphdef(m.model_file_path)
    bare = weights_without_fake_quant(graph_def) if m.quantize else []
    if bare:
        log.warning("%s: %d convolution/matmul weights have no FakeQuant in this QAT graph (%s): quantized from "
                    "their own range, so the integer model differs from TensorFlow's fake-quantized graph, which "
                    "computes these layers with float weights (tfmot 0.8 freezes Conv2D/DepthwiseConv2D followed "
                    "by a ReLU layer this way)", m.model_file_path, len(bare),
                    ", ".join(repr(b) for b in bare[:3]) + (", ..." if len(bare) > 3 else ""))
    return graphdef_to_graph(graph_def, m.model_file_path, list(sub.input_tensors), list(sub.output_tensors),
                             list(sub.input_data_formats), list(sub.output_data_formats), ranks,
                             keep_weight_grid=m.quantize_schema == "int8")
