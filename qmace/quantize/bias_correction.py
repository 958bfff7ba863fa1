"""Weight-quantization bias correction (Nagel et al., "Data-Free Quantization", empirical variant).

Rounding a layer's weights shifts the mean of its output: with W_q = dequantize(quantize(W)) and the
calibration mean E[x] of each input channel, a Conv output channel m moves by
``delta[m] = sum_{c, k} (W_q - W)[m, c, k] * E[x_c]`` (padding ignored), a Gemm/MatMul output column by
``(W_q - W) E[x]``. The corrected float bias is ``b - delta``; it is then quantized as usual, so the
integer semantics are unchanged — only the bias values differ. Needs samples (``qmace quantize``); a
plain range file carries no means.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.quantize import qmath

CORRECTED_OPS = ("Conv", "Gemm", "MatMul")


def correctable_inputs(graph: Graph) -> list[str]:
    """Activation inputs whose per-channel means bias correction needs."""
    names = []
    for n in graph.nodes:
        if n.op_type in CORRECTED_OPS and len(n.inputs) > 1 and graph.constant(n.inputs[1]) is not None:
            names.append(n.inputs[0])
    return list(dict.fromkeys(names))


class ChannelMeans:
    """Running per-channel means (axis 1 for rank >= 3 tensors, the last axis for 2-D ones) of the
    inputs of the layers bias correction can correct (a calibration observer)."""

    def __init__(self, graph: Graph) -> None:
        self.input_names = correctable_inputs(graph)
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def observe(self, name: str, v: np.ndarray) -> None:
        v = np.asarray(v, np.float64)
        if v.ndim >= 3:
            flat = np.moveaxis(v, 1, -1).reshape(-1, v.shape[1])
        else:
            flat = v.reshape(-1, v.shape[-1])
        self.sums[name] = self.sums.get(name, 0.0) + flat.sum(0)
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

    def mean(self, name: str) -> np.ndarray | None:
        return self.sums[name] / self.counts[name] if name in self.sums else None


def weight_params(w: np.ndarray, node: Node, schema: str) -> qmath.QuantParams:
    """The weight parameters the quantizer will choose for input 1 of ``node`` under ``schema``."""
    axis = get_op(node.op_type).weight_axis(node, 1)
    if schema == "int8":
        return qmath.params_symmetric(w, axis, "int8")
    return qmath.params_asymmetric_weights(w, None, "uint8")


def shift_bias(g: Graph, node: Node, delta: np.ndarray) -> bool:
    """Give ``node`` (Conv/Gemm) the bias ``b - delta`` as a new constant; False where no bias can absorb it."""
    if node.op_type == "MatMul":
        return False  # no bias input; a following Add could absorb it, not done here
    b_name = node.inputs[2] if len(node.inputs) > 2 else ""
    b = g.constant(b_name) if b_name else np.zeros(len(delta))
    if b is None or b.ndim > 1:
        return False
    b = b.astype(np.float64)
    if node.op_type == "Gemm":
        b = b * float(node.attrs.get("beta", 1.0))
        node.attrs["beta"] = 1.0
    value = (np.broadcast_to(b, delta.shape) - delta).astype(np.float32)
    name = g.unique_name(f"{b_name or node.name + '_bias'}_corrected")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    while len(node.inputs) < 3:
        node.inputs.append("")
    node.inputs[2] = name
    return True


def correct_biases(graph: Graph, means: ChannelMeans, schema: str) -> tuple[Graph, int]:
    """A copy of ``graph`` with biases corrected for the weight rounding of ``schema``; returns it and the
    number of layers corrected."""
    g = graph.copy()
    done = 0
    for n in g.nodes:
        if n.op_type not in CORRECTED_OPS or len(n.inputs) < 2:
            continue
        w = g.constant(n.inputs[1])
        e = means.mean(n.inputs[0])
        if w is None or e is None:
            continue
        if n.op_type == "Gemm" and (n.attrs.get("transA", 0) or float(n.attrs.get("alpha", 1.0)) != 1.0):
            continue
        if n.op_type == "MatMul" and w.ndim != 2:
            continue
        w32 = w.astype(np.float32)
        qp = weight_params(w32, n, schema)
        dw = qmath.dequantize(qmath.quantize(w32, qp), qp).astype(np.float64) - w.astype(np.float64)
        if n.op_type == "Conv":
            group = int(n.attrs.get("group", 1))
            m, cg = w.shape[0], w.shape[1]
            taps = dw.reshape(group, m // group, cg, -1).sum(-1)  # (G, M/G, Cg)
            delta = np.einsum("gmc,gc->gm", taps, e.reshape(group, cg)).reshape(m)
        elif n.op_type == "Gemm" and n.attrs.get("transB", 0):
            delta = dw @ e
        else:
            delta = e @ dw
        done += shift_bias(g, n, delta)
    g.remove_unused()
    return g, done
