"""Calibrators: MACE's method equals quantize_stat, merging, histogram methods on known distributions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmace.errors import QuantizationError, RangeError
from qmace.quantize.calibration import (
    MSE,
    Entropy,
    ExtremaPercentile,
    HistogramPercentile,
    make_calibrator,
)
from qmace.quantize.ranges import Range, format_range_log, parse_range_log, quantize_stat

HISTOGRAM_METHODS = [HistogramPercentile, Entropy, MSE]
ALL_METHODS = [ExtremaPercentile, *HISTOGRAM_METHODS]


def stream(seed: int, samples: int = 12):
    """(name, values) per tensor per sample, like an inference loop: signed, post-ReLU, scale-varying."""
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        scale = rng.uniform(0.2, 4.0)
        yield "conv1", rng.normal(0.3, scale, (2, 3, 8, 8)).astype(np.float32)
        yield "relu1", np.maximum(rng.normal(0, scale, 300), 0).astype(np.float32)
        yield "fc:0", rng.standard_t(3, 200) * scale


# ------------------------------------------------------------------------------------------------ MACE


@pytest.mark.parametrize(("percentile", "enhance"), [(0, False), (5, False), (0, True), (5, True)])
def test_extrema_percentile_equals_quantize_stat_on_log(percentile, enhance):
    cal = ExtremaPercentile(percentile=percentile, enhance=enhance)
    for name, values in stream(1, samples=40):
        cal.observe(name, values)
    log_text = format_range_log(cal.log).splitlines()
    assert sum("Tensor range @@" in line for line in log_text) == 3 * 40
    expected = quantize_stat(parse_range_log(log_text, "log"), percentile, enhance)
    assert cal.ranges() == expected
    assert list(cal.ranges()) == ["conv1", "relu1", "fc:0"]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.sampled_from([(0, False), (5, False), (5, True)]))
def test_extrema_percentile_merge_is_exact(seed, split, opts):
    items = list(stream(seed, samples=20))
    one, a, b = (ExtremaPercentile(*opts) for _ in range(3))
    for k, (name, values) in enumerate(items):
        one.observe(name, values)
        (a if k < 3 * split else b).observe(name, values)
    a.merge(b)
    assert a.log == one.log
    assert a.ranges() == one.ranges()


# ------------------------------------------------------------------------------------------- histograms


@pytest.mark.parametrize("cls", HISTOGRAM_METHODS)
def test_histogram_merge_exact_when_grids_align(cls):
    # every sample reaches +-8, so every histogram has the same radius and merging just adds counts
    rng = np.random.default_rng(3)
    samples = [np.concatenate([np.clip(rng.normal(0, 2, 3000), -8, 8), [-8.0, 8.0]]) for _ in range(8)]
    one, a, b = cls(), cls(), cls()
    for k, x in enumerate(samples):
        one.observe("t", x)
        (a if k % 2 else b).observe("t", x)
    a.merge(b)
    assert a.ranges() == one.ranges()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 7))
def test_histogram_percentile_merge_within_one_bin(seed, split):
    rng = np.random.default_rng(seed)
    samples = [rng.normal(0, rng.uniform(0.3, 3), 2000) for _ in range(8)]
    bins = 512
    one, a, b = (HistogramPercentile(99.0, bins=bins) for _ in range(3))
    for k, x in enumerate(samples):
        one.observe("t", x)
        (a if k < split else b).observe("t", x)
    a.merge(b)
    # Every radius is max|x| * 2^k for the first sample's max|x|, so < 2 max|x|: one bin is < 4 max|x| / bins.
    # Each estimate is within one bin of the true quantile; the approximate re-binning moves mass < one bin.
    bin_width = 4 * max(np.abs(x).max() for x in samples) / bins
    for got, want in zip(
        (a.ranges()["t"].min, a.ranges()["t"].max), (one.ranges()["t"].min, one.ranges()["t"].max)
    ):
        assert abs(got - want) <= bin_width


def test_histogram_percentile_clips_outliers():
    rng = np.random.default_rng(0)
    cal, full = HistogramPercentile(percentile=99.99), HistogramPercentile(percentile=100)
    for k in range(10):
        x = rng.uniform(-1, 1, 10_000)
        if k in (3, 7):
            x[:2] = [10.0, -7.0]  # 4 outliers per side in 100k values: 4e-5 < the 5e-5 tail
        cal.observe("t", x)
        full.observe("t", x)
    assert full.ranges()["t"] == Range(-7.0, 10.0)
    r = cal.ranges()["t"]
    assert r.min == pytest.approx(-1.0, abs=0.05) and r.max == pytest.approx(1.0, abs=0.05)
    assert HistogramPercentile(percentile=100).ranges() == {}


def test_histogram_percentile_asymmetric():
    rng = np.random.default_rng(1)
    cal = HistogramPercentile(percentile=99.0)
    cal.observe("t", rng.uniform(2.0, 6.0, 100_000))
    r = cal.ranges()["t"]
    assert r.min == pytest.approx(2.02, abs=0.01) and r.max == pytest.approx(5.98, abs=0.01)


@pytest.mark.parametrize("cls", [Entropy, MSE])
def test_gaussian_range_between_two_sigma_and_extrema(cls):
    rng = np.random.default_rng(2)
    cal = cls()
    lo, hi = np.inf, -np.inf
    for _ in range(10):
        x = rng.normal(0.0, 1.0, 100_000)
        lo, hi = min(lo, x.min()), max(hi, x.max())
        cal.observe("g", x)
    r = cal.ranges()["g"]
    assert r.max - r.min < hi - lo  # clips the tails
    assert lo <= r.min < -2.0 and 2.0 < r.max <= hi  # but keeps well over 2 sigma


@pytest.mark.parametrize("cls", [Entropy, MSE])
def test_non_negative_tensor_gets_zero_lower_bound(cls):
    rng = np.random.default_rng(4)
    cal = cls()
    for _ in range(5):
        cal.observe("relu", np.maximum(rng.normal(0, 1, 50_000), 0))
        cal.observe("neg", -rng.exponential(1.0, 50_000))
    r = cal.ranges()
    assert r["relu"].min == 0.0 and 1.0 < r["relu"].max
    assert r["neg"].max == pytest.approx(0.0, abs=1e-3) and r["neg"].min < -1.0


def test_histogram_state_size_independent_of_sample_count():
    def pickled_size(samples: int, cls) -> int:
        cal = cls()
        for name, values in stream(5, samples):
            cal.observe(name, values)
        return len(pickle.dumps(cal))

    for cls in HISTOGRAM_METHODS:
        assert abs(pickled_size(100, cls) - pickled_size(5, cls)) <= 64
    # MACE's method keeps per-sample extrema, so it does grow
    assert pickled_size(100, ExtremaPercentile) > pickled_size(5, ExtremaPercentile) + 1000


# ------------------------------------------------------------------------------------- all calibrators


@pytest.mark.parametrize("cls", ALL_METHODS)
def test_constant_and_zero_tensors(cls):
    cal = cls()
    for _ in range(3):
        cal.observe("c", np.full(16, 3.0, np.float32))
        cal.observe("n", np.full(4, -2.5))
        cal.observe("z", np.zeros(8))
    cal.observe("late", np.zeros(4))
    cal.observe("late", np.array([0.0, 1.0]))  # radius set after zeros were seen
    r = cal.ranges()
    assert (r["c"], r["n"], r["z"]) == (Range(3.0, 3.0), Range(-2.5, -2.5), Range(0.0, 0.0))
    # HistogramPercentile assumes a uniform density inside a bin, so its bounds may sit inside one bin
    assert 0.0 <= r["late"].min <= 2.0 / 2048 and 1.0 - 2.0 / 2048 <= r["late"].max <= 1.0


@pytest.mark.parametrize("cls", ALL_METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_tensor(cls, bad):
    cal = cls()
    with pytest.raises(RangeError, match="tensor 'conv/out:0'.*(NaN|Inf)"):
        cal.observe("conv/out:0", np.array([0.0, bad, 1.0], np.float32))


@pytest.mark.parametrize("cls", ALL_METHODS)
def test_first_seen_order_and_empty_tensors(cls):
    cal = cls()
    cal.observe("b", np.array([1.0, 2.0]))
    cal.observe("empty", np.zeros((0, 3)))
    cal.observe("a", np.array([-1.0, 0.5]))
    cal.observe("b", np.array([0.0]))
    assert list(cal.ranges()) == ["b", "a"]


@pytest.mark.parametrize("cls", ALL_METHODS)
def test_merge_rejects_other_kind_or_options(cls):
    other = HistogramPercentile() if cls is ExtremaPercentile else ExtremaPercentile()
    with pytest.raises(QuantizationError, match="cannot merge"):
        cls().merge(other)
    if cls is not ExtremaPercentile:
        with pytest.raises(QuantizationError, match="cannot merge"):
            cls().merge(cls(bins=1024))


def test_make_calibrator():
    assert isinstance(make_calibrator(), ExtremaPercentile)
    assert make_calibrator("mace", percentile=5, enhance=True) == ExtremaPercentile(5, True)
    assert isinstance(make_calibrator("percentile", percentile=99.9), HistogramPercentile)
    assert isinstance(make_calibrator("entropy", bins=1024), Entropy)
    assert isinstance(make_calibrator("mse"), MSE)
    with pytest.raises(QuantizationError, match="'kl'.*mace, percentile, entropy, mse"):
        make_calibrator("kl")
    with pytest.raises(QuantizationError, match="'mse'.*enhance"):
        make_calibrator("mse", enhance=True)


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("mace", {"percentile": 50}),
        ("mace", {"percentile": -1}),
        ("mace", {"enhance_ratio": 0}),
        ("percentile", {"percentile": 0}),
        ("percentile", {"bins": 7}),
        ("entropy", {"bins": 256, "quant_bins": 128}),
        ("entropy", {"quant_bins": 1}),
        ("mse", {"bins": 0}),
    ],
)
def test_bad_options(method, opts):
    with pytest.raises(QuantizationError):
        make_calibrator(method, **opts)
