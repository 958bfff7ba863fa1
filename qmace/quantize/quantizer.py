"""Float graph + range table -> quantized graph (the plan and the rewrite in one pass over the nodes).

Plan (per node, in topological order), driven by each op's traits (``qmace.ops.base``):
- a node runs *quantized* when its op has an integer kernel (``quant_kernel``), its float data inputs have
  (or can be given) ranges, and for ``accumulate`` ops its weight is a constant (or, for ops with
  ``activation_weights`` such as MatMul's Q·Kᵀ, an activation quantized per tensor from its own calibrated
  range like input 0); otherwise it *falls back*
  to float and the reason is recorded;
- output ranges follow MACE's rules: data-movement ops reuse their input's parameters exactly; Concat takes
  the union of its inputs (with ``change_concat_ranges`` that union is written back to the producers
  before their parameters are chosen); Sigmoid/Softmax get [0, 1], Tanh [-1, 1]; Add/Sub without
  statistics get the interval sum/difference; everything else takes its calibrated range; graph inputs
  take ``input_ranges``.
Rewrite: quantized tensors get codes dtype + QuantParams; weights are quantized (``int8`` schema:
symmetric per-channel int8; ``uint8``: MACE's asymmetric per-tensor uint8); biases become int32 with
scale s_x * s_w; QuantizeLinear/DequantizeLinear nodes are inserted where values cross between float and
integer (graph inputs/outputs and fallbacks). Graph input and output names are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.quantize.mixed import WIDE_DTYPE, wide_activations
from qmace.quantize.ranges import Range, RangeTable

log = logging.getLogger(__name__)

SCHEMAS = qmath.SCHEMAS
ACT_DTYPE = "uint8"  # activations are asymmetric uint8 in both schemas (ORT's fastest u8 x s8 kernels)
# Ops whose float constant inputs are data (quantized with their own range), not parameters.
_CONST_DATA_OPS = {"Add", "Sub", "Mul", "Div", "Concat"}


@dataclass
class QuantizeOptions:
    """How ``quantize_graph`` quantizes: the schema (``uint8``, ``int8``, ``int8_w7``: how weights are
    quantized; activations are asymmetric per-tensor uint8 in all of them), MACE's ``change_concat_ranges``,
    the graph inputs' ranges, parameters fixed by the source model (QDQ/fake-quant nodes, QAT) and the nodes
    the user keeps in float (by name or op type).
    """
    schema: str = "uint8"
    change_concat_ranges: bool = False
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Parameters fixed by the source (QDQ/fake-quant nodes of an imported model, or QAT): tensor or weight
    # name -> QuantParams, used as they are instead of being derived from a range or from the weights.
    fixed_params: dict[str, qmath.QuantParams] = field(default_factory=dict)
    # Nodes (by name or op type) the user keeps in float.
    float_nodes: set[str] = field(default_factory=set)
    # 16-bit activations (qmace.quantize.mixed): "rule" (the documented structural rule), "none", "all".
    wide_activations: str = "rule"


@dataclass
class QuantizeResult:
    """What ``quantize_graph`` produced: the quantized graph, one ``"node (op): reason"`` line per op left in
    float, the ranges actually used per quantized activation, and the range-table names not in the graph.
    """
    graph: Graph
    fallbacks: list[str]  # "node (op): reason"
    ranges: RangeTable  # the ranges actually used, per quantized activation
    unused_ranges: list[str]  # range-table names not in the graph


def _is_float_activation(g: Graph, name: str) -> bool:
    t = g.tensors.get(name) if name else None
    return t is not None and t.data is None and t.dtype == "float32"


def _data_inputs(g: Graph, node: Node) -> list[int]:
    """Input indices that carry quantizable float data (activations, or float constants of data ops)."""
    op = get_op(node.op_type)
    idx = []
    for i, name in enumerate(node.inputs):
        if not name or (op.is_weight(node, i) and g.tensors[name].data is not None) or i == op.bias_input:
            continue  # a weight input that is an activation (``activation_weights`` ops) is data
        t = g.tensors[name]
        if t.dtype != "float32":
            continue
        if t.data is None or node.op_type in _CONST_DATA_OPS:
            idx.append(i)
    return idx


class _Planner:
    def __init__(self, g: Graph, table: RangeTable, opts: QuantizeOptions):
        if opts.schema not in SCHEMAS:
            raise QuantizationError(f"unknown quantize_schema {opts.schema!r} (choose from {', '.join(SCHEMAS)})")
        self.g, self.table, self.opts = g, dict(table), opts
        self.qp: dict[str, qmath.QuantParams] = {}  # activation name -> params
        self.used: RangeTable = {}
        self.quantized: set[str] = set()  # node names that run quantized
        self.fallbacks: list[str] = []
        self.missing: dict[str, str] = {}  # tensor -> node that needs it
        self.wide = wide_activations(g, opts.wide_activations)  # tensor -> why it gets 16 bits

    def range_of(self, name: str) -> Range | None:
        if name in self.opts.input_ranges:
            lo, hi = self.opts.input_ranges[name]
            return Range(lo, hi)
        return self.table.get(name)

    def assign(self, name: str, r: Range) -> qmath.QuantParams:
        """Record ``r`` as the range used for activation ``name`` and give it the asymmetric parameters."""
        self.used[name] = r
        self.qp[name] = qmath.params_asymmetric(r.min, r.max, WIDE_DTYPE if name in self.wide else ACT_DTYPE)
        return self.qp[name]

    def fixed(self, name: str) -> qmath.QuantParams | None:
        """Per-tensor parameters fixed by the source for activation ``name`` (per-channel ones are only
        meaningful for weights and are ignored here)."""
        qp = self.opts.fixed_params.get(name)
        if qp is None or qp.is_per_channel:
            return None
        nudged = qmath.nudged_range(qp)
        self.used[name] = Range(float(nudged.min), float(nudged.max))
        self.qp[name] = qp
        return qp

    def params_for(self, name: str, needed_by: str) -> qmath.QuantParams | None:
        if name in self.qp:
            return self.qp[name]
        if self.fixed(name) is not None:
            return self.qp[name]
        t = self.g.tensors[name]
        if t.data is not None:  # a float constant used as data: its own range
            if t.data.size and not np.all(np.isfinite(t.data)):
                raise QuantizationError(f"constant tensor {name!r} (read by {needed_by}) holds NaN or Inf; "
                                        "it cannot be quantized")
            r = Range(float(t.data.min()), float(t.data.max())) if t.data.size else Range(0.0, 0.0)
        else:
            r = self.range_of(name)
        if r is None:
            self.missing.setdefault(name, needed_by)
            return None
        return self.assign(name, r)

    def concat_writeback(self) -> None:
        """change_concat_ranges: the union of a Concat's input ranges becomes every producer's range."""
        for node in self.g.nodes:
            if node.op_type != "Concat":
                continue
            rs = [self.range_of(i) for i in node.inputs if _is_float_activation(self.g, i)]
            if not rs or any(r is None for r in rs):
                continue
            union = Range(min(r.min for r in rs), max(r.max for r in rs))
            for i in node.inputs:
                if _is_float_activation(self.g, i) and i not in self.opts.input_ranges:
                    self.table[i] = union
            self.table[node.outputs[0]] = union

    def plan_node(self, node: Node) -> None:
        op = get_op(node.op_type)
        reason = None
        if node.name in self.opts.float_nodes or node.op_type in self.opts.float_nodes:
            reason = "kept in float by request"
        elif op.quant_kernel is None:
            reason = "no integer kernel"
        elif not any(_is_float_activation(self.g, i) for i in node.inputs):
            reason = "no float activation input"
        elif op.quant_kernel == "accumulate":
            w_idx = [i for i in range(len(node.inputs)) if op.is_weight(node, i)]
            if not w_idx or (self.g.tensors[node.inputs[w_idx[0]]].data is None and not op.activation_weights):
                reason = "weight is not a constant"
            elif op.bias_input is not None and len(node.inputs) > op.bias_input and node.inputs[op.bias_input]:
                b = self.g.tensors[node.inputs[op.bias_input]].data
                if b is None or b.ndim > 1:
                    reason = "bias is not a constant vector"
        if reason is None and hasattr(op, "quantizable") and not op.quantizable(node):
            reason = "attributes without an integer kernel"
        if reason is None:
            for i in _data_inputs(self.g, node):
                if self.params_for(node.inputs[i], node.name) is None:
                    reason = f"no range for input {node.inputs[i]!r}"
            outs = [o for o in node.outputs if o and self.g.tensors[o].dtype == "float32"]
            if reason is None:
                for o in outs:
                    if self.output_params(node, op, o) is None:
                        reason = f"no range for output {o!r}"
        if reason is not None:
            self.fallbacks.append(f"{node.name} ({node.op_type}): {reason}")
            return
        self.quantized.add(node.name)

    def output_params(self, node: Node, op, out: str) -> qmath.QuantParams | None:
        rule = op.output_range
        if out in self.qp:
            return self.qp[out]
        # Ops that only move codes must share their input's parameters; any other op takes fixed ones.
        if (rule != "input" or op.quant_kernel != "copy") and self.fixed(out) is not None:
            return self.qp[out]
        if rule == "input":
            src = node.inputs[0]
            if src in self.qp:
                self.qp[out] = self.qp[src]
                self.used[out] = self.used[src]
                return self.qp[out]
            return None
        if isinstance(rule, tuple):
            r = Range(*rule)
        elif rule == "union":
            rs = [self.used.get(i) for i in node.inputs if _is_float_activation(self.g, i)]
            if any(r is None for r in rs):
                return None
            r = Range(min(x.min for x in rs), max(x.max for x in rs))
        else:
            r = self.range_of(out)
            if r is None and getattr(op, "range_without_stats", None) == "interval":
                a, b = (self.used.get(i) for i in node.inputs[:2])
                if a is not None and b is not None:
                    r = Range(a.min + b.min, a.max + b.max) if node.op_type == "Add" else Range(a.min - b.max, a.max - b.min)
        if r is None:
            self.missing.setdefault(out, node.name)
            return None
        return self.assign(out, r)


def quantize_graph(graph: Graph, table: RangeTable, opts: QuantizeOptions) -> QuantizeResult:
    """Quantize a float graph with the given ranges (the plan and rewrite described above).

    Args:
        graph: the optimized float graph (not changed; a copy is quantized).
        table: activation tensor name -> (min, max).
        opts: schema, input ranges, fixed parameters, float nodes.

    Returns:
        The QuantizeResult.

    Raises:
        QuantizationError: listing every tensor that a quantized op needs but that has no range; invalid
            ranges or parameters.
    """
    g = graph.copy()
    p = _Planner(g, table, opts)
    if opts.change_concat_ranges:
        p.concat_writeback()
    for node in g.nodes:
        p.plan_node(node)
    # Tensors that ops with integer kernels need and no rule could range: one error listing them all.
    needed = p.missing
    if needed:
        items = ", ".join(f"{t} (for {n})" for t, n in needed.items())
        raise QuantizationError(f"{len(needed)} tensor(s) have no quantization range: {items}; "
                                "add them to the range file or calibrate with samples that reach them")
    _rewrite(g, p, opts)
    unused = [k for k in table if k not in graph.tensors]
    if unused:
        log.warning("%d range-file name(s) are not tensors of the graph: %s", len(unused), ", ".join(unused))
    wide = {k: v for k, v in p.wide.items() if k in p.qp and p.qp[k].dtype == WIDE_DTYPE}
    g.metadata["quantization"] = {"schema": opts.schema, "fallbacks": p.fallbacks, "activation_dtype": ACT_DTYPE,
                                  "wide_activations": wide}
    return QuantizeResult(g, p.fallbacks, p.used, unused)


def _rewrite(g: Graph, p: _Planner, opts: QuantizeOptions) -> None:
    quantized_names: dict[str, str] = {}  # float name -> name of its quantized version (inserted Q)
    dequantized_names: dict[str, str] = {}  # quantized name -> float name (inserted DQ)
    new_nodes: list[Node] = []

    def as_quantized(name: str) -> str:
        t = g.tensors[name]
        if t.is_quantized:
            return name
        if name in quantized_names:
            return quantized_names[name]
        qp = p.qp[name]
        qname = g.unique_name(f"{name}__quant")
        if t.data is not None:
            g.add_tensor(Tensor(qname, qp.dtype, t.shape, qmath.quantize(t.data, qp), qp))
        else:
            g.add_tensor(Tensor(qname, qp.dtype, t.shape, None, qp))
            new_nodes.append(Node(g.unique_name(f"{name}__Q"), "QuantizeLinear", [name], [qname]))
        quantized_names[name] = qname
        return qname

    def as_float(name: str) -> str:
        t = g.tensors[name]
        if not t.is_quantized:
            return name
        if name not in dequantized_names:
            fname = g.unique_name(f"{name}__dequant")
            g.add_tensor(Tensor(fname, "float32", t.shape))
            new_nodes.append(Node(g.unique_name(f"{name}__DQ"), "DequantizeLinear", [name], [fname]))
            dequantized_names[name] = fname
        return dequantized_names[name]

    def rounded(name: str) -> str:
        """A float activation whose parameters the source fixed (an imported Q/DQ pair) is rounded there
        even between two float ops: the source model computes ``DQ(Q(x))``, so does the quantized one."""
        if name and _is_float_activation(g, name) and p.fixed(name) is not None:
            return as_quantized(name)
        return name

    for node in g.nodes:
        op = get_op(node.op_type)
        if node.name not in p.quantized:
            node.inputs = [as_float(rounded(i)) if i else i for i in node.inputs]
            new_nodes.append(node)
            continue
        for i in _data_inputs(g, node):
            node.inputs[i] = as_quantized(node.inputs[i])
        if op.quant_kernel == "accumulate":
            _quantize_weights(g, node, op, opts.schema, opts.fixed_params)
        for o in node.outputs:
            t = g.tensors.get(o) if o else None
            if t is not None and t.dtype == "float32":
                t.quant, t.dtype = p.qp[o], p.qp[o].dtype
        new_nodes.append(node)
    g.nodes = new_nodes
    # Graph outputs keep their names and stay float: the quantized tensor is renamed and dequantized.
    for out in list(g.outputs):
        if _is_float_activation(g, out) and out not in quantized_names and p.fixed(out) is not None:
            g.rename_tensor(out, pre := g.unique_name(f"{out}__float"))  # a float op's output the source rounds
            g.outputs = [out if o == pre else o for o in g.outputs]
            g.add_tensor(Tensor(out, "float32", g.tensors[pre].shape))
            qname = g.unique_name(f"{out}__quant")
            qp = p.qp[out]
            g.add_tensor(Tensor(qname, qp.dtype, g.tensors[pre].shape, None, qp))
            g.nodes += [Node(g.unique_name(f"{out}__Q"), "QuantizeLinear", [pre], [qname]),
                        Node(g.unique_name(f"{out}__DQ"), "DequantizeLinear", [qname], [out])]
            continue
        t = g.tensors[out]
        if t.is_quantized:
            qname = g.unique_name(f"{out}__quant")
            g.rename_tensor(out, qname)
            g.outputs = [out if o == qname else o for o in g.outputs]
            g.add_tensor(Tensor(out, "float32", t.shape))
            g.nodes.append(Node(g.unique_name(f"{out}__DQ"), "DequantizeLinear", [qname], [out]))
    g.toposort()
    g.remove_unused()


def _quantize_weights(g: Graph, node: Node, op, schema: str, fixed: dict) -> None:
    for i, name in enumerate(node.inputs):
        axis = op.weight_axis(node, i) if name else None
        if axis is None or g.tensors[name].data is None:
            continue  # not a weight, or an activation read as one (already quantized as data)
        w = g.tensors[name].data.astype(np.float32)
        if name in fixed:
            qp = fixed[name]
        else:
            qp = qmath.weight_params(w, axis, schema)
        qname = g.unique_name(f"{name}__quant")
        g.add_tensor(Tensor(qname, qp.dtype, tuple(w.shape), qmath.quantize(w, qp), qp))
        node.inputs[i] = qname
        w_qp = qp
        x_qp = g.tensors[node.inputs[0]].quant
        b = op.bias_input
        if b is not None and len(node.inputs) > b and node.inputs[b]:
            bias = g.tensors[node.inputs[b]].data.astype(np.float32)
            bqp = qmath.bias_params(x_qp, w_qp)
            bname = g.unique_name(f"{node.inputs[b]}__quant")
            g.add_tensor(Tensor(bname, "int32", tuple(bias.shape), qmath.quantize_bias(bias, x_qp, w_qp), bqp))
            node.inputs[b] = bname
