"""Output comparison metrics used by ``--validate`` and the benchmarks.

``--validate`` passes an output when MACE's criterion holds, ``cosine(ref, x) >= threshold``, except where
cosine means nothing because the reference is about zero: when ``rms(ref) < ABS_FLOOR`` the relative error
with a floor decides, ``rms(x - ref) / max(rms(ref), ABS_FLOOR) <= sqrt(2 (1 - threshold))`` (the relative
error that the cosine threshold allows for errors orthogonal to the reference: ``cos = 1 / sqrt(1 + e^2)``
~ ``1 - e^2/2``). So an all-but-zero probability map that the model matches to 1e-7 passes, and SQNR is
reported as None ("reference ~ 0") instead of an absurd number of dB.

For sequence outputs (a per-timestep class distribution, e.g. a CTC text recognizer's (N, T, C)), the task
metric ``ctc_greedy`` compares what the outputs *say*: each sequence is decoded greedily (argmax per timestep,
repeats collapsed, blank class 0 dropped) and the metric is the share of sequences decoded identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Per-output metrics a YAML can choose (``validation_outputs_metric``); the first is the default.
METRICS = ("cosine", "sqnr", "rel_error", "max_abs_error", "ctc_greedy")

#: The blank class of ``ctc_greedy`` (PaddleOCR's and PyTorch's CTC convention).
CTC_BLANK = 0

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
    - ``reference_near_zero``: ``rms(ref) < ABS_FLOOR``, so rel_error decides instead of cosine;
    - ``ctc_agreement``: share of sequences (time = axis -2, classes = axis -1, every leading index one
      sequence) whose greedy CTC decodings (``ctc_greedy_decode``) are equal; nan for outputs of rank < 2.
    """
    cosine: float  # cosine similarity of the flattened outputs (1.0 = same direction)
    sqnr_db: float | None  # 10*log10(sum(ref^2) / sum((ref - x)^2)); inf when identical; None when ref ~ 0
    max_abs_error: float
    argmax_agreement: float  # share of rows (last axis) whose argmax agrees; nan where meaningless
    rel_error: float = 0.0  # rms(x - ref) / max(rms(ref), ABS_FLOOR)
    reference_near_zero: bool = False  # rms(ref) < ABS_FLOOR: rel_error decides, not cosine
    ctc_agreement: float = float("nan")  # share of sequences whose greedy CTC decodings are equal

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
        threshold``), rel_error (``<=``), max_abs_error (``<=``) or ctc_greedy (``ctc_agreement >=
        threshold``; an output of rank < 2 has none and fails).

        Args:
            metric: ``"cosine"``, ``"sqnr"``, ``"rel_error"``, ``"max_abs_error"`` or ``"ctc_greedy"``.
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
        if metric == "ctc_greedy":
            return bool(self.ctc_agreement >= threshold)  # nan (no sequence axis) -> False
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
        metric: ``"cosine"``, ``"sqnr"``, ``"rel_error"``, ``"max_abs_error"`` or ``"ctc_greedy"``.
        cosine_threshold: the model's cosine threshold.

    Returns:
        The equivalent threshold (sqnr: ``-20 log10(rel_error_for_cosine(t))`` dB; ctc_greedy: 1.0, every
        sequence decoded as the reference's), or None for max_abs_error, which has no scale-free equivalent
        and needs one in the YAML.
    """
    e = rel_error_for_cosine(cosine_threshold)
    return {"cosine": cosine_threshold, "rel_error": e, "ctc_greedy": 1.0,
            "sqnr": -20.0 * math.log10(e) if e > 0 else math.inf}.get(metric)


def ctc_greedy_decode(probs: np.ndarray, blank: int = CTC_BLANK) -> list[tuple[int, ...]]:
    """Greedy (best-path) CTC decoding of per-timestep class scores.

    For each sequence ``p[t, c]`` (time = axis -2, classes = axis -1, one sequence per leading index):
    ``k_t = argmax_c p[t, c]``; keep ``k_t`` where ``t == 0 or k_t != k_{t-1}`` (repeats collapse) and
    ``k_t != blank``. Scores may be probabilities, log-probabilities or logits (argmax is the same).

    Args:
        probs: (..., T, C) scores.
        blank: the blank class.

    Returns:
        One tuple of class indices per sequence, in C order of the leading axes.

    Raises:
        ValueError: ``probs`` has rank < 2.
    """
    p = np.asarray(probs)
    if p.ndim < 2:
        raise ValueError(f"CTC decoding needs (..., T, C) scores, got shape {p.shape}")
    idx = p.reshape(-1, p.shape[-2], p.shape[-1]).argmax(-1)
    out = []
    for row in idx:
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        out.append(tuple(row[keep].tolist()))
    return out


def ctc_agreement(reference: np.ndarray, x: np.ndarray, blank: int = CTC_BLANK) -> float:
    """Share of sequences whose greedy CTC decodings (``ctc_greedy_decode``) of ``x`` and ``reference`` are equal.

    Args:
        reference: (..., T, C) reference scores.
        x: scores of the same shape.
        blank: the blank class.

    Returns:
        A share in [0, 1]; 1.0 for an empty batch.

    Raises:
        ValueError: shapes differ or have rank < 2.
    """
    if np.shape(reference) != np.shape(x):
        raise ValueError(f"cannot compare shapes {np.shape(reference)} and {np.shape(x)}")
    if np.ndim(reference) < 2:
        raise ValueError(f"CTC decoding needs (..., T, C) scores, got shape {np.shape(reference)}")
    a, b = (_ctc_compact(np.asarray(p).reshape(-1, *np.shape(p)[-2:]).argmax(-1), blank) for p in (reference, x))
    return float(np.mean(np.all(a == b, axis=1))) if len(a) else 1.0


def _ctc_compact(idx: np.ndarray, blank: int) -> np.ndarray:
    """(R, T) argmax rows -> (R, T) with each row's kept labels (``ctc_greedy_decode``) first, then -1s:
    two rows decode alike exactly when their compacted rows are equal (vectorized, no Python loop)."""
    keep = np.ones(idx.shape, bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    keep &= idx != blank
    order = np.argsort(~keep, axis=1, kind="stable")  # kept positions first, in time order
    return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(idx, order, 1), -1)


def sqnr_from_energies(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB, the one SQNR formula of qmace.

    ``signal`` is ``sum(ref^2)`` and ``noise`` is ``sum((ref - x)^2)`` (float64 sums, over whatever the caller
    pools: one output, or every output of every sample). ``inf`` when ``noise == 0`` (identical), ``-inf`` when
    ``signal == 0 < noise``. No floor: :func:`compare` reports None instead when the reference is ~ 0.

    Args:
        signal: the reference's energy, >= 0.
        noise: the error's energy, >= 0.

    Returns:
        The SQNR in dB.
    """
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """SQNR of ``x`` against ``ref`` over all elements: :func:`sqnr_from_energies` of their float64 sums.

    Args:
        ref: the reference.
        x: the values to score, same number of elements.

    Returns:
        The SQNR in dB (``inf`` when equal).
    """
    r = np.asarray(ref, np.float64).ravel()
    e = np.asarray(x, np.float64).ravel() - r
    return sqnr_from_energies(float(np.dot(r, r)), float(np.dot(e, e)))


def compare(reference: np.ndarray, x: np.ndarray) -> Comparison:
    """Compare ``x`` with ``reference`` (see ``Comparison`` for the formulas).

    The argmax agreement is computed only for classifier-like outputs, (N, C) or (C,) with C > 1; for dense
    outputs (rank >= 3, e.g. probability maps) it is nan. The CTC agreement is computed for outputs of rank
    >= 2 with the same shape (nan otherwise).

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
    sqnr = None if near_zero and noise > 0 else sqnr_from_energies(float(np.sum(ref**2)), noise)
    r, g = np.asarray(reference), np.asarray(x)
    if 1 <= r.ndim <= 2 and r.shape[-1] > 1:
        agree = float(np.mean(r.reshape(-1, r.shape[-1]).argmax(-1) == g.reshape(-1, g.shape[-1]).argmax(-1)))
    else:
        agree = float("nan")
    ctc = ctc_agreement(r, g) if r.ndim >= 2 and r.shape == g.shape else float("nan")
    return Comparison(cos, sqnr, float(np.max(np.abs(ref - got))) if ref.size else 0.0, agree,
                      err_rms / max(ref_rms, ABS_FLOOR), near_zero, ctc)
