"""The CLI verbs as plain, typed Python functions: ``convert`` and ``run`` (quantization verbs live in
``qmace.quantize.api``). They log and return named results; only ``qmace.cli`` prints.

In-memory entry point (no YAML, no files): ``convert_model`` (ONNX model or path -> optimized ``Graph``),
``run_model`` (graph + numpy arrays -> numpy arrays), ``save_model`` / ``load_model``::

    g = qmace.api.convert_model("m.onnx", input_shapes={"input": (1, 3, 224, 224)})
    out = qmace.api.run_model(g, {"input": x})["output"]

Every function raises a subclass of ``qmace.errors.QmaceError`` for bad input (docs/errors.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.config import DeploymentConfig, ModelConfig, load_config
from qmace.data import Sample, iter_samples, model_shape, random_sample, sample_names, write_outputs
from qmace.errors import ConfigError, ModelError, ModelFileError
from qmace.fileio import check_inside, check_plain_name
from qmace.frontends import Oracle, frontend_for
from qmace.ir import Graph
from qmace.metrics import Comparison, compare
from qmace.modelfile import EXTENSION, load_graph, save_graph
from qmace.passes import optimize
from qmace.runtime import Session

log = logging.getLogger(__name__)


def model_file_path(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Path:
    """MACE's place for the converted model: ``<build_dir>/<library_name>/model/<model_name>.qmace``.

    Args:
        cfg: the deployment YAML (gives ``library_name``).
        m: the model entry (gives the model name).
        build_dir: the build folder; None means ``./build``.

    Returns:
        The model file's path (not checked for existence).

    Raises:
        PathError: the names would put the file outside ``build_dir`` (the YAML reader already insists on
            plain names; this is the last check before anything is written).
    """
    root = Path(build_dir or "build")
    path = root / check_plain_name(cfg.library_name, f"{cfg.path}: library_name") / "model" / \
        f"{check_plain_name(m.name, f'{cfg.path}: models: model name')}{EXTENSION}"
    check_inside(root, path, "the model file")
    return path


def bind_io(graph: Graph, m: ModelConfig) -> Graph:
    """Check the YAML's inputs/outputs against the model, fix the input shapes, select the outputs.

    Args:
        graph: the imported graph; changed in place (input shapes set, outputs replaced, unused nodes removed).
        m: the YAML model entry whose subgraph names the input/output tensors, shapes and data formats.

    Returns:
        ``graph`` itself.

    Raises:
        ModelError: an input tensor the model does not have (or a model input the YAML leaves unfed), a YAML
            input shape that contradicts the model's, or an output tensor not in the model.
    """
    sub = m.subgraph
    where = f"{m.yaml_path}: {sub.key}"
    unknown = [n for n in sub.input_tensors if n not in graph.inputs]
    if unknown:
        raise ModelError(f"{where}.input_tensors: {', '.join(map(repr, unknown))} not an input of the model; "
                         f"the model's inputs are: {', '.join(graph.inputs)}")
    unfed = [n for n in graph.inputs if n not in sub.input_tensors]
    if unfed:
        raise ModelError(f"{where}.input_tensors: the model also needs input(s) {', '.join(unfed)}")
    for i, (name, shape, fmt) in enumerate(zip(sub.input_tensors, sub.input_shapes, sub.input_data_formats)):
        t = graph.tensors[name]
        want = model_shape(tuple(shape), fmt)
        have = t.shape
        if have is not None and (len(have) != len(want) or any(h is not None and h != w for h, w in zip(have, want))):
            shown = "x".join("?" if d is None else str(d) for d in have)
            layout = f" ({fmt}; {','.join(map(str, want))} in the model's layout)" if tuple(want) != tuple(shape) else ""
            raise ModelError(f"{where}.input_shapes[{i}]: {','.join(map(str, shape))}{layout} contradicts the "
                             f"model's input {name!r} of shape {shown}")
        t.shape = tuple(want)
    # Any tensor of the model may be an output, constants included (a graph output produced by a Constant
    # node, or one that constant folding computes).
    missing = [n for n in sub.output_tensors if n not in graph.tensors]
    if missing:
        raise ModelError(f"{where}.output_tensors: {', '.join(map(repr, missing))} not in the model; "
                         f"the model's outputs are: {', '.join(graph.outputs)}")
    graph.outputs = list(sub.output_tensors)
    graph.remove_unused()
    return graph


def build_settings(m: ModelConfig, built_by: str = "convert") -> dict:
    """What a model file is built from, recorded in its metadata (``built_from``).

    ``run`` and ``export`` compare it with the YAML: the source file's sha256, the YAML's inputs/outputs and,
    for ``convert``, the quantization settings (quantize, quantize_large_weights, schema, range file sha256,
    input ranges, concat ranges).

    Args:
        m: the YAML model entry.
        built_by: ``"convert"``, or ``"quantize"``: the one-shot command chose the ranges itself, so the
            YAML's quantization keys do not apply.

    Returns:
        A JSON-serializable dict of the settings that matter.

    Raises:
        FileAccessError: the range file cannot be read for its sha256.
    """
    sub = m.subgraph
    out: dict = {
        "built_by": built_by,
        "source_sha256": m.model_sha256_checksum,
        "weight_sha256": m.weight_sha256_checksum,
        "input_tensors": sub.input_tensors, "input_shapes": sub.input_shapes,
        "input_data_formats": sub.input_data_formats, "output_tensors": sub.output_tensors,
    }
    if built_by == "convert":
        out |= {"quantize": m.quantize, "quantize_large_weights": m.quantize_large_weights}
        if m.quantize:
            rf = m.quantize_range_file
            out |= {"quantize_schema": m.quantize_schema, "change_concat_ranges": m.change_concat_ranges,
                    "input_ranges": sub.input_ranges,
                    "quantize_range_file_sha256": _sha256_or_none(rf) if rf is not None else None}
    return json.loads(json.dumps(out, default=str))


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def load_float_graph(m: ModelConfig) -> Graph:
    """Verify, load and optimize the float model of a YAML model entry.

    Args:
        m: the YAML model entry.

    Returns:
        The optimized float graph, its metadata naming the model and the source sha256.

    Raises:
        ModelError: the source file is missing, its sha256 differs from the YAML's, the frontend rejects it,
            or the YAML's inputs/outputs contradict it (``bind_io``).
        ResourceLimitError: declared shapes or initializers exceed the memory budget.
    """
    m.verify_model_file()
    graph = bind_io(frontend_for(m).load(m), m)
    g = optimize(graph)
    g.metadata.update({"model_name": m.name, "source_sha256": m.model_sha256_checksum})
    return g


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
        from qmace.quantize.api import quantize_for_config

        graph, fallbacks = quantize_for_config(graph, m)
    graph.metadata["built_from"] = build_settings(m)
    path = save_graph(graph, model_file_path(cfg, m, build_dir))
    log.info("wrote %s", path)
    return ConvertResult(path, graph, path.stat().st_size, fallbacks)


def rebuild_command(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None, verb: str = "convert") -> str:
    """The command line that (re)builds model ``m`` into ``build_dir``.

    Args:
        cfg: the deployment YAML (its path goes into the command).
        m: the model entry (named with ``--model_name`` when the YAML has several).
        build_dir: the build folder; None leaves ``--build_dir`` out.
        verb: ``"convert"`` or ``"quantize"``, whichever built the model.

    Returns:
        A shell command line, e.g. ``qmace convert --config m.yml``.
    """
    cmd = f"qmace {verb} --config {cfg.path}"
    if len(cfg.models) > 1:
        cmd += f" --model_name {m.name}"
    if build_dir is not None:
        cmd += f" --build_dir {build_dir}"
    return cmd + (" --input_dir <samples>" if verb == "quantize" else "")


def load_converted(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Graph:
    """Load the model file built for ``m`` and return its graph.

    Args:
        cfg: the deployment YAML.
        m: the model entry.
        build_dir: the build folder; None means ``./build``.

    Returns:
        The converted graph, checked to be current.

    Raises:
        ModelError: there is no model file (the message names the command that builds it).
        ModelFileError: the file is corrupt or tampered (``load_graph``), or was built from another source
            file or other settings than the YAML now gives (a stale build; the message names the setting
            and the command that rebuilds it).
    """
    path = model_file_path(cfg, m, build_dir)
    if not path.is_file():
        raise ModelError(f"{path}: no converted model; run `{rebuild_command(cfg, m, build_dir)}` first")
    graph = load_graph(path)
    recorded = graph.metadata.get("built_from")
    verb = recorded.get("built_by", "convert") if isinstance(recorded, dict) else "convert"
    verb = verb if verb in ("convert", "quantize") else "convert"
    now = build_settings(m, verb)
    if not isinstance(recorded, dict):
        raise ModelFileError(f"{path}: the file does not record what it was built from; rebuild it: "
                             f"{rebuild_command(cfg, m, build_dir, verb)}")
    for key in [*now, *(k for k in recorded if k not in now)]:
        if now.get(key) != recorded.get(key):
            raise ModelFileError(f"{path}: stale build: built with {key} = {str(recorded.get(key))[:80]}, "
                                 f"{cfg.path} now gives {str(now.get(key))[:80]}; rebuild it: "
                                 f"{rebuild_command(cfg, m, build_dir, verb)}")
    return graph


def samples_for(m: ModelConfig, input_dir: str | Path | None, count: int, seed: int = 0) -> Iterator[Sample]:
    """Samples from ``input_dir`` (MACE file naming), else ``count`` random ones from ``input_ranges``.

    Args:
        m: the YAML model entry (its subgraph gives the input names, shapes, formats and ranges).
        input_dir: folder of input files, or None for random samples.
        count: how many random samples when ``input_dir`` is None.
        seed: seed of the random generator.

    Returns:
        An iterator of ``Sample`` in the model's layout.

    Raises:
        InputDataError: the folder or a file is missing, unreadable or of the wrong size/shape.
    """
    if input_dir is not None:
        yield from iter_samples(input_dir, m.subgraph)
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield random_sample(m.subgraph, rng, f"_{i}")


def count_samples(m: ModelConfig, input_dir: str | Path | None, count: int) -> int:
    """How many samples ``samples_for`` will yield, without reading them.

    Args:
        m: the YAML model entry.
        input_dir: folder of input files, or None.
        count: the number of random samples used when ``input_dir`` is None.

    Returns:
        The number of samples.

    Raises:
        InputDataError: ``input_dir`` is missing, unreadable or holds no input files.
    """
    return len(sample_names(input_dir, m.subgraph)) if input_dir is not None else count


@dataclass
class OutputCheck:
    """One output of one sample compared with the oracle, and whether it passes its metric's threshold."""
    sample: str
    output: str
    comparison: Comparison
    metric: str = "cosine"  # what --validate judges this output by (the YAML's validation_outputs_metric)
    threshold: float | None = None  # None: not judged (e.g. backend-vs-backend comparisons)

    @property
    def passed(self) -> bool:
        """True when not judged (``threshold`` None) or ``comparison`` meets ``threshold`` by ``metric``."""
        return self.threshold is None or self.comparison.judge(self.metric, self.threshold)


@dataclass
class RunReport:
    """What ``run`` measured: backend, samples, latencies, validation checks, per-op times, files written."""
    backend: str
    samples: int
    latencies_ms: list[float]
    checks: list[OutputCheck] = field(default_factory=list)
    threshold: float | None = None
    oracle: str | None = None  # what --validate compared against
    op_times_ms: dict[str, float] = field(default_factory=dict)  # node name -> mean ms per run
    op_types: dict[str, str] = field(default_factory=dict)  # node name -> op type
    outputs_written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when not validated, or every check passed."""
        return self.threshold is None or all(c.passed for c in self.checks)

    def latency_percentiles(self) -> dict[str, float]:
        """Latency summary in ms: ``{"p50", "p90", "p99", "mean"}`` over all runs."""
        lat = np.asarray(self.latencies_ms)
        return {f"p{p}": float(np.percentile(lat, p)) for p in (50, 90, 99)} | {"mean": float(lat.mean())}


@dataclass
class _FloatReference:
    """qmace's own float reference kernels on the imported graph: the oracle when the source framework is
    not installed."""

    session: Session
    label: str = "qmace's float reference of the imported graph (source framework not installed)"

    def run(self, outputs, feeds):
        got = self.session.run(feeds)
        return [got[k] for k in outputs]


def output_criteria(m: ModelConfig, quantized: bool) -> dict[str, tuple[str, float]]:
    """Output name -> (metric, threshold) for ``--validate``.

    The YAML's validation_outputs_metric / validation_outputs_threshold, a missing threshold being the one
    equivalent to the model's cosine threshold (``qmace.metrics.default_threshold``).

    Args:
        m: the YAML model entry.
        quantized: whether the model file is quantized (selects the default threshold).

    Returns:
        ``{output name: (metric name, threshold)}``.
    """
    from qmace.metrics import default_threshold

    cos = m.threshold_for(quantized)
    sg = m.subgraph
    return {name: (metric, t if t is not None else default_threshold(metric, cos))
            for name, metric, t in zip(sg.output_tensors, sg.validation_outputs_metric,
                                       sg.validation_outputs_threshold)}


def source_session(m: ModelConfig, num_threads: int | None = None) -> Oracle:
    """The validation oracle: the original model in its own framework.

    When that framework is not installed, qmace's float reference of the imported graph is used instead
    (logged with what to install); the oracle's ``label`` says which.

    Args:
        m: the YAML model entry.
        num_threads: threads for the framework's session, or None for its default.

    Returns:
        An ``Oracle`` with ``run(feeds) -> outputs`` and ``label``.

    Raises:
        ModelError: the source model cannot be loaded.
    """
    fe = frontend_for(m)
    oracle = fe.oracle(m, num_threads)
    if oracle is None:
        log.warning("%s: the %s framework is not installed (%s); validating against qmace's float reference "
                    "of the imported graph instead", m.model_file_path, m.platform, fe.install_hint)
        oracle = _FloatReference(Session(load_float_graph(m), backend="reference"))
    return oracle


def run(
    config: str | Path,
    *,
    model_name: str | None = None,
    build_dir: str | Path | None = None,
    backend: str = "onnxruntime",
    input_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    rounds: int = 1,
    validate: bool = False,
    benchmark: bool = False,
    num_threads: int | None = None,
    on_tensor: Callable[[str, str, np.ndarray], None] | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> RunReport:
    """``qmace run``: run the converted model on every sample (``rounds`` times each).

    Args:
        config, model_name, build_dir: as for ``convert``; the model file must be current (built from the
            YAML's source file and settings) or ModelFileError names the command that rebuilds it.
        backend: ``"onnxruntime"`` or ``"reference"`` (exact numpy kernels).
        input_dir: samples in MACE file naming (``qmace.data``); None: one random sample from input_ranges.
        output_dir: where to write each output (raw float32 and ``.npy``).
        rounds: runs per sample (>= 1).
        validate: compare with the source framework (threshold from the YAML).
        benchmark: per-op times on the reference backend.
        num_threads: >= 1 or None.
        on_tensor: ``on_tensor(sample, tensor_name, value)`` receives every op output (``--quantize_stat``).
        progress: wraps the sample iterator (a progress bar).

    Returns:
        RunReport: latencies, validation checks (``passed``), per-op times, output files written.

    Raises:
        ConfigError, ModelError, ModelFileError (missing, tampered or stale model file), InputDataError,
        FileAccessError, ResourceLimitError.
    """
    from qmace.quantize.api import check_threads

    check_threads(num_threads)
    if rounds < 1:
        raise ConfigError(f"--round must be >= 1, got {rounds}")
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_converted(cfg, m, build_dir)
    if on_tensor is not None and input_dir is None:
        log.warning("%s: range statistics without --input_dir come from one random sample drawn from "
                    "input_ranges; give --input_dir with real samples for usable ranges", cfg.path)
    quantized = bool(graph.metadata.get("quantization"))
    extra = list(graph.activations()) if (on_tensor is not None and backend == "onnxruntime") else None
    session = Session(graph, backend=backend, num_threads=num_threads, extra_outputs=extra)
    oracle = source_session(m, num_threads) if validate else None
    report = RunReport(backend=backend, samples=0, latencies_ms=[])
    if oracle is not None:
        report.threshold = m.threshold_for(quantized)
        report.oracle = oracle.label
    criteria = output_criteria(m, quantized)
    op_times: dict[str, float] | None = {} if (benchmark and backend == "reference") else None
    formats = dict(zip(m.subgraph.output_tensors, m.subgraph.output_data_formats))
    n = count_samples(m, input_dir, 1)
    samples = samples_for(m, input_dir, 1)
    if progress is not None:
        samples = progress(samples, total=n)
    for sample in samples:
        report.samples += 1
        outs = None
        for _ in range(rounds):
            t0 = time.perf_counter()
            if on_tensor is not None and backend == "reference":
                outs = session.run(sample.feeds, on_tensor=lambda k, v, s=sample.name: on_tensor(s, k, v), op_times=op_times)
            elif on_tensor is not None:
                all_outs = session.run(sample.feeds, outputs=list(dict.fromkeys(graph.outputs + extra)))
                for k in extra:
                    on_tensor(sample.name, k, all_outs[k])
                outs = {k: all_outs[k] for k in graph.outputs}
            else:
                outs = session.run(sample.feeds, op_times=op_times)
            report.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        if output_dir is not None:
            report.outputs_written += write_outputs(output_dir, sample.name, outs, formats)
        if oracle is not None:
            ref = oracle.run(list(graph.outputs), sample.feeds)
            for name, r in zip(graph.outputs, ref):
                report.checks.append(OutputCheck(sample.name, name, compare(r, outs[name]),
                                                 *criteria.get(name, ("cosine", report.threshold))))
    if op_times is not None:
        runs = max(1, len(report.latencies_ms))
        report.op_times_ms = {k: v * 1e3 / runs for k, v in op_times.items()}
        report.op_types = {nd.name: nd.op_type for nd in graph.nodes}
    return report


# ---- in-memory entry point ------------------------------------------------------------------------------


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
    from qmace.quantize.api import check_threads

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


@dataclass
class BackendComparison:
    """``run --benchmark`` over several backends: one report per backend (latencies, and checks against the
    source model with ``--validate``) plus each backend's outputs compared with the first backend's."""

    reports: list[RunReport]
    versus_first: dict[str, list[OutputCheck]]  # backend -> checks against reports[0]'s outputs

    def median_ms(self, backend: str) -> float:
        """Median latency in ms of ``backend`` over all its runs.

        Args:
            backend: one of the compared backends' names.

        Returns:
            The median latency in milliseconds.
        """
        rep = next(r for r in self.reports if r.backend == backend)
        return float(np.median(rep.latencies_ms))


def run_backends(
    config: str | Path,
    backends: list[str],
    *,
    model_name: str | None = None,
    build_dir: str | Path | None = None,
    input_dir: str | Path | None = None,
    rounds: int = 1,
    validate: bool = False,
    num_threads: int | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> BackendComparison:
    """``qmace run --backend a,b,...``: the converted model on every sample by each backend in turn.

    The backends are interleaved sample by sample and round by round, so that they share the machine's
    state and their latencies can be compared as ratios. Each backend's outputs are compared with the first
    one's.

    Args:
        config, model_name, build_dir, input_dir, validate, num_threads, progress: as for ``run``.
        backends: distinct backend names; the first is the reference for ``versus_first``.
        rounds: runs per sample per backend (>= 1).

    Returns:
        BackendComparison: one RunReport per backend and each later backend's checks against the first.

    Raises:
        ValueError: ``backends`` empty or repeated.
        ConfigError, ModelError, ModelFileError, InputDataError: as for ``run``.
    """
    if len(set(backends)) != len(backends) or not backends:
        raise ValueError(f"backends must be distinct and non-empty, got {backends}")
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_converted(cfg, m, build_dir)
    sessions = {b: Session(graph, backend=b, num_threads=num_threads) for b in backends}
    oracle = source_session(m, num_threads) if validate else None
    reports = {b: RunReport(backend=b, samples=0, latencies_ms=[]) for b in backends}
    if oracle is not None:
        for rep in reports.values():
            rep.threshold = m.threshold_for(bool(graph.metadata.get("quantization")))
            rep.oracle = oracle.label
    criteria = output_criteria(m, bool(graph.metadata.get("quantization")))
    versus: dict[str, list[OutputCheck]] = {b: [] for b in backends[1:]}
    samples = samples_for(m, input_dir, 1)
    if progress is not None:
        samples = progress(samples, total=count_samples(m, input_dir, 1))
    for sample in samples:
        outs: dict[str, dict[str, np.ndarray]] = {}
        for _ in range(max(1, rounds)):
            for b, session in sessions.items():
                t0 = time.perf_counter()
                outs[b] = session.run(sample.feeds)
                reports[b].latencies_ms.append((time.perf_counter() - t0) * 1e3)
        ref = dict(zip(graph.outputs, oracle.run(list(graph.outputs), sample.feeds))) if oracle is not None else None
        for b in backends:
            reports[b].samples += 1
            if ref is not None:
                reports[b].checks += [OutputCheck(sample.name, k, compare(ref[k], outs[b][k]),
                                                  *criteria.get(k, ("cosine", reports[b].threshold)))
                                      for k in graph.outputs]
            if b in versus:
                versus[b] += [OutputCheck(sample.name, k, compare(outs[backends[0]][k], outs[b][k]))
                              for k in graph.outputs]
    return BackendComparison([reports[b] for b in backends], versus)
