"""Per-tensor quantization sensitivity, and the 16-bit rule built on it (docs/quantization.md, "16-bit
activations": ``--sensitivity_16bit N``).

**Measurement.** The float graph runs in ONNX Runtime with a switchable fake quantizer on every activation that
has its own parameters in the plan (``ParamSource`` other than ``same_as_input`` / ``source``) and on every
planned weight:

    fq(x) = (clip(round(x / s) + zp, 0, qmax) - zp) * s,        y = x + on * (fq(x) - x)

(activations; ``s``, ``zp``, ``qmax`` and ``on`` are graph inputs, so one session serves every experiment:
8 or 16 bits or float per tensor), and ``W' = W + on * (dequantize(quantize(W)) - W)`` for weights with the
plan's weight parameters. This is the quantized model's arithmetic up to the integer kernels' rounding of
intermediate sums (<= 1 step per tensor).

**Sensitivity of a tensor** = the output SQNR over the calibration samples when that tensor alone is
quantized to 8 bits and everything else stays float:

    SQNR_t = 10 log10( sum ||y_float||^2 / sum ||y_t - y_float||^2 )      (all graph outputs, all samples).

**The rule.** Output noise from independent roundings adds (in power), so the ``N`` tensors with the lowest
``SQNR_t`` carry the largest shares of the all-8-bit model's output noise; giving them 16 bits (256x finer
steps: their share drops by ~48 dB) is the greedy choice for a budget of ``N`` wide tensors. ``N`` is the
user's (``qmace quantize --sensitivity_16bit N``): each wide tensor costs latency, because ONNX Runtime has no
integer kernel reading uint16 codes except copies and runs the ops around it as float islands (DQ -> op -> Q).
Tensors chosen here join the structural rule's (``qmace.quantize.mixed``), which also widens the inputs they
share parameters with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph
from qmace.metrics import sqnr_from_energies
from qmace.quantize.plan import ParamSource, QuantPlan

log = logging.getLogger(__name__)

#: Reason recorded for a tensor this rule widens (``QuantPlan.wide`` / the convert summary).
REASON = "calibration sensitivity"
#: Reason recorded for a layer kept float by the weight rule (the convert summary's float-op lines).
LAYER_REASON = "kept float: calibration sensitivity of its weights"
_OWN = (ParamSource.CALIBRATED, ParamSource.GRAPH_INPUT, ParamSource.UNION, ParamSource.INTERVAL,
        ParamSource.FIXED_RANGE)


def candidates(graph: Graph, plan: QuantPlan) -> list[str]:
    """The activations whose bit width can be chosen: planned 8-bit, with parameters of their own (a copy op's
    output shares its input's, so it follows its input; parameters fixed by the source stay as they are).

    Args:
        graph: the float graph the plan was made for.
        plan: its quantization plan.

    Returns:
        Tensor names in planning order.
    """
    return [k for k in instrumentable(graph, plan) if plan.activations[k].params.dtype == "uint8"]


def instrumentable(graph: Graph, plan: QuantPlan) -> list[str]:
    """The planned activations with parameters of their own (any width), in planning order.

    Args:
        graph: the float graph the plan was made for.
        plan: its quantization plan.

    Returns:
        Tensor names.
    """
    return [k for k, a in plan.activations.items() if a.source in _OWN and graph.tensors[k].data is None]


@dataclass(frozen=True)
class Sensitivity:
    """One tensor's output SQNR (dB) when it alone is quantized (8 bits), everything else float."""
    tensor: str
    sqnr_db: float


class FakeQuantRunner:
    """The float graph in ONNX Runtime with switchable fake quantizers (module docstring).

    Args:
        graph: the float graph.
        plan: its quantization plan (activation ranges, weight parameters).
        num_threads: ONNX Runtime intra-op threads, or None.
        tensors: the activations to instrument (default: ``instrumentable``).

    Raises:
        QuantizationError: a tensor to instrument is not in the graph lowered to ONNX.
    """

    def __init__(self, graph: Graph, plan: QuantPlan, num_threads: int | None = None,
                 tensors: Sequence[str] | None = None) -> None:
        from onnx import helper, numpy_helper

        from qmace.onnx_bridge import sort_nodes, to_onnx
        from qmace.runtime.session import ort_session

        self.plan = plan
        self.tensors = list(tensors if tensors is not None else instrumentable(graph, plan))
        self.outputs = list(graph.outputs)
        model = to_onnx(graph)
        gp = model.graph
        inits = {t.name: t for t in gp.initializer}
        produced = {o for n in gp.node for o in n.output} | {i.name for i in gp.input}
        new_nodes: list = []
        self.act_inputs: dict[str, tuple[str, str, str, str]] = {}
        self.weight_inputs: dict[str, str] = {}

        def scalar_input(name: str) -> str:
            gp.input.append(_scalar_info(name))
            return name

        graph_inputs = {i.name for i in gp.input}
        producer = {o: n for n in gp.node for o in n.output}
        for t in self.tensors:
            if t not in produced:
                raise QuantizationError(f"sensitivity: tensor {t!r} is not in the lowered ONNX graph")
            s, zp, hi, on = (scalar_input(f"{t}__fq_{k}") for k in ("s", "zp", "hi", "on"))
            self.act_inputs[t] = (s, zp, hi, on)
            if t in graph_inputs:  # consumers read the fake-quantized copy
                x, y = t, f"{t}__fq"
                _rewire(gp, t, y)
            else:  # the producer writes x; the fake quantizer writes the tensor under its own name
                x, y = f"{t}__fq_x", t
                prod = producer[t]
                prod.output[list(prod.output).index(t)] = x
            new_nodes += _fake_quant_nodes(x, y, s, zp, hi, on, f"{t}__fq")
        for wp in plan.weights.values():
            if wp.tensor not in inits or wp.tensor in self.weight_inputs:
                continue
            w = graph.tensors[wp.tensor].data.astype(np.float32)
            wq = qmath.dequantize(qmath.quantize(w, wp.params), wp.params).astype(np.float32)
            on = scalar_input(f"{wp.tensor}__fq_on")
            p = f"{wp.tensor}__fq"
            gp.initializer.append(numpy_helper.from_array(wq - w, f"{p}_delta"))
            new_nodes += [helper.make_node("Mul", [f"{p}_delta", on], [f"{p}_d"]),
                          helper.make_node("Add", [wp.tensor, f"{p}_d"], [p])]
            _rewire(gp, wp.tensor, p)
            self.weight_inputs[wp.tensor] = on
        nodes = list(gp.node)
        del gp.node[:]
        gp.node.extend(new_nodes + nodes)
        stuck = sort_nodes(gp)
        if stuck is not None:
            raise QuantizationError(f"sensitivity: instrumented graph has a cycle or a missing input near node "
                                    f"{stuck!r}")
        self.session = ort_session(model.SerializeToString(), num_threads, exact_int8=False)

    def planned_bits(self) -> dict[str, int]:
        """Every instrumented activation at its planned width (8 or 16): the quantized model's activations."""
        return {t: 16 if self.plan.activations[t].params.dtype == "uint16" else 8 for t in self.tensors}

    def control(self, bits: dict[str, int] | None = None, weights: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """The control feeds: ``bits[t]`` = 8 or 16 quantizes activation ``t`` at that width (0 or absent:
        float); ``weights`` lists the weight tensors that are quantized.

        Args:
            bits: activation -> bit width.
            weights: weight tensor names, or the string ``"all"`` for every planned weight.

        Returns:
            Feeds for ``run``.
        """
        bits = bits or {}
        feeds: dict[str, np.ndarray] = {}
        for t, (s, zp, hi, on) in self.act_inputs.items():
            b = bits.get(t, 0)
            a = self.plan.activations[t]
            qp = qmath.params_asymmetric(a.range.min, a.range.max, "uint16" if b == 16 else "uint8")
            feeds[s] = np.asarray(qp.scale, np.float32).reshape(())
            feeds[zp] = np.asarray(qp.zero_point, np.float32).reshape(())
            feeds[hi] = np.asarray(qp.qmax, np.float32).reshape(())
            feeds[on] = np.asarray(1.0 if b else 0.0, np.float32).reshape(())
        wset = set(self.weight_inputs) if weights == "all" else set(weights)
        for w, on in self.weight_inputs.items():
            feeds[on] = np.asarray(1.0 if w in wset else 0.0, np.float32).reshape(())
        return feeds

    def run(self, sample: dict[str, np.ndarray], control: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph outputs for one sample under ``control`` (from :meth:`control`).

        Args:
            sample: graph input name -> array.
            control: the control feeds.

        Returns:
            The outputs, in graph order.
        """
        return self.session.run(self.outputs, {**sample, **control})


def _scalar_info(name: str):
    """A rank-0 float32 graph input."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    vi.type.tensor_type.shape.SetInParent()  # rank 0
    return vi


def _rewire(gp, old: str, new: str) -> None:
    """Every reader of ``old`` among the graph's nodes reads ``new``."""
    for n in gp.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def _fake_quant_nodes(x: str, y: str, s: str, zp: str, hi: str, on: str, p: str) -> list:
    """ONNX nodes computing ``y = x + on * ((clip(round(x / s) + zp, 0, hi) - zp) * s - x)`` (names prefixed ``p``)."""
    from onnx import helper, numpy_helper

    zero = f"{p}_zero"
    return [helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.zeros((), np.float32))),
            helper.make_node("Div", [x, s], [f"{p}_a"]), helper.make_node("Round", [f"{p}_a"], [f"{p}_b"]),
            helper.make_node("Add", [f"{p}_b", zp], [f"{p}_c"]), helper.make_node("Clip", [f"{p}_c", zero, hi], [f"{p}_d"]),
            helper.make_node("Sub", [f"{p}_d", zp], [f"{p}_e"]), helper.make_node("Mul", [f"{p}_e", s], [f"{p}_f"]),
            helper.make_node("Sub", [f"{p}_f", x], [f"{p}_g"]), helper.make_node("Mul", [f"{p}_g", on], [f"{p}_h"]),
            helper.make_node("Add", [f"{p}_h", x], [y])]


def output_sqnr(ref: Sequence[list[np.ndarray]], got: Sequence[list[np.ndarray]]) -> float:
    """``10 log10(sum ||ref||^2 / sum ||got - ref||^2)`` over all samples and outputs (inf when equal).

    Args:
        ref: per sample, the reference outputs.
        got: per sample, the outputs to judge.

    Returns:
        The SQNR in dB.
    """
    sig = sum(float(np.sum(np.square(r.astype(np.float64)))) for rs in ref for r in rs)
    err = sum(float(np.sum(np.square(g.astype(np.float64) - r))) for rs, gs in zip(ref, got) for r, g in zip(rs, gs))
    return sqnr_from_energies(sig, err)


def _ranking(runner: FakeQuantRunner, samples: Sequence[dict[str, np.ndarray]], names: Iterable[str],
             control: Callable[[str], dict[str, np.ndarray]], planning_order: Sequence[str]) -> list[Sensitivity]:
    """``output_sqnr`` of the run under ``control(name)`` against the all-float run, per name, sorted by SQNR
    ascending (ties: ``planning_order``)."""
    float_ctl = runner.control()
    ref = [runner.run(s, float_ctl) for s in samples]
    out = []
    for x in names:
        ctl = control(x)
        out.append(Sensitivity(x, output_sqnr(ref, [runner.run(s, ctl) for s in samples])))
    order = {t: i for i, t in enumerate(planning_order)}
    return sorted(out, key=lambda r: (r.sqnr_db, order.get(r.tensor, 0)))


def activation_sensitivity(runner: FakeQuantRunner, samples: Sequence[dict[str, np.ndarray]],
                           tensors: Sequence[str] | None = None, bits: int = 8) -> list[Sensitivity]:
    """Each tensor's output SQNR when it alone is quantized to ``bits`` (module docstring), lowest first.

    Args:
        runner: the instrumented float graph.
        samples: graph input feeds (calibration samples).
        tensors: the activations to measure (default: every instrumented one).
        bits: 8 or 16.

    Returns:
        One Sensitivity per tensor, sorted by SQNR ascending (ties: planning order).
    """
    return _ranking(runner, samples, tensors if tensors is not None else runner.tensors,
                    lambda t: runner.control({t: bits}), runner.tensors)


def sensitive_activations(graph: Graph, plan: QuantPlan, samples: Sequence[dict[str, np.ndarray]], n: int,
                          num_threads: int | None = None) -> tuple[dict[str, str], list[Sensitivity]]:
    """The ``n`` activations the rule widens (module docstring) and the whole ranking.

    Args:
        graph: the float graph (the one the ranges were calibrated on).
        plan: its plan under the schema and the structural rule (tensors it already widens are not candidates).
        samples: calibration feeds (graph input name -> array).
        n: how many tensors to widen (>= 0).
        num_threads: ONNX Runtime threads.

    Returns:
        ``({tensor: REASON}, ranking)``; empty when ``n == 0`` (nothing is measured).
    """
    if n <= 0:
        return {}, []
    runner = FakeQuantRunner(graph, plan, num_threads)
    ranking = activation_sensitivity(runner, samples, candidates(graph, plan))
    chosen = {r.tensor: REASON for r in ranking[:n]}
    log.info("sensitivity rule: %d of %d activations uint16 (lowest 8-bit-alone SQNR %.1f dB, highest chosen %.1f dB)",
             len(chosen), len(ranking), ranking[0].sqnr_db if ranking else float("nan"),
             ranking[min(n, len(ranking)) - 1].sqnr_db if ranking else float("nan"))
    return chosen, ranking


def weight_sensitivity(runner: FakeQuantRunner, samples: Sequence[dict[str, np.ndarray]],
                       weights: Sequence[str] | None = None) -> list[Sensitivity]:
    """Each weight's output SQNR when it alone is quantized with the plan's parameters (every activation and
    every other weight float), lowest first: the weight counterpart of :func:`activation_sensitivity`.

    Args:
        runner: the instrumented float graph.
        samples: graph input feeds (calibration samples).
        weights: the weight tensors to measure (default: every planned weight).

    Returns:
        One Sensitivity per weight tensor, sorted by SQNR ascending (ties: planning order).
    """
    return _ranking(runner, samples, weights if weights is not None else runner.weight_inputs,
                    lambda w: runner.control({}, [w]), runner.weight_inputs)


def sensitive_layers(graph: Graph, plan: QuantPlan, samples: Sequence[dict[str, np.ndarray]], n: int,
                     num_threads: int | None = None) -> tuple[dict[str, str], list[Sensitivity]]:
    """The ``n`` layers whose weights the rule keeps in float (``--sensitivity_float_layers N``,
    docs/quantization.md) and the whole ranking of the weights.

    A layer's weight sensitivity is ``SQNR_W``: the output SQNR when only that layer's weights are quantized
    (the plan's parameters, e.g. int8 per channel) and everything else is float; the ``n`` layers with the
    lowest ``SQNR_W`` carry the largest shares of the weights' output noise (the same greedy argument as the
    activation rule) and stay float: ``y = op(dequantize(x), W)``, requantized at the output.

    Args:
        graph: the float graph (the one the ranges were calibrated on).
        plan: its plan (only planned weights that the source does not fix are candidates).
        samples: calibration feeds (graph input name -> array).
        n: how many layers to keep float (>= 0).
        num_threads: ONNX Runtime threads.

    Returns:
        ``({node name: reason}, ranking)`` (ranking by weight tensor); empty when ``n == 0``.
    """
    if n <= 0:
        return {}, []
    runner = FakeQuantRunner(graph, plan, num_threads, tensors=[])
    fixed = {wp.tensor for wp in plan.weights.values() if wp.fixed}
    ranking = weight_sensitivity(runner, samples, [w for w in runner.weight_inputs if w not in fixed])
    readers: dict[str, list[str]] = {}
    for wp in plan.weights.values():
        readers.setdefault(wp.tensor, []).append(wp.node)
    chosen: dict[str, str] = {}
    for r in ranking[:n]:
        for node in readers[r.tensor]:
            chosen[node] = f"{LAYER_REASON} ({r.sqnr_db:.1f} dB)"
    log.info("sensitivity rule: %d of %d layers kept float for their weights (lowest weights-alone SQNR %.1f dB, "
             "highest chosen %.1f dB)", len(chosen), len(ranking), ranking[0].sqnr_db if ranking else float("nan"),
             ranking[min(n, len(ranking)) - 1].sqnr_db if ranking else float("nan"))
    return chosen, ranking
