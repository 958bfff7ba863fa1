"""``quantize`` (the one-shot PTQ verb: samples -> ranges -> quantized model file) and ``export``
(the converted model as standard ONNX)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qmace.api.convert import ConvertResult
from qmace.config import load_config
from qmace.errors import QuantizationError
from qmace.fileio import atomic_write
from qmace.modelfile import save_graph
from qmace.onnx_bridge import to_onnx
from qmace.pipeline import (
    build_settings,
    check_threads,
    count_samples,
    load_converted,
    load_float_graph,
    model_file_path,
    samples_for,
)
from qmace.quantize.adaround import InputStatistics
from qmace.quantize.adaround import adaround as run_adaround
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.ranges import write_range_file
from qmace.quantize.recipe import calibrate, equalize_on, quantize_for_config

log = logging.getLogger(__name__)


@dataclass
class OneShotResult:
    """What ``qmace quantize`` produced: the conversion result, the range file it wrote, the samples calibrated on."""
    convert: ConvertResult
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
