"""HardSigmoid / HardSwish fusion: the decomposed spellings exporters write become one node, as MACE fuses
activations, so that a quantized model has one DequantizeLinear -> op -> QuantizeLinear island (or none)
instead of four 8-bit round trips (Add, Clip, Mul, Div) per activation.

Rewrites, with ``r6(x) = Clip(Add(x, 3), 0, 6)`` (Add's operands in either order, Clip's bounds constant):

- ``Div(r6(x), 6)`` or ``Mul(r6(x), 1/6)``            -> ``HardSigmoid(x, alpha=1/6, beta=0.5)``
- ``Mul(x, HardSigmoid(x, 1/6, 0.5))`` (either order) -> ``HardSwish(x)``
- ``Div(Mul(x, r6(x)), 6)`` or ``Mul(Mul(x, r6(x)), 1/6)`` -> ``HardSwish(x)`` (PaddlePaddle's export)

The fused op computes ``x * clip(x/6 + 0.5, 0, 1)`` in float32 where the decomposed graph computed
``x * clip(x + 3, 0, 6) / 6``: the same function, equal to within a few float32 ulps (the tests bound it).
A rewrite needs every intermediate tensor to have a single reader, not to be a graph output and not to
carry parameters imported from a QDQ source model (those pairs are the source's numerics and are kept).
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node
from qmace.ops import get_op

SIXTH = 1.0 / 6.0


def _scalar(graph: Graph, name: str) -> float | None:
    c = graph.constant(name) if name else None
    if c is None or np.size(c) != 1:
        return None
    return float(np.asarray(c, np.float64).reshape(()))


def _is_sixth_scaling(graph: Graph, node: Node) -> str | None:
    """The non-constant input of ``Div(t, 6)`` / ``Mul(t, 1/6)`` / ``Mul(1/6, t)``, else None."""
    if node.op_type == "Div" and len(node.inputs) == 2:
        c = _scalar(graph, node.inputs[1])
        return node.inputs[0] if c is not None and c == 6.0 else None
    if node.op_type == "Mul" and len(node.inputs) == 2:
        for k in (0, 1):
            c = _scalar(graph, node.inputs[1 - k])
            if c is not None and abs(c - SIXTH) <= 1e-7 and graph.constant(node.inputs[k]) is None:
                return node.inputs[k]
    return None


class _Matcher:
    def __init__(self, graph: Graph):
        self.g = graph
        self.producers = graph.producers()
        self.consumers = graph.consumers()

    def private(self, name: str) -> bool:
        """An intermediate the rewrite may delete: one reader, not an output, no imported parameters."""
        return (len(self.consumers.get(name, [])) == 1 and name not in self.g.outputs
                and not self.g.has_fixed_params(name))

    def relu6_plus3(self, name: str) -> str | None:
        """x when ``name`` is ``Clip(Add(x, 3), 0, 6)`` with private intermediates, else None."""
        clip = self.producers.get(name)
        if clip is None or clip.op_type != "Clip" or len(clip.inputs) != 3:
            return None
        if _scalar(self.g, clip.inputs[1]) != 0.0 or _scalar(self.g, clip.inputs[2]) != 6.0:
            return None
        add = self.producers.get(clip.inputs[0])
        if add is None or add.op_type != "Add" or not self.private(clip.inputs[0]):
            return None
        for k in (0, 1):
            if _scalar(self.g, add.inputs[1 - k]) == 3.0 and self.g.constant(add.inputs[k]) is None:
                return add.inputs[k]
        return None

    def hardsigmoid_of(self, name: str) -> str | None:
        """x when ``name`` is ``HardSigmoid(x, 1/6, 0.5)``, else None."""
        hs = self.producers.get(name)
        if hs is None or hs.op_type != "HardSigmoid":
            return None
        op = get_op("HardSigmoid")
        alpha, beta = float(op.attr(hs, "alpha")), float(op.attr(hs, "beta"))
        return hs.inputs[0] if abs(alpha - SIXTH) <= 1e-7 and beta == 0.5 else None


def _replace(graph: Graph, first: Node, last: Node, node: Node, dead: list[str]) -> None:
    """Put ``node`` where ``last`` was (it takes ``last``'s output) and delete the nodes producing ``dead``."""
    producers = graph.producers()
    gone = {id(producers[t]) for t in dead if t in producers}
    gone.add(id(last))
    at = graph.nodes.index(last)
    graph.nodes[at] = node
    graph.nodes[:] = [n for n in graph.nodes if n is node or id(n) not in gone]
    for t in dead:
        graph.tensors.pop(t, None)


def fuse_hardswish(graph: Graph) -> int:
    """Fuse the decomposed HardSigmoid and HardSwish spellings (module docstring) into single nodes.

    Args:
        graph: the float graph, edited in place.

    Returns:
        The number of nodes written (HardSigmoid and HardSwish).
    """
    count = 0
    changed = True
    while changed:
        changed = False
        m = _Matcher(graph)
        for node in list(graph.nodes):
            t = _is_sixth_scaling(graph, node)
            if t is not None and m.private(t):
                x = m.relu6_plus3(t)
                if x is not None:  # Div(r6(x), 6) -> HardSigmoid
                    clip = m.producers[t]
                    new = Node(graph.unique_name(node.name + "_hardsigmoid"), "HardSigmoid", [x], list(node.outputs),
                               {"alpha": SIXTH, "beta": 0.5})
                    _replace(graph, clip, node, new, [t, clip.inputs[0]])
                    count += 1
                    changed = True
                    break
                mul = m.producers.get(t)
                if mul is not None and mul.op_type == "Mul" and len(mul.inputs) == 2:
                    for k in (0, 1):
                        x = mul.inputs[k]
                        r6 = mul.inputs[1 - k]
                        if m.private(r6) and m.relu6_plus3(r6) == x:  # Div(Mul(x, r6(x)), 6) -> HardSwish
                            clip = m.producers[r6]
                            new = Node(graph.unique_name(node.name + "_hardswish"), "HardSwish", [x],
                                       list(node.outputs))
                            _replace(graph, mul, node, new, [t, r6, clip.inputs[0]])
                            count += 1
                            changed = True
                            break
                    if changed:
                        break
            if node.op_type == "Mul" and len(node.inputs) == 2:
                for k in (0, 1):
                    x, h = node.inputs[k], node.inputs[1 - k]
                    if m.private(h) and m.hardsigmoid_of(h) == x:  # Mul(x, HardSigmoid(x)) -> HardSwish
                        new = Node(graph.unique_name(node.name + "_hardswish"), "HardSwish", [x], list(node.outputs))
                        _replace(graph, m.producers[h], node, new, [h])
                        count += 1
                        changed = True
                        break
                if changed:
                    break
    if count:
        graph.remove_unused()
    return count
