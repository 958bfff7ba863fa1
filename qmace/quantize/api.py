"""Quantization verbs as plain functions: calibration, ``convert`` with ``quantize: 1``, the one-shot
``quantize`` and ``export``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmace.config import ModelConfig, load_config
from qmace.errors import ConfigError, InputDataError, QuantizationError
from qmace.fileio import atomic_write
from qmace.ir import Graph
from qmace.qmath import QuantParams
from qmace.quantize.adaround import InputStatistics
from qmace.quantize.adaround import adaround as run_adaround
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import Calibrator, make_calibrator
from qmace.quantize.dense import saturating_input_ranges
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import RangeTable, read_range_file, write_range_file
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
    extra = [n for n in floats if n in wanted]
    session = Session(graph, backend=backend, num_threads=num_threads,
                      extra_outputs=extra if backend == "onnxruntime" else None)
    fetch = list(dict.fromkeys(list(graph.outputs) + extra))
    count = 0
    for sample in samples:
        for k, v in sample.feeds.items():
            if not np.all(np.isfinite(v)):
                raise InputDataError(f"{sample.source(k)}: input {k!r} holds NaN or Inf; calibration needs finite data")
        outs = session.run(sample.feeds, outputs=fetch)
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


def check_threads(num_threads: int | None) -> None:
    """Check a ``--num_threads`` value.

    Args:
        num_threads: None (the runtime's default) or a thread count.

    Raises:
        ConfigError: ``num_threads`` < 1.
    """
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"--num_threads must be >= 1, got {num_threads}")


@dataclass
class OneShotResult:
    """What ``qmace quantize`` produced: the conversion result, the range file it wrote, the samples calibrated on."""
    convert: object  # qmace.api.ConvertResult
    range_file: Path
    samples: int


def quantize_one_shot(
    config: str | Path,
    *,
    input_dir: str | Path,
    model_name: str | None = None,
    build_dir: str | Path | None = None,
    method: str = "mace",
    percentile: float | None = None,
    enhance: bool = False,
    enhance_ratio: float = 10.0,
    schema: str | None = None,
    range_file: str | Path | None = None,
    num_threads: int | None = None,
    bias_correction: bool = True,
    adaround: bool = False,
    adaround_iters: int = 400,
    equalize: bool = True,
    float_nodes: set[str] | None = None,
    progress: Callable[..., Iterator] | None = None,
) -> OneShotResult:
    """MACE's four steps in memory: statistics over ``input_dir`` (streamed), ranges, quantized model.

    Args:
        config, model_name, build_dir: as ``qmace.api.convert``.
        input_dir: calibration samples (MACE file naming, ``qmace.data``).
        method: ``mace`` | ``percentile`` | ``entropy`` | ``mse`` (docs/quantization.md).
        percentile, enhance, enhance_ratio: the method's options (``mace``: MACE's quantize_stat percentile
            and outlier walk; ``percentile``: the histogram percentile).
        schema: ``uint8`` / ``int8`` / ``int8_w7`` (default: the YAML's).
        range_file: where to write the ranges used (default: beside the model file).
        num_threads: >= 1 or None.
        bias_correction, adaround, equalize: the post-training refinements.
        adaround_iters: AdaRound's optimisation iterations per layer.
        float_nodes: node names or op types kept in float.
        progress: wraps sample iterators (a progress bar).

    Returns:
        OneShotResult: the ConvertResult of the quantized model, the range file path, the sample count.

    Raises:
        ConfigError, ModelError, InputDataError (missing/NaN samples), QuantizationError (bad options,
        unknown float_nodes), FileAccessError; on failure the previous model file is left as it was.
    """
    from qmace.api import (
        ConvertResult,
        build_settings,
        count_samples,
        load_float_graph,
        model_file_path,
        samples_for,
    )
    from qmace.modelfile import save_graph

    check_threads(num_threads)
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_float_graph(m)
    opts: dict = {}
    if method == "mace":
        opts = {"percentile": percentile or 0.0, "enhance": enhance, "enhance_ratio": enhance_ratio}
    elif percentile is not None:
        if method != "percentile":
            raise QuantizationError(f"--percentile applies to methods mace and percentile, not {method}")
        opts = {"percentile": percentile}
    calibrator = make_calibrator(method, **opts)
    n = count_samples(m, input_dir, 0)
    schema = schema or m.quantize_schema
    equalized = 0
    if equalize:
        # a first pass for per-channel maxima; the ranges must come from the rescaled model, so a second follows
        samples = samples_for(m, input_dir, 0)
        if progress is not None:
            samples = progress(samples, total=n, desc="equalization statistics")
        graph, groups = equalize_on(graph, samples, num_threads)
        equalized = sum(len(gr.tensors) for gr in groups)
    samples = samples_for(m, input_dir, 0)
    if progress is not None:
        samples = progress(samples, total=n, desc="calibration")
    means = ChannelMeans(graph) if bias_correction and not adaround else None
    moments = InputStatistics(graph) if adaround else None
    count = calibrate(graph, samples, calibrator, num_threads, observers=[o for o in (means, moments) if o])
    table = calibrator.ranges()
    if method != "mace":  # MACE's method keeps MACE's range files; the others keep rare probability-map pixels
        table, _ = saturating_input_ranges(graph, table, calibrator.extrema())
    corrected, fixed = 0, {}
    if means is not None:
        graph, corrected = correct_biases(graph, means, schema)
    if moments is not None:
        graph, fixed, reports = run_adaround(graph, moments, schema, iters=adaround_iters, progress=progress)
        corrected = len(reports)
        gain = sum(r.nearest_loss for r in reports) / max(sum(r.final_loss for r in reports), 1e-30)
        log.info("AdaRound: %d layers, reconstruction error %.2fx lower than rounding to nearest", corrected, gain)
    qgraph, fallbacks = quantize_for_config(graph, m, table=table, schema=schema, float_nodes=float_nodes,
                                            fixed_weights=fixed)
    qgraph.metadata["quantization"].update({"method": method, "samples": count, "bias_corrected_layers": corrected,
                                            "adaround": bool(adaround), "equalized_tensors": equalized})
    qgraph.metadata["built_from"] = build_settings(m, "quantize")
    mpath = model_file_path(cfg, m, build_dir)
    rpath = Path(range_file) if range_file else mpath.with_suffix(".ranges")
    write_range_file(rpath, table)  # first: a failure here leaves the previous model file as it was
    try:
        path = save_graph(qgraph, mpath)
    except BaseException:
        if range_file is None:
            rpath.unlink(missing_ok=True)
        raise
    return OneShotResult(ConvertResult(path, qgraph, path.stat().st_size, fallbacks), rpath, count)


def export(config: str | Path, output: str | Path, *, model_name: str | None = None,
           build_dir: str | Path | None = None, fmt: str = "onnx-qdq") -> Path:
    """The converted model as standard ONNX, written atomically to ``output``.

    ``fmt="onnx-qdq"`` (default) needs a quantized model (QuantizeLinear/DequantizeLinear around the integer
    ops); ``fmt="onnx"`` writes whatever the model is.

    Args:
        config: the deployment YAML.
        output: the ``.onnx`` file to write.
        model_name: the YAML model to export (needed when it has several).
        build_dir: the build folder holding the converted model; None means ``./build``.
        fmt: ``"onnx-qdq"`` or ``"onnx"``.

    Returns:
        The path written.

    Raises:
        ConfigError: the YAML is invalid.
        QuantizationError: unknown format; onnx-qdq of a float model.
        ModelError, ModelFileError: no, tampered or stale model file.
        FileAccessError: cannot write ``output``.
    """
    from qmace.api import load_converted, model_file_path
    from qmace.runtime.lower import to_onnx

    cfg = load_config(config)
    m = cfg.model(model_name)
    if fmt not in ("onnx-qdq", "onnx"):
        raise QuantizationError(f"unknown export format {fmt!r} (formats: onnx-qdq, onnx)")
    graph = load_converted(cfg, m, build_dir)
    if fmt == "onnx-qdq" and not graph.metadata.get("quantization"):
        raise QuantizationError(f"{model_file_path(cfg, m, build_dir)}: --format onnx-qdq needs a quantized model, "
                                "this one is float32 (use --format onnx, or quantize first: quantize: 1 in the "
                                "YAML, or qmace quantize)")
    model = to_onnx(graph)
    out = Path(output)
    with atomic_write(out, "wb") as f:
        f.write(model.SerializeToString())
    return out
