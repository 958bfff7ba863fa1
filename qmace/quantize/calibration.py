"""Calibration statistics: one mergeable object per method, fed tensor by tensor while samples stream.

Every calibrator gets `observe(name, values)` once per tensor per sample, can absorb another calibrator of
the same kind and options with `merge` (e.g. one per worker), and returns a `RangeTable` in first-seen
order. Memory: `ExtremaPercentile` keeps two floats per tensor per sample (what MACE's method needs); the
histogram methods keep `bins` floats per tensor, whatever the number of samples.

Empty tensors carry no range information and are skipped (a tensor only ever seen empty gets no range);
NaN or Inf values raise RangeError naming the tensor.

Shared histogram (`_Histogram`): signed values on a grid symmetric about 0, [-R, R] in `bins` equal bins
(`bins` even, so 0 is a bin edge). R starts at the first non-zero max|x| and, when a value beyond R
arrives, is multiplied by 2^k; bins are then summed in aligned groups of 2^k, which is exact (edges of the
coarse grid are edges of the fine one). Merging two histograms is exact when their radii differ by a power
of two (in particular when equal); otherwise the other's counts are re-binned assuming a uniform density
inside each of its bins, which moves mass by less than one bin width. The exact global min and max are kept
too, and every histogram method clamps its answer to them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from qmace.errors import QuantizationError, RangeError
from qmace.quantize.ranges import (
    DEFAULT_ENHANCE_RATIO,
    Range,
    RangeLog,
    RangeTable,
    TensorSamples,
    quantize_stat,
)

QUANT_STEPS = 255  # 8-bit grid: 256 levels, 255 steps between min and max
_MSE_CANDIDATES = 128  # clipping candidates per side for MSE: bound = k/128 of the observed bound


class Calibrator(Protocol):
    """What every calibration method implements: observe tensors sample by sample, merge with another
    calibrator of the same method and options, and give one (min, max) range per tensor.
    """
    def observe(self, name: str, values: np.ndarray) -> None:
        """Statistics of one tensor for one sample.

        Args:
            name: the tensor name.
            values: its value for this sample.

        Raises:
            RangeError: NaN or Inf values (naming the tensor).
        """

    def merge(self, other: Calibrator) -> None:
        """Absorb ``other`` (same class and options), as if this object had also observed its samples.

        Args:
            other: a calibrator of the same method and options.

        Raises:
            QuantizationError: the calibrators differ in method or options.
        """

    def ranges(self) -> RangeTable:
        """One range per observed tensor, first-seen order.

        Returns:
            Tensor name -> (min, max).
        """


def _extrema(name: str, values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of `values`, None when empty; RangeError naming the tensor on NaN/Inf."""
    arr = np.asarray(values)
    if arr.size == 0:
        return None
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        flat = arr.astype(np.float64, copy=False)
        raise RangeError(
            f"tensor {name!r}: {int(np.isnan(flat).sum())} NaN and {int(np.isinf(flat).sum())} Inf values "
            "in calibration data"
        )
    return lo, hi


def _check_mergeable(a: object, b: object) -> None:
    opts = [f.name for f in fields(a) if f.init]  # type: ignore[arg-type]
    if type(a) is not type(b) or any(getattr(a, k) != getattr(b, k) for k in opts):
        raise QuantizationError(f"cannot merge {b!r} into {a!r}: calibrators differ in method or options")


# ------------------------------------------------------------------------------------------------- MACE


@dataclass
class ExtremaPercentile:
    """MACE's method: per-sample min and max of each tensor, then `quantize_stat` over the samples.

    min = percentile(per-sample mins, P), max = percentile(per-sample maxs, 100 - P), optionally MACE's
    `--enhance` walk; identical to `quantize_stat(parse_range_log(<range log of the same samples>))`.
    `.log` is that range log (`ranges.format_range_log(cal.log)` prints it). Merge is exact.
    """

    percentile: float = 0.0
    enhance: bool = False
    enhance_ratio: float = DEFAULT_ENHANCE_RATIO
    log: RangeLog = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile < 50.0:
            raise QuantizationError(
                f"mace calibration: percentile must be in [0, 50), got {self.percentile!r}"
            )
        if not (self.enhance_ratio > 0 and math.isfinite(self.enhance_ratio)):
            raise QuantizationError(
                f"mace calibration: enhance_ratio must be > 0, got {self.enhance_ratio!r}"
            )

    def observe(self, name: str, values: np.ndarray) -> None:
        """Record the tensor's (min, max) for this sample (``Calibrator.observe``).

        Args:
            name: the tensor name.
            values: its value for this sample (empty tensors are skipped).

        Raises:
            RangeError: NaN or Inf values.
        """
        ext = _extrema(name, values)
        if ext is not None:
            self.log.setdefault(name, TensorSamples()).append(*ext)

    def merge(self, other: ExtremaPercentile) -> None:
        """Append ``other``'s per-sample extrema (``Calibrator.merge``; exact).

        Args:
            other: an ExtremaPercentile with the same options.

        Raises:
            QuantizationError: the options differ.
        """
        _check_mergeable(self, other)
        for name, s in other.log.items():
            mine = self.log.setdefault(name, TensorSamples())
            mine.mins.extend(s.mins)
            mine.maxs.extend(s.maxs)

    def ranges(self) -> RangeTable:
        """The ranges by MACE's rule (``ranges.quantize_stat`` on ``log``).

        Returns:
            Tensor name -> (min, max).

        Raises:
            RangeError: a range that is not finite.
        """
        return quantize_stat(self.log, self.percentile, self.enhance, self.enhance_ratio)

    def extrema(self) -> RangeTable:
        """The exact (min, max) over every sample seen, per tensor (no percentile, no enhance).

        Returns:
            Tensor name -> (min, max).
        """
        return {name: Range(min(s.mins), max(s.maxs)) for name, s in self.log.items() if s.mins}


# ------------------------------------------------------------------------------------------- histograms


class _Histogram:
    """Counts on [-radius, radius] in `bins` equal bins (see module docstring), plus exact min/max/total."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.radius = 0.0  # 0 until a non-zero value arrives; zeros seen before that wait in `zeros`
        self.zeros = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.total = 0.0

    @property
    def width(self) -> float:
        return 2.0 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def add(self, values: np.ndarray, lo: float, hi: float) -> None:
        self.min, self.max, self.total = min(self.min, lo), max(self.max, hi), self.total + values.size
        self._cover(max(-lo, hi))
        if self.radius == 0.0:
            self.zeros += values.size
            return
        x = values.astype(np.float64, copy=False).ravel()
        idx = np.clip(np.floor((x + self.radius) / self.width), 0, self.bins - 1).astype(np.int64)
        self.counts += np.bincount(idx, minlength=self.bins)

    def merge(self, other: _Histogram) -> None:
        self.min, self.max, self.total = (
            min(self.min, other.min),
            max(self.max, other.max),
            self.total + other.total,
        )
        self._cover(other.radius)
        if other.radius == 0.0:
            if self.radius == 0.0:
                self.zeros += other.zeros
            else:
                self.counts[self.bins // 2] += other.zeros
            return
        k = round(math.log2(self.radius) - math.log2(other.radius))
        if other.radius * 2.0**k == self.radius:  # aligned grids: exact
            self.counts += _coarsen(other.counts, k)
        else:  # uniform density inside each source bin: interpolate the cumulative count at our edges
            cum = np.concatenate([[0.0], np.cumsum(other.counts)])
            self.counts += np.diff(np.interp(self.edges(), other.edges(), cum))

    def _cover(self, r: float) -> None:
        """Grow the radius by a power of two until it is >= r, summing bins in aligned groups."""
        if r <= self.radius:
            return
        if self.radius == 0.0:
            self.radius = r
            self.counts[self.bins // 2] += self.zeros  # 0.0 falls in bin floor((0 + R) / w) = bins / 2
            self.zeros = 0.0
            return
        k = max(1, math.ceil(math.log2(r) - math.log2(self.radius)))
        while self.radius * 2.0**k < r:
            k += 1
        self.counts = _coarsen(self.counts, k)
        self.radius *= 2.0**k

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the values lie; linear inside a bin, clamped to [min, max]."""
        if self.radius == 0.0:
            return 0.0
        cdf = np.cumsum(self.counts)
        i = min(int(np.searchsorted(cdf, q * cdf[-1], side="left")), self.bins - 1)
        below = cdf[i - 1] if i > 0 else 0.0
        frac = (q * cdf[-1] - below) / self.counts[i] if self.counts[i] > 0 else 0.0
        return float(np.clip(-self.radius + (i + frac) * self.width, self.min, self.max))

    def clamp(self, lo: float, hi: float) -> Range:
        """[lo, hi] ∩ [min, max]; the whole observed range if the intersection is empty."""
        lo, hi = max(lo, self.min), min(hi, self.max)
        return Range(lo, hi) if lo <= hi else Range(self.min, self.max)


def _coarsen(counts: np.ndarray, k: int) -> np.ndarray:
    """Counts on [-R, R] -> counts on [-2^k R, 2^k R], same bin count: bin i goes to (i + (f-1) n/2) // f.

    With f = 2^k >= n every old bin lands in one of the two central bins, as the formula gives for f = n.
    """
    n = counts.size
    f = n if k >= math.log2(n) else 2**k
    idx = (np.arange(n) + (f - 1) * (n // 2)) // f
    return np.bincount(idx, weights=counts, minlength=n)


class _HistogramMethod:
    """observe/merge/ranges over one `_Histogram` per tensor; subclasses turn a histogram into a range."""

    bins: int
    _hists: dict[str, _Histogram]

    def _check_bins(self, minimum: int) -> None:
        if not (isinstance(self.bins, int) and self.bins >= minimum and self.bins % 2 == 0):
            raise QuantizationError(f"{type(self).__name__}: bins must be an even integer >= {minimum}")

    def observe(self, name: str, values: np.ndarray) -> None:
        """Add the tensor's values for this sample to its histogram (``Calibrator.observe``).

        Args:
            name: the tensor name.
            values: its value for this sample (empty tensors are skipped).

        Raises:
            RangeError: NaN or Inf values.
        """
        ext = _extrema(name, values)
        if ext is not None:
            self._hists.setdefault(name, _Histogram(self.bins)).add(np.asarray(values), *ext)

    def merge(self, other: _HistogramMethod) -> None:
        """Merge ``other``'s histograms into this one's (``Calibrator.merge``).

        Args:
            other: a calibrator of the same class and options.

        Raises:
            QuantizationError: the class or options differ.
        """
        _check_mergeable(self, other)
        for name, h in other._hists.items():
            self._hists.setdefault(name, _Histogram(self.bins)).merge(h)

    def ranges(self) -> RangeTable:
        """One range per tensor from its histogram (the subclass's rule).

        Returns:
            Tensor name -> (min, max).
        """
        return {name: self._range(h) for name, h in self._hists.items()}

    def extrema(self) -> RangeTable:
        """The exact (min, max) over every value seen, per tensor (what the histogram methods clamp to).

        Returns:
            Tensor name -> (min, max).
        """
        return {name: Range(h.min, h.max) for name, h in self._hists.items()}

    def _range(self, h: _Histogram) -> Range:
        raise NotImplementedError


@dataclass
class HistogramPercentile(_HistogramMethod):
    """Central `percentile`% of all values: [q((100-p)/2 %), q((100+p)/2 %)] of the signed histogram.

    Signed (not |x|) so that asymmetric tensors keep asymmetric ranges; each tail gets half the clipped
    mass. Resolution: one bin width, 2 max|x| / bins.
    Default 99.95: on MobileNetV2 with real photos (benchmarks/README.md; int8, bias-corrected) it gave
    14.8 dB logits SQNR / 85.8% top-1 agreement against 13.8 dB / 82.8% at 99.99 and 11.5 dB at 99.999; with
    activation equalization 17.05 dB / 86.3% against 16.92 dB / 87.1% at 99.99 (a tie); with equalization
    and AdaRound 99.99 was ahead (17.85 dB / 90.6% vs 17.84 dB / 89.7%).
    """

    percentile: float = 99.95
    bins: int = 2048
    _hists: dict[str, _Histogram] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise QuantizationError(
                f"percentile calibration: percentile must be in (0, 100], got {self.percentile!r}"
            )
        self._check_bins(2)

    def _range(self, h: _Histogram) -> Range:
        tail = (100.0 - self.percentile) / 200.0
        return h.clamp(h.quantile(tail), h.quantile(1.0 - tail))


@dataclass
class Entropy(_HistogramMethod):
    """KL-divergence threshold (TensorRT / MXNet `_get_optimal_threshold`).

    Fold the histogram onto [0, R] with n = bins/2 bins: |x| for signed tensors (range [-t, t]), x for
    all-non-negative tensors (range [0, t]), -x for all-non-positive ones (range [-t, 0]). One-sided ranges
    get all 2*quant_bins levels of the 8-bit grid, symmetric ones quant_bins per side; call that L. For
    each candidate i = L .. last non-empty bin + 1 (t = i * bin width):
      P = first i bins, with the mass beyond added to bin i-1;
      Q = first i bins (no outliers) summed into L groups of i // L bins (the last takes the rest), each
          group's sum spread evenly over its bins where P != 0;
      KL(P || Q) = sum P log(P / Q) with P, Q normalised (Q = 0 where P > 0 counts as 1e-12).
    t minimises KL; the range is then clamped to the observed [min, max].
    """

    bins: int = 2048
    quant_bins: int = 128
    _hists: dict[str, _Histogram] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.quant_bins, int) and self.quant_bins >= 2):
            raise QuantizationError(
                f"entropy calibration: quant_bins must be an integer >= 2, got {self.quant_bins!r}"
            )
        self._check_bins(4 * self.quant_bins)

    def _range(self, h: _Histogram) -> Range:
        if h.radius == 0.0:
            return Range(0.0, 0.0)
        half = self.bins // 2
        pos, neg = h.counts[half:], h.counts[:half][::-1]
        if h.min >= 0.0:
            t = _kl_threshold(pos, 2 * self.quant_bins) * h.width
            return h.clamp(0.0, t)
        if h.max <= 0.0:
            t = _kl_threshold(neg, 2 * self.quant_bins) * h.width
            return h.clamp(-t, 0.0)
        t = _kl_threshold(pos + neg, self.quant_bins) * h.width
        return h.clamp(-t, t)


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Number of bins i (from 0) whose clipping minimises KL(P || Q); see `Entropy`."""
    nonzero = np.flatnonzero(hist)
    stop = int(nonzero[-1]) + 1 if nonzero.size else 0
    if stop <= levels:
        return max(stop, 1)
    best_i, best_kl = stop, math.inf
    for i in range(levels, stop + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        qsum = np.bincount(group, weights=sliced, minlength=levels)
        nz = np.bincount(group, weights=p != 0, minlength=levels)
        q = np.where(p != 0, qsum[group] / np.maximum(nz[group], 1), 0.0)
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.where(q[m] > 0, q[m], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@dataclass
class MSE(_HistogramMethod):
    """Clipping range minimising the expected squared error of 8-bit quantization over the histogram.

    Candidates: lo = a/128 * min(min, 0), hi = b/128 * max(max, 0) for a, b = 0..128 (0 always inside, as
    the uint8 schema widens every range to include 0). With bin centres c and counts n, step s = (hi-lo)/255:
      E(lo, hi) = s^2/12 * sum_{lo <= c <= hi} n  +  sum_{c < lo} n (c - lo)^2  +  sum_{c > hi} n (c - hi)^2
    (uniform rounding noise inside, clipping error outside); the argmin over (a, b) is returned, clamped to
    the observed [min, max]. The two clipping sums depend on one bound each, so the search is O(128 bins).
    """

    bins: int = 2048
    _hists: dict[str, _Histogram] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_bins(2)

    def _range(self, h: _Histogram) -> Range:
        if h.radius == 0.0:
            return Range(0.0, 0.0)
        centres = -h.radius + (np.arange(self.bins) + 0.5) * h.width
        n = h.counts
        frac = np.arange(_MSE_CANDIDATES + 1) / _MSE_CANDIDATES
        lo_c, hi_c = frac * min(h.min, 0.0), frac * max(h.max, 0.0)
        d_lo = np.minimum(centres[None, :] - lo_c[:, None], 0.0)  # (A, bins): c - lo where c < lo
        d_hi = np.maximum(centres[None, :] - hi_c[:, None], 0.0)  # (B, bins): c - hi where c > hi
        clip_lo, n_lo = (n * d_lo**2).sum(1), (n * (d_lo < 0)).sum(1)
        clip_hi, n_hi = (n * d_hi**2).sum(1), (n * (d_hi > 0)).sum(1)
        step = (hi_c[None, :] - lo_c[:, None]) / QUANT_STEPS  # (A, B)
        inside = n.sum() - n_lo[:, None] - n_hi[None, :]
        err = step**2 / 12.0 * inside + clip_lo[:, None] + clip_hi[None, :]
        err[step <= 0] = math.inf
        a, b = np.unravel_index(int(np.argmin(err)), err.shape)
        return h.clamp(float(lo_c[a]), float(hi_c[b]))


# ---------------------------------------------------------------------------------------------- factory

CALIBRATORS: dict[str, type] = {
    "mace": ExtremaPercentile,
    "percentile": HistogramPercentile,
    "entropy": Entropy,
    "mse": MSE,
}


def make_calibrator(method: str = "mace", **opts: object) -> Calibrator:
    """The calibrator for ``method`` built with ``opts``.

    Args:
        method: ``"mace"`` (per-sample extrema + percentile, MACE's quantize_stat), ``"percentile"``,
            ``"entropy"`` or ``"mse"`` (histogram methods).
        **opts: the method's options (e.g. ``percentile``, ``enhance``, ``bins``).

    Returns:
        A fresh Calibrator.

    Raises:
        QuantizationError: an unknown method, an unknown option, or an invalid option value.
    """
    cls = CALIBRATORS.get(method)
    if cls is None:
        raise QuantizationError(
            f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATORS)}"
        )
    try:
        inspect.signature(cls).bind(**opts)
    except TypeError as e:
        raise QuantizationError(f"calibration method {method!r}: {e}") from None
    return cls(**opts)
