"""The quantization plan: which nodes run on integer codes and the parameters of every quantized tensor.

``plan_quantization(graph, table, opts)`` decides, per node in topological order and driven by each op's
traits (``qmace.ops.base``):
- a node runs *quantized* when its op has an integer kernel (``kernel_for(node)``), its float data inputs
  have (or can be given) ranges, for ACCUMULATE ops its weight is a constant (or, for ops with
  ``activation_weights`` such as MatMul's Q·Kᵀ, an activation quantized per tensor from its own calibrated range
  like input 0) and its bias a constant vector, and ``quantizable(node)`` holds; otherwise it *falls back* to
  float with the reason recorded (``Fallback``);
- activation parameters follow MACE's rules (``ParamSource``): data-movement ops (RangeRule.INPUT with a
  COPY kernel) reuse their input's parameters exactly; UNION ops (Concat) take the union of their inputs (with
  ``change_concat_ranges`` that union is written back to the producers first); FIXED ops get the op's range
  (Sigmoid/Softmax [0, 1], Tanh [-1, 1]); STAT outputs without statistics use ``range_without_stats``
  (Add/Sub: the interval sum/difference); everything else takes its calibrated range; graph inputs take
  ``input_ranges``; parameters fixed by the source model (imported Q/DQ, QAT, AdaRound) win over all of these
  except the exact sharing of a COPY op;
- weight parameters come from ``Op.weight_params`` under the schema, or from the fixed parameters.
- activations are uint8, except those the 16-bit rule (``qmace.quantize.mixed``, ``wide_activations``) widens
  to uint16 (``QuantPlan.wide`` says which and why).

The result is one typed ``QuantPlan`` that the rewrite (``qmace.quantize.quantizer``) consumes; it is also
exposed on ``QuantizeResult.plan`` for the tools built on the same decisions (QAT's fake-quant placement
reads the same rules: ``ActivationPlan.source`` says which ones are learnt, shared, unions or fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph, Node
from qmace.ops import get_op
from qmace.ops.base import Kernel, RangeRule
from qmace.qmath import QuantParams, Range, Schema
from qmace.quantize.mixed import WIDE_DTYPE, wide_activations

ACT_DTYPE = "uint8"  # activations are asymmetric uint8 in every schema (ORT's fastest u8 x s8 kernels)


@dataclass
class QuantizeOptions:
    """How ``quantize_graph`` quantizes: the schema (``uint8``, ``int8``, ``int8_w7``: how weights are
    quantized; activations are asymmetric per-tensor uint8 in all of them), MACE's ``change_concat_ranges``,
    the graph inputs' ranges, parameters fixed by the source model (QDQ/fake-quant nodes, QAT) and the nodes
    the user keeps in float (by name or op type).
    """
    schema: str = Schema.UINT8
    change_concat_ranges: bool = False
    # Graph input name -> its Range (a (lo, hi) pair given here is turned into a Range).
    input_ranges: dict[str, Range] = field(default_factory=dict)
    # Parameters fixed by the source (QDQ/fake-quant nodes of an imported model, or QAT): tensor or weight
    # name -> QuantParams, used as they are instead of being derived from a range or from the weights.
    fixed_params: dict[str, QuantParams] = field(default_factory=dict)
    # Nodes (by name or op type) the user keeps in float.
    float_nodes: set[str] = field(default_factory=set)
    # 16-bit activations (qmace.quantize.mixed): "rule" (the documented structural rule), "none", "all".
    wide_activations: str = "rule"
    # Further activations given 16 bits (tensor -> reason), e.g. by the calibration-sensitivity rule
    # (qmace.quantize.sensitivity); added to the structural rule's in every mode but "all".
    wide_extra: dict[str, str] = field(default_factory=dict)
    # Layers (node names) kept in float by a measured rule, with the reason the convert summary shows, e.g.
    # the weight-sensitivity rule (qmace.quantize.sensitivity.sensitive_layers, --sensitivity_float_layers).
    float_layers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ranges = {k: r if isinstance(r, Range) else Range(*r) for k, r in self.input_ranges.items()}


class ParamSource(StrEnum):
    """Where an activation's parameters come from (module docstring)."""
    CALIBRATED = "calibrated"  # the range table (statistics or a range file)
    GRAPH_INPUT = "graph_input"  # QuantizeOptions.input_ranges
    CONSTANT = "constant"  # a float constant used as data: its own min/max
    SAME_AS_INPUT = "same_as_input"  # input 0's parameters (RangeRule.INPUT)
    UNION = "union"  # the union of the inputs' ranges (RangeRule.UNION)
    INTERVAL = "interval"  # interval arithmetic on the inputs' ranges (range_without_stats)
    FIXED_RANGE = "fixed_range"  # the op's fixed output range (RangeRule.FIXED)
    SOURCE = "source"  # fixed by the source model, QAT or AdaRound (QuantizeOptions.fixed_params)


@dataclass(frozen=True)
class ActivationPlan:
    """One quantized activation (or float constant used as data): its range, parameters, and why."""
    name: str
    source: ParamSource
    owner: str  # the node that writes it ("" for graph inputs and constants)
    range: Range
    params: QuantParams


@dataclass(frozen=True)
class WeightPlan:
    """The parameters of input ``index`` (a weight) of ``node``; ``fixed`` when they came from the source."""
    node: str
    index: int
    tensor: str
    params: QuantParams
    fixed: bool


@dataclass(frozen=True)
class Fallback:
    """A node left in float, and why."""
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


@dataclass
class QuantPlan:
    """Everything the rewrite needs: the schema, the nodes that run quantized (in graph order), the
    parameters of every quantized activation and weight, and the fallbacks with reasons."""
    schema: Schema
    quantized: list[str] = field(default_factory=list)
    activations: dict[str, ActivationPlan] = field(default_factory=dict)
    weights: dict[tuple[str, int], WeightPlan] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)
    # Activations planned with 16 bits (qmace.quantize.mixed) -> why.
    wide: dict[str, str] = field(default_factory=dict)

    def params(self, name: str) -> QuantParams:
        """The planned parameters of an activation.

        Args:
            name: the tensor.

        Returns:
            Its QuantParams.

        Raises:
            KeyError: the tensor is not quantized.
        """
        return self.activations[name].params

    def is_source_rounded(self, name: str) -> bool:
        """Whether a tensor carries parameters fixed by the source: the source computes ``DQ(Q(x))`` there,
        so the quantized model rounds it too, even between two float ops.

        Args:
            name: the tensor.

        Returns:
            True for a planned tensor whose parameters came from ``QuantizeOptions.fixed_params``.
        """
        a = self.activations.get(name)
        return a is not None and a.source is ParamSource.SOURCE

    @property
    def ranges(self) -> dict[str, Range]:
        """The range used per quantized activation, in planning order."""
        return {k: a.range for k, a in self.activations.items()}


def is_float_activation(g: Graph, name: str) -> bool:
    """Whether a tensor is a float32 value computed at run time (not a constant).

    Args:
        g: the graph.
        name: the tensor ("" for an omitted input).

    Returns:
        True for a float32 activation.
    """
    t = g.tensors.get(name) if name else None
    return t is not None and t.data is None and t.dtype == "float32"


def data_inputs(g: Graph, node: Node) -> list[int]:
    """Input indices that carry quantizable float data (activations, or float constants of ops whose
    ``const_data_inputs`` trait says they are data; never weights or the bias).

    Args:
        g: the graph.
        node: the node.

    Returns:
        The input positions.
    """
    op = get_op(node.op_type)
    idx = []
    for i, name in enumerate(node.inputs):
        if not name or (op.is_weight(node, i) and g.tensors[name].data is not None) or i == op.bias_input:
            continue  # a weight input that is an activation (``activation_weights`` ops) is data
        t = g.tensors[name]
        if t.dtype != "float32":
            continue
        if t.data is None or op.const_data_inputs:
            idx.append(i)
    return idx


class _Planner:
    def __init__(self, g: Graph, table: dict[str, Range], opts: QuantizeOptions):
        if opts.schema not in qmath.SCHEMAS:
            raise QuantizationError(f"unknown quantize_schema {opts.schema!r} (choose from "
                                    f"{', '.join(qmath.SCHEMAS)})")
        self.g, self.table, self.opts = g, dict(table), opts
        self.plan = QuantPlan(Schema(opts.schema))
        self.producers = g.producers()
        self.missing: dict[str, str] = {}  # tensor -> node that needs it
        self.wide = wide_activations(g, opts.wide_activations, opts.wide_extra)  # tensor -> why it gets 16 bits

    def _owner(self, name: str) -> str:
        prod = self.producers.get(name)
        return prod.name if prod is not None else ""

    def range_of(self, name: str) -> tuple[Range | None, ParamSource]:
        if name in self.opts.input_ranges:
            return self.opts.input_ranges[name], ParamSource.GRAPH_INPUT
        return self.table.get(name), ParamSource.CALIBRATED

    def assign(self, name: str, r: Range, source: ParamSource) -> QuantParams:
        """Record ``r`` as the range of activation ``name`` and give it the asymmetric parameters."""
        qp = qmath.params_asymmetric(r.min, r.max, WIDE_DTYPE if name in self.wide else ACT_DTYPE)
        self.plan.activations[name] = ActivationPlan(name, source, self._owner(name), r, qp)
        return qp

    def known(self, name: str) -> QuantParams | None:
        a = self.plan.activations.get(name)
        return a.params if a is not None else None

    def fixed(self, name: str) -> QuantParams | None:
        """Per-tensor parameters fixed by the source for activation ``name`` (per-channel ones are only
        meaningful for weights and are ignored here)."""
        qp = self.opts.fixed_params.get(name)
        if qp is None or qp.is_per_channel:
            return None
        nudged = qmath.nudged_range(qp)
        r = Range(float(nudged.min), float(nudged.max))
        self.plan.activations[name] = ActivationPlan(name, ParamSource.SOURCE, self._owner(name), r, qp)
        return qp

    def params_for(self, name: str, needed_by: str) -> QuantParams | None:
        if self.known(name) is not None:
            return self.known(name)
        if self.fixed(name) is not None:
            return self.known(name)
        t = self.g.tensors[name]
        if t.data is not None:  # a float constant used as data: its own range
            if t.data.size and not np.all(np.isfinite(t.data)):
                raise QuantizationError(f"constant tensor {name!r} (read by {needed_by}) holds NaN or Inf; "
                                        "it cannot be quantized")
            r = Range(float(t.data.min()), float(t.data.max())) if t.data.size else Range(0.0, 0.0)
            source = ParamSource.CONSTANT
        else:
            r, source = self.range_of(name)
        if r is None:
            self.missing.setdefault(name, needed_by)
            return None
        return self.assign(name, r, source)

    def concat_writeback(self) -> None:
        """change_concat_ranges: the union of a UNION node's input ranges becomes every producer's range."""
        for node in self.g.nodes:
            if get_op(node.op_type).range_rule is not RangeRule.UNION:
                continue
            rs = [self.range_of(i)[0] for i in node.inputs if is_float_activation(self.g, i)]
            if not rs or any(r is None for r in rs):
                continue
            union = Range(min(r.min for r in rs), max(r.max for r in rs))
            for i in node.inputs:
                if is_float_activation(self.g, i) and i not in self.opts.input_ranges:
                    self.table[i] = union
            self.table[node.outputs[0]] = union

    def plan_node(self, node: Node) -> None:
        op = get_op(node.op_type)
        kind = op.kernel_for(node)
        reason = None
        if node.name in self.opts.float_nodes or node.op_type in self.opts.float_nodes:
            reason = "kept in float by request"
        elif node.name in self.opts.float_layers:
            reason = self.opts.float_layers[node.name]
        elif kind is Kernel.NONE:
            reason = "no integer kernel"
        elif not any(is_float_activation(self.g, i) for i in node.inputs):
            reason = "no float activation input"
        elif kind is Kernel.ACCUMULATE:
            w_idx = [i for i in range(len(node.inputs)) if op.is_weight(node, i)]
            if not w_idx or (self.g.tensors[node.inputs[w_idx[0]]].data is None and not op.activation_weights):
                reason = "weight is not a constant"
            elif op.bias_input is not None and len(node.inputs) > op.bias_input and node.inputs[op.bias_input]:
                b = self.g.tensors[node.inputs[op.bias_input]].data
                if b is None or b.ndim > 1:
                    reason = "bias is not a constant vector"
        if reason is None and not op.quantizable(node):
            reason = "attributes without an integer kernel"
        if reason is None:
            for i in data_inputs(self.g, node):
                if self.params_for(node.inputs[i], node.name) is None:
                    reason = f"no range for input {node.inputs[i]!r}"
            outs = [o for o in node.outputs if o and self.g.tensors[o].dtype == "float32"]
            if reason is None:
                for o in outs:
                    if self.output_params(node, op, o) is None:
                        reason = f"no range for output {o!r}"
        if reason is not None:
            self.plan.fallbacks.append(Fallback(node.name, node.op_type, reason))
            return
        self.plan.quantized.append(node.name)
        if kind is Kernel.ACCUMULATE:
            self.plan_weights(node, op)

    def plan_weights(self, node: Node, op) -> None:
        for i, name in enumerate(node.inputs):
            if not name or op.weight_axis(node, i) is None or self.g.tensors[name].data is None:
                continue  # not a weight, or an activation read as one (planned as data)
            qp = self.opts.fixed_params.get(name)
            if qp is None:
                w = self.g.tensors[name].data.astype(np.float32)
                qp = op.weight_params(node, i, w, self.opts.schema)
            self.plan.weights[(node.name, i)] = WeightPlan(node.name, i, name, qp, name in self.opts.fixed_params)

    def output_params(self, node: Node, op, out: str) -> QuantParams | None:
        rule = op.range_rule
        if self.known(out) is not None:
            return self.known(out)
        # Ops that only move codes must share their input's parameters; any other op takes fixed ones.
        if (rule is not RangeRule.INPUT or op.kernel_for(node) is not Kernel.COPY) and self.fixed(out) is not None:
            return self.known(out)
        if rule is RangeRule.INPUT:
            src = self.plan.activations.get(node.inputs[0])
            if src is None:
                return None
            self.plan.activations[out] = ActivationPlan(out, ParamSource.SAME_AS_INPUT, node.name, src.range, src.params)
            return src.params
        source = ParamSource.CALIBRATED
        if rule is RangeRule.FIXED:
            r, source = op.fixed_range, ParamSource.FIXED_RANGE
        elif rule is RangeRule.UNION:
            rs = [self.plan.activations.get(i) for i in node.inputs if is_float_activation(self.g, i)]
            if any(a is None for a in rs):
                return None
            r, source = Range(min(a.range.min for a in rs), max(a.range.max for a in rs)), ParamSource.UNION
        else:
            r, source = self.range_of(out)
            if r is None and op.range_without_stats is RangeRule.INTERVAL:
                ins = [self.plan.activations.get(i) for i in node.inputs]
                if ins and all(a is not None for a in ins):
                    r, source = op.interval(node, [a.range for a in ins]), ParamSource.INTERVAL
        if r is None:
            self.missing.setdefault(out, node.name)
            return None
        return self.assign(out, r, source)

    def source_rounded(self) -> None:
        """Float activations with source parameters that stay float (read by float nodes, or graph outputs)
        are rounded there too (``QuantPlan.is_source_rounded``): plan them, in the order the rewrite meets them."""
        quantized = set(self.plan.quantized)
        written = {o for n in self.g.nodes if n.name in quantized for o in n.outputs if o}
        for node in self.g.nodes:
            if node.name not in quantized:
                for i in node.inputs:
                    if is_float_activation(self.g, i) and i not in written:
                        self.fixed(i)
        for out in self.g.outputs:
            if is_float_activation(self.g, out) and out not in written:
                self.fixed(out)


def plan_quantization(graph: Graph, table: dict[str, Range], opts: QuantizeOptions) -> QuantPlan:
    """The plan for quantizing ``graph`` with these ranges and options (module docstring).

    Args:
        graph: the float graph (not changed).
        table: activation tensor name -> Range.
        opts: schema, input ranges, fixed parameters, float nodes.

    Returns:
        The QuantPlan.

    Raises:
        QuantizationError: an unknown schema; one error listing every tensor that a quantized op needs but
            that has no range; invalid ranges or parameters.
    """
    p = _Planner(graph, table, opts)
    if opts.change_concat_ranges:
        p.concat_writeback()
    for node in graph.nodes:
        p.plan_node(node)
    if p.missing:
        items = ", ".join(f"{t} (for {n})" for t, n in p.missing.items())
        raise QuantizationError(f"{len(p.missing)} tensor(s) have no quantization range: {items}; "
                                "add them to the range file or calibrate with samples that reach them")
    p.source_rounded()
    p.plan.wide = {k: v for k, v in p.wide.items()
                   if k in p.plan.activations and p.plan.activations[k].params.dtype == WIDE_DTYPE}
    return p.plan
