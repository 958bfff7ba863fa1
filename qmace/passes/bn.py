"""BatchNormalization folding into the producing Conv / ConvTranspose / Gemm.

With s = gamma / sqrt(var + eps): Conv weights W'[m] = W[m] * s[m], bias b' = (b - mean) * s + beta.
ConvTranspose scales axis 1 of W (per output channel of each group). Gemm (y = alpha*A@B + beta*C) gets
B' = B * s on its output columns and C' = s * (beta*C - mean) + bn_bias with beta' = 1.
The producer takes over the BatchNormalization's output name (as MACE's fusions do). A BN whose input
has fixed quantization parameters (an imported Q/DQ pair sits between it and its producer) is not folded:
the source model rounds there, so the BN stays a float op between those parameters.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.passes.weight_params import rescale_weight_params


def _const(graph: Graph, name: str) -> np.ndarray | None:
    return graph.constant(name) if name else None


def _set_const(graph: Graph, node: Node, index: int, value: np.ndarray, suffix: str) -> None:
    name = graph.unique_name(f"{node.name}_{suffix}")
    value = np.ascontiguousarray(value.astype(np.float32))
    graph.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    while len(node.inputs) <= index:
        node.inputs.append("")
    node.inputs[index] = name


def fold_batchnorm(graph: Graph) -> int:
    """Fold inference-mode BatchNormalizations into the Conv, ConvTranspose or Gemm producing their input.

    With ``s = gamma / sqrt(var + eps)``: ``W'[m] = W[m] * s[m]``, ``b' = (b - mean) * s + beta`` (formulas
    per producer in the module docstring). Left alone: a producer with other readers, a fused activation or
    non-constant weights, malformed parameters, an input with fixed quantization parameters.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of BatchNormalizations folded.
    """
    folded = 0
    while True:
        producers, consumers = graph.producers(), graph.consumers()
        for bn in graph.nodes:
            if (bn.op_type != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1
                    or int(get_op(bn.op_type).attr(bn, "training_mode"))):  # training mode normalizes by batch statistics
                continue
            prod = producers.get(bn.inputs[0])
            if prod is None or prod.op_type not in ("Conv", "ConvTranspose", "Gemm") or prod.attrs.get("qm_activation"):
                continue
            if len(consumers.get(bn.inputs[0], [])) != 1 or bn.inputs[0] in graph.outputs:
                continue
            if graph.has_fixed_params(bn.inputs[0]):  # a Q/DQ pair between producer and BN: a rounding to keep
                continue
            params = [_const(graph, n) for n in bn.inputs[1:5]]
            w = _const(graph, prod.inputs[1])
            if w is None or any(p is None for p in params):
                continue
            if any(p.ndim != 1 or p.shape != params[0].shape for p in params) or w.ndim < 2:
                continue  # malformed parameters: leave the BatchNormalization to its kernel's named error
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            s = gamma / np.sqrt(var + float(get_op(bn.op_type).attr(bn, "epsilon")))
            if prod.op_type == "Gemm":
                if not _fold_into_gemm(graph, prod, w, s, beta, mean):
                    continue
            else:
                m = len(s)
                b = _const(graph, prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] else np.zeros(m)
                if b is None or b.shape != (m,) or (prod.op_type == "Conv" and w.shape[0] != m) or (
                        prod.op_type == "ConvTranspose" and w.shape[1] * int(get_op(prod.op_type).attr(prod, "group")) != m):
                    continue
                if prod.op_type == "Conv":
                    w2 = w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))
                else:  # ConvTranspose: W (C_in, M/g, k...), output channel = g * M/g + j
                    group = int(get_op(prod.op_type).attr(prod, "group"))
                    cin, mg = w.shape[0], w.shape[1]
                    sg = s.reshape(group, 1, mg, *([1] * (w.ndim - 2)))
                    w2 = (w.astype(np.float64).reshape(group, cin // group, mg, *w.shape[2:]) * sg).reshape(w.shape)
                old_w = prod.inputs[1]
                _set_const(graph, prod, 1, w2, "weight_bnfold")
                if prod.op_type == "Conv":
                    rescale_weight_params(graph, old_w, prod.inputs[1], s)
                _set_const(graph, prod, 2, (b.astype(np.float64) - mean) * s + beta, "bias_bnfold")
            old = prod.outputs[0]
            graph.nodes.remove(bn)
            graph.tensors.pop(old, None)
            prod.outputs[0] = bn.outputs[0]
            folded += 1
            break
        else:
            break
    graph.remove_unused()
    return folded


def _fold_into_gemm(graph: Graph, gemm: Node, w: np.ndarray, s, beta_bn, mean) -> bool:
    if w.ndim != 2:
        return False
    trans_b = int(get_op(gemm.op_type).attr(gemm, "transB"))
    m = w.shape[0] if trans_b else w.shape[1]
    if len(s) != m:
        return False
    w2 = w.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
    c = _const(graph, gemm.inputs[2]) if len(gemm.inputs) > 2 and gemm.inputs[2] else np.zeros(m)
    if c is None:
        return False
    beta = float(get_op(gemm.op_type).attr(gemm, "beta"))
    c2 = s * (beta * np.broadcast_to(c.astype(np.float64), (m,)) - mean) + beta_bn if c.ndim <= 1 else None
    if c2 is None:
        return False
    _set_const(graph, gemm, 1, w2, "weight_bnfold")
    _set_const(graph, gemm, 2, c2, "bias_bnfold")
    gemm.attrs["beta"] = 1.0
    return True
