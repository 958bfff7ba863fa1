"""Transpose sinking: move Transposes towards the outputs through layout-agnostic ops and cancel pairs.

Frontends of channels-last frameworks (TensorFlow) wrap each channels-first op between
``(0,3,1,2)`` and ``(0,2,3,1)`` Transposes, and graphs converted from ONNX to TF carry Transpose pairs around
residual adds. With ``T_p(x)`` the transpose ``y.shape[i] = x.shape[p[i]]``:

- two consecutive transposes compose: ``T_q(T_p(x)) = T_r(x)`` with ``r[i] = p[q[i]]``; an identity ``r``
  disappears (readers read ``x``);
- an op ``f`` whose activation inputs all come out of ``T_p`` is rewritten as ``T_p'(f'(x...))``:
  ``elementwise`` ops (an op trait) unchanged, those whose constants are data (``const_data_inputs``: the
  broadcasting binary ops) with constants padded to rank ``len(p)`` and
  transposed by ``p``'s inverse; Concat/Softmax axis ``a -> p[a]``; reductions with axes ``a -> p[a]``
  (without keepdims the output permutation is ``p`` restricted to the kept axes); Pad's pads permuted.

Each rewrite moves a transpose strictly downstream, so the pass terminates. The rewritten op keeps its
output name (range logs and fixed quantization parameters stay attached to the real op); the new Transpose
writes ``<name>__t`` for the readers, unless the name is a graph output, which the Transpose then keeps.
Per-tensor fixed parameters (``Graph.fixed_params``) are copied across moved transposes (a
transpose only moves values).
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op

_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


def _perm(node: Node) -> tuple[int, ...] | None:
    p = get_op("Transpose").attr(node, "perm")
    return tuple(int(i) for i in p) if p is not None else None


def _inherit(graph: Graph, src: str, dst: str) -> None:
    """Copy per-tensor fixed parameters of ``src`` to ``dst`` (same values, other layout)."""
    params = graph.fixed_params
    if src in params and dst not in params and not params[src].is_per_channel:
        params[dst] = params[src]


def _merge_pairs(graph: Graph) -> int:
    changed = 0
    producers = graph.producers()
    for node in list(graph.nodes):
        if node.op_type != "Transpose":
            continue
        prod = producers.get(node.inputs[0])
        if prod is None or prod.op_type != "Transpose" or _perm(prod) is None or _perm(node) is None:
            continue
        p, q = _perm(prod), _perm(node)
        r = tuple(p[i] for i in q)
        src = prod.inputs[0]
        _inherit(graph, node.inputs[0], src)
        if r == tuple(range(len(r))):
            out = node.outputs[0]
            if out in graph.outputs:
                node.op_type, node.inputs, node.attrs = "Identity", [src], {}
            else:
                _inherit(graph, out, src)
                graph.nodes.remove(node)
                graph.replace_uses(out, src)
                graph.tensors.pop(out, None)
        else:
            node.inputs, node.attrs = [src], {"perm": list(r)}
        producers = graph.producers()
        changed += 1
    return changed


def _const_for(value: np.ndarray, p: tuple[int, ...]) -> np.ndarray | None:
    """A constant operand c of ``f(T_p(x), c)`` as the operand c' of ``f(x, c')``."""
    rank = len(p)
    if value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    return np.ascontiguousarray(full.transpose(np.argsort(p)))


def _rewrite(graph: Graph, node: Node, producers: dict[str, Node]) -> bool:
    """Push the transposes feeding ``node`` below it; False when ``node`` does not qualify."""
    if len([o for o in node.outputs if o]) != 1:
        return False
    sources = {}
    perms = set()
    for i, name in enumerate(node.inputs):
        if not name or graph.tensors[name].data is not None:
            continue
        prod = producers.get(name)
        if prod is None or prod.op_type != "Transpose" or _perm(prod) is None:
            return False
        sources[i] = prod
        perms.add(_perm(prod))
    if len(perms) != 1:
        return False
    p = perms.pop()
    rank = len(p)
    op = node.op_type
    new_inputs = list(node.inputs)
    attrs = dict(node.attrs)
    out_perm = p
    if get_op(op).elementwise:
        # constants that are data (broadcasting binary ops) are permuted with the activations; others are
        # scalar parameters (Clip's bounds) and stay
        for i, name in enumerate(node.inputs[:2] if get_op(op).const_data_inputs else []):
            if i in sources:
                continue
            c = _const_for(graph.tensors[name].data, p)
            if c is None:
                return False
            cname = graph.unique_name(f"{name}__t")
            graph.add_tensor(Tensor(cname, str(c.dtype), tuple(c.shape), c))
            new_inputs[i] = cname
    elif op == "Concat":
        if len(sources) != len([i for i in node.inputs if i]):
            return False
        if "axis" not in node.attrs:  # required: left to the kernel's named error
            return False
        attrs["axis"] = p[int(node.attrs["axis"]) % rank]
    elif op == "Softmax":
        attrs["axis"] = p[int(get_op(op).attr(node, "axis")) % rank]
    elif op in _REDUCE:
        if len(node.inputs) < 2 or graph.constant(node.inputs[1]) is None:
            return False
        axes = sorted({int(a) % rank for a in graph.constant(node.inputs[1]).reshape(-1)})
        new_axes = np.array(sorted(p[a] for a in axes), np.int64)
        aname = graph.unique_name(f"{node.inputs[1]}__t")
        graph.add_tensor(Tensor(aname, "int64", tuple(new_axes.shape), new_axes))
        new_inputs[1] = aname
        if not int(get_op(op).attr(node, "keepdims")):
            kept = [p[i] for i in range(rank) if i not in axes]  # x axes of the output, in output order
            out_perm = tuple(int(np.argsort(np.argsort(kept))[j]) for j in range(len(kept)))
    elif op == "Pad":
        pads = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or (len(node.inputs) > 3 and node.inputs[3]):
            return False
        pads = pads.reshape(2, rank)
        new = np.empty_like(pads)
        new[:, list(p)] = pads
        pname = graph.unique_name(f"{node.inputs[1]}__t")
        graph.add_tensor(Tensor(pname, "int64", (2 * rank,), new.reshape(-1).astype(np.int64)))
        new_inputs[1] = pname
    else:
        return False
    for i, prod in sources.items():
        new_inputs[i] = prod.inputs[0]
        _inherit(graph, node.inputs[i], prod.inputs[0])
    node.inputs, node.attrs = new_inputs, attrs
    out = node.outputs[0]
    t_out = graph.tensors[out]
    if out in graph.outputs:
        inner = graph.unique_name(f"{out}__nchw")
        graph.add_tensor(Tensor(inner, t_out.dtype, None))
        node.outputs[0] = inner
        _inherit(graph, out, inner)
        graph.nodes.insert(graph.nodes.index(node) + 1, Node(graph.unique_name(f"{node.name}__T"), "Transpose",
                                                               [inner], [out], {"perm": list(out_perm)}))
    else:
        moved = graph.unique_name(f"{out}__t")
        graph.add_tensor(Tensor(moved, t_out.dtype, None))
        graph.replace_uses(out, moved)
        _inherit(graph, out, moved)
        t_out.shape = None
        graph.nodes.insert(graph.nodes.index(node) + 1, Node(graph.unique_name(f"{node.name}__T"), "Transpose",
                                                               [out], [moved], {"perm": list(out_perm)}))
    return True


def sink_transposes(graph: Graph) -> int:
    """Sink and cancel Transposes (see the module docstring); returns the number of rewrites.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of rewrites (merged pairs and ops moved across).
    """
    total = 0
    while True:
        changed = _merge_pairs(graph)
        producers = graph.producers()
        for node in list(graph.nodes):
            if node.op_type == "Transpose":
                continue
            if _rewrite(graph, node, producers):
                producers = graph.producers()
                changed += 1
        graph.remove_unused()
        total += changed
        if not changed:
            break
    for node in list(graph.nodes):  # identity permutations left by frontends
        p = _perm(node) if node.op_type == "Transpose" else None
        if p is not None and p == tuple(range(len(p))):
            if node.outputs[0] in graph.outputs:  # the identity pass hands the name to the producer
                node.op_type, node.attrs = "Identity", {}
            else:
                graph.nodes.remove(node)
                graph.replace_uses(node.outputs[0], node.inputs[0])
            total += 1
    graph.remove_unused()
    return total
