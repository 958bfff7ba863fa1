"""The QAT training losses: cross-entropy with labels, else label-free distillation from a teacher's logits.

One home for what a loss is (the names ``qmace qat --distill`` accepts, their formulas, the default teacher);
:mod:`qmace.qat.trainer` runs the optimisation around them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

#: Distillation losses: ``softmax`` (KL between class distributions) and ``sigmoid`` (per-element Bernoulli KL:
#: dense probability maps, e.g. a segmentation mask or a text-detection map, distilled from their logits).
DISTILL_LOSSES = ("softmax", "sigmoid")


def check_distill(distill: str) -> None:
    """ValueError unless ``distill`` is one of :data:`DISTILL_LOSSES` (``fit`` and ``qmace qat`` both ask here).

    Args:
        distill: the loss name.

    Raises:
        ValueError: an unknown name.
    """
    if distill not in DISTILL_LOSSES:
        raise ValueError(f"distill must be one of {', '.join(DISTILL_LOSSES)}, not {distill!r}")


def as_tensor(x):
    """``x`` as float32 torch tensors.

    Args:
        x: an array, tensor or feed dict of them.

    Returns:
        The tensor(s), in ``x``'s structure.
    """
    if isinstance(x, dict):
        return {k: as_tensor(v) for k, v in x.items()}
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, np.float32))


def as_numpy(x):
    """``x`` as numpy arrays (tensors detached, on the CPU).

    Args:
        x: an array, tensor or feed dict of them.

    Returns:
        The array(s), in ``x``'s structure.
    """
    if isinstance(x, dict):
        return {k: as_numpy(v) for k, v in x.items()}
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def cross_entropy(student: torch.Tensor, y, device: torch.device) -> torch.Tensor:
    """Cross-entropy of ``student`` logits (one row per label) against integer class labels ``y``.

    Args:
        student: the module's logits.
        y: the labels (array or tensor), one per row of ``student``.
        device: where ``student`` lives.

    Returns:
        The mean loss.
    """
    target = torch.as_tensor(np.asarray(as_numpy(y)), dtype=torch.long).reshape(-1).to(device)
    return F.cross_entropy(student.reshape(len(target), -1), target)


def distillation(student: torch.Tensor, teacher: torch.Tensor, distill: str = "softmax", axis: int | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """The distillation loss of ``student`` logits towards ``teacher`` logits (same shape), times ``T^2``.

    ``softmax``, ``axis`` None: ``KL(softmax(teacher / T) || softmax(student / T))`` per sample (its whole
    output one distribution), averaged over the batch; ``axis`` ``a``: one distribution per position along the
    other axes (``(N, T, C)`` logits, ``a = -1``: one per timestep), averaged over the positions.
    ``sigmoid``: every element is one Bernoulli distribution, ``KL(sigmoid(teacher / T) || sigmoid(student / T))``
    averaged over the elements (dense probability maps; the logits are those the map's Sigmoid reads).

    Args:
        student: the module's logits.
        teacher: the teacher's logits (no gradient is taken through them).
        distill: ``softmax`` or ``sigmoid``.
        axis: the class axis of per-position ``softmax`` distillation, or None.
        temperature: ``T``.

    Returns:
        The loss.
    """
    t = teacher.reshape(student.shape).detach()
    if distill == "sigmoid":  # Bernoulli KL per element: BCE(student, p) - BCE(teacher, p), p = sigmoid(t)
        s_, t_ = student.float() / temperature, t.float() / temperature
        p = torch.sigmoid(t_)
        kl = (F.binary_cross_entropy_with_logits(s_, p, reduction="none")
              - F.binary_cross_entropy_with_logits(t_, p, reduction="none"))
        return kl.mean() * temperature**2
    if axis is not None:  # one distribution per position: the class axis last, positions as rows
        student = student.movedim(axis, -1).reshape(-1, student.shape[axis])
        t = t.movedim(axis, -1).reshape(student.shape)
    n = student.shape[0]
    log_p = F.log_softmax(student.reshape(n, -1) / temperature, dim=-1)
    q = F.softmax(t.reshape(n, -1) / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def float_teacher(module) -> Callable[[np.ndarray], np.ndarray]:
    """The float graph the module was prepared from (before fine-tuning), in ONNX Runtime: x -> logits.

    This is ``module.float_graph``: the graph given to ``prepare``. ``qmace qat`` prepares from the equalized
    graph, which computes the original function; a module prepared from a bias-corrected graph (a PTQ result's
    ``float_graph`` after bias correction or AdaRound) would distil towards that graph instead of the original
    model: pass ``teacher=`` (e.g. ``float_teacher`` of a module prepared from the original) in that case.

    Args:
        module: the QATModule (its ``float_graph`` is the teacher).

    Returns:
        ``run(x)``: ``x`` a batched array or feed dict, the first output for each sample, concatenated.
    """
    from qmace.runtime import Session

    session = Session(module.float_graph.copy())
    name = module.float_graph.inputs[0]
    out = module.float_graph.outputs[0]

    def run(x):
        feeds = x if isinstance(x, dict) else {name: x}
        feeds = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        # the converted graph has the YAML's (usually batch-1) shapes: run sample by sample
        return np.concatenate([session.run({k: v[i:i + 1] for k, v in feeds.items()})[out] for i in range(n)])

    return run


def teacher_logits(module, teacher: Callable | None) -> Callable:
    """``x -> logits`` of the distillation teacher: a torch module on tensors, else ``teacher`` (default:
    :func:`float_teacher`, built on first use) on numpy arrays.

    Args:
        module: the QATModule being trained.
        teacher: a torch module, ``x -> logits`` on numpy arrays, or None.

    Returns:
        ``logits(x)``.
    """
    built: dict[str, Callable] = {}

    def logits(x):
        if isinstance(teacher, torch.nn.Module):
            return teacher(x)
        if "fn" not in built:
            built["fn"] = teacher if teacher is not None else float_teacher(module)
        return built["fn"](as_numpy(x))

    return logits
