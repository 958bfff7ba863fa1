"""Range table, MACE range log, quantize_stat (against MACE's own formula) and the range file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmace.errors import RangeError
from qmace.quantize.ranges import (
    Range,
    TensorSamples,
    format_range_file,
    format_range_log,
    format_range_log_line,
    parse_range_log,
    quantize_stat,
    read_range_file,
    write_range_file,
)

# ------------------------------------------------------------------------------------------ oracles


def linear_percentile(values: list[float], p: float) -> float:
    """numpy's default ('linear') percentile written out: position p/100 * (n-1) in the sorted values."""
    s = sorted(values)
    pos = p / 100.0 * (len(s) - 1)
    k = math.floor(pos)
    if k + 1 >= len(s):
        return s[-1]
    return s[k] + (pos - k) * (s[k + 1] - s[k])


def mace_quantize_stat(tensor_ranges: dict, percentile, enhance, enhance_ratio) -> dict:
    """QuantizeStat.run from XiaoMi/mace mace/python/tools/quantization/quantize_stat.py (commit 14e7f760),
    copied statement for statement (xrange -> range; file reading dropped; assert relaxed to <=)."""
    res = {}
    for tensor_name in tensor_ranges:
        samples = len(tensor_ranges[tensor_name][0])
        tensor_min = np.percentile(tensor_ranges[tensor_name][0], percentile)
        tensor_max = np.percentile(tensor_ranges[tensor_name][1], 100 - percentile)
        assert tensor_min <= tensor_max
        if not enhance or samples <= 1:
            res[tensor_name] = (tensor_min, tensor_max)
        else:
            tensor_mins = np.sort(tensor_ranges[tensor_name][0])
            tensor_maxs = np.sort(tensor_ranges[tensor_name][1])[::-1]
            cur_min_idx = 0
            cur_max_idx = 0
            cur_min = tensor_min
            cur_max = tensor_max
            for i in range(samples):
                if tensor_mins[i] + 0.1 > cur_max:
                    break

                delta_range = (tensor_mins[i] - cur_min) / (cur_max - cur_min)
                delta_quantile = float(i - cur_min_idx) / (samples - cur_min_idx)
                if delta_quantile > 0 and delta_range / delta_quantile > enhance_ratio:
                    cur_min_idx = i
                    cur_min = tensor_mins[i]

                if cur_min + 0.1 > tensor_maxs[i]:
                    break

                delta_range = (cur_max - tensor_maxs[i]) / (cur_max - cur_min)
                delta_quantile = float(i - cur_max_idx) / (samples - cur_max_idx)
                if delta_quantile > 0 and delta_range / delta_quantile > enhance_ratio:
                    cur_max_idx = i
                    cur_max = tensor_maxs[i]

            res[tensor_name] = (cur_min, cur_max)
    return res


def make_log(rng: np.random.Generator, tensors: int = 4, samples: int = 30, outliers: bool = True) -> dict:
    """name -> (mins, maxs) per sample, with a few long-tail outliers so that `enhance` has work to do."""
    out = {}
    for t in range(tensors):
        centre, spread = rng.normal(0, 2), rng.uniform(0.5, 5)
        mins = list(centre - spread * rng.uniform(0.8, 1.2, samples))
        maxs = list(centre + spread * rng.uniform(0.8, 1.2, samples))
        if outliers:
            for k in rng.choice(samples, int(rng.integers(1, 4)), replace=False):
                mins[k] -= spread * rng.uniform(5, 50)
                maxs[k] += spread * rng.uniform(5, 50)
        out[f"layer{t}/out:0"] = (mins, maxs)
    return out


def to_log_text(ranges: dict) -> list[str]:
    n = len(next(iter(ranges.values()))[0])
    return [
        f"I mace/core/net.cc:171] {format_range_log_line(name, mins[k], maxs[k])}\n"
        for k in range(n)
        for name, (mins, maxs) in ranges.items()
    ]


# ---------------------------------------------------------------------------------------- quantize_stat


@pytest.mark.parametrize("percentile", [0, 5])
def test_quantize_stat_matches_plain_percentile_formula(percentile):
    data = make_log(np.random.default_rng(percentile))
    table = quantize_stat(parse_range_log(to_log_text(data), "log"), percentile=percentile)
    assert list(table) == list(data)
    for name, (mins, maxs) in data.items():
        assert table[name].min == pytest.approx(linear_percentile(mins, percentile), rel=1e-12, abs=1e-12)
        assert table[name].max == pytest.approx(
            linear_percentile(maxs, 100 - percentile), rel=1e-12, abs=1e-12
        )
    if percentile == 0:
        for name, (mins, maxs) in data.items():
            assert (table[name].min, table[name].max) == (min(mins), max(maxs))


@pytest.mark.parametrize("percentile", [0, 5])
@pytest.mark.parametrize("enhance", [False, True])
@pytest.mark.parametrize("ratio", [2.0, 10.0])
@pytest.mark.parametrize("seed", range(5))
def test_quantize_stat_equals_mace_source(percentile, enhance, ratio, seed):
    data = make_log(np.random.default_rng(seed), samples=10 + 15 * seed)
    ours = quantize_stat(parse_range_log(to_log_text(data), "log"), percentile, enhance, ratio)
    mace = mace_quantize_stat(data, percentile, enhance, ratio)
    assert list(ours) == list(mace)
    for name in mace:
        assert (ours[name].min, ours[name].max) == (float(mace[name][0]), float(mace[name][1]))


def test_generated_logs_exercise_enhance():
    changed = 0
    for seed in range(5):
        data = make_log(np.random.default_rng(seed), samples=10 + 15 * seed)
        for percentile in (0, 5):
            plain = mace_quantize_stat(data, percentile, False, 10)
            enhanced = mace_quantize_stat(data, percentile, True, 10)
            changed += sum(plain[k] != enhanced[k] for k in plain)
    assert changed >= 10


def test_enhance_actually_drops_outliers():
    maxs = [1.0 + 0.01 * k for k in range(100)] + [50.0]
    mins = [-1.0] * 101
    plain = quantize_stat({"t": TensorSamples(mins, maxs)})["t"]
    enhanced = quantize_stat({"t": TensorSamples(mins, maxs)}, enhance=True)["t"]
    assert plain.max == 50.0
    assert enhanced.max == pytest.approx(1.99)  # the outlier clipped, the next sample kept
    assert enhanced.min == -1.0
    # a huge ratio makes enhance a no-op
    assert quantize_stat({"t": TensorSamples(mins, maxs)}, enhance=True, enhance_ratio=1e9)["t"] == plain


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(0, 1e3)).map(lambda t: (t[0], t[0] + t[1])),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([0, 1, 5, 25, 49.9]),
    st.booleans(),
    st.sampled_from([1.0, 2.0, 10.0]),
)
def test_quantize_stat_property(pairs, percentile, enhance, ratio):
    mins, maxs = [p[0] for p in pairs], [p[1] for p in pairs]
    ours = quantize_stat({"t": TensorSamples(mins, maxs)}, percentile, enhance, ratio)["t"]
    lo, hi = np.percentile(mins, percentile), np.percentile(maxs, 100 - percentile)
    if lo < hi:  # MACE asserts on constant tensors; qmace returns them as they are
        mace = mace_quantize_stat({"t": (mins, maxs)}, percentile, enhance, ratio)["t"]
        assert (ours.min, ours.max) == (float(mace[0]), float(mace[1]))
    else:
        assert (ours.min, ours.max) == (float(lo), float(hi))
    assert min(mins) <= ours.min <= ours.max <= max(maxs)


@pytest.mark.parametrize("enhance", [False, True])
def test_constant_tensors_do_not_crash(enhance):
    log = {"c": TensorSamples([3.0] * 5, [3.0] * 5), "z": TensorSamples([0.0], [0.0])}
    assert quantize_stat(log, 5, enhance) == {"c": Range(3.0, 3.0), "z": Range(0.0, 0.0)}


@pytest.mark.parametrize("percentile", [50, -1, 50.5, 100])
def test_percentile_out_of_range(percentile):
    with pytest.raises(RangeError, match="percentile"):
        quantize_stat({"t": TensorSamples([0.0], [1.0])}, percentile=percentile)


def test_quantize_stat_rejects_inconsistent_log():
    with pytest.raises(RangeError, match="'t'"):
        quantize_stat({"t": TensorSamples([0.0, 1.0], [1.0])})
    with pytest.raises(RangeError, match="'t'"):
        quantize_stat({"t": TensorSamples()})


# ---------------------------------------------------------------------------------------------- range log


def test_parse_range_log_ignores_noise_and_prefixes():
    lines = [
        "Run init: 12.3 ms\n",
        "I mace/core/net.cc:171] Tensor range @@conv1@@-1.5,2.25\n",
        "Tensor range @@fc/out:0@@0,1e-07\n",
        "W some warning with @@ in it\n",
        "  [device] I net.cc] Tensor range @@conv1@@-0.5,3\r\n",
        "Tensor range @@weird@@name@@-1,1\n",
        "Summary: done\n",
    ]
    log = parse_range_log(lines, "range_log")
    assert list(log) == ["conv1", "fc/out:0", "weird@@name"]
    assert log["conv1"].mins == [-1.5, -0.5] and log["conv1"].maxs == [2.25, 3.0]
    assert log["fc/out:0"].maxs == [1e-07]


def test_range_log_full_precision_round_trip():
    values = [(0.1 + 0.2, 1 / 3), (-1e-30, 5e-324), (-3.4028234663852886e38, 3.4028234663852886e38)]
    log = parse_range_log([format_range_log_line("t", lo, hi) for lo, hi in values], "x")
    assert list(zip(log["t"].mins, log["t"].maxs)) == values
    assert parse_range_log(format_range_log(log).splitlines(), "y") == log


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("Tensor range @@conv1@@1.0\n", "log:3: malformed"),
        ("Tensor range @@conv1@@a,b\n", "log:3: tensor 'conv1'"),
        ("Tensor range @@conv1\n", "log:3: malformed"),
        ("Tensor range @@@@0,1\n", "log:3: malformed"),
        ("Tensor range @@conv1@@nan,1\n", "log:3: tensor 'conv1'.*not finite"),
        ("Tensor range @@conv1@@-inf,1\n", "log:3: tensor 'conv1'.*not finite"),
        ("Tensor range @@conv1@@3.40282e+38,-3.40282e+38\n", "log:3: tensor 'conv1'.*min .* > max"),
    ],
)
def test_parse_range_log_errors_name_line(bad, match):
    lines = ["hello\n", "Tensor range @@a@@0,1\n", bad]
    with pytest.raises(RangeError, match=match):
        parse_range_log(lines, "log")


def test_log_without_range_lines():
    with pytest.raises(RangeError, match="empty.log: no"):
        parse_range_log(["just\n", "noise @@a@@0,1\n"], "empty.log")


# --------------------------------------------------------------------------------------------- range file


def test_range_file_round_trip_full_precision(tmp_path):
    table = {
        "conv1": Range(-1e-9, 3e-9),  # collapses to 0,0 under MACE's %f
        "fc:0": Range(0.1 + 0.2, 1 / 3),
        "const": Range(2.5, 2.5),
        "odd@@name": Range(-1.0, 1.0),
    }
    path = tmp_path / "sub" / "overall_range"
    write_range_file(path, table)
    back = read_range_file(path)
    assert back == table and list(back) == list(table)
    assert path.read_text() == format_range_file(table)
    assert [p.name for p in path.parent.iterdir()] == ["overall_range"]  # no temporary left behind


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e30, 1e30), st.floats(0, 1e30)), min_size=1, max_size=10))
def test_range_file_text_round_trip(pairs):
    table = {f"t{i}": Range(lo, lo + w) for i, (lo, w) in enumerate(pairs)}
    lines = format_range_file(table).splitlines()
    assert len(lines) == len(table)
    for line, (name, rng) in zip(lines, table.items()):
        n, _, minmax = line.rpartition("@@")
        assert n == name and tuple(map(float, minmax.split(","))) == (rng.min, rng.max)


def test_reads_mace_percent_f_file(tmp_path):
    path = tmp_path / "overall_range"
    rows = [("a", -1.25, 6.0), ("b/c:0", 0, 0.000001)]
    lines = ["%s@@%f,%f" % row for row in rows]  # noqa: UP031 - exactly MACE's print statement
    path.write_text("\n".join(lines) + "\n\n# a comment\n   \n")
    assert read_range_file(path) == {"a": Range(-1.25, 6.0), "b/c:0": Range(0.0, 1e-06)}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("garbage", r":3: malformed"),
        ("x@@1.0", r":3: malformed"),
        ("x@@1.0,2.0,3.0", r":3: malformed"),
        ("x@@one,two", r":3: tensor 'x'"),
        ("x@@2.0,1.0", r":3: tensor 'x': min 2.0 > max 1.0"),
        ("a@@0,2", r":3: tensor 'a' appears twice"),
        ("x@@nan,1", r":3: tensor 'x'.*not finite"),
        ("x@@0,inf", r":3: tensor 'x'.*not finite"),
    ],
)
def test_range_file_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "ranges.txt"
    path.write_text(f"a@@0,1\n# ok\n{line}\n")
    with pytest.raises(RangeError, match="ranges.txt" + match):
        read_range_file(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_range_file(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(RangeError, match="empty.txt: range file has no"):
        read_range_file(path)


def test_missing_range_file(tmp_path):
    with pytest.raises(RangeError, match="nope.txt"):
        read_range_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("name", ["", "a\nb", " lead", "#hash"])
def test_unwritable_names(name):
    with pytest.raises(RangeError, match="cannot be written"):
        format_range_file({name: Range(0, 1)})


@pytest.mark.parametrize(("lo", "hi"), [(math.nan, 1.0), (0.0, math.inf), (2.0, 1.0)])
def test_range_validates(lo, hi):
    with pytest.raises(RangeError):
        Range(lo, hi)


def test_range_coerces_numpy_scalars():
    r = Range(np.float32(0.5), np.float64(1.0))
    assert type(r.min) is float and type(r.max) is float
