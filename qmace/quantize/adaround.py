"""Weight rounding by output reconstruction (AdaRound, Nagel et al. 2020) with bias correction, in numpy.

Rounding each weight to the nearest code is not what minimises a layer's output error: for a layer
y = W x (per group of a grouped conv; x are im2col rows), the output error of rounded weights
W_q = s * (floor(W / s) + h) (+ zero point) over calibration inputs is

    E[ ||(W_q - W) x||^2 ] = tr(dW C dW^T) + ||dW mu||^2,   C = Cov[x], mu = E[x].

The mean term is removed exactly by correcting the bias (b' = b - dW mu), so AdaRound minimises
tr(dW C dW^T) over h in {0, 1} per weight. A layer whose bias cannot absorb the shift (``can_shift_bias``:
e.g. a MatMul whose output is not read by a bias ``Add`` alone) minimises the whole error, with the second
moment C + mu mu^T. A layer with more than ``max_k`` inputs per output gets rounding to nearest and the bias
correction (its K x K moment is not gathered). Only C (Kg x Kg per group) and mu are needed, accumulated
while calibration streams samples, so the optimisation never touches the samples again and costs
O(iterations * M * K^2) per layer. The relaxation h = clip(sigmoid(V) * 1.2 - 0.1, 0, 1) is optimised with
Adam on the normalised reconstruction loss plus AdaRound's regulariser sum(1 - |2h - 1|^beta) (beta annealed
20 -> 2) that drives every h to 0 or 1; the hard rounding (V >= 0) is kept only where it beats rounding to
nearest on the same loss. The codes are then fixed: the layer's weights become their dequantized values
and the weight's QuantParams are passed to the quantizer as fixed parameters, so the integer semantics
(docs/quantization.md) are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from qmace import qmath
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.quantize.bias_correction import can_shift_bias, layer_weight, shift_bias

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


@dataclass
class _Layer:
    node: Node
    sum_x: np.ndarray  # (G, K)
    sum_xx: np.ndarray | None  # (G, K, K); None: too wide, means only
    rows: int = 0


class InputStatistics:
    """Per-layer first and second moments of the input rows (``Op.input_rows``: im2col patches for a Conv) of
    every linear layer (``layer_weight``); only the first moment for layers with more than ``max_k`` inputs
    per output."""

    def __init__(self, graph: Graph, max_k: int = 2048):
        self.graph = graph
        self.layers: dict[str, _Layer] = {}
        for n in graph.nodes:
            w = layer_weight(graph, n)
            if w is None:
                continue
            gs, _, k = w.shape
            self.layers[n.name] = _Layer(n, np.zeros((gs, k)), np.zeros((gs, k, k)) if k <= max_k else None)
        self.by_input: dict[str, list[_Layer]] = {}
        for lay in self.layers.values():
            self.by_input.setdefault(lay.node.inputs[0], []).append(lay)

    @property
    def input_names(self) -> list[str]:
        """The tensors this observer wants from calibration: the inputs of the observed layers."""
        return list(self.by_input)

    def observe(self, name: str, x: np.ndarray) -> None:
        """Accumulate one sample of tensor ``name`` into every layer reading it.

        For each layer with input rows ``x`` (``Op.input_rows``: im2col for Conv, the last axis for Gemm/MatMul):
        ``sum_x += sum(x)``, ``sum_xx += x^T x``, ``rows += count``.

        Args:
            name: the tensor (an ``input_names`` entry; others are ignored).
            x: its value for one sample.
        """
        for lay in self.by_input.get(name, []):
            node = lay.node
            w = self.graph.constant(node.inputs[1])
            cols = get_op(node.op_type).input_rows(node, x, w.shape)  # (G, R, K)
            lay.sum_x += cols.sum(1)
            if lay.sum_xx is not None:
                lay.sum_xx += np.matmul(cols.transpose(0, 2, 1), cols)
            lay.rows += cols.shape[1]


@dataclass
class RoundingReport:
    """AdaRound's result for one layer: the output-reconstruction loss ``tr(dW C dW^T)`` (``C`` the input's
    second-moment matrix) with rounding to nearest and with the chosen rounding.
    """
    node: str
    nearest_loss: float  # tr(dW C dW^T) with rounding to nearest (0 for a means-only layer)
    final_loss: float  # with the chosen rounding
    optimised: bool = True  # False: rounded to nearest (over max_cost, or means only) with bias correction


def _optimise(w: np.ndarray, s: np.ndarray, zp: float, lo: int, hi: int, cov: np.ndarray, iters: int) -> np.ndarray:
    """Codes (G, Mg, K) minimising tr(dW C dW^T) per group. w (G, Mg, K); s (G, Mg, 1)."""
    r = w / s
    base = np.floor(r)
    rest = r - base
    # codes must stay in [lo, hi]: base + h + zp within bounds
    can_up = (base + 1 + zp) <= hi
    can_down = (base + zp) >= lo

    def loss_grad(h):
        dw = s * (base + h) - w  # (G, Mg, K)
        dc = np.matmul(dw, cov)  # (G, Mg, K)
        return float(np.sum(dw * dc)), 2 * s * dc

    nearest = np.clip(qmath.round_to_codes(w, s, zp, lo, hi) - zp - base, 0, 1)  # qmath's rounding
    nearest = np.where(~can_up, 0.0, np.where(~can_down, 1.0, nearest))
    l_near, _ = loss_grad(nearest)
    if l_near <= 0 or iters <= 0:
        return base + nearest + zp
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    v = np.log(p / (1 - p))
    m1 = np.zeros_like(v)
    m2 = np.zeros_like(v)
    lr, b1, b2, lam = 0.01, 0.9, 0.999, 0.01
    warm = iters // 5
    for t in range(1, iters + 1):
        sig = 1 / (1 + np.exp(-v))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
        h = np.where(~can_up, np.minimum(h, 0.0), np.where(~can_down, np.maximum(h, 1.0), h))
        _, grad_h = loss_grad(h)
        grad_h = grad_h / l_near
        if t > warm:
            beta = 2 + (20 - 2) * (1 - (t - warm) / (iters - warm))
            u = 2 * h - 1
            grad_h = grad_h + lam * (-beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2)
        inside = (h > 0) & (h < 1)
        grad_v = grad_h * sig * (1 - sig) * (ZETA - GAMMA) * inside
        m1 = b1 * m1 + (1 - b1) * grad_v
        m2 = b2 * m2 + (1 - b2) * grad_v**2
        v -= lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + 1e-8)
    hard = (v >= 0).astype(np.float64)
    hard = np.where(~can_up, 0.0, np.where(~can_down, 1.0, hard))
    l_hard, _ = loss_grad(hard)
    return base + (hard if l_hard < l_near else nearest) + zp


def adaround(
    graph: Graph, stats: InputStatistics, schema: str, iters: int = 400, max_cost: float = 2e8, progress=None,
    skip: Collection[str] = (),
) -> tuple[Graph, dict[str, qmath.QuantParams], list[RoundingReport]]:
    """Round the weights of every observed layer by output reconstruction and correct its bias.

    Returns a copy of the graph with the chosen weights (dequantized codes) and corrected biases, the
    weight QuantParams to fix in the quantizer, and a per-layer report. Layers whose optimisation would
    cost more than ``max_cost`` multiply-adds per iteration (M * K^2) get rounding to nearest plus bias
    correction only.

    Args:
        graph: the float graph.
        stats: the layers' input statistics gathered during calibration.
        schema: the quantization schema that gives the weight parameters (``qmath.weight_params``).
        iters: optimisation iterations per layer.
        max_cost: the per-iteration multiply-add budget of a layer.
        progress: wraps the layer list (a progress bar), or None.
        skip: node names or op types left as they are (layers kept in float have nothing to round), as in
            ``bias_correction.correct_biases``.

    Returns:
        ``(graph copy, {weight name: QuantParams}, [RoundingReport per layer])``.

    Raises:
        QuantizationError: an unknown schema.
    """
    g = graph.copy()
    fixed: dict[str, qmath.QuantParams] = {}
    reports: list[RoundingReport] = []
    items = [(k, lay) for k, lay in stats.layers.items() if k not in skip and lay.node.op_type not in skip]
    if progress is not None:
        items = progress(items, total=len(items), desc="AdaRound layers")
    for name, lay in items:
        if lay.rows == 0:
            log.warning("AdaRound: layer %s: its input was never observed; left as it is", name)
            continue
        node = next(n for n in g.nodes if n.name == name)
        op = get_op(node.op_type)
        w3 = layer_weight(g, node)
        w_orig = g.constant(node.inputs[1])
        qp = op.weight_params(node, 1, w_orig.astype(np.float32), schema)
        mu = lay.sum_x / lay.rows  # (G, K)
        gs, mg, k = w3.shape
        if lay.sum_xx is None:  # too wide for the K x K moment: nearest rounding, bias correction below
            cov = None
        elif can_shift_bias(g, node):
            cov = lay.sum_xx / lay.rows - mu[:, :, None] * mu[:, None, :]
        else:  # the mean shift stays: minimise the whole E||dW x||^2
            cov = lay.sum_xx / lay.rows
        # per output-channel scale in (G, Mg, 1) row order
        if qp.is_per_channel:
            s = np.asarray(qp.scale, np.float64).reshape(gs, mg, 1)
        else:
            s = np.full((gs, mg, 1), float(qp.scale))
        zp = float(qp.zero_point) if not qp.is_per_channel else 0.0
        lo, hi = qp.qmin, qp.qmax
        if qp.narrow_range:
            lo = -hi
        cost = gs * mg * k * k
        optimised = cov is not None and cost <= max_cost and iters > 0
        near = qmath.round_to_codes(w3, s, zp, lo, hi)
        codes = _optimise(w3, s, zp, lo, hi, cov, iters) if optimised else near
        wq = s * (codes - zp)  # (G, Mg, K) real values on the grid
        dw = wq - w3
        dn = s * (near - zp) - w3
        if cov is None:
            reports.append(RoundingReport(name, 0.0, 0.0, optimised=False))
        else:
            reports.append(RoundingReport(name, float(np.einsum("gmk,gkl,gml->", dn, cov, dn)),
                                          float(np.einsum("gmk,gkl,gml->", dw, cov, dw)), optimised))
        # back to the weight's own layout
        rows_shape = op.weight_rows(node, w_orig).shape
        w_new = op.weight_from_rows(node, wq.reshape(rows_shape), w_orig.shape).astype(np.float32)
        wname = g.unique_name(f"{node.inputs[1]}__rounded")
        g.add_tensor(Tensor(wname, "float32", tuple(w_new.shape), w_new))
        node.inputs[1] = wname
        fixed[wname] = qp
        # bias correction: the mean output shift of the chosen rounding
        shift_bias(g, node, np.einsum("gmk,gk->gm", dw, mu).reshape(-1))
    g.remove_unused()
    return g, fixed, reports
