"""The CLI verbs as plain, typed Python functions: ``convert`` and ``run`` (quantization verbs live in
``qmace.quantize.api``). They log and return named results; only ``qmace.cli`` prints."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.config import DeploymentConfig, ModelConfig, load_config
from qmace.data import Sample, iter_samples, model_shape, random_sample, sample_names, write_outputs
from qmace.errors import ModelError
from qmace.frontends import Oracle, frontend_for
from qmace.ir import Graph
from qmace.metrics import Comparison, compare
from qmace.modelfile import EXTENSION, load_graph, save_graph
from qmace.passes import optimize
from qmace.runtime import Session

log = logging.getLogger(__name__)


def model_file_path(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Path:
    """MACE's place for the converted model: ``<build_dir>/<library_name>/model/<model_name>.qmace``."""
    return Path(build_dir or "build") / cfg.library_name / "model" / f"{m.name}{EXTENSION}"


def bind_io(graph: Graph, m: ModelConfig) -> Graph:
    """Check the YAML's inputs/outputs against the model, fix the input shapes, select the outputs."""
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
    missing = [n for n in sub.output_tensors if n not in graph.tensors or graph.tensors[n].data is not None]
    if missing:
        raise ModelError(f"{where}.output_tensors: {', '.join(map(repr, missing))} not in the model; "
                         f"the model's outputs are: {', '.join(graph.outputs)}")
    graph.outputs = list(sub.output_tensors)
    graph.remove_unused()
    return graph


def load_float_graph(m: ModelConfig) -> Graph:
    """Verify, load and optimize the float model of a YAML model entry."""
    m.verify_model_file()
    graph = bind_io(frontend_for(m).load(m), m)
    g = optimize(graph)
    g.metadata.update({"model_name": m.name, "source_sha256": m.model_sha256_checksum})
    return g


@dataclass
class ConvertResult:
    path: Path
    graph: Graph
    file_size: int
    fallbacks: list[str] = field(default_factory=list)  # one line per op that runs in float, with the reason

    def summary(self) -> str:
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
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} op(s) run in float:")
            lines += [f"  {f}" for f in self.fallbacks]
        return "\n".join(lines)


def convert(config: str | Path, model_name: str | None = None, build_dir: str | Path | None = None) -> ConvertResult:
    """``qmace convert``: YAML -> optimized (and, with ``quantize: 1``, quantized) model file."""
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_float_graph(m)
    fallbacks: list[str] = []
    if m.quantize or m.quantize_large_weights:
        from qmace.quantize.api import quantize_for_config

        graph, fallbacks = quantize_for_config(graph, m)
    path = save_graph(graph, model_file_path(cfg, m, build_dir))
    log.info("wrote %s", path)
    return ConvertResult(path, graph, path.stat().st_size, fallbacks)


def load_converted(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Graph:
    path = model_file_path(cfg, m, build_dir)
    if not path.is_file():
        raise ModelError(f"{path}: no converted model; run `qmace convert --config {cfg.path}` first")
    return load_graph(path)


def samples_for(m: ModelConfig, input_dir: str | Path | None, count: int, seed: int = 0) -> Iterator[Sample]:
    """Samples from ``input_dir`` (MACE file naming), else ``count`` random ones from ``input_ranges``."""
    if input_dir is not None:
        yield from iter_samples(input_dir, m.subgraph)
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield random_sample(m.subgraph, rng, f"_{i}")


def count_samples(m: ModelConfig, input_dir: str | Path | None, count: int) -> int:
    return len(sample_names(input_dir, m.subgraph)) if input_dir is not None else count


@dataclass
class OutputCheck:
    sample: str
    output: str
    comparison: Comparison
    metric: str = "cosine"  # what --validate judges this output by (the YAML's validation_outputs_metric)
    threshold: float | None = None  # None: not judged (e.g. backend-vs-backend comparisons)

    @property
    def passed(self) -> bool:
        return self.threshold is None or self.comparison.judge(self.metric, self.threshold)


@dataclass
class RunReport:
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
        return self.threshold is None or all(c.passed for c in self.checks)

    def latency_percentiles(self) -> dict[str, float]:
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
    """Output name -> (metric, threshold) for --validate: the YAML's validation_outputs_metric /
    validation_outputs_threshold, a missing threshold being the one equivalent to the model's cosine
    threshold (``qmace.metrics.default_threshold``)."""
    from qmace.metrics import default_threshold

    cos = m.threshold_for(quantized)
    sg = m.subgraph
    return {name: (metric, t if t is not None else default_threshold(metric, cos))
            for name, metric, t in zip(sg.output_tensors, sg.validation_outputs_metric,
                                       sg.validation_outputs_threshold)}


def source_session(m: ModelConfig, num_threads: int | None = None) -> Oracle:
    """The original model in its own framework (the validation oracle), or, when that framework is not
    installed, qmace's float reference of the imported graph (logged with what to install)."""
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

    ``on_tensor(sample, tensor_name, value)`` receives every op output (for ``--quantize_stat``).
    """
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_converted(cfg, m, build_dir)
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
        for _ in range(max(1, rounds)):
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


@dataclass
class BackendComparison:
    """``run --benchmark`` over several backends: one report per backend (latencies, and checks against the
    source model with ``--validate``) plus each backend's outputs compared with the first backend's."""

    reports: list[RunReport]
    versus_first: dict[str, list[OutputCheck]]  # backend -> checks against reports[0]'s outputs

    def median_ms(self, backend: str) -> float:
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
    """``qmace run --backend a,b,...``: the converted model on every sample by each backend in turn
    (interleaved sample by sample and round by round, so that the backends share the machine's state and
    their latencies can be compared as ratios). Each backend's outputs are compared with the first one's."""
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
