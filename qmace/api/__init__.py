"""The CLI verbs as plain, typed Python functions: ``convert``, ``run``, ``run_backends``, ``quantize_one_shot``
and ``export``. They log and return named results; only ``qmace.cli`` prints.

In-memory entry point (no YAML, no files): ``convert_model`` (ONNX model or path -> optimized ``Graph``),
``run_model`` (graph + numpy arrays -> numpy arrays), ``save_model`` / ``load_model``::

    g = qmace.api.convert_model("m.onnx", input_shapes={"input": (1, 3, 224, 224)})
    out = qmace.api.run_model(g, {"input": x})["output"]

Every function raises a subclass of ``qmace.errors.QmaceError`` for bad input (docs/errors.md). The
building blocks the verbs share (loading a YAML model entry, the build tree, samples) live one layer down in
``qmace.pipeline`` and are re-exported here.
"""

from __future__ import annotations

from qmace.api.convert import ConvertResult, convert, convert_model, load_model, run_model, save_model
from qmace.api.quantize import OneShotResult, export, quantize_one_shot
from qmace.api.run import (
    BackendComparison,
    OutputCheck,
    RunReport,
    output_criteria,
    run,
    run_backends,
    source_session,
)
from qmace.pipeline import (
    bind_io,
    build_settings,
    count_samples,
    load_converted,
    load_float_graph,
    model_file_path,
    rebuild_command,
    samples_for,
)

__all__ = [
    "BackendComparison", "ConvertResult", "OneShotResult", "OutputCheck", "RunReport", "bind_io",
    "build_settings", "convert", "convert_model", "count_samples", "export", "load_converted",
    "load_float_graph", "load_model", "model_file_path", "output_criteria", "quantize_one_shot",
    "rebuild_command", "run", "run_backends", "run_model", "samples_for", "save_model", "source_session",
]
