"""Output comparison metrics used by ``--validate`` and the benchmarks.

``--validate`` passes an output when MACE's criterion holds, ``cosine(ref, x) >= threshold``, except where
cosine means nothing because the reference is about zero: when ``rms(ref) < ABS_FLOOR`` the relative error
with a floor decides, ``rms(x - ref) / max(rms(ref), ABS_FLOOR) <= sqrt(2 (1 - threshold))`` (the relative
error that the cosine threshold allows for errors orthogonal to the reference: ``cos = 1 / sqrt(1 + e^2)``
~ ``1 - e^2/2``). So an all-but-zero probability map that the model matches to 1e-7 passes, and SQNR is
reported as None ("reference ~ 0") instead of an absurd number of dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Per-output metrics a YAML can choose (``validation_outputs_metric``); the first is the default.
METRICS = ("cosine", "sqnr", "rel_error", "max_abs_error")

#: Root-mean-square below which a reference output counts as zero (float32 outputs of real models are
#: probabilities, logits or feature values of order 1e-3..1e2; 1e-5 is far below any of them).
ABS_FLOOR = 1e-5


@dataclass(frozen=True)
class Comparison:
    """How one output ``x`` compares with its reference ``ref`` (both flattened).

    - ``cosine`` = ``<ref, x> / (|ref| |x|)`` (MACE's validation metric; 1.0 = same direction);
    - ``sqnr_db`` = ``10 log10(sum(ref^2) / sum((ref - x)^2))``, inf when identical, None when ``ref`` ~ 0;
    - ``max_abs_error`` = ``max |ref - x|``;
    - ``argmax_agreement``: share of rows (last axis) whose argmax agrees, nan where meaningless;
    - ``rel_error`` = ``rms(x - ref) / max(rms(ref), ABS_FLOOR)``;
    - ``reference_near_zero``: ``rms(ref) < ABS_FLOOR``, so rel_error decides instead of cosine.
    """
    cosine: float  # cosine similarity of the flattened outputs (1.0 = same direction)
    sqnr_db: float | None  # 10*log10(sum(ref^2) / sum((ref - x)^2)); inf when identical; None when ref ~ 0
    max_abs_error: float
    argmax_agreement: float  # share of rows (last axis) whose argmax agrees; nan where meaningless
    rel_error: float = 0.0  # rms(x - ref) / max(rms(ref), ABS_FLOOR)
    reference_near_zero: bool = False  # rms(ref) < ABS_FLOOR: rel_error decides, not cosine

    @property
    def criterion(self) -> str:
        """What decides ``passes``: "cosine" (MACE's) or "rel-error" (reference ~ 0)."""
        return "rel-error" if self.reference_near_zero else "cosine"

    def passes(self, threshold: float) -> bool:
        """MACE's criterion, ``cosine >= threshold``.

        Where the reference is ~0, the relative error that threshold allows (``rel_error_for_cosine``) decides.

        Args:
            threshold: the cosine threshold (MACE's default 0.98 float, 0.999 ...).

        Returns:
            Whether the output passes.
        """
        if self.reference_near_zero:
            return bool(self.rel_error <= rel_error_for_cosine(threshold))
        return bool(self.cosine >= threshold)

    def judge(self, metric: str, threshold: float) -> bool:
        """Whether the output passes ``metric`` at ``threshold``.

        cosine (as :meth:`passes`), sqnr (dB, from the floored relative error: ``-20 log10(rel_error) >=
        threshold``), rel_error (``<=``) or max_abs_error (``<=``).

        Args:
            metric: ``"cosine"``, ``"sqnr"``, ``"rel_error"`` or ``"max_abs_error"``.
            threshold: the metric's threshold.

        Returns:
            Whether the output passes.

        Raises:
            ValueError: an unknown metric (the YAML reader rejects those first).
        """
        if metric == "cosine":
            return self.passes(threshold)
        if metric == "sqnr":
            return bool(self.rel_error == 0 or -20.0 * math.log10(self.rel_error) >= threshold)
        if metric == "rel_error":
            return bool(self.rel_error <= threshold)
        if metric == "max_abs_error":
            return bool(self.max_abs_error <= threshold)
        raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")


def rel_error_for_cosine(threshold: float) -> float:
    """The relative error a cosine threshold allows for an error orthogonal to the reference.

    ``sqrt(2 (1 - threshold))`` (0.2 for MACE's 0.98, 0.045 for 0.999).

    Args:
        threshold: a cosine threshold in (0, 1].

    Returns:
        The equivalent relative error.
    """
    return math.sqrt(2.0 * max(0.0, 1.0 - threshold))


def default_threshold(metric: str, cosine_threshold: float) -> float | None:
    """The threshold of ``metric`` equivalent to a cosine threshold.

    Args:
        metric: ``"cosine"``, ``"sqnr"``, ``"rel_error"`` or ``"max_abs_error"``.
        cosine_threshold: the model's cosine threshold.

    Returns:
        The equivalent threshold (sqnr: ``-20 log10(rel_error_for_cosine(t))`` dB), or None for
        max_abs_error, which has no scale-free equivalent and needs one in the YAML.
    """
    e = rel_error_for_cosine(cosine_threshold)
    return {"cosine": cosine_threshold, "rel_error": e,
            "sqnr": -20.0 * math.log10(e) if e > 0 else math.inf}.get(metric)


def compare(reference: np.ndarray, x: np.ndarray) -> Comparison:
    """Compare ``x`` with ``reference`` (see ``Comparison`` for the formulas).

    The argmax agreement is computed only for classifier-like outputs, (N, C) or (C,) with C > 1; for dense
    outputs (rank >= 3, e.g. probability maps) it is nan.

    Args:
        reference: the oracle's output.
        x: the output under test, same number of elements.

    Returns:
        The Comparison.
    """
    ref = np.asarray(reference, np.float64).ravel()
    got = np.asarray(x, np.float64).ravel()
    if ref.shape != got.shape:
        raise ValueError(f"cannot compare shapes {np.shape(reference)} and {np.shape(x)}")
    nr, ng = np.linalg.norm(ref), np.linalg.norm(got)
    if nr == 0 and ng == 0:
        cos = 1.0
    elif nr == 0 or ng == 0:
        cos = 0.0
    else:
        cos = float(np.dot(ref, got) / (nr * ng))
    noise = float(np.sum((ref - got) ** 2))
    n = max(ref.size, 1)
    ref_rms, err_rms = math.sqrt(float(np.sum(ref**2)) / n), math.sqrt(noise / n)
    near_zero = ref_rms < ABS_FLOOR
    if noise == 0:
        sqnr: float | None = float("inf")
    elif near_zero:
        sqnr = None
    else:
        sqnr = float(10 * np.log10(float(np.sum(ref**2)) / noise))
    r, g = np.asarray(reference), np.asarray(x)
    if 1 <= r.ndim <= 2 and r.shape[-1] > 1:
        agree = float(np.mean(r.reshape(-1, r.shape[-1]).argmax(-1) == g.reshape(-1, g.shape[-1]).argmax(-1)))
    else:
        agree = float("nan")
    return Comparison(cos, sqnr, float(np.max(np.abs(ref - got))) if ref.size else 0.0, agree,
                      err_rms / max(ref_rms, ABS_FLOOR), near_zero)
