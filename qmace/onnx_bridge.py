"""The bridge between the IR and ONNX, both ways; the one place that knows ONNX's protobuf types.

- ONNX -> IR: ``graph_from_onnx`` turns an (opset-21) ``onnx.ModelProto`` into an ``ir.Graph`` one to one
  (initializers and Constant nodes become constant tensors, value infos give dtypes and shapes); the ONNX
  frontend (``qmace.frontends.onnx_frontend``) reads files, checks and upgrades opsets around it.
- IR -> ONNX: ``to_onnx`` lowers a graph to a standard ONNX model (float, or quantized as QDQ); it is what
  shape inference (``qmace.passes.shapes``), the ONNX Runtime and OpenVINO backends and ``qmace export`` run.
- Element types: ``onnx_elem_type`` (NumPy name -> ONNX) and ``np_dtype`` (ONNX -> NumPy name).

Lowering. Float nodes map one to one (IR op types and attributes are ONNX's), except ops that give their own
ONNX nodes (``Op.onnx_nodes``, e.g. Swish as Sigmoid + Mul; ``Op.onnx_integer_nodes`` for quantized nodes that
compute codes from codes, e.g. a MatMul with a 16-bit output as MatMulInteger + requantization). A fused
activation (``qm_activation``) becomes a Relu/Clip node after its producer; ONNX Runtime fuses it back.

Quantized tensors become the QDQ form ONNX Runtime's quantizer writes and its optimizer fuses into integer
kernels (QLinearConv, QLinearMatMul, QLinearAdd, ...):
- a quantized constant ``W`` is an integer initializer read through ``DequantizeLinear`` (``W__dq``);
- a quantized activation ``T`` is produced in float as ``T__f``, quantized by ``QuantizeLinear`` into ``T``
  (the integer codes, same name as in the IR) and read by consumers through ``DequantizeLinear`` (``T__dq``);
- explicit IR ``QuantizeLinear``/``DequantizeLinear`` nodes lower to themselves with scale/zero-point
  initializers taken from the quantized tensor's parameters (nodes that carry their own scale/zero-point
  inputs, ONNX's form kept by the QDQ import, lower one to one like any float node).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qmace import limits
from qmace.errors import ModelError, first_line
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op, is_supported

# ---- ONNX -> IR ------------------------------------------------------------------------------------------


def declared_bytes(t: onnx.TensorProto, where: str) -> int:
    """The bytes a TensorProto's dims and data type declare (checked before anything is allocated).

    Args:
        t: the tensor.
        where: what to name in messages.

    Returns:
        prod(dims) * itemsize.

    Raises:
        ModelError: a negative dimension or an unknown data type.
    """
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"{where}: negative dimension in {dims}")
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{where}: unknown data type {t.data_type}") from None
    return math.prod(dims) * itemsize



def np_dtype(elem_type: int) -> str:
    """The NumPy dtype name of an ONNX element type, e.g. ``TensorProto.FLOAT`` -> ``"float32"``.

    Args:
        elem_type: the ``onnx.TensorProto`` element type.

    Returns:
        The dtype name.
    """
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))



def attr_value(a: onnx.AttributeProto):
    """An ONNX attribute as the IR holds it: strings decoded, tensors as numpy arrays, lists as lists.

    Args:
        a: the attribute.

    Returns:
        Its value (int, float, str, numpy array, or a list of those).
    """
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list):
        return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v]
    return v



def shape_of(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """The shape a value info declares.

    Args:
        vi: the value info.

    Returns:
        The dimensions (None for a symbolic one), or None when the rank is unknown.
    """
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)



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



def _to_array(t: onnx.TensorProto, where: str) -> np.ndarray:
    """``numpy_helper.to_array`` with a ModelError naming the tensor for data that does not fit its shape."""
    limits.check_tensor_bytes(declared_bytes(t, where), where)
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise ModelError(f"{where}: malformed tensor data ({first_line(e, 200)})") from None


def sort_nodes(gp: onnx.GraphProto) -> str | None:
    """Sort an ONNX GraphProto's nodes topologically, in place and stably (a node moves only after its inputs).

    Args:
        gp: the graph; its inputs and initializers count as available.

    Returns:
        None, or the name of a node whose inputs never become available (a cycle or a missing input); then
        ``gp`` is left unchanged.
    """
    ready = {i.name for i in gp.input} | {t.name for t in gp.initializer} | {""}
    pending = list(gp.node)
    out = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return rest[0].name
        pending = rest
    del gp.node[:]
    gp.node.extend(out)
    return None


def graph_from_onnx(model: onnx.ModelProto, path: str | Path = "<model>", metadata: dict | None = None) -> Graph:
    """The IR graph of an ONNX model, one to one (no checks beyond tensor data and string types).

    Initializers and ``Constant`` nodes become constant tensors; inputs, value infos and outputs give
    dtypes and shapes; unnamed nodes are named ``<op_type>_<index>`` (made unique).

    Args:
        model: the model at opset-21 semantics, tensors loaded.
        path: its file, for messages and the graph's default name.
        metadata: the new graph's metadata.

    Returns:
        The Graph (its structure is not yet checked: ``ir.check_structure``).

    Raises:
        ModelError: malformed tensor data, string tensors, an output no node produces.
        ResourceLimitError: a tensor over the memory budget.
    """
    path = Path(path)
    g = model.graph
    graph = Graph(name=g.name or path.stem, metadata=dict(metadata or {}))
    for init in g.initializer:
        arr = _to_array(init, f"{path}: initializer {init.name!r}")
        graph.add_tensor(Tensor(init.name, str(arr.dtype), tuple(arr.shape), arr))
    for vi in list(g.input):
        if vi.name in graph.tensors:  # old models list initializers as inputs too
            continue
        graph.add_tensor(Tensor(vi.name, np_dtype(vi.type.tensor_type.elem_type), shape_of(vi)))
        graph.inputs.append(vi.name)
    for vi in list(g.value_info) + list(g.output):
        if vi.name not in graph.tensors and vi.type.tensor_type.elem_type:
            graph.add_tensor(Tensor(vi.name, np_dtype(vi.type.tensor_type.elem_type), shape_of(vi)))
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
        attrs = {a.name: attr_value(a) for a in n.attribute}
        graph.nodes.append(Node(name, n.op_type, list(n.input), list(n.output), attrs))
        for o in n.output:
            if o and o not in graph.tensors:
                graph.add_tensor(Tensor(o))
    graph.outputs = [o.name for o in g.output]
    strings = [k for k, t in graph.tensors.items() if t.dtype in ("object", "str")]
    if strings:
        raise ModelError(f"{path}: tensor(s) {', '.join(map(repr, strings))} hold strings; qmace supports "
                         "numeric tensors only")
    for o in graph.outputs:
        if o not in graph.tensors:
            raise ModelError(f"{path}: graph output {o!r} is produced by no node")
    return graph


# ---- IR -> ONNX ------------------------------------------------------------------------------------------

OPSET = 21
_NP_TO_ONNX = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "bool": TensorProto.BOOL,
    "int16": TensorProto.INT16,
    "uint16": TensorProto.UINT16,
}


def onnx_elem_type(dtype: str, tensor: str | None = None) -> int:
    """The ONNX element type of a NumPy dtype name (ml_dtypes' bfloat16/float8/int4 names included).

    Args:
        dtype: the dtype name, e.g. ``"float32"``.
        tensor: the tensor it belongs to, for the message.

    Returns:
        The ``onnx.TensorProto`` element type.

    Raises:
        ModelError: naming ``tensor`` for a type ONNX tensors cannot hold here (strings, objects).
    """
    if dtype in _NP_TO_ONNX:
        return _NP_TO_ONNX[dtype]
    try:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        elem = None
    if elem is None or elem == TensorProto.STRING:
        where = f"tensor {tensor!r}: " if tensor else ""
        raise ModelError(f"{where}element type {dtype!r} is not supported (numeric tensors only)")
    return elem


def _value_info(t: Tensor, name: str | None = None, dtype: str | None = None) -> onnx.ValueInfoProto:
    shape = None if t.shape is None else [d if d is not None else "N" for d in t.shape]
    return helper.make_tensor_value_info(name or t.name, onnx_elem_type(dtype or t.dtype, t.name), shape)


def _onnx_attrs(node: Node) -> dict:
    """ONNX attributes of an IR node; array values (tensor attributes, e.g. ConstantOfShape.value) as tensors."""
    return {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v
            for k, v in node.attrs.items() if not k.startswith("qm_") and v is not None}


class _Lowering:
    def __init__(self, graph: Graph, extra_outputs: list[str] | None):
        self.g = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_outputs = extra_outputs or []
        self._qp_inits: set[str] = set()

    def qparams_inputs(self, t: Tensor) -> tuple[str, str]:
        scale, zp = f"{t.name}__scale", f"{t.name}__zero_point"
        if scale not in self._qp_inits:
            qp = t.quant
            self.inits.append(numpy_helper.from_array(np.asarray(qp.scale, np.float32), scale))
            self.inits.append(numpy_helper.from_array(np.asarray(qp.zero_point).astype(qp.dtype), zp))
            self._qp_inits.add(scale)
        return scale, zp

    def q_axis(self, t: Tensor) -> dict:
        return {"axis": int(t.quant.axis)} if t.quant.is_per_channel else {}

    def read_name(self, name: str) -> str:
        """The float name a normal consumer reads for IR tensor ``name``."""
        if not name:
            return name
        t = self.g.tensors[name]
        return f"{name}__dq" if t.is_quantized else name

    def lower(self) -> onnx.ModelProto:
        g = self.g
        for name, t in g.tensors.items():
            if t.data is None:
                continue
            self.inits.append(numpy_helper.from_array(np.asarray(t.data, order="C"), name))
            if t.is_quantized:
                self.emit_dq(t)
        for node in g.nodes:
            self.lower_node(node)
        inputs = [_value_info(g.tensors[i]) for i in g.inputs]
        outputs = []
        for o in list(g.outputs) + [x for x in self.extra_outputs if x not in g.outputs]:
            t = g.tensors[o]
            outputs.append(helper.make_tensor_value_info(o, onnx_elem_type(t.dtype, o), None))
        graph = helper.make_graph(self.nodes, g.name, inputs, outputs, initializer=self.inits)
        opset = max([OPSET] + [get_op(n.op_type).onnx_opset for n in g.nodes if is_supported(n.op_type)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qmace")
        model.ir_version = 10
        return model

    def lower_node(self, node: Node) -> None:
        g = self.g
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.inputs) == 1:
            qt = g.tensors[node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]]
            s, z = self.qparams_inputs(qt)
            src = node.inputs[0]
            out = node.outputs[0]
            self.nodes.append(helper.make_node(node.op_type, [src, s, z], [out], name=node.name, **self.q_axis(qt)))
            if node.op_type == "QuantizeLinear":
                self.emit_dq(qt)
            return
        op = get_op(node.op_type) if is_supported(node.op_type) else None
        if op is not None and all(g.tensors[t].is_quantized for t in (*node.inputs, *node.outputs) if t):
            out_t = [g.tensors[o] if o else None for o in node.outputs]
            custom = op.onnx_integer_nodes(node, [g.tensors[i] if i else None for i in node.inputs], out_t,
                                           self.qparams_inputs)
            if custom is not None:  # the op writes its output codes itself
                self.nodes += custom[0]
                self.inits += custom[1]
                for t in out_t:
                    if t is not None:
                        self.emit_dq(t)
                return
        inputs = [self.read_name(i) for i in node.inputs]
        outs = []
        for o in node.outputs:
            t = g.tensors.get(o) if o else None
            outs.append(f"{o}__f" if t is not None and t.is_quantized else o)
        act = node.attrs.get("qm_activation")
        if act:
            final = outs[0]
            outs[0] = f"{node.outputs[0]}__preact"
        custom = op.onnx_nodes(node, inputs, outs) if op is not None else None
        if custom is not None:
            self.nodes += custom[0]
            self.inits += custom[1]
        else:
            self.nodes.append(helper.make_node(node.op_type, inputs, outs, name=node.name, **_onnx_attrs(node)))
        if act:
            if act == "Relu":
                self.nodes.append(helper.make_node("Relu", [outs[0]], [final], name=f"{node.name}__relu"))
            else:
                lo, hi = node.attrs["qm_clip"]
                lo_n, hi_n = f"{node.name}__clip_min", f"{node.name}__clip_max"
                self.inits.append(numpy_helper.from_array(np.array(lo, np.float32), lo_n))
                self.inits.append(numpy_helper.from_array(np.array(hi, np.float32), hi_n))
                self.nodes.append(helper.make_node("Clip", [outs[0], lo_n, hi_n], [final], name=f"{node.name}__clip"))
        for o in node.outputs:
            t = g.tensors.get(o) if o else None
            if t is not None and t.is_quantized:
                s, z = self.qparams_inputs(t)
                self.nodes.append(helper.make_node("QuantizeLinear", [f"{o}__f", s, z], [o], name=f"{o}__Q", **self.q_axis(t)))
                self.emit_dq(t)

    def emit_dq(self, t: Tensor) -> None:
        s, z = self.qparams_inputs(t)
        self.nodes.append(helper.make_node("DequantizeLinear", [t.name, s, z], [f"{t.name}__dq"], name=f"{t.name}__DQ", **self.q_axis(t)))


def to_onnx(graph: Graph, extra_outputs: list[str] | None = None) -> onnx.ModelProto:
    """The graph as an ONNX model (opset 21, or the newer opset an op needs: ``Op.onnx_opset``).

    Args:
        graph: a float or quantized graph.
        extra_outputs: intermediate tensors to expose as outputs too.

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        ModelError: a tensor type ONNX cannot hold.
    """
    model = _Lowering(graph, extra_outputs).lower()
    # DequantizeLinear nodes nobody reads (e.g. a quantized graph output) are harmless; keep the model lean.
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if n.op_type != "DequantizeLinear" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    # Node names must be unique in ONNX; an IR node (e.g. the quantizer's ``T__DQ`` before a float fallback)
    # can share a name with a node the lowering emits for the same tensor.
    seen: set[str] = set()
    for n in model.graph.node:
        if n.name in seen:
            i = 1
            while f"{n.name}_{i}" in seen:
                i += 1
            n.name = f"{n.name}_{i}"
        seen.add(n.name)
    return model
