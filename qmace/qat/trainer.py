"""The built-in QAT trainer: Adam over the weights and LSQ ranges, validation, the significance gate, checkpoints.

The losses (cross-entropy with labels, else distillation from the float model) are :mod:`qmace.qat.losses`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qmace.errors import InputDataError
from qmace.qat.checkpoint import CHECKPOINT_FORMAT, KeptStates, load_checkpoint, save_checkpoint, state_copy
from qmace.qat.gate import DEFAULT_ALPHA, GateResult, apply_gate, check_alpha
from qmace.qat.losses import as_tensor, check_distill, cross_entropy, distillation, teacher_logits

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine")


def _to(x, dev):
    if isinstance(x, dict):
        return {k: v.to(dev) for k, v in x.items()}
    return x.to(dev)


def _split(batch):
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Warm-up: the first ``n_w = round(warmup * total)`` steps rise linearly, ``(step + 1) / n_w``. After it,
    ``constant``: 1; ``cosine``: ``0.5 * (1 + cos(pi * (step - n_w) / (total - n_w)))`` (1 down to ~0).

    Args:
        step: the optimizer step, 0-based.
        total: the number of steps of the whole run.
        schedule: ``constant`` or ``cosine``.
        warmup: the share of ``total`` spent warming up, in [0, 1].

    Returns:
        The factor, in (0, 1].

    Raises:
        ValueError: an unknown ``schedule``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    n_w = round(warmup * total)
    if step < n_w:
        return (step + 1) / n_w
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - n_w) / max(1, total - n_w)))
    return 1.0


@dataclass
class EpochReport:
    """What one epoch did (the ``on_epoch`` callback receives it; rank 0 only under data parallelism)."""

    epoch: int  # 1-based
    epochs: int
    loss: float  # mean training loss over the epoch's batches (all ranks)
    metric: float | None  # validation metric of the quantized model after the epoch (None: no validation)
    best: bool  # the best metric so far (the state kept)


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch losses and validation metrics, the start (PTQ) metric, the best
    metric and its epoch (whose state the module holds afterwards), and whether patience stopped it early."""

    losses: list[float]  # mean loss per epoch run (resumed epochs included)
    metrics: list[float] = field(default_factory=list)  # validation metric per epoch run
    start_metric: float | None = None  # the validation metric before training (the PTQ start)
    best_metric: float | None = None
    best_epoch: int = 0  # 0: the start was best (its state is kept)
    stopped_early: bool = False
    epochs_run: int = 0
    gate: GateResult | None = None  # the significance gate's decision (None: off, or no per-sample scores)
    frozen: list[str] = field(default_factory=list)  # weight tensors kept fixed (``freeze_below``)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(
    module,
    batches: Iterable | Callable[[int], Iterable],
    *,
    epochs: int,
    lr: float,
    labels: Iterable | None = None,
    teacher: Callable | None = None,
    temperature: float = 1.0,
    distill_axis: int | None = None,
    distill: str = "softmax",
    range_lr: float | None = None,
    freeze_below: float = 0.0,
    schedule: str = "constant",
    warmup: float = 0.0,
    device: str | torch.device | None = None,
    validate: Callable | None = None,
    patience: int | None = None,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    progress: Callable | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    gate_alpha: float | None = DEFAULT_ALPHA,
) -> FitResult:
    """Fine-tune ``module`` (a QATModule) with Adam; see :func:`train` for ``batches``, ``labels``, ``teacher``,
    ``temperature``, ``range_lr``.

    ``distill_axis``: None (default): each sample's whole output is one distribution; an axis ``a``: one per
    position along the other axes (``(N, T, C)`` logits, ``a = -1``: one per timestep), the loss
    ``T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T))`` along ``a``.
    ``distill``: ``softmax`` (the above) or ``sigmoid``: every output element is one Bernoulli distribution,
    the loss ``T^2 * mean over elements of KL(sigmoid(teacher / T) || sigmoid(student / T))`` (dense
    probability maps; the targets are the logits the map's Sigmoid reads, ``QATModule.train_outputs``).

    ``freeze_below``: weight tensors (not biases) whose largest magnitude at the start is below this stay fixed
    (``FitResult.frozen``). Adam moves every element by about its rate per step whatever the tensor's scale,
    so at ``lr`` 1e-5 a layer whose weights are ~1e-5 loses its function in a few steps (a text detector's
    conv did, docs/qat.md); weight tensors whose largest magnitude is below ``100 * lr`` (1% of their range
    per step) and not frozen are named in one warning.
    ``schedule``/``warmup``: the learning rate of step ``k`` is the peak one times :func:`lr_factor`.
    ``device``: where the module, optimizer state and batches live (default: the module's device).
    ``validate(module)`` (higher is better) scores the quantized model before training and after every
    epoch: either per-sample scores (a 1-D array; the metric is their mean, e.g. 0/100 correctness -> top-1 %)
    or one float (the metric). The best state by the metric is the candidate (ties keep the earlier; the start
    included), and ``patience`` epochs without a better metric stop training. Significance gate
    (``gate_alpha``, :mod:`qmace.qat.gate`): with per-sample scores the candidate replaces the PTQ start only
    when the one-sided exact sign test (McNemar for 0/1 scores) of its per-sample scores against the start's,
    Bonferroni-adjusted over the epochs scored, gives ``p <= gate_alpha``; otherwise the start is kept (logged,
    ``FitResult.gate``). A float-returning ``validate`` cannot be gated (no per-sample results): the best
    state by the metric is kept, as with ``gate_alpha=None``.
    ``checkpoint``: written atomically after each epoch (rank 0): module, optimizer, epoch, scores, best state.
    ``resume``: a checkpoint to continue from (its epoch count, scores and best state); the data order
    depends only on the epoch, so a resumed run ends as the uninterrupted one.

    Data parallelism: when ``torch.distributed`` is initialized with more than one process, the module is
    wrapped in ``DistributedDataParallel`` (gradients averaged over ranks) and rank 0's ranges are broadcast
    after each step, so every rank holds the same ranges; only rank 0 validates (its score is broadcast) and
    writes the checkpoint. ``batches`` must then be this rank's shard (:func:`qmace.qat.data.make_loader`).

    Args:
        module: the QATModule to fine-tune (in place).
        batches: the training batches, or ``epoch -> batches`` (see :func:`train`).
        epochs: epochs to run in total (resumed ones included).
        lr: the peak learning rate of the weights.
        labels: class labels aligned with ``batches``, or None (see :func:`train`).
        teacher: ``x -> logits`` for distillation (default: :func:`qmace.qat.losses.float_teacher`).
        temperature: the distillation temperature ``T``.
        distill_axis: the class axis of per-position distillation, or None (one distribution per sample).
        distill: the distillation loss, ``softmax`` or ``sigmoid`` (see above).
        range_lr: the peak learning rate of the LSQ range parameters (default ``lr``).
        freeze_below: keep weight tensors whose largest start magnitude is below this fixed (0: none).
        schedule: ``constant`` or ``cosine`` (:func:`lr_factor`).
        warmup: the warm-up share of the steps.
        device: where training runs (default: the module's device).
        validate: ``validate(module) -> 1-D per-sample scores or float``, higher is better, or None.
        patience: epochs without a better score before stopping (needs ``validate``), or None.
        checkpoint: the checkpoint path written after each epoch, or None.
        resume: a checkpoint to continue from, or None.
        progress: ``progress(iterable, total=, desc=)`` wrapping each epoch, or None.
        on_epoch: called with an :class:`EpochReport` after each epoch (rank 0), or None.
        gate_alpha: the significance level of the gate, in (0, 1), or None (off: the best state is kept).

    Returns:
        The :class:`FitResult`; the module holds the kept state (best, or the start by the gate), in eval mode.

    Raises:
        InputDataError: ``resume`` is unreadable or does not match this model.
        ValueError: an unknown ``schedule`` or ``distill``, a ``gate_alpha`` outside (0, 1), or per-sample
            scores that are not 1-D or change length.
    """
    check_alpha(gate_alpha)
    check_distill(distill)
    rank, world = _distributed()
    if device is not None:
        module.to(torch.device(device))
    dev = next(module.parameters()).device
    opt, peak, frozen = _optimizer(module, lr, range_lr, freeze_below)
    net = module
    if world > 1:
        from qmace.qat.distributed import data_parallel

        net = data_parallel(module)
    run = _Run(epochs, schedule, warmup, temperature, distill_axis, distill,
               list(labels) if labels is not None else None, teacher_logits(module, teacher), rank, world, dev, peak)
    res = FitResult(losses=[], frozen=frozen)
    kept = KeptStates()
    first, step, bad = _resume(module, opt, resume, run, res, kept) if resume is not None else (0, 0, 0)
    score = _scorer(module, validate, run)
    if validate is not None and resume is None:
        res.start_metric, kept.start_scores = score()
        res.best_metric, kept.best_scores = res.start_metric, kept.start_scores
        kept.best_state = kept.start_state = state_copy(module)
    module.train()
    stop = validate is not None and patience is not None and bad >= patience
    for epoch in range(first, epochs):
        if stop:
            break
        it, per_epoch = _epoch_batches(batches, epoch, progress, run)
        loss, step = _train_epoch(net, module, opt, it, per_epoch, step, run)
        res.losses.append(loss)
        metric, per_sample = score()
        better = metric is not None and (res.best_metric is None or metric > res.best_metric)
        if metric is not None:
            res.metrics.append(metric)
            if better:
                res.best_metric, res.best_epoch, bad = metric, epoch + 1, 0
                kept.best_state, kept.best_scores = state_copy(module), per_sample
            else:
                bad += 1
            stop = patience is not None and bad >= patience
        log.info("qat epoch %d/%d: loss %.4f%s", epoch + 1, epochs, res.losses[-1],
                 "" if metric is None else f", validation {metric:.4f}")
        if checkpoint is not None and rank == 0:
            save_checkpoint(module, checkpoint, extra={
                "format": CHECKPOINT_FORMAT, "optimizer": opt.state_dict(), "epoch": epoch + 1, "epochs": epochs,
                "step": step, "losses": res.losses, "metrics": res.metrics, "start_metric": res.start_metric,
                "best_metric": res.best_metric, "best_epoch": res.best_epoch, "bad_epochs": bad,
                **kept.to_checkpoint()})
        if on_epoch is not None and rank == 0:
            on_epoch(EpochReport(epoch + 1, epochs, res.losses[-1], metric, better))
    res.epochs_run = len(res.losses)
    res.stopped_early = res.epochs_run < epochs
    if validate is not None and gate_alpha is not None:
        apply_gate(res, kept, gate_alpha, run.rank, run.world, run.device)
    if kept.best_state is not None:
        module.load_state_dict(kept.best_state)
    module.eval()
    return res


@dataclass(frozen=True)
class _Run:
    """The fixed settings of one :func:`fit` run, shared by its helpers."""

    epochs: int
    schedule: str
    warmup: float
    temperature: float
    distill_axis: int | None  # None: one distribution per sample; else the class axis (one per position)
    distill: str  # one of qmace.qat.losses.DISTILL_LOSSES
    labels: list | None  # labels aligned with the batches, or None
    teacher_logits: Callable  # x -> the teacher's logits (distillation)
    rank: int
    world: int
    device: torch.device
    peak: list[float]  # peak learning rate per optimizer parameter group


def _optimizer(module, lr: float, range_lr: float | None, freeze_below: float = 0.0
               ) -> tuple[torch.optim.Adam, list[float], list[str]]:
    """Adam over the weights (``lr``) and the LSQ ranges (``range_lr``, default ``lr``); the peak rates and the
    weight tensors kept fixed (largest start magnitude below ``freeze_below``; :func:`fit`)."""
    top = {n: float(w.detach().abs().max()) if w.numel() else 0.0 for n, w in module.kernel_weights().items()}
    frozen = [n for n, m in top.items() if m < freeze_below]
    fixed = {id(module.weight(n)) for n in frozen}
    if frozen:
        log.info("qat: %d weight tensor(s) kept fixed (largest magnitude < %g): %s", len(frozen), freeze_below,
                 ", ".join(frozen))
    risky = [f"{n} ({m:.2g})" for n, m in top.items() if m < 100 * lr and n not in frozen]
    if risky:
        log.warning("qat: Adam moves each weight by about lr = %g per step, over 1%% of the largest magnitude of "
                    "%d weight tensor(s): %s; freeze_below (--freeze_below) keeps such layers fixed", lr,
                    len(risky), ", ".join(risky))
    ranges = [p for n, p in module.named_parameters() if n in ("act_min", "act_max") and p.requires_grad]
    weights = [p for n, p in module.named_parameters()
               if n not in ("act_min", "act_max") and p.requires_grad and id(p) not in fixed]
    groups = [{"params": weights, "lr": lr}] if weights else []
    if ranges:
        groups.append({"params": ranges, "lr": range_lr if range_lr is not None else lr})
    return torch.optim.Adam(groups), [g["lr"] for g in groups], frozen


def _resume(module, opt, resume: str | Path, run: _Run, res: FitResult, kept: KeptStates) -> tuple[int, int, int]:
    """Load a checkpoint into ``module``/``opt``/``res``/``kept`` (rank 0 reads, the others receive it);
    returns ``(first epoch, step, epochs without improvement)``."""
    ck = load_checkpoint(resume) if run.rank == 0 else None
    if run.world > 1:
        import torch.distributed as dist

        box = [ck]
        dist.broadcast_object_list(box, src=0)
        ck = box[0]
    try:
        module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputDataError(f"{resume}: the checkpoint does not match this model: {e}") from e
    res.losses, res.metrics = list(ck["losses"]), list(ck["metrics"])
    res.start_metric, res.best_metric, res.best_epoch = ck["start_metric"], ck["best_metric"], int(ck["best_epoch"])
    if int(ck["epochs"]) != run.epochs:
        log.warning("%s: resuming a run planned for %s epochs with %s epochs (schedule changes)", resume,
                    ck["epochs"], run.epochs)
    kept.from_checkpoint(ck)
    log.info("resumed from %s after epoch %d", resume, int(ck["epoch"]))
    return int(ck["epoch"]), int(ck["step"]), int(ck["bad_epochs"])


def _scorer(module, validate: Callable | None, run: _Run) -> Callable[[], tuple[float | None, np.ndarray | None]]:
    """``score() -> (metric, per-sample scores or None)``: rank 0's ``validate(module)`` in eval mode without
    gradients (a 1-D array: its mean is the metric; a scalar: the metric, no per-sample scores); the metric is
    broadcast to every rank, the per-sample scores stay on rank 0."""
    count: list[int] = []

    def score() -> tuple[float | None, np.ndarray | None]:
        if validate is None:
            return None, None
        value = torch.zeros(1, dtype=torch.float64)
        per = None
        if run.rank == 0:
            module.eval()
            with torch.no_grad():
                got = validate(module)
            module.train()
            if np.ndim(got) == 0:
                value[0] = float(got)
            else:
                per = np.asarray(got, np.float64)
                if per.ndim != 1 or not len(per) or (count and count[0] != len(per)):
                    raise ValueError(f"validate() returned per-sample scores of shape {per.shape}: expected a "
                                     f"non-empty 1-D array{f' of {count[0]}' if count else ''}")
                count[:] = [len(per)]
                value[0] = float(per.mean())
        if run.world > 1:
            import torch.distributed as dist

            dist.broadcast(value.to(run.device) if dist.get_backend() == "nccl" else value, src=0)
        return float(value[0]), per

    return score


def _epoch_batches(batches, epoch: int, progress: Callable | None, run: _Run) -> tuple[Iterable, int]:
    """This epoch's batches (the sampler told the epoch), wrapped by ``progress`` on rank 0, and their count."""
    items = batches(epoch) if callable(batches) else batches
    sampler = getattr(items, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if not hasattr(items, "__len__"):
        items = list(items)
    it = items
    if progress is not None and run.rank == 0:
        it = progress(items, total=len(items), desc=f"qat epoch {epoch + 1}/{run.epochs}")
    return it, len(items)


def _loss(student: torch.Tensor, x, y, run: _Run) -> torch.Tensor:
    """Cross-entropy with labels ``y``; without, the distillation loss of ``run`` (:func:`fit`)."""
    if y is not None:
        return cross_entropy(student, y, run.device)
    t = as_tensor(run.teacher_logits(x)).to(run.device)
    return distillation(student, t, run.distill, run.distill_axis, run.temperature)


def _train_epoch(net, module, opt, it, per_epoch: int, step: int, run: _Run) -> tuple[float, int]:
    """One epoch of Adam steps; returns the mean loss over every rank's batches and the next step number."""
    total, count = 0.0, 0
    for i, batch in enumerate(it):
        x, y = _split(batch)
        if y is None and run.labels is not None:
            y = run.labels[i]
        for g, p in zip(opt.param_groups, run.peak):
            g["lr"] = p * lr_factor(step, run.epochs * per_epoch, run.schedule, run.warmup)
        loss = _loss(net(_to(as_tensor(x), run.device)), x, y, run)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if run.world > 1:
            from qmace.qat.distributed import sync_ranges

            sync_ranges(module)
        step += 1
        total += float(loss.detach())
        count += 1
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{total / count:.4f}")
    if run.world > 1:  # the epoch's mean loss over all ranks' batches
        import torch.distributed as dist

        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=run.device)
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1), step


def train(
    module,
    batches: Iterable | Callable[[int], Iterable],
    *,
    epochs: int,
    lr: float,
    labels: Iterable | None = None,
    teacher: Callable | None = None,
    temperature: float = 1.0,
    progress: Callable | None = None,
    checkpoint: str | Path | None = None,
    range_lr: float | None = None,
    **kwargs,
) -> list[float]:
    """Fine-tune ``module`` (a QATModule) with Adam; returns the mean loss of each epoch.

    ``batches``: a re-iterable of inputs (arrays, tensors or feed dicts), of ``(x, y)`` pairs, or a callable
    ``epoch -> iterable`` (fresh augmentation each epoch), or a DataLoader. ``labels``: integer class labels
    aligned with ``batches`` (one array per batch), or None. With labels (from either place) the loss is
    cross-entropy; without, it is distillation: ``KL(softmax(teacher(x)/T) || softmax(student(x)/T)) * T^2``,
    the teacher being ``teacher(x) -> logits`` or, by default, the module's original float graph run in ONNX
    Runtime. ``progress(iterable, total=, desc=)`` wraps each epoch (e.g. tqdm); the bar shows the running loss.
    ``checkpoint``: a path written atomically after each epoch (tensors and plain values only).
    ``range_lr``: learning rate of the LSQ range parameters (default ``lr``). Other keywords (schedule,
    warm-up, device, validation, early stopping, resume): :func:`fit`.

    Args:
        module: the QATModule to fine-tune (in place).
        batches: the training batches, as above.
        epochs: number of epochs.
        lr: the learning rate of the weights.
        labels: class labels aligned with ``batches``, or None.
        teacher: ``x -> logits`` for distillation, or None (the float graph).
        temperature: the distillation temperature ``T``.
        progress: a wrapper of each epoch's batches, or None.
        checkpoint: the checkpoint path, or None.
        range_lr: the learning rate of the LSQ ranges (default ``lr``).
        **kwargs: passed to :func:`fit`.

    Returns:
        The mean loss of each epoch.

    Raises:
        InputDataError: an unreadable or mismatched ``resume`` checkpoint (via :func:`fit`).
    """
    return fit(module, batches, epochs=epochs, lr=lr, labels=labels, teacher=teacher, temperature=temperature,
               progress=progress, checkpoint=checkpoint, range_lr=range_lr, **kwargs).losses

