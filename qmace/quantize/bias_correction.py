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

from qmace import qmath
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op


def layer_weight(g: Graph, node: Node) -> np.ndarray | None:
    """The constant weight of a linear layer (an op with ``weight_rows``: Conv, Gemm, MatMul) as float64
    rows (G, Mg, K): one row per output channel, K = input channels per group x taps.

    Args:
        g: the graph.
        node: any node.

    Returns:
        The (G, Mg, K) rows, or None when the node is no linear layer with a constant weight.
    """
    op = get_op(node.op_type)
    w = g.constant(node.inputs[1]) if op.channel_axis is not None and len(node.inputs) > 1 else None
    rows = op.weight_rows(node, w) if w is not None else None
    return None if rows is None else rows.reshape(rows.shape[0], rows.shape[1], -1)


def correctable_inputs(graph: Graph) -> list[str]:
    """Activation inputs whose per-channel means bias correction needs.

    Args:
        graph: the float graph.

    Returns:
        The input tensor names of the layers ``layer_weight`` handles, without repeats.
    """
    return list(dict.fromkeys(n.inputs[0] for n in graph.nodes if layer_weight(graph, n) is not None))


class ChannelMeans:
    """Running per-channel means (axis 1 for rank >= 3 tensors, the last axis for 2-D ones) of the
    inputs of the layers bias correction can correct (a calibration observer)."""

    def __init__(self, graph: Graph) -> None:
        self.input_names = correctable_inputs(graph)
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def observe(self, name: str, v: np.ndarray) -> None:
        """Add one sample of tensor ``name`` to its per-channel sums.

        Args:
            name: the tensor.
            v: its value for one sample (channels on axis 1 for rank >= 3, else the last axis).
        """
        v = np.asarray(v, np.float64)
        if v.ndim >= 3:
            flat = np.moveaxis(v, 1, -1).reshape(-1, v.shape[1])
        else:
            flat = v.reshape(-1, v.shape[-1])
        self.sums[name] = self.sums.get(name, 0.0) + flat.sum(0)
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

    def mean(self, name: str) -> np.ndarray | None:
        """The per-channel mean ``E[x]`` of tensor ``name`` over everything observed.

        Args:
            name: the tensor.

        Returns:
            The (C,) means, or None when the tensor was never observed.
        """
        return self.sums[name] / self.counts[name] if name in self.sums else None


def shift_bias(g: Graph, node: Node, delta: np.ndarray) -> bool:
    """Give ``node`` (a linear layer with a ``bias_input``) the bias ``b - delta`` as a new constant.

    Args:
        g: the graph, changed in place (a new bias tensor; a layer without a bias gets one).
        node: the layer; a factor the op applies to its bias (Gemm's ``beta``, ``Op.fold_bias_scale``) is
            folded into the new bias.
        delta: (M,) per output channel.

    Returns:
        True when done; False where no bias can absorb it (no bias input: MatMul, or a non-constant or
        multi-dimensional bias).
    """
    op = get_op(node.op_type)
    bi = op.bias_input
    if bi is None:
        return False  # no bias input; a following Add could absorb it, not done here
    b_name = node.inputs[bi] if len(node.inputs) > bi else ""
    b = g.constant(b_name) if b_name else np.zeros(len(delta))
    if b is None or b.ndim > 1:
        return False
    b = b.astype(np.float64) * op.fold_bias_scale(node)
    value = (np.broadcast_to(b, delta.shape) - delta).astype(np.float32)
    name = g.unique_name(f"{b_name or node.name + '_bias'}_corrected")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    while len(node.inputs) <= bi:
        node.inputs.append("")
    node.inputs[bi] = name
    return True


def correct_biases(graph: Graph, means: ChannelMeans, schema: str) -> tuple[Graph, int]:
    """A copy of ``graph`` with biases corrected for the weight rounding of ``schema``.

    With ``dW = dequantize(quantize(W)) - W`` and ``E[x]`` the input's per-channel mean, each layer's bias
    becomes ``b - dW E[x]``: the expected output error of the rounding is removed.

    Args:
        graph: the float graph (not changed).
        means: the layer inputs' per-channel means.
        schema: the quantization schema.

    Returns:
        The corrected copy and the number of layers corrected.

    Raises:
        QuantizationError: an unknown schema.
    """
    g = graph.copy()
    done = 0
    for n in g.nodes:
        w3 = layer_weight(g, n)
        e = means.mean(n.inputs[0]) if w3 is not None else None
        if e is None:
            continue
        op = get_op(n.op_type)
        w32 = g.constant(n.inputs[1]).astype(np.float32)
        qp = op.weight_params(n, 1, w32, schema)
        wq = op.weight_rows(n, qmath.dequantize(qmath.quantize(w32, qp), qp))
        dw = wq.reshape(w3.shape) - w3  # (G, Mg, K)
        group, _, k = dw.shape
        # the mean of each weight's input: its channel's mean, the same for every kernel tap
        mu = np.repeat(e.reshape(group, -1), k * group // e.size, axis=1)  # (G, K)
        done += shift_bias(g, n, np.einsum("gmk,gk->gm", dw, mu).reshape(-1))
    g.remove_unused()
    return g, done
