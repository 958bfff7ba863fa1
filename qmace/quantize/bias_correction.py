"""Weight-quantization bias correction (Nagel et al., "Data-Free Quantization", empirical variant).

Rounding a layer's weights shifts the mean of its output: with W_q = dequantize(quantize(W)) and the
calibration mean E[x] of each input channel, a Conv output channel m moves by
``delta[m] = sum_{c, k} (W_q - W)[m, c, k] * E[x_c]`` (padding ignored), a Gemm/MatMul output column by
``(W_q - W) E[x]``. The corrected float bias is ``b - delta``; it is then quantized as usual, so the
integer semantics are unchanged — only the bias values differ. Needs samples (``qmace quantize``); a
plain range file carries no means.
"""

from __future__ import annotations

from collections.abc import Collection

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


def channels_last(graph: Graph, node: Node) -> bool:
    """Whether a linear layer reads its input channels on the last axis (Gemm, MatMul: ``x[..., K] @ W``)
    rather than on axis 1 (Conv, whose weight has rank >= 3).

    Args:
        graph: the graph.
        node: a layer ``layer_weight`` handles.

    Returns:
        True for a rank-2 weight.
    """
    return graph.constant(node.inputs[1]).ndim == 2


class ChannelMeans:
    """Running per-channel means of the inputs of the layers bias correction can correct (a calibration
    observer): over axis 1 for rank >= 3 tensors read by a Conv, over the last axis for 2-D tensors and for
    inputs of MatMul/Gemm layers (``channels_last``; a (1, T, C) sequence into a MatMul has its channels last)."""

    def __init__(self, graph: Graph) -> None:
        self.input_names = correctable_inputs(graph)
        self.last_axis = {n.inputs[0] for n in graph.nodes
                          if layer_weight(graph, n) is not None and channels_last(graph, n)}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def observe(self, name: str, v: np.ndarray) -> None:
        """Add one sample of tensor ``name`` to its per-channel sums.

        Args:
            name: the tensor.
            v: its value for one sample (channels on axis 1 for rank >= 3, else the last axis).
        """
        v = np.asarray(v, np.float64)
        if v.ndim >= 3 and name not in self.last_axis:
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
        True when done; False where no bias can absorb it (a non-constant or multi-dimensional bias; an op
        without a bias input, e.g. MatMul, whose output is not read only by an ``Add`` of a constant
        vector along its last axis: that Add's constant is the bias then, as exporters write ``x @ W + b``).
    """
    op = get_op(node.op_type)
    bi = op.bias_input
    if bi is None:
        return _shift_following_add(g, node, delta)
    own = _own_bias(g, node)
    if own is None:
        return False
    b_name, b = own
    b = (np.zeros(len(delta)) if b is None else b.astype(np.float64)) * op.fold_bias_scale(node)
    value = (np.broadcast_to(b, delta.shape) - delta).astype(np.float32)
    name = g.unique_name(f"{b_name or node.name + '_bias'}_corrected")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    while len(node.inputs) <= bi:
        node.inputs.append("")
    node.inputs[bi] = name
    return True


def _own_bias(g: Graph, node: Node) -> tuple[str, np.ndarray | None] | None:
    """For a layer with a ``bias_input``: ``(name, value)`` of the bias a shift can go into (``("", None)``
    when the layer has none yet, so one is created); None when the bias is not a constant of rank <= 1."""
    bi = get_op(node.op_type).bias_input
    b_name = node.inputs[bi] if len(node.inputs) > bi else ""
    if not b_name:
        return "", None
    b = g.constant(b_name)
    return None if b is None or b.ndim > 1 else (b_name, b)


def _following_add(g: Graph, node: Node, m: int) -> tuple[Node, int] | None:
    """For a layer without a bias input: the ``Add`` that is the only reader of its output and adds a constant
    of ``m`` values along the last axis, with the position of that constant; None when there is none."""
    out = node.outputs[0]
    readers = g.consumers().get(out, [])
    if out in g.outputs or len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].inputs) != 2:
        return None
    add = readers[0]
    idx = 1 if add.inputs[0] == out else 0
    c = g.constant(add.inputs[idx])
    if add.inputs[1 - idx] != out or c is None or c.size != m or c.shape[-1] != m:
        return None
    return add, idx


def can_shift_bias(g: Graph, node: Node) -> bool:
    """Whether ``shift_bias`` can absorb an output shift of this linear layer.

    Args:
        g: the graph.
        node: a layer ``layer_weight`` handles.

    Returns:
        True when the layer has a bias input (a missing bias is created) or a following bias ``Add``.
    """
    if get_op(node.op_type).bias_input is not None:
        return _own_bias(g, node) is not None
    w = layer_weight(g, node)
    return w is not None and _following_add(g, node, w.shape[0] * w.shape[1]) is not None


def _shift_following_add(g: Graph, node: Node, delta: np.ndarray) -> bool:
    """``shift_bias`` for a layer without a bias input: ``y = layer(x); z = y + c`` with ``c`` a constant of
    ``delta.size`` values along the last axis and ``z`` the only reader of ``y`` gets ``c - delta``."""
    found = _following_add(g, node, delta.size)
    if found is None:
        return False
    add, idx = found
    c = g.constant(add.inputs[idx])
    value = (c.astype(np.float64) - delta.reshape(c.shape)).astype(np.float32)
    name = g.unique_name(f"{add.inputs[idx]}_corrected")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
    add.inputs[idx] = name
    return True


def correct_biases(graph: Graph, means: ChannelMeans, schema: str,
                   skip: Collection[str] = ()) -> tuple[Graph, int]:
    """A copy of ``graph`` with biases corrected for the weight rounding of ``schema``.

    With ``dW = dequantize(quantize(W)) - W`` and ``E[x]`` the input's per-channel mean, each layer's bias
    becomes ``b - dW E[x]``: the expected output error of the rounding is removed.

    Args:
        graph: the float graph (not changed).
        means: the layer inputs' per-channel means.
        schema: the quantization schema.
        skip: node names or op types left as they are (layers kept in float have no rounding to correct).

    Returns:
        The corrected copy and the number of layers corrected.

    Raises:
        QuantizationError: an unknown schema.
    """
    g = graph.copy()
    done = 0
    for n in g.nodes:
        if n.name in skip or n.op_type in skip:
            continue
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
