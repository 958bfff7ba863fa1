"""``quantize`` (the one-shot PTQ verb: samples -> ranges -> quantized model file) and ``export``
(the converted model as standard ONNX)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
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
from qmace.quantize.ranges import write_range_file
from qmace.quantize.recipe import PTQRecipe, options_for, run_ptq

log = logging.getLogger(__name__)


@dataclass
class OneShotResult:
    """What ``qmace quantize`` produced: the conversion result, the range file it wrote, the samples calibrated on."""
    convert: ConvertResult
    range_file: Path
    samples: int
    # qmace's YAML keys (quantize_float_nodes, quantize_16bit_tensors) that keep this run's float nodes and
    # 16-bit activations when the model is quantized again from the range file (convert, qat); only keys whose
    # value differs from the YAML's
    yaml_keys: dict[str, list[str]] = field(default_factory=dict)
    model_key: str = ""  # models.<name>

def quantize_one_shot(
    config: str | Path,
    *,
    input_dir: str | Path,
    recipe: PTQRecipe | None = None,
    model_name: str | None = None,
    build_dir: str | Path | None = None,
    range_file: str | Path | None = None,
    num_threads: int | None = None,
    float_nodes: set[str] | None = None,
    progress: Callable[..., Iterator] | None = None,
) -> OneShotResult:
    """MACE's four steps in memory: statistics over ``input_dir`` (streamed), ranges, quantized model.

    Args:
        config, model_name, build_dir: as ``qmace.api.convert``.
        input_dir: calibration samples (MACE file naming, ``qmace.data``).
        recipe: how to quantize (``qmace.quantize.recipe.PTQRecipe``; default: its defaults, as
            ``qmace quantize`` without options).
        range_file: where to write the ranges used (default: beside the model file).
        num_threads: >= 1 or None.
        float_nodes: node names or op types kept in float.
        progress: wraps sample iterators (a progress bar).

    Returns:
        OneShotResult: the ConvertResult of the quantized model, the range file path, the sample count.

    Raises:
        ConfigError, ModelError, InputDataError (missing/NaN samples), QuantizationError (bad options,
        unknown float_nodes), FileAccessError; on failure the previous model file is left as it was.
    """
    check_threads(num_threads)
    recipe = recipe or PTQRecipe()
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_float_graph(m)
    total = count_samples(m, input_dir, 0)
    options = options_for(m, graph=graph)
    options = replace(options, float_nodes={*options.float_nodes, *(float_nodes or ())})
    res = run_ptq(graph, lambda: samples_for(m, input_dir, 0), recipe, options, num_threads=num_threads,
                  progress=progress, total=total)
    qgraph = res.graph
    qgraph.metadata["built_from"] = build_settings(m, "quantize")
    mpath = model_file_path(cfg, m, build_dir)
    rpath = Path(range_file) if range_file else mpath.with_suffix(".ranges")
    write_range_file(rpath, res.ranges)  # first: a failure here leaves the previous model file as it was
    try:
        path = save_graph(qgraph, mpath)
    except BaseException:
        if range_file is None:
            rpath.unlink(missing_ok=True)
        raise
    used = res.options  # the caller's options plus the sensitivity rules' choices
    keys = {"quantize_float_nodes": sorted({*used.float_nodes, *used.float_layers}),
            "quantize_16bit_tensors": sorted(used.wide_extra)}
    keys = {k: v for k, v in keys.items() if v and v != sorted(getattr(m, k))}
    return OneShotResult(ConvertResult(path, qgraph, path.stat().st_size, res.fallbacks), rpath, res.samples, keys, m.key)

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
    if fmt == "onnx-qdq" and not graph.is_quantized:
        raise QuantizationError(f"{model_file_path(cfg, m, build_dir)}: --format onnx-qdq needs a quantized model, "
                                "this one is float32 (use --format onnx, or quantize first: quantize: 1 in the "
                                "YAML, or qmace quantize)")
    model = to_onnx(graph)
    out = Path(output)
    with atomic_write(out, "wb") as f:
        f.write(model.SerializeToString())
    return out
