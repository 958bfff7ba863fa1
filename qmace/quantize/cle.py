"""Cross-layer equalization for per-tensor weights (the ``uint8`` schema): level the weight ranges of each
channel across the layers that write and read it.

Under per-tensor weights a layer's 256 steps span its widest row; a row ten times narrower gets a tenth of the
resolution, and BatchNorm folding leaves rows whose ranges differ by 100x (depthwise layers above all). Where
an activation group (``equalize._groups``: tensors joined through channel-wise nodes) is written by linear
layers ``P`` and read by linear layers ``Q`` through a positive-homogeneous activation (none, Relu, or a
``[0, hi]`` Clip, below), multiplying channel ``i`` by ``t_i > 0`` at the producers (weight rows and biases)
and dividing it by ``t_i`` at the consumers (weight columns) keeps the float function:
``Q (diag(1/t) f(diag(t) (P x + b))) = Q f(P x + b)`` for ``f(t y) = t f(y)``.

Nagel et al. 2019 ("Data-free quantization", section 4.1), per-tensor formulation: with ``r1_i`` the range of
the producer's row ``i`` and ``r2_i`` the range of the consumer's column ``i``, each relative to its layer's
widest, ``t_i = sqrt(r2_i / r1_i)`` makes both ``sqrt(r1_i r2_i)``: an outlier row is shrunk and the narrow
column it fed is widened, which maximises ``sum_i (r1_i / R1) (r2_i / R2)`` (the product of the two layers'
per-channel precisions). A layer sits in two groups (a depthwise conv reads one and writes the next), so the
groups are swept in order until no scale moves by more than ``tol`` (relative) or ``iterations`` sweeps.
Groups with several producers or consumers (a residual stream) use, per channel, the largest relative range
over them.

Choices beyond the paper, each keeping the float function or the activations' grids:

- The common factor of ``t`` is free for the weights (each layer's grid scales with it). It is fixed so that
  no member tensor's activation range grows: ``max_i T_i m_i = max_i m_i`` with ``T`` the accumulated scale
  and ``m_i`` the channel's calibration max |value|. The activations' per-tensor grids therefore keep their
  step, and channels grown by the weights gain activation resolution.
- No channel loses activation resolution: ``T_i >= max_j(T_j m_j) / max_j m_j``, i.e. a channel shrinks only as
  far as its tensor's range shrinks with it. The sqrt rule trades a channel's producer-row precision against
  its consumer-column precision and ignores the activation grid: shrinking channel ``i`` by ``t`` under an
  unchanged per-tensor step multiplies its activation noise, as the consumer sees it, by ``1/t``. Without this
  bound the selfie segmentation model's last decoder group (the tensor the head reads, range set by one
  channel at 110 while most sit near 11) had channels shrunk to 0.10x, and its ``uint8`` model lost 1.3 dB on
  its calibration images against the rule before cross-layer equalization (benchmarks/README.md, "Mobile
  models", run 4). A widest producer row that sets the activation range shrinks with the range, so an outlier
  row is still leveled (tests/test_cle.py).
- A fused ``[0, hi]`` Clip (ReLU6) is positive-homogeneous only if the clip point moves with the scale
  (``t f(y) = clip(t y, 0, t hi)``), which a per-tensor kernel cannot do per channel. A channel that never
  reached ``hi`` on the calibration data has ``clip(t y, 0, hi) = t clip(y, 0, hi)`` whenever ``t m_i <= hi``
  (always true by the rule above, since ``max m <= hi``) and for every ``t < 1``: its scale is free. A channel
  that reached ``hi`` (it saturates) keeps ``T_i = 1``: any other scale would move its clip point.
  (Nagel et al. replaced ReLU6 by ReLU, which changes the function; this does not.)
- Channels whose producer rows or consumer columns are all zero keep their scale.

Activation equalization (``equalize.equalize_activations``) may run after it on the leveled model with the
maxima the scales imply (``scaled_maxima``): the function is unchanged, so no second calibration pass.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from qmace.ir import Graph, Node
from qmace.ops import get_op
from qmace.quantize.equalize import (
    ChannelMaxima,
    EqualizedGroup,
    _channel_inputs,
    _channels_on_axis_1,
    _linear,
    _passes_channels,
    _replace_constant,
    candidate_groups,
    equalize_activations,
)

log = logging.getLogger(__name__)

SATURATION = 1e-6  # a channel whose calibration max is within this (relative) of a clip point saturates


@dataclass
class _Layer:
    """A linear layer's weight as rows (G, Mg, Cg, T) and its bias, scaled in memory during the sweeps."""
    node: Node
    rows: np.ndarray
    bias: np.ndarray | None
    shape: tuple[int, ...]

    def out_ranges(self) -> np.ndarray:
        """Per output channel, max |w| over its row."""
        return np.abs(self.rows).max(axis=(2, 3)).reshape(-1)

    def in_ranges(self) -> np.ndarray:
        """Per input channel, max |w| over the weights that read it (its column in every row of its group)."""
        return np.abs(self.rows).max(axis=(1, 3)).reshape(-1)

    def scale_out(self, t: np.ndarray) -> None:
        g, mg = self.rows.shape[:2]
        self.rows = self.rows * t.reshape(g, mg, 1, 1)
        if self.bias is not None:
            self.bias = self.bias * t

    def scale_in(self, inv: np.ndarray) -> None:
        g, _, cg, _ = self.rows.shape
        self.rows = self.rows * inv.reshape(g, 1, cg, 1)


@dataclass
class _Group:
    tensors: list[str]
    maxima: list[np.ndarray]   # per member tensor, the calibration channel maxima of the original model
    producers: list[_Layer]
    consumers: list[_Layer]
    pinned: np.ndarray         # channels whose clip point a scale would move
    total: np.ndarray          # the accumulated scale T


def _relative(ranges: list[np.ndarray]) -> np.ndarray:
    """Per channel, the largest range relative to its own layer's widest (0 for an all-zero layer)."""
    rel = [r / r.max() if r.max() > 0 else np.zeros_like(r) for r in ranges]
    return np.max(rel, axis=0)


def _producer_activation(node: Node) -> tuple[bool, float]:
    """(eligible, clip point) of a producer's fused activation: none or Relu (``inf``), ``[0, hi]`` Clip."""
    act = node.attrs.get("qm_activation")
    if act is None or get_op(act).channelwise:
        return True, np.inf
    lo, hi = node.attrs.get("qm_clip", [-np.inf, np.inf])
    return lo == 0.0 and np.isfinite(hi), float(hi)


def _collect(g: Graph, maxima: ChannelMaxima) -> list[_Group]:
    producers = g.producers()
    layers: dict[str, _Layer] = {}

    def layer(node: Node) -> _Layer:
        if node.name not in layers:
            rows, b = _linear(g, node)
            w = g.constant(node.inputs[1])
            layers[node.name] = _Layer(node, rows, None if b is None else b.astype(np.float64), tuple(w.shape))
        return layers[node.name]

    out: list[_Group] = []
    for members_list, members, per, cons in candidate_groups(g, maxima):
        pinned = np.zeros(per[0].shape, bool)
        prods, ok = [], True
        for t, p in zip(members_list, (producers[t] for t in members_list)):
            if _passes_channels(g, p):
                ok = all(i in members for i in _channel_inputs(p))
            elif _linear(g, p) is not None and _channels_on_axis_1(g, p, p.outputs[0]):
                eligible, hi = _producer_activation(p)
                ok = eligible
                pinned |= maxima.maxima[t] >= hi * (1 - SATURATION)
                prods.append(p)
            else:
                ok = False
            if not ok:
                break
        if not ok or not prods:
            continue
        lin_cons = [c for _, c in cons if not _passes_channels(g, c)]
        if not lin_cons:
            continue
        out.append(_Group(members_list, per, [layer(p) for p in prods], [layer(c) for c in _unique(lin_cons)],
                          pinned, np.ones(per[0].shape)))
    return out


def _unique(nodes: list[Node]) -> list[Node]:
    seen: dict[str, Node] = {}
    for n in nodes:
        seen.setdefault(n.name, n)
    return list(seen.values())


def _sweep(gr: _Group) -> float:
    """Equalize one group's current weights; returns the largest relative change of a scale."""
    r1 = _relative([p.out_ranges() for p in gr.producers])
    r2 = _relative([c.in_ranges() for c in gr.consumers])
    t = np.ones_like(r1)
    live = (r1 > 0) & (r2 > 0)
    t[live] = np.sqrt(r2[live] / r1[live])
    want = gr.total * t
    # no member tensor's activation range grows: T_i m_i <= max_j m_j for every member (channels that never
    # moved have no bound)
    for m in gr.maxima:
        ok = m > 0
        want[ok] = np.minimum(want[ok], m.max() / m[ok])
    # no channel loses activation resolution: none shrinks by more than its tensor's range does,
    # T_i >= max_j(T_j m_j) / max_j m_j (the largest such bound over the members)
    want = np.maximum(want, max((float(np.max(want * m) / m.max()) for m in gr.maxima if m.max() > 0), default=0.0))
    want[gr.pinned] = 1.0
    step = want / gr.total
    gr.total = want
    for p in gr.producers:
        p.scale_out(step)
    for c in gr.consumers:
        c.scale_in(1.0 / step)
    return float(np.max(np.abs(np.log(step))))


def cross_layer_equalize(graph: Graph, maxima: ChannelMaxima, iterations: int = 50,
                         tol: float = 1e-4) -> tuple[Graph, list[EqualizedGroup]]:
    """A copy of ``graph`` with per-channel weight ranges leveled across layers (rules in the module docstring).

    The float function is unchanged on every value inside the calibration ranges.

    Args:
        graph: the float graph (not changed).
        maxima: the activations' per-channel max |value| from a calibration pass of ``graph``.
        iterations: the most sweeps over all groups.
        tol: stop when no scale changed by more than this (as ``|log t|``) in a sweep.

    Returns:
        The rescaled copy and one EqualizedGroup per group whose accumulated scales differ from 1
        (``min_scale`` / ``max_scale``: the smallest and largest ``T_i``, below 1 where a channel shrank).
    """
    g = graph.copy()
    groups = _collect(g, maxima)
    sweeps = 0
    while sweeps < iterations:
        sweeps += 1
        if max((_sweep(gr) for gr in groups), default=0.0) <= tol:
            break
    written: set[str] = set()
    done: list[EqualizedGroup] = []
    for gr in groups:
        for lay in gr.producers + gr.consumers:
            if lay.node.name in written:
                continue
            written.add(lay.node.name)
            op = get_op(lay.node.op_type)
            _replace_constant(g, lay.node, 1, op.weight_from_rows(lay.node, lay.rows, lay.shape))
            if lay.bias is not None:
                _replace_constant(g, lay.node, op.bias_input, lay.bias)
        if not np.allclose(gr.total, 1.0):
            done.append(EqualizedGroup(gr.tensors, len(gr.total), float(gr.total.min()), float(gr.total.max()),
                                       [p.node.name for p in gr.producers], [c.node.name for c in gr.consumers],
                                       gr.total.copy()))
    g.remove_unused()
    log.info("cross-layer equalization: %d groups leveled in %d sweeps", len(done), sweeps)
    return g, done


def scaled_maxima(maxima: ChannelMaxima, groups: list[EqualizedGroup]) -> ChannelMaxima:
    """The channel maxima of ``cross_layer_equalize``'s output without another calibration pass: each
    rescaled tensor's maxima times its group's accumulated scale (the function is otherwise unchanged).

    Args:
        maxima: the maxima of the graph ``cross_layer_equalize`` was given.
        groups: its reports (``scales`` per channel).

    Returns:
        A new ChannelMaxima; ``maxima`` is not changed.
    """
    out = copy.copy(maxima)
    out.maxima = dict(maxima.maxima)
    for gr in groups:
        if gr.scales is not None:
            for name in gr.tensors:
                out.maxima[name] = maxima.maxima[name] * gr.scales
    return out


def equalize_per_tensor_weights(graph: Graph, maxima: ChannelMaxima,
                                activation_strength: float = 0.25) -> tuple[Graph, list[EqualizedGroup]]:
    """The ``uint8`` schema's equalization: ``cross_layer_equalize`` (weight ranges), then activation
    equalization on the leveled model (``equalize_activations(per_tensor_weights=True)``: small activation
    channels grown within every producer's row headroom) with the maxima the scales imply.

    Args:
        graph: the float graph (not changed).
        maxima: the activations' per-channel max |value| from a calibration pass of ``graph``.
        activation_strength: the activation step's ``strength``.

    Returns:
        The rescaled copy and one EqualizedGroup per rescaled group (``scales``: both steps' product).
    """
    leveled, cle = cross_layer_equalize(graph, maxima)
    out, act = equalize_activations(leveled, scaled_maxima(maxima, cle), strength=activation_strength,
                                    per_tensor_weights=True)
    merged: dict[tuple[str, ...], EqualizedGroup] = {tuple(gr.tensors): gr for gr in cle}
    for gr in act:
        key = tuple(gr.tensors)
        if key not in merged:
            merged[key] = gr
            continue
        old = merged[key]
        scales = old.scales * gr.scales
        merged[key] = EqualizedGroup(gr.tensors, gr.channels, float(scales.min()), float(scales.max()),
                                     list(dict.fromkeys(old.producers + gr.producers)),
                                     list(dict.fromkeys(old.consumers + gr.consumers)), scales)
    return out, list(merged.values())
