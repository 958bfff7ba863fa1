"""Post-training quantization as steps over an in-memory graph: calibration (streamed), activation
equalization, and the quantized graph for a YAML model entry."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from qmace.config import ModelConfig
from qmace.errors import InputDataError, QuantizationError
from qmace.ir import Graph
from qmace.qmath import QuantParams
from qmace.quantize.calibration import Calibrator
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import RangeTable, read_range_file
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

def equalize_on(graph: Graph, samples: Iterable, num_threads: int | None = None) -> tuple[Graph, list]:
    """Activation equalization as ``qmace quantize`` does it.

    One streamed pass for the per-channel maxima, then ``equalize_activations``; ranges must then be
    calibrated on the returned copy (a second pass over the samples).

    Args:
        graph: the optimized float graph (not changed).
        samples: an iterable of ``qmace.data.Sample``.
        num_threads: intra-op threads, or None.

    Returns:
        The rescaled copy of the graph and its equalization groups.

    Raises:
        InputDataError: as for ``calibrate``.
    """
    maxima = ChannelMaxima(graph)
    calibrate(graph, samples, None, num_threads, observers=[maxima])
    return equalize_activations(graph, maxima)

def options_for(m: ModelConfig, schema: str | None = None) -> QuantizeOptions:
    """The quantizer's options from a YAML model entry (schema, change_concat_ranges, input_ranges).

    Args:
        m: the YAML model entry.
        schema: overrides the YAML's ``quantize_schema`` when given.

    Returns:
        The QuantizeOptions (no fixed parameters, no float nodes).
    """
    sub = m.subgraph
    return QuantizeOptions(
        schema=schema or m.quantize_schema,
        change_concat_ranges=m.change_concat_ranges,
        input_ranges={n: tuple(r) for n, r in zip(sub.input_tensors, sub.input_ranges)},
    )

def quantize_for_config(graph: Graph, m: ModelConfig, table: RangeTable | None = None,
                        schema: str | None = None, float_nodes: set[str] | None = None,
                        fixed_weights: dict[str, QuantParams] | None = None) -> tuple[Graph, list[str]]:
    """``convert`` with ``quantize: 1`` or with ``quantize_large_weights: 1``.

    Ranges come from ``quantize_range_file``, from QDQ nodes of the source model, and from ``table``;
    parameters fixed by the source model's QDQ pairs win over ranges.

    Args:
        graph: the optimized float graph (its metadata may hold imported ``qdq_params``).
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
    fixed = {k: QuantParams.from_json(v) for k, v in graph.metadata.get("qdq_params", {}).items()}
    fixed.update(fixed_weights or {})
    ranges: RangeTable = {}
    if m.quantize_range_file is not None:
        ranges.update(read_range_file(m.quantize_range_file))
    if table is not None:
        ranges.update(table)
    if not ranges and not graph.metadata.get("qdq_params"):
        raise QuantizationError(f"{m.yaml_path}: {m.key}.quantize_range_file: quantize: 1 needs a range file "
                                "(or a model with QuantizeLinear/DequantizeLinear ranges)")
    opts = options_for(m, schema)
    opts.fixed_params = fixed
    opts.float_nodes = check_float_nodes(graph, float_nodes or ())
    res = quantize_graph(graph, ranges, opts)
    res.graph.metadata.pop("qdq_params", None)
    return res.graph, res.fallbacks

def check_float_nodes(graph: Graph, wanted: Iterable[str]) -> set[str]:
    """Check ``--float_nodes``: each entry must be a node name or an op type of the (optimized) graph.

    Args:
        graph: the optimized graph.
        wanted: the names/op types given.

    Returns:
        ``wanted`` as a set.

    Raises:
        QuantizationError: listing the unknown entries with the closest names.
    """
    import difflib

    wanted = set(wanted)
    known = {n.name for n in graph.nodes} | {n.op_type for n in graph.nodes}
    unknown = sorted(wanted - known)
    if unknown:
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, sorted(known), n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise QuantizationError(f"--float_nodes: no node or op type {', '.join(hints)} in the converted graph "
                                "(fused activations are part of the Conv/Gemm before them; see the node names "
                                "with qmace run --benchmark --backend reference)")
    return wanted
