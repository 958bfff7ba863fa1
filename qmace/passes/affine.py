"""Per-channel affine ops folded into the producing Conv, and MatMul + bias into Gemm.

Batch norm spelled with plain arithmetic (Keras 3 writes ``y * s + t`` with ``s = gamma * rsqrt(var + eps)``
and ``t = beta - mean * s``, constants once folded), and TF's BiasAdd, arrive as ``Mul``/``Add``/``Sub`` by a
constant after a Conv. With ``c`` broadcastable to ``(1, M, 1, 1)`` (one value per output channel, or one):
``Mul: W'[m] = W[m] * c[m], b' = b * c``; ``Add: b' = b + c``; ``Sub: b' = b - c``. A 2-D constant-weight
``MatMul(x, W) + c`` with ``c`` of shape ``(N,)`` or ``(1, N)`` becomes ``Gemm(x, W, c)``.
The producer takes over the folded op's output name. Fixed weight parameters recorded by a frontend
(``Graph.fixed_params``) follow a Mul when they are symmetric: scales times ``|c[m]|`` (see ``weight_params``).
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.passes.weight_params import rescale_weight_params


def _channel_vector(value: np.ndarray, m: int, rank: int) -> np.ndarray | None:
    """``value`` as an (M,) vector when it broadcasts against (N, M, *S) along the channel axis only."""
    if value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, m):
        return None
    return np.broadcast_to(full.reshape(-1), (m,)).astype(np.float64)


def _new_const(graph: Graph, base: str, value: np.ndarray) -> str:
    name = graph.unique_name(base)
    value = np.ascontiguousarray(value.astype(np.float32))
    graph.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    return name


def _fold_into_conv(graph: Graph, conv: Node, op: Node, const_index: int) -> bool:
    w = graph.constant(conv.inputs[1])
    out_rank = w.ndim if w is not None else 0
    if w is None:
        return False
    c = _channel_vector(graph.constant(op.inputs[const_index]), w.shape[0], out_rank)
    if c is None or (op.op_type == "Sub" and const_index != 1):
        return False
    m = w.shape[0]
    b = graph.constant(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] else np.zeros(m)
    if b is None:
        return False
    b = b.astype(np.float64)
    if op.op_type == "Mul":
        old_w = conv.inputs[1]
        new_w = _new_const(graph, f"{conv.name}_weight_scaled", w.astype(np.float64) * c.reshape(-1, *([1] * (w.ndim - 1))))
        rescale_weight_params(graph, old_w, new_w, c)
        conv.inputs[1] = new_w
        b = b * c
    else:
        b = b + c if op.op_type == "Add" else b - c
    while len(conv.inputs) < 3:
        conv.inputs.append("")
    conv.inputs[2] = _new_const(graph, f"{conv.name}_bias_folded", b)
    return True


def _matmul_bias(graph: Graph, mm: Node, add: Node, const_index: int) -> bool:
    w = graph.constant(mm.inputs[1])
    x = graph.tensors[mm.inputs[0]]
    if w is None or w.ndim != 2 or x.shape is None or len(x.shape) != 2:
        return False
    c = graph.constant(add.inputs[const_index])
    if c.ndim > 2 or c.size != w.shape[1] or (c.ndim == 2 and c.shape[0] != 1):
        return False
    mm.op_type, mm.attrs = "Gemm", {}
    mm.inputs = [mm.inputs[0], mm.inputs[1], _new_const(graph, f"{mm.name}_bias", c.reshape(-1))]
    return True


def fold_affine(graph: Graph) -> int:
    """Fold Mul/Add/Sub by per-channel constants into Convs and bias Adds into Gemms; returns the count.

    Formulas in the module docstring.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of ops folded.
    """
    folded = 0
    changed = True
    while changed:
        changed = False
        producers, consumers = graph.producers(), graph.consumers()
        for op in graph.nodes:
            if op.op_type not in ("Mul", "Add", "Sub") or len(op.inputs) != 2:
                continue
            consts = [i for i, n in enumerate(op.inputs) if graph.constant(n) is not None]
            if len(consts) != 1:
                continue
            k = consts[0]
            src = op.inputs[1 - k]
            prod = producers.get(src)
            if prod is None or prod.attrs.get("qm_activation") or src in graph.outputs:
                continue
            if len(consumers.get(src, [])) != 1:
                continue
            if prod.op_type == "Conv":
                ok = _fold_into_conv(graph, prod, op, k)
            elif prod.op_type == "MatMul" and op.op_type == "Add":
                ok = _matmul_bias(graph, prod, op, k)
            else:
                ok = False
            if not ok:
                continue
            graph.nodes.remove(op)
            graph.tensors.pop(src, None)
            prod.outputs[0] = op.outputs[0]
            folded += 1
            changed = True
            break
    graph.remove_unused()
    return folded
