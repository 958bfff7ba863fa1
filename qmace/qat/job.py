"""``qmace qat`` as a library call: calibrate on the training samples, fine-tune with fake quantization (one
process, ``nproc`` local processes, or one rank of a ``torchrun`` job), write a float ONNX model + learned
range file + a ready ``quantize: 1`` YAML (docs/qat.md). Logs; never prints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qmace.errors import ConfigError, InputDataError, ModelError

log = logging.getLogger(__name__)


@dataclass
class QATJob:
    """Everything one ``qmace qat`` run needs (the CLI flags of the same names)."""

    config: Path
    train_dir: Path
    model_name: str | None = None
    labels: Path | None = None
    val_dir: Path | None = None
    val_labels: Path | None = None
    epochs: int = 1
    lr: float = 1e-5
    range_lr: float | None = None
    freeze_below: float = 0.0  # weight tensors whose largest magnitude is below this stay fixed (fit)
    batch_size: int = 16  # global batch: split over the processes
    output_dir: Path | None = None
    build_dir: Path | None = None
    equalization: bool = True
    device: str = "cpu"
    nproc: int = 1
    workers: int = 0  # DataLoader worker processes per rank
    schedule: str = "cosine"
    warmup: float = 0.0
    patience: int | None = None
    resume: bool = False
    seed: int = 0
    threads: int | None = None  # torch intra-op threads per process (None: torch's default)
    gate_alpha: float | None = 0.05  # significance gate of the validation gain (None: off); qmace.qat.gate
    distill: str = "softmax"  # the loss without labels: qmace.qat.losses.DISTILL_LOSSES
    # the PTQ start's mixed precision, as `qmace quantize` (besides the YAML's quantize_float_nodes /
    # quantize_16bit_tensors): node names / op types kept float, and the sensitivity rules' counts
    float_nodes: tuple[str, ...] = ()
    sensitivity_16bit: int = 0
    sensitivity_float_layers: int = 0
    sensitivity_samples: int = 8


@dataclass
class QATOutputs:
    """What a ``qmace qat`` run wrote and measured: the fine-tuned float ONNX model, the learned range file,
    the checkpoint, the ``quantize: 1`` YAML and this summary's JSON; sample counts, the objective, the
    per-epoch losses and validation metrics, and the float / PTQ / QAT metrics (None without validation)."""

    onnx: Path
    ranges: Path
    checkpoint: Path
    yaml: Path
    summary: Path
    samples: int
    val_samples: int
    objective: str
    equalized_tensors: int
    world: int
    losses: list[float] = field(default_factory=list)
    metric: str | None = None  # name of the validation metric
    metrics: list[float] = field(default_factory=list)
    float_metric: float | None = None
    ptq_metric: float | None = None
    qat_metric: float | None = None
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    gate: dict | None = None  # qmace.qat.gate.GateResult as a dict (None: gate off or not possible)
    frozen: list[str] = field(default_factory=list)  # weight tensors kept fixed (--freeze_below)

    def to_json(self) -> str:
        """These outputs as JSON (paths as strings); :meth:`from_json` reads it back.

        Returns:
            The JSON text.
        """
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> QATOutputs:
        """Outputs written by :meth:`to_json` (how spawned ranks hand rank 0's result to the parent).

        Args:
            text: the JSON text.

        Returns:
            The outputs, paths as Paths.
        """
        d = json.loads(text)
        for k in ("onnx", "ranges", "checkpoint", "yaml", "summary"):
            d[k] = Path(d[k])
        return cls(**d)


def read_labels(path: str | Path, sample_names: list[str]) -> list[int]:
    """Labels file: one integer per line in sample order, or ``name label`` pairs (``name`` = the sample's
    file-name suffix, or the whole file name). Blank lines and ``#`` comments are ignored.

    Args:
        path: the labels file.
        sample_names: the samples' names, in sample order.

    Returns:
        One integer label per sample, in sample order.

    Raises:
        InputDataError: unreadable file, wrong count, malformed line, non-integer label or a sample without
            a label (the message names the file).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputDataError(f"{path}: cannot read labels: {e}") from e
    rows = [ln.split() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    try:
        if rows and all(len(r) == 1 for r in rows):
            labels = [int(r[0]) for r in rows]
            if len(labels) != len(sample_names):
                raise InputDataError(f"{path}: {len(labels)} labels for {len(sample_names)} samples")
            return labels
        by_name = {}
        for r in rows:
            if len(r) != 2:
                raise InputDataError(f"{path}: expected 'label' or 'name label' lines, got {' '.join(r)!r}")
            by_name[r[0]] = int(r[1])
    except ValueError as e:
        raise InputDataError(f"{path}: labels must be integers: {e}") from e
    out = []
    for s in sample_names:
        hit = by_name.get(s)
        if hit is None:
            hit = next((v for k, v in by_name.items() if k.endswith(s) or s.endswith(k)), None)
        if hit is None:
            raise InputDataError(f"{path}: no label for sample {s!r}")
        out.append(hit)
    return out


def write_qat_yaml(config_path: Path, m, out_yaml: Path, onnx_path: Path, range_path: Path,
                   input_ranges: list[tuple[float, float]], float_nodes: list[str] = (),
                   wide: list[str] = ()) -> Path:
    """The source YAML's entry for model ``m`` pointing at the QAT float model, with ``quantize: 1``.

    Args:
        config_path: the source deployment YAML.
        m: the model's config (its ``name`` and ``quantize_schema`` are used).
        out_yaml: the YAML to write (atomically).
        onnx_path: the fine-tuned float ONNX model (its name and SHA-256 go into the entry).
        range_path: the learned range file (its name goes into the entry).
        input_ranges: ``(min, max)`` of each model input, written as the first subgraph's ``input_ranges``.
        float_nodes: the ``quantize_float_nodes`` the QAT model was trained with (empty: the key is dropped).
        wide: its ``quantize_16bit_tensors`` (empty: the key is dropped).

    Returns:
        ``out_yaml``.
    """
    import yaml

    from qmace.fileio import atomic_write

    raw = yaml.safe_load(Path(config_path).read_text())
    entry = dict(raw["models"][m.name])
    entry["model_file_path"] = onnx_path.name
    entry["model_sha256_checksum"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    entry.pop("weight_file_path", None)
    entry.pop("weight_sha256_checksum", None)
    entry.pop("quantize_large_weights", None)
    entry.pop("quantize_large_weights_schema", None)
    entry["quantize"] = 1
    entry["quantize_range_file"] = range_path.name
    entry["quantize_schema"] = m.quantize_schema
    for key, names in (("quantize_float_nodes", float_nodes), ("quantize_16bit_tensors", wide)):
        entry.pop(key, None)
        if names:
            entry[key] = list(names)
    subs = entry["subgraphs"]
    first = subs[0] if isinstance(subs, list) else next(iter(subs.values()))
    first = dict(first)
    first["input_ranges"] = [f"{lo!r},{hi!r}" for lo, hi in input_ranges]
    entry["subgraphs"] = [first]
    doc = {k: v for k, v in raw.items() if k != "models"}
    doc["models"] = {m.name: entry}
    with atomic_write(out_yaml) as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    return out_yaml


def output_dir(job: QATJob) -> tuple[Path, str]:
    """(output directory, model name) of ``job``; reads the config. The default folder,
    ``<build_dir>/<library_name>/qat``, is checked to stay inside the build folder (PathError).

    Args:
        job: the QAT job.

    Returns:
        ``(output directory, model name)``.

    Raises:
        ConfigError: a bad YAML or an unknown model name.
        PathError: ``library_name`` is not a plain name or the folder leaves the build folder.
    """
    from qmace.config import load_config
    from qmace.fileio import check_inside, check_plain_name

    cfg = load_config(job.config)
    m = cfg.model(job.model_name)
    if job.output_dir:
        return Path(job.output_dir), m.name
    root = Path(job.build_dir or "build")
    out = root / check_plain_name(cfg.library_name, f"{cfg.path}: library_name") / "qat"
    check_inside(root, out, "the QAT output folder")
    return out, m.name


def check_job(job: QATJob) -> None:
    """ConfigError for flags that cannot work, before any process is started.

    Args:
        job: the QAT job.

    Raises:
        ConfigError: bad epochs/batch size/learning rates/schedule/warm-up/patience/workers/gate alpha/
            sensitivity counts, an unusable
            device or process count, a batch not divisible by the processes, inconsistent label flags, a
            distillation loss with labels, or ``resume`` without a checkpoint.
    """
    from qmace.qat.distributed import check_device, launched_by_torchrun
    from qmace.qat.gate import check_alpha
    from qmace.qat.losses import DISTILL_LOSSES, check_distill
    from qmace.qat.trainer import SCHEDULES

    if job.epochs < 0 or job.batch_size < 1:
        raise ConfigError("--epochs must be >= 0 and --batch_size >= 1")
    if not math.isfinite(job.lr) or job.lr <= 0 or (
            job.range_lr is not None and (not math.isfinite(job.range_lr) or job.range_lr <= 0)):
        raise ConfigError(f"--lr and --range_lr must be positive finite numbers, got {job.lr}, {job.range_lr}")
    if not math.isfinite(job.freeze_below) or job.freeze_below < 0:
        raise ConfigError(f"--freeze_below {job.freeze_below}: a magnitude >= 0 (0: train every weight)")
    if job.schedule not in SCHEDULES:
        raise ConfigError(f"--lr_schedule {job.schedule}: choose from {', '.join(SCHEDULES)}")
    if not 0.0 <= job.warmup <= 1.0:
        raise ConfigError(f"--warmup {job.warmup}: a share of the steps in [0, 1]")
    if job.patience is not None and (job.patience < 1 or job.val_dir is None):
        raise ConfigError("--patience needs --val_dir and must be >= 1")
    if job.workers < 0:
        raise ConfigError("--workers must be >= 0")
    if min(job.sensitivity_16bit, job.sensitivity_float_layers) < 0 or job.sensitivity_samples < 1:
        raise ConfigError("--sensitivity_16bit and --sensitivity_float_layers must be >= 0 and "
                          "--sensitivity_samples >= 1")
    try:
        check_alpha(job.gate_alpha)  # fit's own check, so the bound lives once
    except ValueError:
        raise ConfigError(f"--gate_alpha {job.gate_alpha}: a significance level in (0, 1), or off") from None
    if job.nproc > 1 and launched_by_torchrun():
        raise ConfigError("--nproc with torchrun: torchrun starts the processes (use --nproc 1, the default)")
    check_device(job.device, job.nproc)
    world = job.nproc
    if launched_by_torchrun():
        import os

        world = int(os.environ["WORLD_SIZE"])
    if job.batch_size % world:
        raise ConfigError(f"--batch_size {job.batch_size} must be a multiple of the number of processes ({world})")
    if job.labels is not None and job.val_dir is not None and job.val_labels is None:
        raise ConfigError("--labels with --val_dir needs --val_labels (labels of the validation samples)")
    if job.val_labels is not None and job.val_dir is None:
        raise ConfigError("--val_labels needs --val_dir")
    try:
        check_distill(job.distill)  # fit's own check, so the list lives once
    except ValueError:
        raise ConfigError(f"--distill {job.distill}: choose from {', '.join(DISTILL_LOSSES)}") from None
    if job.distill != "softmax" and job.labels is not None:
        raise ConfigError(f"--distill {job.distill} is a distillation loss: it cannot be used with --labels")
    if job.resume:
        out, name = output_dir(job)
        if not (out / f"{name}_qat.ckpt").is_file():
            raise ConfigError(f"--resume: no checkpoint {out / f'{name}_qat.ckpt'}")


def run_qat(job: QATJob, progress=None, on_epoch=None) -> QATOutputs | None:
    """Run ``job``: in this process, in ``job.nproc`` spawned local processes, or as this rank of a torchrun
    job. Returns the outputs (None on ranks other than 0 of a torchrun job).

    Args:
        job: the QAT job.
        progress: optional ``tqdm``-like wrapper for progress bars (rank 0).
        on_epoch: optional callback receiving each :class:`qmace.qat.trainer.EpochReport` (rank 0; picklable
            for ``nproc > 1``).

    Returns:
        The :class:`QATOutputs`, or None on a torchrun rank other than 0.

    Raises:
        ConfigError: a bad job (:func:`check_job`) or a spawned process failed (its last error line).
        QmaceError: bad YAML, model, samples or labels (a subclass naming the file).
    """
    from qmace.qat import distributed as D

    check_job(job)
    if D.launched_by_torchrun():
        rank, world, local = D.init(job.device)
        try:
            return _run_rank(job, rank, world, local, progress, on_epoch)
        finally:
            D.shutdown()
    if job.nproc > 1:
        import torch.multiprocessing as mp

        out, name = output_dir(job)
        summary = out / f"{name}_qat.json"
        summary.unlink(missing_ok=True)
        try:
            D.spawn(_worker, job.nproc, (job, D.free_port(), progress, on_epoch))
        except mp.ProcessException as e:  # a rank failed: its last line is the error
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise ConfigError(f"qat process failed: {lines[-1] if lines else e}") from None
        return QATOutputs.from_json(summary.read_text())
    return _run_rank(job, 0, 1, 0, progress, on_epoch)


def _worker(rank: int, job: QATJob, port: int, progress, on_epoch) -> None:
    from qmace.qat import distributed as D

    D.init(job.device, rank, job.nproc, port)
    try:
        _run_rank(job, rank, job.nproc, rank, progress, on_epoch)
    finally:
        D.shutdown()


def _load_samples(m, directory, progress, label: str, show: bool) -> list:
    from qmace.pipeline import count_samples, samples_for

    n = count_samples(m, directory, 0)
    it = samples_for(m, directory, 0)
    return list(progress(it, total=n, desc=label) if progress and show else it)


def _run_rank(job: QATJob, rank: int, world: int, local: int, progress, on_epoch) -> QATOutputs | None:
    import torch

    from qmace.config import load_config
    from qmace.fileio import atomic_write
    from qmace.pipeline import load_float_graph
    from qmace.qat.data import SampleDataset, make_loader
    from qmace.qat.distributed import rank_device
    from qmace.qat.module import export_qat, prepare
    from qmace.qat.trainer import fit

    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    cfg = load_config(job.config)
    m = cfg.model(job.model_name)
    original = load_float_graph(m)
    samples = _load_samples(m, job.train_dir, progress, "loading", rank == 0)
    graph, ranges, opts, equalized = _ptq_start(job, m, original, samples)
    dev = rank_device(job.device, local)
    module = prepare(graph, ranges, opts).to(dev)
    if job.distill == "sigmoid":
        module.train_outputs = sigmoid_logits(graph)
    labels = read_labels(job.labels, [s.name for s in samples]) if job.labels else None
    loader = make_loader(SampleDataset(samples, labels), global_batch=job.batch_size, rank=rank, world=world,
                         seed=job.seed, workers=job.workers)
    val_samples, metric, float_metric, validate = _validation(job, m, original, rank, progress)
    out_dir, _ = output_dir(job)
    ckpt = out_dir / f"{m.name}_qat.ckpt"
    if rank == 0:
        from qmace.fileio import ensure_dir

        ensure_dir(out_dir)
    res = fit(module, loader, epochs=job.epochs, lr=job.lr, range_lr=job.range_lr, schedule=job.schedule,
              warmup=job.warmup, device=dev, validate=validate, patience=job.patience, checkpoint=ckpt,
              resume=ckpt if job.resume else None, progress=progress, on_epoch=on_epoch, gate_alpha=job.gate_alpha,
              distill=job.distill, freeze_below=job.freeze_below)
    if rank != 0:
        return None
    module.to("cpu")
    onnx_path, range_path = export_qat(module, out_dir / f"{m.name}_qat.onnx", out_dir / f"{m.name}_qat.ranges")
    yml = write_qat_yaml(Path(job.config), m, out_dir / f"{m.name}_qat.yml", onnx_path, range_path,
                         [(r.min, r.max) for r in opts.input_ranges.values()],
                         float_nodes=sorted({*opts.float_nodes, *opts.float_layers}), wide=sorted(opts.wide_extra))
    outputs = QATOutputs(
        onnx=onnx_path, ranges=range_path, checkpoint=ckpt, yaml=yml, summary=out_dir / f"{m.name}_qat.json",
        samples=len(samples), val_samples=len(val_samples), gate=None if res.gate is None else asdict(res.gate),
        objective="cross-entropy" if labels is not None else (
            "distillation from the float model" + (" (per-element sigmoid maps)" if job.distill == "sigmoid" else "")),
        equalized_tensors=equalized, world=world, losses=res.losses, metric=metric, metrics=res.metrics,
        float_metric=float_metric, ptq_metric=res.start_metric, qat_metric=res.best_metric,
        best_epoch=res.best_epoch, epochs_run=res.epochs_run, stopped_early=res.stopped_early, frozen=res.frozen)
    with atomic_write(outputs.summary) as f:
        f.write(outputs.to_json())
    return outputs


def sigmoid_logits(graph) -> list[str]:
    """The tensors the graph's output Sigmoids read (``--distill sigmoid`` distills these logits).

    Args:
        graph: the float graph QAT starts from.

    Returns:
        One tensor name per graph output.

    Raises:
        ModelError: an output is not made by a Sigmoid (named, with the op that makes it).
    """
    producers = graph.producers()
    names = []
    for out in graph.outputs:
        node = producers.get(out)
        if node is None or node.op_type != "Sigmoid":
            made = "a graph input or constant" if node is None else f"node {node.name!r} ({node.op_type})"
            raise ModelError(f"--distill sigmoid: output {out!r} is made by {made}, not by a Sigmoid")
        names.append(node.inputs[0])
    return names


def _ptq_start(job: QATJob, m, graph, samples) -> tuple:
    """The post-training start: (equalized float graph, ranges, options, equalized tensor count).

    qmace's PTQ recipe with the histogram percentile (better ranges than MACE's min/max) and, as `qmace
    quantize`, activation equalization first; no weight refinement (training learns the weights). Every rank
    computes the same start; DistributedDataParallel also broadcasts rank 0's parameters. The options carry
    the start's float nodes / layers and 16-bit activations (the YAML's, the flags', the sensitivity rules'):
    trained as such, and written into the output YAML so that converting the result keeps them."""
    from qmace.quantize.recipe import PTQRecipe, options_for, run_ptq

    opts = options_for(m, graph=graph)
    opts = replace(opts, float_nodes={*opts.float_nodes, *job.float_nodes})
    recipe = PTQRecipe(method="percentile", equalize=job.equalization, bias_correction=False,
                       sensitivity_16bit=job.sensitivity_16bit, sensitivity_float_layers=job.sensitivity_float_layers,
                       sensitivity_samples=job.sensitivity_samples)
    ptq = run_ptq(graph, samples, recipe, opts)
    if ptq.equalized_tensors:
        log.info("activation equalization rescaled %d tensor(s)", ptq.equalized_tensors)
    used = ptq.options
    opts = replace(opts, float_nodes=set(used.float_nodes), float_layers=dict(used.float_layers),
                   wide_extra=dict(used.wide_extra))
    return ptq.float_graph, ptq.ranges, opts, ptq.equalized_tensors


def _validation(job: QATJob, m, original, rank: int, progress) -> tuple:
    """Rank 0's validation set and scorer (samples, metric name, the float model's score, ``validate``); the
    other ranks get a scorer that is never called (they receive rank 0's score)."""
    from qmace.qat.evaluate import validator

    if job.val_dir is None:
        return [], None, None, None
    if rank != 0:
        return [], None, None, _never_called
    val_samples = _load_samples(m, job.val_dir, progress, "validation samples", True)
    val_labels = read_labels(job.val_labels, [s.name for s in val_samples]) if job.val_labels else None
    metric, float_metric, validate = validator(original, val_samples, val_labels)
    return val_samples, metric, float_metric, validate


def _never_called(module) -> float:
    raise AssertionError("validation runs on rank 0 only")
