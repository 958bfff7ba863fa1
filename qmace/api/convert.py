"""``convert`` (YAML -> model file) and the in-memory entry point: ``convert_model``, ``run_model``,
``save_model``, ``load_model``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.config import load_config
from qmace.errors import ModelError
from qmace.ir import Graph
from qmace.modelfile import load_graph, save_graph
from qmace.passes import optimize
from qmace.pipeline import build_settings, check_threads, load_float_graph, model_file_path
from qmace.quantize.recipe import quantize_for_config
from qmace.runtime import Session

log = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """What ``convert`` built: the model file, its graph, its size and the ops that fall back to float."""
    path: Path
    graph: Graph
    file_size: int
    fallbacks: list[str] = field(default_factory=list)  # one line per op that runs in float, with the reason

    def summary(self) -> str:
        """The lines ``qmace convert`` prints: op counts, parameters, schema, size, inputs/outputs, fallbacks."""
        g = self.graph
        ops = ", ".join(f"{k} x{v}" for k, v in g.op_counts().items())
        kind = g.metadata.get("quantization", {}).get("schema", "float32")
        lines = [
            (f"model {g.metadata.get('model_name', g.name)}: {len(g.nodes)} ops, {g.num_parameters():,} parameters, "
             f"{kind}, {self.file_size / 1e6:.2f} MB"),
            f"ops: {ops}",
            (f"inputs: {', '.join(f'{i}{list(g.tensors[i].shape or [])}' for i in g.inputs)}; "
             f"outputs: {', '.join(g.outputs)}"),
        ]
        if kind == "large_weights":
            from qmace.quantize.weight_only import describe

            lines += describe(g.metadata["quantization"], self.file_size)
        wide = g.metadata.get("quantization", {}).get("wide_activations") or {}
        if wide:  # qmace.quantize.mixed: which activations got 16 bits, and why
            from collections import Counter

            why = ", ".join(f"{n} {r}" for r, n in Counter(wide.values()).items())
            lines.append(f"{len(wide)} activation(s) uint16 (16-bit rule: {why})")
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} op(s) run in float:")
            lines += [f"  {f}" for f in self.fallbacks]
        return "\n".join(lines)

def convert(config: str | Path, model_name: str | None = None, build_dir: str | Path | None = None) -> ConvertResult:
    """``qmace convert``: YAML -> optimized (and, with ``quantize: 1``, quantized) model file.

    Args:
        config: the MACE deployment YAML.
        model_name: the model under ``models:`` (default: the first).
        build_dir: root of the build tree (default ``./build``); the file goes to
            ``<build_dir>/<library_name>/model/<model_name>.qmace`` and records what it was built from.

    Returns:
        ConvertResult: the path written, the graph, the file size and the ops left in float.

    Raises:
        ConfigError, PathError: bad YAML, or names that would leave the build folder.
        ModelError, UnsupportedOpsError: checksum mismatch, unreadable or malformed model, unsupported ops.
        RangeError, QuantizationError: missing or malformed range file with ``quantize: 1``.
        FileAccessError, ResourceLimitError: the file cannot be written; a tensor over the memory budget.
    """
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_float_graph(m)
    fallbacks: list[str] = []
    if m.quantize or m.quantize_large_weights:
        graph, fallbacks = quantize_for_config(graph, m)
    graph.metadata["built_from"] = build_settings(m)
    path = save_graph(graph, model_file_path(cfg, m, build_dir))
    log.info("wrote %s", path)
    return ConvertResult(path, graph, path.stat().st_size, fallbacks)

def convert_model(model, *, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  outputs: list[str] | None = None) -> Graph:
    """An ONNX model (``onnx.ModelProto``, or the path of an ``.onnx`` file) -> optimized float ``Graph``.

    Args:
        model: the ONNX model in memory, or its file (external data is read beside it).
        input_shapes: input name -> shape in the model's own layout (NCHW for most ONNX models); fixes
            dynamic dimensions. Default: the shapes the model declares.
        outputs: the outputs to keep (default: the model's).

    Returns:
        The graph, ready for ``run_model``, ``save_model`` or ``qmace.quantize``.

    Raises:
        ModelError / UnsupportedOpsError: malformed model, unsupported ops, unknown input or output name, a
        shape contradicting the model's; ResourceLimitError: a tensor over the memory budget.
    """
    from qmace.frontends import load_onnx, onnx_to_graph

    graph = load_onnx(model) if isinstance(model, (str, Path)) else onnx_to_graph(model, "<in-memory model>")
    for name, shape in (input_shapes or {}).items():
        if name not in graph.inputs:
            raise ModelError(f"input_shapes: {name!r} is not an input of the model (inputs: {', '.join(graph.inputs)})")
        have = graph.tensors[name].shape
        shape = tuple(int(d) for d in shape)
        if have is not None and (len(have) != len(shape) or any(h is not None and h != d for h, d in zip(have, shape))):
            raise ModelError(f"input_shapes: {name!r}: {shape} contradicts the model's shape {have}")
        graph.tensors[name].shape = shape
    if outputs is not None:
        missing = [o for o in outputs if o not in graph.tensors]
        if missing:
            raise ModelError(f"outputs: {', '.join(map(repr, missing))} not in the model")
        graph.outputs = list(outputs)
        graph.remove_unused()
    return optimize(graph)

def run_model(graph: Graph, feeds: dict[str, np.ndarray], *, backend: str = "onnxruntime",
              num_threads: int | None = None) -> dict[str, np.ndarray]:
    """Run a graph once on numpy arrays: ``{input name: array}`` -> ``{output name: array}``.

    Arrays are taken in the graph's own layout (no NHWC transposition) and cast to the input's dtype. Each
    call builds a session; for many calls, make one ``qmace.runtime.Session(graph)`` and call its ``run``.

    Args:
        graph: a float or quantized graph (``convert_model``, ``load_model``).
        feeds: one array per graph input, by name.
        backend: ``"onnxruntime"``, ``"reference"`` (exact numpy kernels) or ``"openvino"``.
        num_threads: intra-op threads (>= 1), or None for the backend's default.

    Returns:
        ``{output name: array}`` for every graph output.

    Raises:
        InputDataError: a missing or unknown input, or an array whose shape contradicts the graph's.
        ConfigError: ``num_threads`` < 1.
        ValueError: an unknown backend name.
        ModelError: the kernels fail on the graph.
    """
    from qmace.errors import InputDataError
    check_threads(num_threads)
    missing = [i for i in graph.inputs if i not in feeds]
    if missing:
        raise InputDataError(f"missing input(s): {', '.join(missing)} (the graph's inputs: {', '.join(graph.inputs)})")
    unknown = [k for k in feeds if k not in graph.inputs]
    if unknown:
        raise InputDataError(f"unknown input(s): {', '.join(unknown)} (the graph's inputs: {', '.join(graph.inputs)})")
    ready = {}
    for name in graph.inputs:
        t = graph.tensors[name]
        arr = np.asarray(feeds[name], dtype=np.dtype(t.dtype))
        if t.shape is not None and (arr.ndim != len(t.shape) or any(
                d is not None and d != a for d, a in zip(t.shape, arr.shape))):
            raise InputDataError(f"input {name!r}: shape {arr.shape} does not match the graph's {tuple(t.shape)}")
        ready[name] = np.ascontiguousarray(arr)
    return Session(graph, backend=backend, num_threads=num_threads).run(ready)

def save_model(graph: Graph, path: str | Path) -> Path:
    """Write ``graph`` as a ``.qmace`` model file (atomically, with its content hash).

    Args:
        graph: the graph to save.
        path: the file to write.

    Returns:
        The path written.

    Raises:
        FileAccessError: the file cannot be written.
    """
    return save_graph(graph, path)

def load_model(path: str | Path) -> Graph:
    """Read a ``.qmace`` model file, verifying its content hash and header.

    Args:
        path: the model file.

    Returns:
        The graph.

    Raises:
        ModelError, ModelFileError: naming the file: missing, truncated, tampered or malformed.
    """
    return load_graph(path)
