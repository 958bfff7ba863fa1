"""Activation equalization: per-channel rescaling that lets per-tensor 8-bit activations resolve small channels.

A per-tensor activation quantizer spends its 256 steps on the tensor's widest channel; a channel whose values
stay ten times smaller gets a tenth of the resolution. Where a tensor is written only by Conv layers (per
output channel scale-free under per-channel weights) and read only by Conv layers, channel ``c`` can be
multiplied by ``s_c`` at its producers (weight rows and bias) and divided by ``s_c`` at its consumers (the
weight columns that read it): the float function is unchanged and the quantizer now sees every channel at
about the same range (Nagel et al. 2019 "cross-layer equalization" and SmoothQuant move scale the same way,
here in the direction that helps the activation).

Rules (see docs/quantization.md, "Activation equalization"):

- Tensors joined by an ``Add`` (a residual stream) form one group and share one scale vector, so the sum
  stays consistent; so do the outputs of ops that act on each channel alone (``PASSTHROUGH``: pooling, Relu,
  a Flatten that keeps channels, a Resize that keeps N and C). Every producer of the group must be a Conv whose output channels can be
  scaled (any ``group``; fused Relu; fused Clip only as ``[0, hi]`` with every rescaled calibration value of
  its output still at most ``hi``; scales are at least 1), an Add or a channel-wise op inside the group; every consumer must be a Conv
  reading it as input 0 (any ``group``, where only the columns of that channel change), a Gemm/MatMul with a
  constant 2-D weight (its rows or columns for that channel), or an Add / channel-wise op inside the group.
  Graph inputs and outputs and any other reader leave the group alone.
- ``s_c = min(max_scale, (T / m_c) ** strength)`` with ``m_c`` the channel's calibration max |value| and ``T``
  the group's widest channel; channels that never moved keep ``s_c = 1``. With a fused ``[0, hi]`` clip whose rescaled
  calibration values stay ``<= hi`` the rescaled float model equals the original on every value inside the calibration ranges, and
  the quantized model, whose range saturates below ``hi`` anyway, is the same function either way.
- The price is paid by a consumer with ``group == 1``: dividing its input columns makes their weight rounding
  relatively coarser. Depthwise consumers and every producer are per-channel, so for them it is free.
  ``strength`` (default 0.25; consumers that pay nothing get ``free_strength``, default 1) trades one
  against the other. The defaults were chosen by logits SQNR on MobileNetV2's calibration images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from qmace.ir import Graph, Node, Tensor

log = logging.getLogger(__name__)

# Ops that act on each channel alone and commute with a positive per-channel scale: a rescaled input gives
# the same output rescaled, so their outputs join their input's group (Flatten only where it keeps channels).
# Resize (nearest, linear, cubic: per-channel weighted sums of X) where it keeps N and C; not in the
# tf_crop_and_resize mode, whose extrapolation value does not scale.
PASSTHROUGH = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "Flatten", "Resize"}


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
    """One rescaled group: its tensors, channel count, the smallest and largest scale ``s_c`` applied, and the
    nodes whose weights were multiplied (producers) or divided (consumers).
    """
    tensors: list[str]
    channels: int
    min_scale: float
    max_scale: float
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)


def _groups(graph: Graph) -> list[list[str]]:
    """Activation tensors joined through Add nodes (union-find), in first-seen order."""
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
            parent[find(n.inputs[0])] = find(n.outputs[0])
            continue
        if n.op_type != "Add" or len(n.inputs) != 2:
            continue
        a, b = n.inputs
        if graph.tensors[a].is_constant or graph.tensors[b].is_constant:
            continue
        sa, sb, so = (graph.tensors[t].shape for t in (a, b, n.outputs[0]))
        if sa is None or sa != sb or sa != so:
            continue  # broadcasting adds are left alone
        parent[find(a)] = find(n.outputs[0])
        parent[find(b)] = find(n.outputs[0])
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def _passes_channels(graph: Graph, node: Node) -> bool:
    if node.op_type not in PASSTHROUGH or not node.inputs or graph.tensors[node.inputs[0]].is_constant:
        return False
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1]:
        return False  # the Indices output would not follow
    if node.op_type == "Flatten":
        shape = graph.tensors[node.inputs[0]].shape
        return (int(node.attrs.get("axis", 1)) == 1 and shape is not None and len(shape) >= 2
                and all(d == 1 for d in shape[2:]))
    if node.op_type == "Resize":
        si, so = graph.tensors[node.inputs[0]].shape, graph.tensors[node.outputs[0]].shape
        return (node.attrs.get("coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize"
                and si is not None and so is not None and len(si) >= 2 and tuple(si[:2]) == tuple(so[:2]))
    return True


def _dense_weight(graph: Graph, node: Node) -> np.ndarray | None:
    """The constant 2-D weight of a Gemm (transA 0) or MatMul reading its input 0 channel by channel."""
    if node.op_type == "Gemm" and not node.attrs.get("transA", 0) and len(node.inputs) > 1:
        w = graph.constant(node.inputs[1])
        return w if w is not None and w.ndim == 2 else None
    if node.op_type == "MatMul" and len(node.inputs) > 1:
        w = graph.constant(node.inputs[1])
        return w if w is not None and w.ndim == 2 else None
    return None


def _conv_weight(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    if node.op_type != "Conv" or len(node.inputs) < 2:
        return None
    w = graph.constant(node.inputs[1])
    b = graph.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if w is None or (len(node.inputs) > 2 and node.inputs[2] and b is None):
        return None
    return w, b


def _producer_ok(graph: Graph, node: Node, members: set[str], scaled_max: float) -> bool:
    """``scaled_max``: the largest rescaled calibration value of the node's output."""
    if _passes_channels(graph, node):
        return node.inputs[0] in members
    if node.op_type == "Add":
        return node.outputs[0] in members and all(i in members for i in node.inputs)
    if _conv_weight(graph, node) is None:
        return False
    act = node.attrs.get("qm_activation")
    if act in (None, "Relu"):
        return True
    if act == "Clip":
        lo, hi = node.attrs.get("qm_clip", [-np.inf, np.inf])
        return lo == 0.0 and scaled_max <= hi * (1 + 1e-6)  # ties at hi (saturated ReLU6) are fine
    return False


def _consumer_ok(graph: Graph, node: Node, name: str, members: set[str]) -> bool:
    if node.op_type == "Add" or _passes_channels(graph, node):
        return node.outputs[0] in members
    weighted = _conv_weight(graph, node) is not None or _dense_weight(graph, node) is not None
    return weighted and node.inputs[0] == name and name not in node.inputs[1:]


def equalize_activations(graph: Graph, maxima: ChannelMaxima, strength: float = 0.25,
                         max_scale: float = 16.0, free_strength: float = 1.0) -> tuple[Graph, list[EqualizedGroup]]:
    """A copy of ``graph`` with every eligible activation group rescaled (rules in the module docstring).

    The float function is unchanged inside the calibration ranges.

    Args:
        graph: the float graph (not changed).
        maxima: the activations' per-channel max |value| from a calibration pass.
        strength: ``s_c = min(max_scale, (T / m_c) ** strength)`` for groups with a ``group == 1`` consumer.
        max_scale: the largest scale applied to a channel.
        free_strength: the strength where every consumer is per-channel (the rescaling costs nothing).

    Returns:
        The rescaled copy and one EqualizedGroup per group rescaled.

    Raises:
        ValueError: ``strength`` or ``free_strength`` outside [0, 1].
    """
    for v in (strength, free_strength):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"equalization strength must be in [0, 1], got {v}")
    g = graph.copy()
    producers, consumers = g.producers(), g.consumers()
    done: list[EqualizedGroup] = []
    for members_list in _groups(g):
        members = set(members_list)
        if any(t in g.outputs or t in g.inputs or t not in maxima.maxima for t in members_list):
            continue
        per = [maxima.maxima[t] for t in members_list]
        if len({p.shape for p in per}) != 1:
            continue
        m = np.max(per, axis=0)
        top = float(m.max())
        if top <= 0.0:
            continue
        prods = [producers[t] for t in members_list]
        cons = [(t, c) for t in members_list for c in consumers.get(t, [])]
        if not cons or not all(_consumer_ok(g, c, t, members) for t, c in cons):
            continue
        # consumers that see one input channel per weight row (depthwise) pay nothing for the rescale
        free = all(c.op_type == "Add" or _passes_channels(g, c)
                   or (c.op_type == "Conv" and g.constant(c.inputs[1]).shape[1] == 1) for _, c in cons)
        alpha = free_strength if free else strength
        if alpha == 0.0:
            continue
        s = np.ones_like(m)
        live = m > top * 1e-6
        s[live] = np.minimum(max_scale, (top / m[live]) ** alpha)
        if np.allclose(s, 1.0):
            continue
        if not all(_producer_ok(g, p, members, float(np.max(s * maxima.maxima[t])))
                   for t, p in zip(members_list, prods)):
            continue
        report = EqualizedGroup(members_list, len(s), float(s.min()), float(s.max()))
        for p in prods:
            if p.op_type == "Conv":
                _scale_rows(g, p, s)
                report.producers.append(p.name)
        for _, c in cons:
            if c.op_type != "Add" and not _passes_channels(g, c):
                _scale_columns(g, c, 1.0 / s)
                report.consumers.append(c.name)
        done.append(report)
    g.remove_unused()
    log.info("activation equalization: %d groups, %d tensors rescaled", len(done),
             sum(len(r.tensors) for r in done))
    return g, done


def _replace_constant(g: Graph, node: Node, index: int, value: np.ndarray) -> None:
    old = node.inputs[index]
    name = g.unique_name(f"{old}_equalized")
    g.add_tensor(Tensor(name, "float32", tuple(value.shape), value.astype(np.float32)))
    node.inputs[index] = name


def _scale_rows(g: Graph, node: Node, s: np.ndarray) -> None:
    w, b = _conv_weight(g, node)
    shape = (-1,) + (1,) * (w.ndim - 1)
    _replace_constant(g, node, 1, w.astype(np.float64) * s.reshape(shape))
    if b is not None:
        _replace_constant(g, node, 2, b.astype(np.float64) * s)


def _scale_columns(g: Graph, node: Node, inv: np.ndarray) -> None:
    """Multiply the weights that read input channel c by ``inv[c]`` (grouped Conv: only its group's rows;
    Gemm/MatMul: column c of the (transposed) weight)."""
    if node.op_type != "Conv":
        w = _dense_weight(g, node).astype(np.float64)
        transposed = node.op_type == "Gemm" and node.attrs.get("transB", 0)
        _replace_constant(g, node, 1, w * inv[None, :] if transposed else w * inv[:, None])
        return
    w, _ = _conv_weight(g, node)
    group = int(node.attrs.get("group", 1))
    m, kg = w.shape[0], w.shape[1]
    mg = m // group
    w = w.astype(np.float64).copy()
    for c, f in enumerate(inv):
        gi = c // kg
        w[gi * mg:(gi + 1) * mg, c - gi * kg] *= f
    _replace_constant(g, node, 1, w)
