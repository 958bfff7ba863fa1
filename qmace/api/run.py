"""``run``: the converted model on samples (latency, validation against the source framework, per-op
times), on one backend or several side by side."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.config import ModelConfig, load_config
from qmace.data import write_outputs
from qmace.errors import ConfigError
from qmace.frontends import Oracle, frontend_for
from qmace.metrics import Comparison, compare
from qmace.pipeline import check_threads, count_samples, load_converted, load_float_graph, samples_for
from qmace.runtime import Session

log = logging.getLogger(__name__)


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
    check_threads(num_threads)
    if rounds < 1:
        raise ConfigError(f"--round must be >= 1, got {rounds}")
    cfg = load_config(config)
    m = cfg.model(model_name)
    graph = load_converted(cfg, m, build_dir)
    if on_tensor is not None and input_dir is None:
        log.warning("%s: range statistics without --input_dir come from one random sample drawn from "
                    "input_ranges; give --input_dir with real samples for usable ranges", cfg.path)
    quantized = graph.is_quantized
    observe = list(graph.activations()) if on_tensor is not None else []
    session = Session(graph, backend=backend, num_threads=num_threads)
    oracle = source_session(m, num_threads) if validate else None
    report = RunReport(backend=backend, samples=0, latencies_ms=[])
    if oracle is not None:
        report.threshold = m.threshold_for(quantized)
        report.oracle = oracle.label
    criteria = output_criteria(m, quantized)
    op_times: dict[str, float] | None = {} if (benchmark and session.times_ops) else None
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
            got = session.run(sample.feeds, observe=observe, op_times=op_times)
            outs = {k: got[k] for k in graph.outputs}
            report.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        for k in observe:  # the last round's values (every round computes the same)
            on_tensor(sample.name, k, got[k])
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
            rep.threshold = m.threshold_for(graph.is_quantized)
            rep.oracle = oracle.label
    criteria = output_criteria(m, graph.is_quantized)
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
