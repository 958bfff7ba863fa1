"""Fuse decomposed LayerNorm, GELU and Swish spellings into single ops (``LayerNormalization``, ``Gelu``,
``Swish``), so a quantized model rounds once per op instead of once per elementwise piece (HardSigmoid/HardSwish
spellings: ``qmace.passes.hardswish``, which ``optimize`` runs right after this pass).

Spellings matched (commuted Add/Mul operands included; constants must be scalars where shown):
- LayerNorm (PP-OCR's SVTR, torch without ``nn.LayerNorm``, paddle2onnx)::

      m = ReduceMean(x, axes=A)            # A: the trailing axes [k, rank), keepdims 1
      d = Sub(x, m)
      v = ReduceMean(Pow(d, 2) | Mul(d, d), axes=A)
      s = Sqrt(Add(v, eps))
      n = Div(d, s)
      y = [Add(] [Mul(] n [, gamma)] [, beta)]   # gamma/beta: constants over the normalized axes

  -> ``LayerNormalization(x, gamma or 1, beta, axis=k, epsilon=eps)``.
- GELU, erf form: ``x * 0.5 * (1 + Erf(x / sqrt 2))`` (``Div(x, 1.41421)`` or ``Mul(x, 0.70711)``; the
  products with x and 0.5 in any order/association) -> ``Gelu(approximate="none")``.
- GELU, tanh form: ``x * 0.5 * (1 + Tanh(0.79788 * (x + 0.044715 * x^3)))`` (``x^3`` as ``Pow(x, 3)`` or
  ``Mul(x, Mul(x, x))``) -> ``Gelu(approximate="tanh")``.
- Swish/SiLU: ``Mul(x, Sigmoid(x))`` -> ``Swish(alpha=1)``; paddle2onnx's ``Mul(x, Sigmoid(Mul(x, beta)))``
  (beta a scalar constant) -> ``Swish(alpha=beta)``.

A match needs every intermediate tensor to be read only inside the pattern, not be a graph output and not
carry parameters fixed by an imported Q/DQ pair; the fused node takes the pattern's output name (so range
files name the same tensors). Constants are compared with a relative tolerance of 1e-4 (exporters write
``sqrt(2)`` etc. rounded to float32). Anything else is left alone.
"""

from __future__ import annotations

import math

import numpy as np

from qmace.ir import Graph, Node
from qmace.ops import get_op

_RTOL = 1e-4


class _View:
    """Producers/consumers of a graph and the checks every pattern shares."""

    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producers()
        self.cons = g.consumers()

    def scalar(self, name: str) -> float | None:
        c = self.g.constant(name) if name else None
        if c is None or np.size(c) != 1 or not np.issubdtype(np.asarray(c).dtype, np.floating):
            return None
        return float(np.asarray(c).reshape(()))

    def is_value(self, name: str, value: float) -> bool:
        v = self.scalar(name)
        return v is not None and math.isclose(v, value, rel_tol=_RTOL)

    def private(self, name: str, readers: int = 1) -> bool:
        """``name`` is read by exactly ``readers`` nodes, is no graph output and has no fixed parameters."""
        return (len(self.cons.get(name, [])) == readers and name not in self.g.outputs
                and not self.g.has_fixed_params(name))

    def sole_reader(self, name: str, op_type: str) -> Node | None:
        """The only reader of a private ``name`` when it is an ``op_type`` node."""
        if not self.private(name):
            return None
        n = self.cons[name][0]
        return n if n.op_type == op_type else None

    def producer(self, name: str, op_type: str) -> Node | None:
        n = self.prod.get(name)
        return n if n is not None and n.op_type == op_type else None


def _other(node: Node, name: str) -> str | None:
    """The other input of a two-input node that reads ``name`` (None if it does not, or reads it twice)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a == name and b != name:
        return b
    if b == name and a != name:
        return a
    return None


def _replace(g: Graph, matched: list[Node], new: Node) -> None:
    """Put ``new`` where the last matched node was and drop the matched nodes and their private tensors."""
    last = max(g.nodes.index(n) for n in matched)
    g.nodes[last] = new
    for n in matched:
        if n in g.nodes:
            g.nodes.remove(n)
    keep = set(new.outputs)
    for n in matched:
        for o in n.outputs:
            if o and o not in keep:
                g.tensors.pop(o, None)


def _reduce_axes(v: _View, node: Node, rank: int | None) -> tuple[int, ...] | None:
    """The ReduceMean's axes, normalized (non-negative when the rank is known), or None if not usable."""
    if int(get_op("ReduceMean").attr(node, "keepdims")) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = v.g.constant(node.inputs[1])
        if axes is None:
            return None
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    else:
        axes = node.attrs["axes"] if "axes" in node.attrs else None  # absent: every axis (not matched)
        if axes is None:
            return None
        axes = [int(a) for a in axes]
    if not axes:
        return None
    if rank is None:
        return tuple(sorted(axes)) if sorted(axes) == [-1] else None
    return tuple(sorted(a % rank for a in axes))


def _match_layer_norm(v: _View, m1: Node) -> tuple[list[Node], Node] | None:
    g = v.g
    x = m1.inputs[0]
    shape = g.tensors[x].shape if x in g.tensors else None
    rank = len(shape) if shape is not None else None
    axes = _reduce_axes(v, m1, rank)
    if axes is None:
        return None
    if rank is not None:
        if list(axes) != list(range(axes[0], rank)):
            return None  # LayerNormalization normalizes trailing axes only
        first = axes[0]
    else:
        first = -1
    mean = m1.outputs[0]
    sub = v.sole_reader(mean, "Sub")
    if sub is None or sub.inputs != [x, mean]:
        return None
    d = sub.outputs[0]
    readers = list({id(n): n for n in v.cons.get(d, [])}.values())  # Mul(d, d) reads d twice
    if len(readers) != 2 or d in g.outputs or g.has_fixed_params(d):
        return None
    sq = next((n for n in readers if (n.op_type == "Pow" and n.inputs[0] == d and v.is_value(n.inputs[1], 2.0))
               or (n.op_type == "Mul" and n.inputs == [d, d])), None)
    div = next((n for n in readers if n is not sq), None)
    if sq is None or div is None:
        return None
    m2 = v.sole_reader(sq.outputs[0], "ReduceMean")
    if m2 is None or _reduce_axes(v, m2, rank) != axes:
        return None
    add_eps = v.sole_reader(m2.outputs[0], "Add")
    if add_eps is None:
        return None
    eps_name = _other(add_eps, m2.outputs[0])
    eps = v.scalar(eps_name) if eps_name else None
    if eps is None or eps < 0:
        return None
    sqrt = v.sole_reader(add_eps.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    matched = [m1, sub, sq, m2, add_eps, sqrt]
    s = sqrt.outputs[0]
    if div.op_type != "Div" or div.inputs != [d, s] or not v.private(s):
        return None
    matched.append(div)
    out = div.outputs[0]
    norm_shape = tuple(shape[first:]) if shape is not None else None
    gamma = beta = None
    mul = v.sole_reader(out, "Mul")
    if mul is not None:
        gamma = _affine_param(v, _other(mul, out), norm_shape)
        if gamma is not None:
            matched.append(mul)
            out = mul.outputs[0]
    add = v.sole_reader(out, "Add")
    if add is not None:
        beta = _affine_param(v, _other(add, out), norm_shape)
        if beta is not None:
            matched.append(add)
            out = add.outputs[0]
    if norm_shape is None or any(not isinstance(dim, int) for dim in norm_shape):
        return None  # Scale must be materialized over the normalized shape
    dtype = g.tensors[x].dtype
    scale_name = g.unique_name(f"{m1.name}__ln_scale")
    scale = gamma if gamma is not None else np.ones(norm_shape, np.float32)
    from qmace.ir import Tensor

    g.add_tensor(Tensor(scale_name, dtype, norm_shape, np.ascontiguousarray(scale, dtype=dtype)))
    inputs = [x, scale_name]
    if beta is not None:
        b_name = g.unique_name(f"{m1.name}__ln_bias")
        g.add_tensor(Tensor(b_name, dtype, norm_shape, np.ascontiguousarray(beta, dtype=dtype)))
        inputs.append(b_name)
    ln = Node(g.unique_name(f"{m1.name}__LayerNorm"), "LayerNormalization", inputs, [out],
              {"axis": int(first), "epsilon": float(eps)})
    return matched, ln


def _affine_param(v: _View, name: str | None, norm_shape: tuple | None) -> np.ndarray | None:
    """A constant gamma/beta that broadcasts over the normalized axes only, materialized to that shape."""
    c = v.g.constant(name) if name else None
    if c is None or norm_shape is None or any(not isinstance(d, int) for d in norm_shape):
        return None
    c = np.asarray(c)
    if not np.issubdtype(c.dtype, np.floating) or c.ndim > len(norm_shape):
        return None
    try:
        return np.broadcast_to(c, norm_shape).copy()
    except ValueError:
        return None


def _gelu_tail(v: _View, x: str, one_plus: str) -> tuple[list[Node], str] | None:
    """``x * 0.5 * one_plus`` in any order: the Mul nodes and the final output."""
    m1 = v.sole_reader(one_plus, "Mul")
    if m1 is None:
        return None
    other = _other(m1, one_plus)
    if other is None:
        return None
    if other == x:
        m2 = v.sole_reader(m1.outputs[0], "Mul")
        if m2 is None or not v.is_value(_other(m2, m1.outputs[0]) or "", 0.5):
            return None
        return [m1, m2], m2.outputs[0]
    if v.is_value(other, 0.5):
        m2 = v.sole_reader(m1.outputs[0], "Mul")
        if m2 is None or _other(m2, m1.outputs[0]) != x:
            return None
        return [m1, m2], m2.outputs[0]
    half = v.producer(other, "Mul")  # (x * 0.5) * one_plus
    if half is None or not v.private(other) or not v.is_value(_other(half, x) or "", 0.5):
        return None
    return [half, m1], m1.outputs[0]


def _plus_one(v: _View, name: str) -> Node | None:
    add = v.sole_reader(name, "Add")
    return add if add is not None and v.is_value(_other(add, name) or "", 1.0) else None


def _match_gelu_erf(v: _View, erf: Node) -> tuple[list[Node], Node] | None:
    pre = v.prod.get(erf.inputs[0])
    if pre is None or not v.private(erf.inputs[0]) or len(pre.inputs) != 2:
        return None
    if pre.op_type == "Div" and v.is_value(pre.inputs[1], math.sqrt(2.0)):
        x = pre.inputs[0]
    elif pre.op_type == "Mul":
        x = next((i for i in pre.inputs if v.is_value(_other(pre, i) or "", math.sqrt(0.5))), None)
        if x is None:
            return None
    else:
        return None
    add = _plus_one(v, erf.outputs[0])
    tail = _gelu_tail(v, x, add.outputs[0]) if add is not None else None
    if tail is None:
        return None
    nodes, out = tail
    return [pre, erf, add, *nodes], Node(v.g.unique_name(f"{erf.name}__Gelu"), "Gelu", [x], [out], {"approximate": "none"})


def _cube_of(v: _View, name: str) -> tuple[list[Node], str] | None:
    """``name = x^3`` as Pow(x, 3) or Mul(x, Mul(x, x)) / Mul(Mul(x, x), x): the nodes and x."""
    n = v.prod.get(name)
    if n is None or not v.private(name):
        return None
    if n.op_type == "Pow" and v.is_value(n.inputs[1], 3.0):
        return [n], n.inputs[0]
    if n.op_type != "Mul" or len(n.inputs) != 2:
        return None
    for sq_name, x in (n.inputs, n.inputs[::-1]):
        sq = v.prod.get(sq_name)
        if sq is not None and sq.op_type == "Mul" and sq.inputs == [x, x] and v.private(sq_name):
            return [sq, n], x
    return None


def _match_gelu_tanh(v: _View, tanh: Node) -> tuple[list[Node], Node] | None:
    scaled = v.prod.get(tanh.inputs[0])  # 0.79788 * (x + 0.044715 x^3)
    if scaled is None or scaled.op_type != "Mul" or not v.private(tanh.inputs[0]) or len(scaled.inputs) != 2:
        return None
    inner = next((i for i in scaled.inputs if v.is_value(_other(scaled, i) or "", math.sqrt(2.0 / math.pi))), None)
    inner_add = v.prod.get(inner) if inner else None
    if inner_add is None or inner_add.op_type != "Add" or not v.private(inner) or len(inner_add.inputs) != 2:
        return None
    for x, cubic in (inner_add.inputs, inner_add.inputs[::-1]):
        cmul = v.prod.get(cubic)
        if cmul is None or cmul.op_type != "Mul" or not v.private(cubic) or len(cmul.inputs) != 2:
            continue
        cube = next((i for i in cmul.inputs if v.is_value(_other(cmul, i) or "", 0.044715)), None)
        found = _cube_of(v, cube) if cube else None
        if found is None or found[1] != x:
            continue
        add = _plus_one(v, tanh.outputs[0])
        tail = _gelu_tail(v, x, add.outputs[0]) if add is not None else None
        if tail is None:
            return None
        nodes, out = tail
        matched = [*found[0], cmul, inner_add, scaled, tanh, add, *nodes]
        return matched, Node(v.g.unique_name(f"{tanh.name}__Gelu"), "Gelu", [x], [out], {"approximate": "tanh"})
    return None


def _match_swish(v: _View, sig: Node) -> tuple[list[Node], Node] | None:
    x, alpha, matched = sig.inputs[0], 1.0, [sig]
    scaled = v.prod.get(x)  # paddle2onnx: Mul(x, Sigmoid(Mul(x, beta)))
    if scaled is not None and scaled.op_type == "Mul" and len(scaled.inputs) == 2 and v.private(x):
        for a, c in (scaled.inputs, scaled.inputs[::-1]):
            beta = v.scalar(c)
            if beta is not None and v.g.constant(a) is None:
                x, alpha, matched = a, beta, [scaled, sig]
                break
    mul = v.sole_reader(sig.outputs[0], "Mul")
    if mul is None or _other(mul, sig.outputs[0]) != x:
        return None
    return [*matched, mul], Node(v.g.unique_name(f"{sig.name}__Swish"), "Swish", [x], [mul.outputs[0]],
                                 {"alpha": alpha})


_MATCHERS = {"ReduceMean": _match_layer_norm, "Erf": _match_gelu_erf, "Tanh": _match_gelu_tanh,
             "Sigmoid": _match_swish}


def fuse_decomposed(graph: Graph) -> dict[str, int]:
    """Fuse every decomposed LayerNorm / GELU / Swish of the module docstring (in place).

    Args:
        graph: the float graph with shapes inferred (LayerNorm needs the input's rank and normalized shape).

    Returns:
        Count of fused ops per op type (``{"LayerNormalization": 2, "Gelu": 1, "Swish": 0}``).
    """
    counts = {"LayerNormalization": 0, "Gelu": 0, "Swish": 0}
    changed = True
    while changed:
        changed = False
        v = _View(graph)
        for node in list(graph.nodes):
            matcher = _MATCHERS.get(node.op_type)
            found = matcher(v, node) if matcher is not None and node in graph.nodes else None
            if found is None:
                continue
            matched, new = found
            _replace(graph, matched, new)
            counts[new.op_type] += 1
            changed = True
            v = _View(graph)
    graph.remove_unused()
    return counts
