"""Calibration for dense outputs and probability maps (issue 10 item 4).

A clipping range rule (percentile, entropy, MSE) trades the rare extreme values of a tensor for resolution
of the common ones. For the input of a **saturating fixed-range op** that trade is wrong: in a text
detector's probability map, the pixels that matter (text) are the rare ones at the top of the logit
histogram, and a 99.95th-percentile upper bound can sit below the detection threshold's logit on a page with
little text, turning every text pixel into the same code. Those outputs already have their fixed range
(Sigmoid/HardSigmoid [0, 1], Tanh [-1, 1], Softmax [0, 1]: ``Op.range_rule``, ``Op.fixed_range``); this module fixes the range
of their *inputs* (each op states its interval: ``Op.saturating_input``):

- ``Sigmoid``: ``[max(min, -L), min(max, L)]`` with ``L = ln(2*255 - 1)`` ≈ 6.23, where ``sigmoid(L) = 1 -
  0.5/255``: beyond ±L the 8-bit [0, 1] output is saturated at its end code anyway, so nothing that changes
  an output code is clipped, and no range is wider than it needs to be.
- ``Tanh``: the same with ``L = atanh(1 - 1/255) = ln(2*255 - 1) / 2`` ≈ 3.12 ([-1, 1] output, step 2/255).
- ``HardSigmoid(alpha, beta)``: the linear part ``[-beta/alpha, (1 - beta)/alpha]`` (outside it the output is
  exactly 0 or 1).
- ``Softmax``: the observed ``[min, max]`` (no clipping: clipping the largest logit changes the largest
  probability directly; softmax saturation depends on each row's maximum, so there is no global bound).

``min``/``max`` are the exact extremes seen during calibration (``Calibrator.extrema``). The rule applies to
a tensor only when every reader is such an op (a tensor that also feeds a Conv keeps its calibrated range),
and never to graph inputs (their ranges are the YAML's ``input_ranges``). Through code-moving ops
(DepthToSpace, Reshape, Transpose: output parameters = input parameters) the rule reaches the tensor whose
range actually sets those parameters (e.g. the Conv before the DepthToSpace of a rewritten ConvTranspose).
A tensor whose observed values all lie beyond one end of the interval keeps its calibrated range.
"""

from __future__ import annotations

import logging

from qmace.ir import Graph
from qmace.ops import get_op
from qmace.quantize.ranges import Range, RangeTable

log = logging.getLogger(__name__)

def saturating_input_ranges(graph: Graph, table: RangeTable, extrema: RangeTable) -> tuple[RangeTable, list[str]]:
    """``table`` with the inputs of saturating fixed-range ops re-ranged by the module's rule.

    Args:
        graph: the float graph the ranges were calibrated on.
        table: the calibrated ranges (any method).
        extrema: the exact observed (min, max) per tensor (``Calibrator.extrema()``).

    Returns:
        The new table (a copy; ``table`` is not changed) and the names of the tensors whose range changed.
    """
    producers, consumers = graph.producers(), graph.consumers()
    out = dict(table)
    changed = []
    for name, readers in consumers.items():
        if name in graph.inputs or name not in extrema or name not in table or not readers:
            continue
        spans = [get_op(r.op_type).saturating_input(r) for r in readers]
        if any(sp is None for sp in spans) or not all(r.inputs and r.inputs[0] == name for r in readers):
            continue
        spans = list(spans)  # the union of what every reader can still resolve
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        for t in _copy_chain(graph, name, producers, consumers):
            if t not in extrema or t not in table:
                continue
            a, b = max(extrema[t].min, lo), min(extrema[t].max, hi)
            if a > b:
                continue
            new = Range(a, b)
            if new != table[t]:
                log.info("range of %s (read by %s): [%g, %g] -> [%g, %g]", t, readers[0].op_type, table[t].min,
                         table[t].max, new.min, new.max)
                out[t] = new
                changed.append(t)
    return out, changed


def _copy_chain(graph: Graph, name: str, producers: dict, consumers: dict) -> list[str]:
    """``name`` and, walking back, the inputs of the code-moving ops that produce it (DepthToSpace, Reshape, ...:
    their output shares their input's parameters, so the input's range is the one that counts), while each
    input has that op as its only reader."""
    chain = [name]
    while True:
        prod = producers.get(chain[-1])
        if prod is None or not prod.inputs:
            return chain
        op = get_op(prod.op_type)
        src = prod.inputs[0]
        if (op.quant_kernel != "copy" or op.range_rule != "input" or src in graph.inputs
                or len(consumers.get(src, [])) != 1 or graph.tensors[src].is_constant):
            return chain
        chain.append(src)
