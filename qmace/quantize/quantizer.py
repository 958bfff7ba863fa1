"""Float graph + range table -> quantized graph: the plan (``qmace.quantize.plan``), then the rewrite.

Rewrite (it reads only the ``QuantPlan``): quantized tensors get codes dtype + QuantParams; weights are
quantized with their planned parameters (``int8`` schema: symmetric per-channel int8; ``uint8``: MACE's
asymmetric per-tensor uint8); biases become int32 with scale s_x * s_w; QuantizeLinear/DequantizeLinear
nodes are inserted where values cross between float and integer (graph inputs/outputs and fallbacks), and
around float tensors whose parameters the source fixed (the source computes ``DQ(Q(x))`` there). Graph input
and output names are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qmace import qmath
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.ops.base import ARITH
from qmace.quantize.plan import (
    ACT_DTYPE,
    QuantizeOptions,
    QuantPlan,
    data_inputs,
    is_float_activation,
    plan_quantization,
)
from qmace.quantize.ranges import RangeTable

log = logging.getLogger(__name__)

SCHEMAS = qmath.SCHEMAS
__all__ = ["ACT_DTYPE", "SCHEMAS", "QuantizeOptions", "QuantizeResult", "quantize_graph"]


@dataclass
class QuantizeResult:
    """What ``quantize_graph`` produced: the quantized graph, one ``"node (op): reason"`` line per op left in
    float, the ranges actually used per quantized activation, the range-table names not in the graph, and
    the plan it followed.
    """
    graph: Graph
    fallbacks: list[str]  # "node (op): reason"
    ranges: RangeTable  # the ranges actually used, per quantized activation
    unused_ranges: list[str]  # range-table names not in the graph
    plan: QuantPlan


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
    plan = plan_quantization(graph, table, opts)
    g = graph.copy()
    _rewrite(g, plan)
    unused = [k for k in table if k not in graph.tensors]
    if unused:
        log.warning("%d range-file name(s) are not tensors of the graph: %s", len(unused), ", ".join(unused))
    fallbacks = [str(f) for f in plan.fallbacks]
    g.metadata["quantization"] = {"schema": str(plan.schema), "fallbacks": fallbacks, "activation_dtype": ACT_DTYPE,
                                  "wide_activations": dict(plan.wide)}
    return QuantizeResult(g, fallbacks, plan.ranges, unused, plan)


def _rewrite(g: Graph, plan: QuantPlan) -> None:
    quantized_names: dict[str, str] = {}  # float name -> name of its quantized version (inserted Q)
    dequantized_names: dict[str, str] = {}  # quantized name -> float name (inserted DQ)
    new_nodes: list[Node] = []

    def as_quantized(name: str) -> str:
        t = g.tensors[name]
        if t.is_quantized:
            return name
        if name in quantized_names:
            return quantized_names[name]
        qp = plan.params(name)
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
        if name and is_float_activation(g, name) and plan.is_source_rounded(name):
            return as_quantized(name)
        return name

    quantized = set(plan.quantized)
    for node in g.nodes:
        op = get_op(node.op_type)
        if node.name not in quantized:
            node.inputs = [as_float(rounded(i)) if i else i for i in node.inputs]
            new_nodes.append(node)
            continue
        # the op's integer variant unless a source model's Q/DQ pair fixed a parameter (the import reproduces
        # the source's float island there); QAT's and AdaRound's fixed parameters are qmace's own choice
        own = op.integer_arith and not any(g.has_fixed_params(t) for t in (*node.inputs, *node.outputs) if t)
        for i in data_inputs(g, node):
            node.inputs[i] = as_quantized(node.inputs[i])
        _quantize_weights(g, node, op, plan)
        for o in node.outputs:
            t = g.tensors.get(o) if o else None
            if t is not None and t.dtype == "float32":
                t.quant = plan.params(o)
                t.dtype = t.quant.dtype
        if own:
            node.attrs[ARITH] = op.integer_arith
        elif op.integer_arith and node.attrs.get(ARITH) == op.integer_arith:
            del node.attrs[ARITH]  # a mark from an earlier quantization of this graph does not carry over
        new_nodes.append(node)
    g.nodes = new_nodes
    # Graph outputs keep their names and stay float: the quantized tensor is renamed and dequantized.
    for out in list(g.outputs):
        if is_float_activation(g, out) and out not in quantized_names and plan.is_source_rounded(out):
            g.rename_tensor(out, pre := g.unique_name(f"{out}__float"))  # a float op's output the source rounds
            g.outputs = [out if o == pre else o for o in g.outputs]
            g.add_tensor(Tensor(out, "float32", g.tensors[pre].shape))
            qname = g.unique_name(f"{out}__quant")
            qp = plan.params(out)
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


def _quantize_weights(g: Graph, node: Node, op, plan: QuantPlan) -> None:
    """Quantize the node's planned weights (and its bias with scale s_x * s_w)."""
    for i, name in enumerate(node.inputs):
        wp = plan.weights.get((node.name, i))
        if wp is None:
            continue
        w = g.tensors[name].data.astype(np.float32)
        qp = wp.params
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
