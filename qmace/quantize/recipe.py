"""Post-training quantization in memory: the recipe (``PTQRecipe``) and ``run_ptq``, which every caller
uses (``qmace quantize``, QAT's starting point, the benchmarks), built from the steps below it: streamed
calibration, activation equalization, and the quantized graph for a YAML model entry."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np

from qmace.config import ModelConfig
from qmace.errors import InputDataError, QuantizationError
from qmace.ir import Graph
from qmace.qmath import QuantParams, Range, Schema
from qmace.quantize.adaround import InputStatistics
from qmace.quantize.adaround import adaround as run_adaround
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import Calibrator, make_calibrator
from qmace.quantize.cle import equalize_per_tensor_weights
from qmace.quantize.dense import saturating_input_ranges
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import DEFAULT_ENHANCE_RATIO, RangeTable, read_range_file
from qmace.quantize.weight_only import quantize_large_weights
from qmace.runtime import Session

log = logging.getLogger(__name__)


def calibrate(
    graph: Graph,
    samples: Iterable,
    calibrator: Calibrator | None,
    num_threads: int | None = None,
    backend: str = "onnxruntime",
    observers: Sequence = (),
) -> int:
    """Run the float graph on each sample and feed every float op output to ``calibrator``.

    Samples stream one at a time: memory holds one sample's tensors plus the calibrator's state.

    Args:
        graph: the optimized float graph.
        samples: an iterable of ``qmace.data.Sample``.
        calibrator: receives ``observe(name, value)`` for every float activation; None: only the observers
            are fed.
        num_threads: intra-op threads (>= 1), or None.
        backend: the backend that runs the float graph.
        observers: objects (bias-correction means, AdaRound input statistics, equalization maxima) listing
            ``input_names``; each is fed those tensors with ``observe(name, value)``.

    Returns:
        The number of samples seen.

    Raises:
        InputDataError: a sample holds NaN or Inf, or there is no sample at all.
        ModelError: the backend fails on the graph.
    """
    floats = [n for n in graph.activations() if graph.tensors[n].dtype == "float32"]
    names = floats if calibrator is not None else []
    wanted = set(names) | {n for obs in observers for n in obs.input_names}
    observe = [n for n in floats if n in wanted]
    session = Session(graph, backend=backend, num_threads=num_threads)
    count = 0
    for sample in samples:
        for k, v in sample.feeds.items():
            if not np.all(np.isfinite(v)):
                raise InputDataError(f"{sample.source(k)}: input {k!r} holds NaN or Inf; calibration needs finite data")
        outs = session.run(sample.feeds, observe=observe)
        for n in names:
            calibrator.observe(n, outs[n])
        for obs in observers:
            for n in obs.input_names:
                obs.observe(n, sample.feeds[n] if n in sample.feeds else outs[n])
        count += 1
    if count == 0:
        raise InputDataError("no calibration samples")
    return count

def equalize_on(graph: Graph, samples: Iterable, num_threads: int | None = None,
                schema: str | None = None) -> tuple[Graph, list]:
    """Activation equalization as ``qmace quantize`` does it.

    One streamed pass for the per-channel maxima, then ``equalize_activations``; ranges must then be
    calibrated on the returned copy (a second pass over the samples).

    Args:
        graph: the optimized float graph (not changed).
        samples: an iterable of ``qmace.data.Sample``.
        num_threads: intra-op threads, or None.
        schema: the quantization schema the graph will get; ``uint8`` (per-tensor weights) levels the
            weight ranges across layers first and then keeps every producer's weight range
            (``cle.equalize_per_tensor_weights``). None: per-channel rules (``equalize_activations``).

    Returns:
        The rescaled copy of the graph and its equalization groups.

    Raises:
        InputDataError: as for ``calibrate``.
    """
    maxima = ChannelMaxima(graph)
    calibrate(graph, samples, None, num_threads, observers=[maxima])
    if schema == Schema.UINT8:
        return equalize_per_tensor_weights(graph, maxima)
    return equalize_activations(graph, maxima)

def imported_params(graph: Graph) -> dict[str, QuantParams]:
    """Quantization parameters fixed by the source model (its QuantizeLinear/DequantizeLinear pairs, QAT).

    Args:
        graph: the float graph as the frontend imported it.

    Returns:
        Tensor or weight name -> QuantParams (empty for a plain float model).
    """
    return dict(graph.fixed_params)


YAML_16BIT_REASON = "YAML quantize_16bit_tensors"


def options_for(m: ModelConfig, schema: str | None = None, graph: Graph | None = None) -> QuantizeOptions:
    """The quantizer's options from a YAML model entry (schema, change_concat_ranges, input_ranges, and qmace's
    ``quantize_float_nodes`` / ``quantize_16bit_tensors``).

    Args:
        m: the YAML model entry.
        schema: overrides the YAML's ``quantize_schema`` when given.
        graph: the optimized float graph; when given, every name of ``quantize_float_nodes`` and
            ``quantize_16bit_tensors`` must be in it.

    Returns:
        The QuantizeOptions (no fixed parameters).

    Raises:
        QuantizationError: a ``quantize_float_nodes`` / ``quantize_16bit_tensors`` name not in ``graph``,
            naming the YAML file and key.
    """
    if graph is not None:
        check_float_nodes(graph, m.quantize_float_nodes, f"{m.yaml_path}: {m.key}.quantize_float_nodes")
        tensors = {*graph.inputs, *(o for n in graph.nodes for o in n.outputs)}
        unknown = sorted(set(m.quantize_16bit_tensors) - tensors)
        if unknown:
            raise QuantizationError(f"{m.yaml_path}: {m.key}.quantize_16bit_tensors: no activation "
                                    f"{_with_hints(unknown, tensors)} in the converted graph")
    sub = m.subgraph
    return QuantizeOptions(
        schema=schema or m.quantize_schema,
        change_concat_ranges=m.change_concat_ranges,
        input_ranges={n: Range(*r) for n, r in zip(sub.input_tensors, sub.input_ranges)},
        wide_activations=m.wide_activations,
        wide_extra={t: YAML_16BIT_REASON for t in m.quantize_16bit_tensors},
        float_nodes=set(m.quantize_float_nodes),
    )


def _with_hints(unknown: list[str], known: set[str]) -> str:
    """``'a' (did you mean 'b'?), 'c'``: each unknown name with the closest known one, if any."""
    import difflib

    hints = []
    for u in unknown:
        close = difflib.get_close_matches(u, sorted(known), n=1)
        hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)

def quantize_for_config(graph: Graph, m: ModelConfig, table: RangeTable | None = None,
                        schema: str | None = None, float_nodes: set[str] | None = None,
                        fixed_weights: dict[str, QuantParams] | None = None) -> tuple[Graph, list[str]]:
    """``convert`` with ``quantize: 1`` or with ``quantize_large_weights: 1``.

    Ranges come from ``quantize_range_file``, from QDQ nodes of the source model, and from ``table``;
    parameters fixed by the source model's QDQ pairs win over ranges.

    Args:
        graph: the optimized float graph (its ``fixed_params`` hold parameters imported from the source).
        m: the YAML model entry.
        table: extra ranges (tensor name -> (min, max)), e.g. from one-shot calibration.
        schema: overrides the YAML's ``quantize_schema``.
        float_nodes: node names or op types kept in float (``--float_nodes``).
        fixed_weights: weight name -> QuantParams fixed by the caller (AdaRound).

    Returns:
        The quantized graph and one line per op left in float (with the reason).

    Raises:
        RangeError: the range file is unreadable or malformed.
        QuantizationError: no ranges at all, a tensor without a range, or unknown ``float_nodes``.
    """
    if m.quantize_large_weights and not m.quantize:
        return quantize_large_weights(graph, m.quantize_large_weights_schema), []
    # Parameters read from QuantizeLinear/DequantizeLinear pairs of the source model (QAT / QDQ import)
    # win; tensors without one take the range file's range (MACE's "mixing usage").
    fixed = imported_params(graph)
    fixed.update(fixed_weights or {})
    ranges: RangeTable = {}
    if m.quantize_range_file is not None:
        ranges.update(read_range_file(m.quantize_range_file))
    if table is not None:
        ranges.update(table)
    if not ranges and not graph.fixed_params:
        raise QuantizationError(f"{m.yaml_path}: {m.key}.quantize_range_file: quantize: 1 needs a range file "
                                "(or a model with QuantizeLinear/DequantizeLinear ranges)")
    opts = options_for(m, schema, graph)
    opts.fixed_params = fixed
    opts.float_nodes = check_float_nodes(graph, {*opts.float_nodes, *(float_nodes or ())})
    res = quantize_graph(graph, ranges, opts)
    res.graph.fixed_params = {}
    return res.graph, res.fallbacks

def check_float_nodes(graph: Graph, wanted: Iterable[str], where: str = "--float_nodes") -> set[str]:
    """Check ``--float_nodes`` (or the YAML's ``quantize_float_nodes``): each entry must be a node name or an
    op type of the (optimized) graph.

    Args:
        graph: the optimized graph.
        wanted: the names/op types given.
        where: what gave them, the error's first words (the flag, or the YAML file and key).

    Returns:
        ``wanted`` as a set.

    Raises:
        QuantizationError: listing the unknown entries with the closest names.
    """
    wanted = set(wanted)
    known = {n.name for n in graph.nodes} | {n.op_type for n in graph.nodes}
    unknown = sorted(wanted - known)
    if unknown:
        raise QuantizationError(f"{where}: no node or op type {_with_hints(unknown, known)} in the converted graph "
                                "(fused activations are part of the Conv/Gemm before them; see the node names "
                                "with qmace run --benchmark --backend reference)")
    return wanted


# ---- the PTQ recipe ------------------------------------------------------------------------------------

#: Calibration methods whose ``percentile`` option the recipe passes on.
_PERCENTILE_METHODS = ("mace", "percentile")


@dataclass(frozen=True)
class PTQRecipe:
    """How post-training quantization is done, stated once: ``qmace quantize``, QAT's starting point and
    the benchmarks all run ``run_ptq`` with one of these.

    Steps, in order: activation equalization (``equalize``: a first pass for per-channel maxima, then the
    model is rescaled and everything below runs on the rescaled model); one calibration pass (``method``
    with its options) that also gathers the statistics of the weight refinement; the weight refinement
    (``adaround``: learned rounding with its bias correction, else ``bias_correction``: ``b -= dW · E[x]``;
    neither when both are off); quantization with ``schema``.

    Attributes:
        method: ``mace`` | ``percentile`` | ``entropy`` | ``mse`` (docs/quantization.md).
        percentile: ``mace``: the percentile P of per-sample extrema (default 0: min/max); ``percentile``:
            the histogram percentile (default: the calibrator's). Other methods take none.
        enhance: ``mace`` only: MACE's outlier walk, with ``enhance_ratio``.
        enhance_ratio: the walk's ratio.
        equalize: activation equalization first.
        bias_correction: correct each layer's bias for its weight rounding (ignored with ``adaround``,
            which corrects biases itself).
        adaround: AdaRound the weights, ``adaround_iters`` optimisation steps per layer.
        adaround_iters: see ``adaround``.
        sensitivity_16bit: give 16 bits to this many more activations, those whose 8-bit quantization alone
            (everything else float) costs the most output SQNR on the first ``sensitivity_samples`` calibration
            samples (``qmace.quantize.sensitivity``); 0: only the structural rule's.
        sensitivity_float_layers: keep this many layers in float, those whose weights alone quantized
            (everything else float) cost the most output SQNR on the same samples
            (``qmace.quantize.sensitivity.sensitive_layers``); 0: none.
        sensitivity_samples: how many calibration samples the two measurements use.
        schema: ``uint8`` / ``int8`` / ``int8_w7``; None: the model entry's ``quantize_schema``.
    """

    method: str = "mace"
    percentile: float | None = None
    enhance: bool = False
    enhance_ratio: float = DEFAULT_ENHANCE_RATIO
    equalize: bool = True
    bias_correction: bool = True
    adaround: bool = False
    adaround_iters: int = 400
    sensitivity_16bit: int = 0
    sensitivity_samples: int = 8
    sensitivity_float_layers: int = 0
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.percentile is not None and self.method not in _PERCENTILE_METHODS:
            raise QuantizationError(f"--percentile applies to methods mace and percentile, not {self.method}")
        if self.adaround_iters < 1:
            raise QuantizationError(f"adaround_iters must be >= 1, got {self.adaround_iters}")
        if self.sensitivity_16bit < 0 or self.sensitivity_samples < 1 or self.sensitivity_float_layers < 0:
            raise QuantizationError(f"sensitivity_16bit and sensitivity_float_layers must be >= 0 and "
                                    f"sensitivity_samples >= 1, got {self.sensitivity_16bit}, "
                                    f"{self.sensitivity_float_layers} and {self.sensitivity_samples}")
        self.calibrator()  # an unknown method or a bad option fails here, before any sample is read

    def calibrator(self) -> Calibrator:
        """A fresh calibrator of ``method`` with the recipe's options.

        Returns:
            The Calibrator.

        Raises:
            QuantizationError: an unknown method or an invalid option value.
        """
        opts: dict = {}
        if self.method == "mace":
            opts = {"percentile": self.percentile or 0.0, "enhance": self.enhance, "enhance_ratio": self.enhance_ratio}
        elif self.percentile is not None:
            opts = {"percentile": self.percentile}
        return make_calibrator(self.method, **opts)


@dataclass
class PTQResult:
    """What ``run_ptq`` produced.

    Attributes:
        graph: the quantized graph.
        float_graph: the float graph the ranges belong to (equalized and bias-corrected / AdaRounded).
        ranges: the calibrated range table (tensor name -> range) of ``float_graph``.
        samples: the number of calibration samples.
        fallbacks: one line per op left in float, with the reason.
        equalized_tensors: activation tensors rescaled by equalization.
        corrected_layers: layers whose bias was corrected (or weights AdaRounded).
        fixed_params: weight name -> QuantParams fixed by AdaRound (its rounding grid), empty without it.
        variants: the quantized ``variants`` passed to ``run_ptq``, in order.
        options: the options ``graph`` was quantized with: the caller's, plus the sensitivity rules' 16-bit
            activations (``wide_extra``) and float layers (``float_layers``).
    """

    graph: Graph
    float_graph: Graph
    ranges: RangeTable
    samples: int
    fallbacks: list[str] = field(default_factory=list)
    equalized_tensors: int = 0
    corrected_layers: int = 0
    fixed_params: dict[str, QuantParams] = field(default_factory=dict)
    variants: list[Graph] = field(default_factory=list)
    options: QuantizeOptions | None = None


Samples = Sequence | Callable[[], Iterable]


def _stream(samples: Samples, progress, total: int | None, desc: str) -> Iterable:
    it = samples() if callable(samples) else samples
    if progress is None:
        return it
    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    return progress(it, total=total, desc=desc)


def transplant_constants(src: Graph, dst: Graph) -> Graph:
    """A copy of ``dst`` (the same model built with other input shapes, e.g. another batch size) reading the
    constants that ``src``'s nodes now read (equalized, bias-corrected or AdaRounded weights and biases are
    shape-independent constants). Nodes are matched by name; attributes are taken from ``src``.

    Args:
        src: the refined graph.
        dst: the same model, unrefined (not changed).

    Returns:
        The refined copy of ``dst``.

    Raises:
        QuantizationError: ``dst`` lacks a node of ``src`` (not the same model).
    """
    g = dst.copy()
    by_name = {n.name: n for n in src.nodes}
    missing = [n.name for n in g.nodes if n.name not in by_name]
    if missing or len(g.nodes) != len(src.nodes):
        raise QuantizationError(f"variant graph {dst.name!r} is not the same model as {src.name!r} "
                                f"(nodes {', '.join(missing[:3]) or 'differ in number'})")
    for n in g.nodes:
        o = by_name[n.name]
        for i, name in enumerate(o.inputs):
            if name and src.constant(name) is not None and (i >= len(n.inputs) or n.inputs[i] != name):
                g.add_tensor(src.tensors[name])
                while len(n.inputs) <= i:
                    n.inputs.append("")
                n.inputs[i] = name
        n.attrs = dict(o.attrs)
    g.remove_unused()
    return g


def _sensitive(graph: Graph, table: RangeTable, options: QuantizeOptions, samples: Iterable, recipe: PTQRecipe,
               num_threads: int | None) -> tuple[dict[str, str], dict[str, str]]:
    """The activations ``recipe.sensitivity_16bit`` widens and the layers ``recipe.sensitivity_float_layers``
    keeps float, both measured on the float ``graph`` before the weight refinement
    (``qmace.quantize.sensitivity``)."""
    from qmace.quantize.plan import plan_quantization
    from qmace.quantize.sensitivity import sensitive_activations, sensitive_layers

    feeds = [sample.feeds for sample in islice(samples, recipe.sensitivity_samples)]
    plan = plan_quantization(graph, table, replace(options, float_nodes=check_float_nodes(graph, options.float_nodes),
                                                   fixed_params={**imported_params(graph), **options.fixed_params}))
    wide, _ = sensitive_activations(graph, plan, feeds, recipe.sensitivity_16bit, num_threads)
    layers, _ = sensitive_layers(graph, plan, feeds, recipe.sensitivity_float_layers, num_threads)
    return wide, layers


def run_ptq(
    graph: Graph,
    samples: Samples,
    recipe: PTQRecipe,
    options: QuantizeOptions | None = None,
    *,
    num_threads: int | None = None,
    progress: Callable[..., Iterator] | None = None,
    total: int | None = None,
    variants: Sequence[tuple[Graph, QuantizeOptions]] = (),
) -> PTQResult:
    """Post-training quantization of ``graph`` by ``recipe`` (steps in ``PTQRecipe``).

    Args:
        graph: the optimized float graph (not changed).
        samples: the calibration samples (``qmace.data.Sample``): a sequence, or a function returning a fresh
            iterator (called once per pass: equalization takes two passes).
        recipe: the recipe.
        options: the model's quantizer options (``options_for(m)`` for a YAML entry: input ranges,
            ``change_concat_ranges``, the schema unless the recipe names one; ``float_nodes``, checked
            against the graph). Parameters the source model fixed (``imported_params``) are kept. Every
            activation range comes from this calibration (a YAML ``quantize_range_file`` is not read).
        num_threads: intra-op threads for the calibration passes, or None.
        progress: wraps sample iterators and AdaRound's layers (tqdm-like: ``progress(it, total=, desc=)``).
        total: the number of samples, for ``progress`` when ``samples`` is a function.
        variants: the same model built for other input shapes (float graph, model entry); each gets the
            refined constants (``transplant_constants``) and is quantized with the same ranges and the
            variant's options.

    Returns:
        PTQResult; the quantized graph's ``metadata["quantization"]`` also records the recipe's figures.

    Raises:
        InputDataError: no samples, or a sample with NaN/Inf.
        QuantizationError: unknown ``float_nodes``, a tensor without a range.
        ModelError: the backend fails on the graph.
    """
    options = options or QuantizeOptions()
    schema = recipe.schema or options.schema
    equalized = 0
    if recipe.equalize:
        graph, groups = equalize_on(graph, _stream(samples, progress, total, "equalization statistics"), num_threads,
                                    schema)
        equalized = sum(len(gr.tensors) for gr in groups)
    calibrator = recipe.calibrator()
    means = ChannelMeans(graph) if recipe.bias_correction and not recipe.adaround else None
    moments = InputStatistics(graph) if recipe.adaround else None
    count = calibrate(graph, _stream(samples, progress, total, "calibration"), calibrator, num_threads,
                      observers=[o for o in (means, moments) if o])
    table = calibrator.ranges()
    if recipe.method != "mace":  # MACE's method keeps MACE's range files; the others keep rare probability-map pixels
        table, _ = saturating_input_ranges(graph, table, calibrator.extrema())
    float_layers: dict[str, str] = {}
    if recipe.sensitivity_16bit or recipe.sensitivity_float_layers:
        wide, float_layers = _sensitive(graph, table, replace(options, schema=schema),
                                        _stream(samples, None, None, ""), recipe, num_threads)
        options = replace(options, wide_extra={**options.wide_extra, **wide},
                          float_layers={**options.float_layers, **float_layers})
    corrected, fixed = 0, {}
    kept_float = {*options.float_nodes, *options.float_layers}  # no rounding to correct, nothing to round
    if means is not None:
        graph, corrected = correct_biases(graph, means, schema, skip=kept_float)
    if moments is not None:
        graph, fixed, reports = run_adaround(graph, moments, schema, iters=recipe.adaround_iters, progress=progress,
                                             skip=kept_float)
        corrected = len(reports)
        optimised = sum(r.optimised for r in reports)
        gain = sum(r.nearest_loss for r in reports) / max(sum(r.final_loss for r in reports), 1e-30)
        log.info("AdaRound: %d layers (%d optimised, %d rounded to nearest with bias correction), reconstruction "
                 "error %.2fx lower than rounding to nearest", corrected, optimised, corrected - optimised, gain)
    figures = {"method": recipe.method, "samples": count, "bias_corrected_layers": corrected,
               "adaround": bool(recipe.adaround), "equalized_tensors": equalized,
               "sensitivity_16bit": recipe.sensitivity_16bit,
               "sensitivity_float_layers": sorted(float_layers)}
    if moments is not None:
        figures["adaround_optimised_layers"] = optimised
    quantized, used = [], None
    for g, opts in [(graph, options), *((transplant_constants(graph, vg),
                                         replace(vo, float_layers={**vo.float_layers, **float_layers}))
                                        for vg, vo in variants)]:
        opts = replace(opts, schema=schema, fixed_params={**imported_params(g), **opts.fixed_params, **fixed},
                       float_nodes=check_float_nodes(g, opts.float_nodes))
        res = quantize_graph(g, table, opts)
        res.graph.fixed_params = {}
        res.graph.metadata["quantization"].update(figures)
        quantized.append((res.graph, res.fallbacks))
        used = used or opts
    (qgraph, fallbacks), others = quantized[0], quantized[1:]
    return PTQResult(qgraph, graph, table, count, fallbacks, equalized, corrected, fixed, [q for q, _ in others],
                     used)
