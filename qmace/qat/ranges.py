"""Who owns each quantized activation's parameters in the QAT module, derived from the ops' range rules.

Every quantized activation of the quantized graph gets an :class:`ActSpec`:
- ``learn``: its float tensor owns a learnable ``(min, max)`` pair (index ``owner`` into the module's
  ``act_min``/``act_max``); ``change_concat_ranges`` makes a Concat's inputs and output share one owner;
- ``fixed``: parameters fixed by the plan (an op's fixed range such as Sigmoid's, ``input_ranges``,
  user ``fixed_params``);
- ``same``: the parameters of ``source`` (ops whose range rule is "same as input 0": data movement);
- ``union``: the parameters of the union of the ``sources``' ranges (Concat's rule).
The kind comes from the quantizer's plan (``QuantizeResult.plan``: each activation's ``ParamSource``), so
QAT places and shares parameters exactly where the quantized model does; :func:`range_rule` (the op's
range-rule trait) only names the kind of a tensor the plan does not list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph
from qmace.ops import get_op
from qmace.ops.base import RangeRule
from qmace.qat.fakequant import with_value
from qmace.quantize.plan import ParamSource, QuantPlan
from qmace.quantize.quantizer import ACT_DTYPE, QuantizeOptions
from qmace.quantize.ranges import Range, RangeTable

LEARN, FIXED, SAME, UNION = "learn", "fixed", "same", "union"
# The plan's parameter source -> QAT's kind: statistics-derived ranges are learnt; shared and union ranges
# follow their inputs; anything the plan takes as given (an op's fixed range, input_ranges, the source
# model's parameters, a constant's own range) stays fixed.
_KIND_OF_SOURCE = {
    ParamSource.CALIBRATED: LEARN,
    ParamSource.INTERVAL: LEARN,
    ParamSource.SAME_AS_INPUT: SAME,
    ParamSource.UNION: UNION,
    ParamSource.FIXED_RANGE: FIXED,
    ParamSource.GRAPH_INPUT: FIXED,
    ParamSource.SOURCE: FIXED,
    ParamSource.CONSTANT: FIXED,
}


def range_rule(op_type: str) -> str:
    """The QAT spec kind of an op's output, from the op's range-rule trait (``Op.range_rule``).

    Args:
        op_type: the op.

    Returns:
        ``"same"`` (the output shares input 0's range), ``"fixed"`` (a fixed range), ``"union"`` (the union
        of the inputs' ranges) or ``"learn"`` (a range from statistics, learned by QAT).
    """
    rule = get_op(op_type).range_rule
    if rule is RangeRule.INPUT:
        return SAME
    if rule is RangeRule.FIXED:
        return FIXED
    if rule is RangeRule.UNION:
        return UNION
    return LEARN


@dataclass(frozen=True)
class ActSpec:
    """Where one quantized activation's parameters come from (module docstring)."""

    kind: str
    owner: int | None = None  # learn: index into act_min / act_max
    qp: qmath.QuantParams | None = None  # fixed: the parameters
    source: str | None = None  # same: the tensor whose parameters it shares
    sources: tuple[str, ...] = ()  # union: the tensors whose ranges it unites
    float_name: str | None = None  # fixed / union: the float graph's tensor name


@dataclass
class ActivationRanges:
    """The specs of every quantized activation plus the float tensors each owner stands for."""

    qgraph: Graph
    opts: QuantizeOptions
    base_ranges: RangeTable
    specs: dict[str, ActSpec] = field(default_factory=dict)
    owner_names: list[list[str]] = field(default_factory=list)  # owner index -> float tensor names
    initial: list[Range] = field(default_factory=list)  # owner index -> starting range
    owner_dtypes: list[str] = field(default_factory=list)  # owner index -> code type (uint8, or the plan's uint16)
    plan: QuantPlan | None = None  # the quantizer's plan the specs follow

    # ---- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, qgraph: Graph, float_graph: Graph, opts: QuantizeOptions, base_ranges: RangeTable,
        plan: QuantPlan | None = None,
    ) -> ActivationRanges:
        """The specs of ``qgraph``'s quantized activations (module docstring).

        Args:
            qgraph: the quantized graph (``quantize_graph`` of ``float_graph``).
            float_graph: the float graph.
            opts: the quantization options.
            base_ranges: the plan's ranges (float tensor name -> Range).
            plan: the quantizer's plan for ``qgraph`` (the source of every activation's kind).

        Returns:
            The ActivationRanges.

        Raises:
            QuantizationError: a learned activation without a range.
        """
        self = cls(qgraph, opts, base_ranges)
        self.plan = plan
        group = _concat_groups(float_graph) if opts.change_concat_ranges else {}
        owner_keys: dict[str, int] = {}
        graph_out_of = {
            n.inputs[0]: n.outputs[0]
            for n in qgraph.nodes
            if n.op_type == "DequantizeLinear" and n.outputs[0] in qgraph.outputs
        }
        for node in qgraph.nodes:
            for o in node.outputs:
                t = qgraph.tensors.get(o) if o else None
                if t is None or not t.is_quantized or t.data is not None:
                    continue
                if node.op_type == "QuantizeLinear":
                    fname = node.inputs[0]
                    fixed = fname in opts.input_ranges or fname in opts.fixed_params
                else:
                    fname = graph_out_of.get(o, o)
                    fixed = False
                self.specs[o] = self._spec_of(node, o, fname, fixed, group, owner_keys)
        return self

    def _spec_of(self, node, name, fname, fixed, group, owner_keys) -> ActSpec:
        """The spec of ``name`` (output of ``node``; ``fname`` its float tensor)."""
        t = self.qgraph.tensors[name]
        planned = self.plan.activations.get(fname) if self.plan is not None else None
        if planned is not None and node.op_type != "QuantizeLinear":
            kind = _KIND_OF_SOURCE[planned.source]
        elif planned is not None:  # a float -> codes boundary: learnt unless the plan fixed it
            kind = LEARN if _KIND_OF_SOURCE[planned.source] == LEARN else FIXED
        elif node.op_type == "QuantizeLinear":
            kind = FIXED if fixed else LEARN
        else:
            kind = range_rule(node.op_type)
            if kind != SAME and fname in self.opts.fixed_params:
                kind = FIXED
        if kind == SAME:
            return ActSpec(SAME, source=node.inputs[0])
        if kind == FIXED:
            return ActSpec(FIXED, qp=t.quant, float_name=fname)
        if kind == UNION:
            g = self.qgraph
            srcs = tuple(
                i
                for i in node.inputs
                if i and i in g.tensors and g.tensors[i].is_quantized and g.tensors[i].data is None
            )
            return ActSpec(UNION, sources=srcs, float_name=fname)
        key = group.get(fname, fname)
        if key not in owner_keys:
            r = self.base_ranges.get(fname)
            if r is None:
                raise QuantizationError(f"QAT: no range for {fname!r}")
            owner_keys[key] = len(self.owner_names)
            self.owner_names.append([])
            self.initial.append(r)
            self.owner_dtypes.append(t.quant.dtype if t.quant is not None else ACT_DTYPE)
        k = owner_keys[key]
        if fname not in self.owner_names[k]:
            self.owner_names[k].append(fname)
        return ActSpec(LEARN, owner=k)

    # ---- current parameters ------------------------------------------------------------------------------
    def params(
        self, act_min: torch.Tensor, act_max: torch.Tensor
    ) -> tuple[dict[str, qmath.QuantParams], dict[str, torch.Tensor]]:
        """QuantParams (qmath, exact) and differentiable float32 torch scales of every quantized activation.

        A learned owner's parameters are ``qmath.params_asymmetric(min, max, dtype)`` in the plan's code type (uint8,
        or uint16 where the 16-bit rule widened the tensor); its torch scale is
        ``(max(hi, 0) - min(lo, 0)) / (qmax - qmin)`` (differentiable in the range) carrying the exact value.

        Args:
            act_min: the owners' current minima (float64).
            act_max: the owners' current maxima.

        Returns:
            ``(params, scales)`` keyed by quantized tensor name.
        """
        lo, hi = act_min.detach().cpu().numpy(), act_max.detach().cpu().numpy()
        dev = act_min.device
        owners: dict[int, tuple] = {}
        qps: dict[str, qmath.QuantParams] = {}
        scales: dict[str, torch.Tensor] = {}

        def owner(k):
            if k not in owners:
                l, h = _ordered(float(lo[k]), float(hi[k]))
                qp = qmath.params_asymmetric(l, h, self.owner_dtypes[k])
                s = (torch.clamp(act_max[k], min=0) - torch.clamp(act_min[k], max=0)) / float(
                    qp.qmax - qp.qmin
                )
                owners[k] = qp, with_value(s, qp.scale)
            return owners[k]

        def resolve(name):
            if name not in qps:
                qps[name], scales[name] = self._resolve(name, resolve, owner, lo, hi, dev)
            return qps[name], scales[name]

        for name in self.specs:
            resolve(name)
        return qps, scales

    def _resolve(self, name, resolve, owner, lo, hi, dev):
        """One tensor's ``(QuantParams, torch scale)`` from its spec (``resolve``, ``owner``: the others')."""
        spec = self.specs[name]
        if spec.kind == LEARN:
            return owner(spec.owner)
        if spec.kind == FIXED:
            return spec.qp, torch.tensor(np.float32(spec.qp.scale), device=dev)
        if spec.kind == SAME:
            if spec.source in self.specs:
                return resolve(spec.source)
            qp = self.qgraph.tensors[spec.source].quant
            return qp, torch.tensor(qp.scale, device=dev)
        parts = [resolve(x) for x in spec.sources]  # union of the inputs' effective ranges
        ks = [self.owner_of(x) for x in spec.sources]
        if all(k is not None for k in ks) and len(set(ks)) == 1:
            return parts[0]
        los = [self.range_of(x, lo, hi) for x in spec.sources]
        qp = qmath.params_asymmetric(min(r[0] for r in los), max(r[1] for r in los), self.qgraph.tensors[name].quant.dtype)
        return qp, with_value(torch.stack([sc for _, sc in parts]).max(), qp.scale)

    def owner_of(self, name: str) -> int | None:
        """The learned owner whose parameters ``name`` uses (following ``same``).

        Args:
            name: a quantized activation.

        Returns:
            The owner's index, or None when ``name``'s parameters are not learned.
        """
        spec = self.specs.get(name)
        while spec is not None and spec.kind == SAME:
            spec = self.specs.get(spec.source)
        return spec.owner if spec is not None and spec.kind == LEARN else None

    def range_of(self, name: str, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
        """The range the quantizer records for ``name`` (its used range): the learned range, the nudged range
        of fixed parameters, or the plan's range for fixed-rule tensors.

        Args:
            name: a quantized activation.
            lo: the owners' current minima.
            hi: the owners' current maxima.

        Returns:
            ``(min, max)``.
        """
        spec = self.specs[name]
        while spec.kind == SAME:
            spec = self.specs[spec.source]
        if spec.kind == LEARN:
            return float(lo[spec.owner]), float(hi[spec.owner])
        if spec.kind == FIXED:
            fname = spec.float_name
            if fname in self.opts.fixed_params or fname not in self.base_ranges:
                n = qmath.nudged_range(spec.qp)
                return float(n.min), float(n.max)
            return self.base_ranges[fname].min, self.base_ranges[fname].max
        parts = [self.range_of(x, lo, hi) for x in spec.sources]
        return min(p[0] for p in parts), max(p[1] for p in parts)


def _ordered(lo: float, hi: float) -> tuple[float, float]:
    """A learned range whose ends crossed collapses to their midpoint."""
    return (lo, hi) if lo <= hi else ((lo + hi) / 2, (lo + hi) / 2)


def _concat_groups(fg: Graph) -> dict[str, str]:
    """change_concat_ranges: a Concat's float inputs and output share one range (union-find)."""
    parent: dict[str, str] = {}

    def find(a):
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    for n in fg.nodes:
        if range_rule(n.op_type) == UNION:
            names = [i for i in n.inputs if i and fg.tensors[i].data is None] + [n.outputs[0]]
            root = find(names[0])
            for x in names[1:]:
                parent[find(x)] = root
    return {k: find(k) for k in list(parent) + list(set(parent.values()))}


def learned_table(acts: ActivationRanges, act_min: torch.Tensor, act_max: torch.Tensor) -> RangeTable:
    """The plan's ranges with every learned (min, max) in place (keys: float graph tensor names).

    Args:
        acts: the activation specs.
        act_min: the owners' current minima.
        act_max: the owners' current maxima.

    Returns:
        The range table.
    """
    table: RangeTable = dict(acts.base_ranges)
    lo, hi = act_min.detach().cpu().numpy(), act_max.detach().cpu().numpy()
    for k, names in enumerate(acts.owner_names):
        r = Range(*_ordered(float(lo[k]), float(hi[k])))
        for n in names:
            table[n] = r
    return table


def exact_params(acts: ActivationRanges, qps: dict[str, qmath.QuantParams]) -> dict[str, qmath.QuantParams]:
    """The activation parameters that reproduce the module exactly, keyed by float tensor name (for
    ``QuantizeOptions.fixed_params``): the user's fixed ones, every learned owner's and every union's.

    Args:
        acts: the activation specs.
        qps: the current parameters (:meth:`ActivationRanges.params`).

    Returns:
        The parameters.
    """
    out = dict(acts.opts.fixed_params)
    for qname, spec in acts.specs.items():
        if spec.kind == LEARN:
            for n in acts.owner_names[spec.owner]:
                out[n] = qps[qname]
        elif spec.kind == UNION:
            out[spec.float_name] = qps[qname]
    return out
