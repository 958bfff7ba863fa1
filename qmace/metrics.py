"""Output comparison metrics used by ``--validate`` and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    cosine: float  # cosine similarity of the flattened outputs (1.0 = same direction)
    sqnr_db: float  # 10*log10(sum(ref^2) / sum((ref - x)^2)); inf when identical
    max_abs_error: float
    argmax_agreement: float  # share of rows (last axis) whose argmax agrees; nan for scalars

    def passes(self, threshold: float) -> bool:
        return bool(self.cosine >= threshold)


def compare(reference: np.ndarray, x: np.ndarray) -> Comparison:
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
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(ref**2)), 1e-300) / noise))
    r, g = np.asarray(reference), np.asarray(x)
    if r.ndim >= 1 and r.shape[-1] > 1:
        agree = float(np.mean(r.reshape(-1, r.shape[-1]).argmax(-1) == g.reshape(-1, g.shape[-1]).argmax(-1)))
    else:
        agree = float("nan")
    return Comparison(cos, sqnr, float(np.max(np.abs(ref - got))) if ref.size else 0.0, agree)
