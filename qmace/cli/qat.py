"""``qmace qat``: flags -> :class:`qmace.qat.job.QATJob`, progress and the summary on the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qmace.errors import ConfigError, QmaceError


class TorchMissing(QmaceError):
    """``qmace qat`` was asked for but PyTorch is not installed (exit 2 with the install hint)."""


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchMissing("qmace qat needs PyTorch: pip install 'qmace[qat]'") from None


def _path(v) -> Path | None:
    return Path(v) if v else None


def job_from_args(a: argparse.Namespace):
    """The :class:`qmace.qat.job.QATJob` the ``qmace qat`` flags describe (no checks here: ``run_qat`` checks).

    Args:
        a: the parsed ``qmace qat`` command line.

    Returns:
        The job.
    """
    from qmace.qat.job import QATJob

    return QATJob(
        config=Path(a.config), train_dir=Path(a.train_dir), model_name=a.model_name, labels=_path(a.labels),
        val_dir=_path(a.val_dir), val_labels=_path(a.val_labels), epochs=a.epochs, lr=a.lr, range_lr=a.range_lr,
        freeze_below=a.freeze_below,
        batch_size=a.batch_size, output_dir=_path(a.output_dir), build_dir=_path(a.build_dir),
        equalization=not a.no_equalization, device=a.device, nproc=a.nproc, workers=a.workers,
        schedule=a.lr_schedule, warmup=a.warmup, patience=a.patience, resume=a.resume, seed=a.seed,
        threads=a.threads, gate_alpha=gate_alpha(a.gate_alpha), distill=a.distill,
        float_nodes=tuple(x for x in a.float_nodes.split(",") if x), sensitivity_16bit=a.sensitivity_16bit,
        sensitivity_float_layers=a.sensitivity_float_layers, sensitivity_samples=a.sensitivity_samples)


def gate_alpha(text: str) -> float | None:
    """``--gate_alpha``: the significance gate's level (a number; ``run_qat`` checks it is in (0, 1)), or
    None for ``off`` (the best validation state is kept, however small its gain).

    Args:
        text: the flag's value.

    Returns:
        The level, or None.

    Raises:
        ConfigError: neither a number nor ``off``.
    """
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--gate_alpha {text!r}: a significance level in (0, 1), or off") from None


def print_epoch(rep) -> None:
    """One line per epoch: loss and the validation metric of the quantized model (module-level: picklable
    for spawned ranks).

    Args:
        rep: the epoch report (``epoch``, ``epochs``, ``loss``, ``metric``, ``best``).
    """
    metric = "" if rep.metric is None else f", validation {rep.metric:.4f}{' (best)' if rep.best else ''}"
    print(f"qat epoch {rep.epoch}/{rep.epochs}: loss {rep.loss:.4f}{metric}", flush=True)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def summary_line(o) -> str:
    """float / PTQ / QAT metric on the validation set in one line, then the significance gate's decision
    (when it ran) on a second.

    Args:
        o: the run's :class:`qmace.qat.job.QATOutputs`.

    Returns:
        The line(s) (without a final newline).
    """
    if o.metric is None:
        return (f"qat summary: no --val_dir, no validation metric; {o.epochs_run} epoch(s), final loss "
                f"{o.losses[-1]:.4f}" if o.losses else "qat summary: 0 epochs")
    float_part = "reference" if o.float_metric is None else _fmt(o.float_metric)
    stop = ", stopped early" if o.stopped_early else ""
    line = (f"qat summary ({o.metric}, {o.val_samples} validation samples): float {float_part} | "
            f"PTQ {_fmt(o.ptq_metric)} | QAT {_fmt(o.qat_metric)} (best epoch {o.best_epoch} of "
            f"{o.epochs_run} run{stop})")
    if o.gate is None:
        return line
    from qmace.qat.gate import GateResult

    return f"{line}\n{GateResult(**o.gate).message()}"


def qat_command(a: argparse.Namespace, progress=None) -> int:
    """Run ``qmace qat``: build the job from the flags, train, print one line per epoch, the output paths
    and the float/PTQ/QAT summary (rank 0 only).

    Args:
        a: the parsed ``qmace qat`` command line.
        progress: optional ``tqdm``-like wrapper for the per-batch progress bar.

    Returns:
        0.

    Raises:
        TorchMissing: PyTorch is not installed.
        QmaceError: a bad job (see :func:`qmace.qat.job.check_job`) or bad inputs.
    """
    _need_torch()
    from qmace.qat.job import run_qat

    o = run_qat(job_from_args(a), progress=progress, on_epoch=print_epoch)
    if o is None:  # a torchrun rank other than 0
        return 0
    if o.equalized_tensors:
        print(f"qat: activation equalization rescaled {o.equalized_tensors} tensor(s)")
    print(f"qat: {o.samples} sample(s), {o.epochs_run} epoch(s), {o.objective}, {o.world} process(es); "
          f"loss per epoch: {', '.join(f'{x:.4f}' for x in o.losses) or '-'}")
    if o.frozen:
        print(f"qat: {len(o.frozen)} weight tensor(s) kept fixed (--freeze_below): {', '.join(o.frozen)}")
    print(f"fine-tuned float model: {o.onnx}")
    print(f"learned ranges: {o.ranges}")
    print(f"checkpoint: {o.checkpoint}")
    print(f"YAML (quantize: 1): {o.yaml}  ->  qmace convert --config {o.yaml}")
    print(summary_line(o))
    sys.stdout.flush()
    return 0
