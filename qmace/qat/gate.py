"""The significance gate of QAT: a trained state replaces the PTQ start only when its validation gain is
statistically significant on the per-sample validation scores.

Test: the one-sided exact sign test on the paired per-sample differences ``d_i = trained_i - start_i``.
With ``W`` samples where the trained state scores higher (``d_i > 0``), ``L`` where it scores lower
(``d_i < 0``), ties dropped and ``m = W + L``, under H0 "each non-tied sample is as likely to improve as to
worsen" ``W ~ Binomial(m, 1/2)`` and

    p = P(X >= W) = sum_{i=W}^{m} C(m, i) / 2^m        (p = 1 when m = 0).

For 0/1 (or 0/100) per-sample correctness this is exactly the one-sided exact McNemar test on the
discordant samples (``W`` = right only after training, ``L`` = right only at the start). For continuous
per-sample scores it is the same test on the signs: exact, distribution-free, no assumption of symmetric
differences (the Wilcoxon signed-rank test needs it) and not driven by a few samples with large changes.

The state tested is the best of ``K`` trained states on the same validation samples, so its raw p is
optimistic; :func:`decide` reports the Bonferroni-adjusted ``p_adj = min(1, K p)``, so the chance that some
state of a run replaces the start when no state is truly better than it stays below ``alpha``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)
DEFAULT_ALPHA = 0.05


def sign_test(start: np.ndarray, trained: np.ndarray) -> tuple[int, int, float]:
    """One-sided exact sign test that ``trained`` scores higher than ``start`` (paired by sample).

    Args:
        start: per-sample scores of the start, 1-D.
        trained: per-sample scores of the trained state, same shape.

    Returns:
        ``(W, L, p)``: samples better, samples worse, ``P(Binomial(W + L, 1/2) >= W)``.

    Raises:
        ValueError: the two arrays are not 1-D of the same length.
    """
    a, b = np.asarray(start, np.float64), np.asarray(trained, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"per-sample scores must be 1-D of equal length, got {a.shape} and {b.shape}")
    wins, losses = int(np.sum(b > a)), int(np.sum(b < a))
    m = wins + losses
    if m == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(m, i) for i in range(wins, m + 1))
    return wins, losses, tail / 2**m


@dataclass
class GateResult:
    """What the gate decided at the end of :func:`qmace.qat.trainer.fit`.

    ``candidate_epoch`` is the best trained state on validation (0: the start itself was best, no test run);
    ``wins``/``losses`` the validation samples it scores higher/lower than the start, of ``samples``;
    ``p_value`` the Bonferroni-adjusted one-sided sign-test p over the ``candidates`` trained states scored
    (None without a test); ``kept_start``: the start's state is the result."""

    alpha: float
    samples: int
    candidate_epoch: int
    candidate_metric: float | None
    candidates: int
    wins: int = 0
    losses: int = 0
    p_value: float | None = None
    kept_start: bool = True

    def message(self) -> str:
        """One line saying what the gate decided and why.

        Returns:
            The line.
        """
        if self.candidate_epoch == 0:
            return "QAT: no trained state beat the PTQ start on the validation set; kept the PTQ start"
        gain = f"{self.wins - self.losses:+d} of {self.samples}, p={self.p_value:.3g}"
        if self.kept_start:
            return (f"QAT did not beat the start significantly on the validation set ({gain}); kept the PTQ "
                    f"start (epoch {self.candidate_epoch}: {self.wins} samples better, {self.losses} worse; "
                    f"one-sided sign test, Bonferroni over {self.candidates} epoch(s), alpha {self.alpha:g})")
        return (f"QAT beat the start significantly on the validation set ({gain} <= alpha {self.alpha:g}); "
                f"kept epoch {self.candidate_epoch} ({self.wins} samples better, {self.losses} worse)")


def decide(start: np.ndarray, candidate: np.ndarray | None, *, alpha: float, candidate_epoch: int,
           candidate_metric: float | None, candidates: int) -> GateResult:
    """Keep the start unless ``candidate`` (the best trained state's per-sample scores) beats it with a
    Bonferroni-adjusted one-sided sign-test p ``min(1, candidates * p) <= alpha``.

    Args:
        start: the start's per-sample validation scores.
        candidate: the candidate's per-sample scores, or None when the start was best (``candidate_epoch`` 0).
        alpha: the significance level, in (0, 1).
        candidate_epoch: the candidate's epoch (1-based; 0 = the start).
        candidate_metric: the candidate's validation metric.
        candidates: how many trained states were scored (the candidate is the best of them), >= 1.

    Returns:
        The :class:`GateResult`.
    """
    res = GateResult(alpha=alpha, samples=len(start), candidate_epoch=candidate_epoch,
                     candidate_metric=candidate_metric, candidates=max(1, candidates))
    if candidate is None or candidate_epoch == 0:
        return res
    res.wins, res.losses, p = sign_test(start, candidate)
    res.p_value = min(1.0, p * res.candidates)
    res.kept_start = not res.p_value <= alpha
    return res


def check_alpha(alpha: float | None) -> None:
    """ValueError unless ``alpha`` is None (gate off) or in (0, 1).

    Args:
        alpha: the significance level.

    Raises:
        ValueError: out of range.
    """
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ValueError(f"significance level alpha {alpha}: must be in (0, 1) (None turns the gate off)")


def apply_gate(res, kept, alpha: float, rank: int = 0, world: int = 1, device=None) -> None:
    """The gate at the end of :func:`qmace.qat.trainer.fit`: rank 0 tests the best state against the start
    (:func:`decide`, logged, stored in ``res.gate``) and broadcasts the decision; when the start is kept,
    ``res``'s best metric/epoch become the start's and ``kept.best_state`` the start's state. Without
    per-sample scores (a float-returning ``validate``, or a resumed format-2 checkpoint) nothing changes.

    Args:
        res: the run's FitResult (``best_epoch``, ``best_metric``, ``start_metric``, ``metrics``, ``gate``).
        kept: the run's :class:`qmace.qat.checkpoint.KeptStates`.
        alpha: the significance level.
        rank: this process's rank.
        world: the number of processes.
        device: the training device (the broadcast goes through it under nccl).
    """
    import torch

    keep_start = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        if kept.start_scores is None or kept.start_state is None:
            log.info("QAT: validate() gave no per-sample scores (or the resumed checkpoint has none): no "
                     "significance gate, the best validation state is kept")
        else:
            res.gate = decide(kept.start_scores, kept.best_scores if res.best_epoch else None, alpha=alpha,
                              candidate_epoch=res.best_epoch, candidate_metric=res.best_metric,
                              candidates=len(res.metrics))
            log.info("%s", res.gate.message())
            keep_start[0] = int(res.gate.kept_start and res.best_epoch > 0)
    if world > 1:
        import torch.distributed as dist

        dist.broadcast(keep_start.to(device) if dist.get_backend() == "nccl" else keep_start, src=0)
    if int(keep_start[0]):
        res.best_metric, res.best_epoch, kept.best_state = res.start_metric, 0, kept.start_state
