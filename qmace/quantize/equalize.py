"""Activation equalization: per-channel rescaling that lets per-tensor 8-bit activations resolve small channels.

A per-tensor activation quantizer spends its 256 steps on the tensor's widest channel; a channel whose values
stay ten times smaller gets a tenth of the resolution. Where a tensor is written only by Conv layers (per
output channel scale-free under per-channel weights) and read only by Conv layers, channel ``c`` can be
multiplied by ``s_c`` at its producers (weight rows and bias) and divided by ``s_c`` at its consumers (the
weight columns that read it): the float function is unchanged and the quantizer now sees every channel at
about the same range (Nagel et al. 2019 "cross-layer equalization" and SmoothQuant move scale the same way,
here in the direction that helps the activation).

Rules (see docs/quantization.md, "Activation equalization"):

- The inputs and output of a channel-wise node (the op trait ``channelwise``, checked per node by
  ``is_channelwise``: a same-shape ``Add`` joining a residual stream, pooling, Relu, a Flatten that keeps
  channels, a Resize that keeps N and C) form one group and share one scale vector, so the node commutes with the rescaling. Every
  producer of the group must be a linear layer (an op with ``weight_rows``: Conv, Gemm, MatMul) whose output
  channels sit on axis 1 (``channel_axis``) and can be scaled (any ``group``; fused Relu; fused Clip only as
  ``[0, hi]`` with every rescaled calibration value of its output still at most ``hi``; scales are at least
  1), or a channel-wise node inside the group; every consumer must be a linear layer with constant weights
  reading it as input 0 with its channels on axis 1 (only the weight columns of that channel change), or a
  channel-wise node inside the group. Graph inputs and outputs and any other reader leave the group alone.
- ``s_c = min(max_scale, (T / m_c) ** strength)`` with ``m_c`` the channel's calibration max |value| and ``T``
  the group's widest channel; channels that never moved keep ``s_c = 1``. With a fused ``[0, hi]`` clip whose rescaled
  calibration values stay ``<= hi`` the rescaled float model equals the original on every value inside the calibration ranges, and
  the quantized model, whose range saturates below ``hi`` anyway, is the same function either way.
- The price is paid by a consumer with ``group == 1``: dividing its input columns makes their weight rounding
  relatively coarser. Under per-channel weights (``int8``) depthwise consumers and every producer are
  per-channel, so for them it is free. ``strength`` (default 0.25; consumers that pay nothing get
  ``free_strength``, default 1) trades one against the other. The defaults were chosen by logits SQNR on
  MobileNetV2's calibration images.
- Under per-tensor weights (``uint8``, ``per_tensor_weights``) nothing is free: a producer row multiplied by
  ``s_c`` widens the whole tensor's grid when it is the row that sets the range (a BatchNorm-folded outlier
  row of a nearly dead channel, whose small output asks for the largest scale, blew a depthwise layer's range
  up 3.6x and rounded 63 of its 64 rows to zero), and a depthwise row divided by ``s_c`` gets coarser on the
  shared grid. So ``s_c`` is capped at ``max_row |w| / max |w_c|`` for every producer (no producer's range
  grows) and every group uses ``strength``. The ``uint8`` schema runs this after cross-layer equalization of
  the weight ranges (``qmace.quantize.cle.equalize_per_tensor_weights``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op

log = logging.getLogger(__name__)


class ChannelMaxima:
    """Running per-channel max |value| (axis 1) of rank >= 2 activations (a calibration observer)."""

    def __init__(self, graph: Graph) -> None:
        self.input_names = [n for n in graph.activations()
                            if graph.tensors[n].dtype == "float32" and _rank(graph, n) in (None, 2, 3, 4, 5)]
        self.maxima: dict[str, np.ndarray] = {}

    def observe(self, name: str, v: np.ndarray) -> None:
        """Fold one sample into tensor ``name``'s running per-channel ``max |v|`` (axis 1).

        Args:
            name: the tensor.
            v: its value for one sample (rank < 2 is ignored).
        """
        v = np.asarray(v)
        if v.ndim < 2:
            return
        m = np.abs(np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)).max(axis=1).astype(np.float64)
        prev = self.maxima.get(name)
        self.maxima[name] = m if prev is None or prev.shape != m.shape else np.maximum(prev, m)


def _rank(graph: Graph, name: str) -> int | None:
    shape = graph.tensors[name].shape
    return None if shape is None else len(shape)


@dataclass
class EqualizedGroup:
    """One rescaled group: its tensors, channel count, the smallest and largest scale ``s_c`` applied, the
    nodes whose weights were multiplied (producers) or divided (consumers), and the scales (when kept).
    """
    tensors: list[str]
    channels: int
    min_scale: float
    max_scale: float
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    scales: np.ndarray | None = None


def _groups(graph: Graph) -> list[list[str]]:
    """Activation tensors joined through channel-wise nodes (union-find), in first-seen order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    order = list(graph.activations())
    for name in order:
        find(name)
    for n in graph.nodes:
        if _passes_channels(graph, n):
            for i in _channel_inputs(n):
                parent[find(i)] = find(n.outputs[0])
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def _channel_inputs(node: Node) -> list[str]:
    """The inputs a channel-wise node carries channels through: all of them for an op whose inputs are all
    data (``const_data_inputs``: Add), else input 0 (Resize's roi/scales/sizes are parameters)."""
    return node.inputs if get_op(node.op_type).const_data_inputs else node.inputs[:1]


def _passes_channels(graph: Graph, node: Node) -> bool:
    """A channel-wise node (op trait) whose channel inputs (``_channel_inputs``) are all activations."""
    op = get_op(node.op_type)
    data = _channel_inputs(node)
    if not op.channelwise or not data or any(not i or graph.tensors[i].is_constant for i in data):
        return False
    return op.is_channelwise(node, lambda t: graph.tensors[t].shape)


def _channels_on_axis_1(graph: Graph, node: Node, tensor: str) -> bool:
    """Whether the layer's channel axis (``channel_axis``) is axis 1 of ``tensor`` (its input 0 or output)."""
    shape = graph.tensors[tensor].shape
    axis = get_op(node.op_type).channel_axis
    return shape is not None and len(shape) >= 2 and axis is not None and axis % len(shape) == 1


def _linear(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A linear layer's constant weight as rows (G, Mg, Cg, T) (``Op.weight_rows``) and its constant bias."""
    op = get_op(node.op_type)
    if op.channel_axis is None or len(node.inputs) < 2:
        return None
    w = graph.constant(node.inputs[1])
    b_name = node.inputs[op.bias_input] if op.bias_input is not None and len(node.inputs) > op.bias_input else ""
    b = graph.constant(b_name) if b_name else None
    if w is None or (b_name and b is None):
        return None
    rows = op.weight_rows(node, w)
    return None if rows is None else (rows, b)


def _producer_ok(graph: Graph, node: Node, members: set[str], scaled_max: float) -> bool:
    """``scaled_max``: the largest rescaled calibration value of the node's output."""
    if _passes_channels(graph, node):
        return all(i in members for i in _channel_inputs(node))
    if _linear(graph, node) is None or not _channels_on_axis_1(graph, node, node.outputs[0]):
        return False
    act = node.attrs.get("qm_activation")  # the fused activation's op type
    if act is None or get_op(act).channelwise:  # Relu commutes with a positive per-channel scale
        return True
    # a fused Clip: only as [0, hi] with no rescaled calibration value above hi (ties at hi, a saturated
    # ReLU6, are fine); any other fused activation has no qm_clip and stays alone
    lo, hi = node.attrs.get("qm_clip", [-np.inf, np.inf])
    return lo == 0.0 and scaled_max <= hi * (1 + 1e-6)


def _consumer_ok(graph: Graph, node: Node, name: str, members: set[str]) -> bool:
    if _passes_channels(graph, node):
        return node.outputs[0] in members
    return (_linear(graph, node) is not None and node.inputs[0] == name and name not in node.inputs[1:]
            and _channels_on_axis_1(graph, node, name))


def candidate_groups(g: Graph, maxima: ChannelMaxima):
    """The activation groups (``_groups``) a rescale may touch, with what every rule needs: none of the
    group's tensors is a graph input or output, every one has calibration maxima of one shape, not all zero,
    and every consumer takes a per-channel rescale (``_consumer_ok``).

    Args:
        g: the float graph (read only).
        maxima: the per-channel calibration maxima of its activations.

    Yields:
        ``(members_list, members, per, cons)``: the group's tensors in order and as a set, their per-channel
        maxima, and its ``(tensor, consumer node)`` pairs.
    """
    consumers = g.consumers()
    for members_list in _groups(g):
        members = set(members_list)
        if any(t in g.outputs or t in g.inputs or t not in maxima.maxima for t in members_list):
            continue
        per = [maxima.maxima[t] for t in members_list]
        if len({p.shape for p in per}) != 1 or float(np.max(per)) <= 0.0:
            continue
        cons = [(t, c) for t in members_list for c in consumers.get(t, [])]
        if cons and all(_consumer_ok(g, c, t, members) for t, c in cons):
            yield members_list, members, per, cons


def equalize_activations(graph: Graph, maxima: ChannelMaxima, strength: float = 0.25,
                         max_scale: float = 16.0, free_strength: float = 1.0,
                         per_tensor_weights: bool = False) -> tuple[Graph, list[EqualizedGroup]]:
    """A copy of ``graph`` with every eligible activation group rescaled (rules in the module docstring).

    The float function is unchanged inside the calibration ranges.

    Args:
        graph: the float graph (not changed).
        maxima: the activations' per-channel max |value| from a calibration pass.
        strength: ``s_c = min(max_scale, (T / m_c) ** strength)`` for groups with a ``group == 1`` consumer.
        max_scale: the largest scale applied to a channel.
        free_strength: the strength where every consumer is per-channel (the rescaling costs nothing).
        per_tensor_weights: the weights will be quantized per tensor (the ``uint8`` schema): no producer's
            per-tensor weight range may grow (``s_c <= max_row |w| / max |w_c|`` for each producer), and no
            consumer is free (a depthwise row divided by ``s_c`` loses resolution on the shared grid too).

    Returns:
        The rescaled copy and one EqualizedGroup per group rescaled.

    Raises:
        ValueError: ``strength`` or ``free_strength`` outside [0, 1].
    """
    for v in (strength, free_strength):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"equalization strength must be in [0, 1], got {v}")
    g = graph.copy()
    producers = g.producers()
    done: list[EqualizedGroup] = []
    for members_list, members, per, cons in candidate_groups(g, maxima):
        m = np.max(per, axis=0)
        top = float(m.max())
        prods = [producers[t] for t in members_list]
        # consumers that see one input channel per weight row (depthwise) pay nothing for the rescale
        free = not per_tensor_weights and all(_passes_channels(g, c) or _linear(g, c)[0].shape[2] == 1
                                              for _, c in cons)
        alpha = free_strength if free else strength
        if alpha == 0.0:
            continue
        s = np.ones_like(m)
        live = m > top * 1e-6
        s[live] = np.minimum(max_scale, (top / m[live]) ** alpha)
        if per_tensor_weights:
            for p in prods:
                if not _passes_channels(g, p) and _linear(g, p) is not None:
                    s = np.minimum(s, _row_headroom(_linear(g, p)[0]))
        if np.allclose(s, 1.0):
            continue
        if not all(_producer_ok(g, p, members, float(np.max(s * maxima.maxima[t])))
                   for t, p in zip(members_list, prods)):
            continue
        report = EqualizedGroup(members_list, len(s), float(s.min()), float(s.max()), scales=s.copy())
        for p in prods:
            if not _passes_channels(g, p):
                _scale_rows(g, p, s)
                report.producers.append(p.name)
        for _, c in cons:
            if not _passes_channels(g, c):
                _scale_columns(g, c, 1.0 / s)
                report.consumers.append(c.name)
        done.append(report)
    g.remove_unused()
    log.info("activation equalization: %d groups, %d tensors rescaled", len(done),
             sum(len(r.tensors) for r in done))
    return g, done


def _row_headroom(rows: np.ndarray) -> np.ndarray:
    """Per output channel, the factor its weight row can grow by before it sets the per-tensor range:
    ``max |w| / max |w_c|`` (>= 1; unbounded for an all-zero row)."""
    r = np.abs(rows).reshape(rows.shape[0] * rows.shape[1], -1).max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(r > 0, r.max() / np.where(r > 0, r, 1.0), np.inf)


def _replace_constant(g: Graph, node: Node, index: int, value: np.ndarray) -> None:
    old = node.inputs[index]
    name = g.unique_name(f"{old}_equalized")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value.astype(np.float32)))
    node.inputs[index] = name


def _scale_rows(g: Graph, node: Node, s: np.ndarray) -> None:
    """Multiply output channel m's weight row and bias by ``s[m]``."""
    op = get_op(node.op_type)
    rows, b = _linear(g, node)
    w = g.constant(node.inputs[1])
    _replace_constant(g, node, 1, op.weight_from_rows(node, rows * s.reshape(rows.shape[:2] + (1, 1)), w.shape))
    if b is not None:
        _replace_constant(g, node, op.bias_input, b.astype(np.float64) * s)


def _scale_columns(g: Graph, node: Node, inv: np.ndarray) -> None:
    """Multiply the weights that read input channel c by ``inv[c]`` (a grouped layer: only its group's rows)."""
    op = get_op(node.op_type)
    rows, _ = _linear(g, node)
    groups, _, cg, _ = rows.shape
    w = g.constant(node.inputs[1])
    _replace_constant(g, node, 1, op.weight_from_rows(node, rows * inv.reshape(groups, 1, cg, 1), w.shape))
