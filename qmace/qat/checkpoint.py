"""QAT checkpoints: what :func:`qmace.qat.trainer.fit` writes after every epoch and resumes from, and the
states and per-sample validation scores it keeps between epochs (the significance gate's inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qmace.errors import InputDataError
from qmace.fileio import atomic_write

CHECKPOINT_FORMAT = "qmace-qat-checkpoint-3"  # -2: the same without the gate's inputs (still resumable)
_READABLE = (CHECKPOINT_FORMAT, "qmace-qat-checkpoint-2")


def state_copy(module) -> dict:
    """A detached CPU copy of ``module.state_dict()``.

    Args:
        module: a torch module.

    Returns:
        name -> cloned tensor.
    """
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(module, path: str | Path, extra: dict | None = None) -> Path:
    """``torch.save`` of ``{"model": state dict, **extra}`` (tensors and plain values, readable with
    ``weights_only=True``), written atomically (a killed run leaves the previous checkpoint intact).

    Args:
        module: the module whose state dict is saved (detached, on the CPU).
        path: the checkpoint file (parent folders are created).
        extra: further entries (optimizer state, epoch, scores, ...).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": state_copy(module), **(extra or {})}
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`qmace.qat.trainer.fit` (``torch.load(weights_only=True)``: tensors and
    plain values).

    Args:
        path: the checkpoint file.

    Returns:
        Its dict (``model``, ``optimizer``, ``epoch``, scores, ``best_model``, ...).

    Raises:
        InputDataError: the file cannot be read or is not a resumable QAT checkpoint of this format.
    """
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise InputDataError(f"{path}: cannot read the QAT checkpoint: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") not in _READABLE:
        raise InputDataError(f"{path}: not a resumable QAT checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


@dataclass
class KeptStates:
    """The states and per-sample validation scores ``fit`` keeps: the start's (for the gate) and the best's
    (the candidate); scores only on rank 0, None when ``validate`` returns one float."""

    start_state: dict | None = None
    best_state: dict | None = None
    start_scores: np.ndarray | None = None
    best_scores: np.ndarray | None = None

    def to_checkpoint(self) -> dict:
        """The checkpoint entries (tensors or None).

        Returns:
            ``best_model``, ``start_model``, ``start_scores``, ``best_scores``.
        """
        def t(a):
            return None if a is None else torch.from_numpy(np.asarray(a, np.float64))

        return {"best_model": self.best_state, "start_model": self.start_state,
                "start_scores": t(self.start_scores), "best_scores": t(self.best_scores)}

    def from_checkpoint(self, ck: dict) -> None:
        """Read the entries of :meth:`to_checkpoint` (a format-2 checkpoint has only ``best_model``).

        Args:
            ck: the loaded checkpoint.
        """
        def a(x):
            return None if x is None else x.numpy()

        self.best_state, self.start_state = ck["best_model"], ck.get("start_model")
        self.start_scores, self.best_scores = a(ck.get("start_scores")), a(ck.get("best_scores"))
