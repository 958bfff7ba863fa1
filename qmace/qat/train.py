"""The built-in QAT trainer: cross-entropy with labels, else label-free distillation from the float model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qmace.fileio import atomic_write


def float_teacher(module) -> Callable[[np.ndarray], np.ndarray]:
    """The original float graph (before fine-tuning) in ONNX Runtime: x -> logits."""
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


def save_checkpoint(module, path: str | Path) -> Path:
    """``torch.save`` of the state dict (tensors only), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def _split(batch):
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _as_tensor(x):
    if isinstance(x, dict):
        return {k: _as_tensor(v) for k, v in x.items()}
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, np.float32))


def _as_numpy(x):
    if isinstance(x, dict):
        return {k: _as_numpy(v) for k, v in x.items()}
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


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
) -> list[float]:
    """Fine-tune ``module`` (a QATModule) with Adam; returns the mean loss of each epoch.

    ``batches``: a re-iterable of inputs (arrays, tensors or feed dicts), of ``(x, y)`` pairs, or a callable
    ``epoch -> iterable`` (fresh augmentation each epoch). ``labels``: integer class labels aligned with
    ``batches`` (one array per batch), or None. With labels (from either place) the loss is cross-entropy;
    without, it is distillation: ``KL(softmax(teacher(x)/T) || softmax(student(x)/T)) * T^2``, the teacher
    being ``teacher(x) -> logits`` or, by default, the module's original float graph run in ONNX Runtime.
    ``progress(iterable, total=, desc=)`` wraps each epoch (e.g. tqdm); the bar shows the running loss.
    ``checkpoint``: a path written atomically after each epoch (state dict of tensors only).
    ``range_lr``: learning rate of the LSQ range parameters (default ``lr``).
    """
    ranges = [p for n, p in module.named_parameters() if n in ("act_min", "act_max") and p.requires_grad]
    weights = [p for n, p in module.named_parameters() if n not in ("act_min", "act_max") and p.requires_grad]
    groups = [{"params": weights, "lr": lr}]
    if ranges:
        groups.append({"params": ranges, "lr": range_lr if range_lr is not None else lr})
    opt = torch.optim.Adam(groups)
    label_list = list(labels) if labels is not None else None
    losses: list[float] = []
    teacher_fn = teacher
    module.train()
    for epoch in range(epochs):
        items = batches(epoch) if callable(batches) else batches
        items = list(items)
        it = progress(items, total=len(items), desc=f"qat epoch {epoch + 1}/{epochs}") if progress else items
        total, count = 0.0, 0
        for i, batch in enumerate(it):
            x, y = _split(batch)
            if y is None and label_list is not None:
                y = label_list[i]
            student = module(_as_tensor(x))
            if y is not None:
                target = torch.as_tensor(np.asarray(_as_numpy(y)), dtype=torch.long).reshape(-1)
                loss = F.cross_entropy(student.reshape(len(target), -1), target)
            else:
                if teacher_fn is None:
                    teacher_fn = float_teacher(module)
                t = teacher(x) if teacher is not None and isinstance(teacher, torch.nn.Module) else teacher_fn(_as_numpy(x))
                t = _as_tensor(t).reshape(student.shape).detach()
                n = student.shape[0]
                log_p = F.log_softmax(student.reshape(n, -1) / temperature, dim=-1)
                q = F.softmax(t.reshape(n, -1) / temperature, dim=-1)
                loss = F.kl_div(log_p, q, reduction="batchmean") * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            count += 1
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / max(count, 1))
        if checkpoint is not None:
            save_checkpoint(module, checkpoint)
    module.eval()
    return losses


class _CallableModule(__import__("types").ModuleType):
    """``from qmace.qat import train`` may yield this module (Python binds the submodule over the
    package attribute): calling it calls :func:`train`."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
