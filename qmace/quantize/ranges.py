"""Tensor ranges: the typed range table, MACE's range log, MACE's `quantize_stat` and MACE's range file.

Formats (see docs/mace-reference.md, "Range log" and "quantize_stat"):

- Range log, one line per op output per inference, possibly after a log prefix::

      I mace/core/net.cc:123] Tensor range @@<tensor name>@@<min>,<max>

- Range file, one line per tensor in first-seen (topological) order::

      <tensor name>@@<min>,<max>

MACE writes the range file with ``%f`` (6 decimals, so tiny ranges collapse); qmace writes ``repr(float)``
(shortest string that round-trips exactly) and reads both.

`quantize_stat` reproduces ``QuantizeStat.run`` of MACE's
``mace/python/tools/quantization/quantize_stat.py`` (repository XiaoMi/mace, read at commit
14e7f7608a8ef17e5c50177ba6351cc5fdd9bf7d; the older 3d1951765cc1 version has no ``--enhance``), except
that constant tensors (min == max), on which MACE fails ``assert tensor_min < tensor_max``, are returned
as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from qmace.errors import RangeError, ResourceLimitError
from qmace.fileio import atomic_write

RANGE_LOG_MARKER = "Tensor range @@"
SEPARATOR = "@@"

# MACE's enhance loop never narrows a range below this width (absolute, in tensor units).
ENHANCE_MIN_RANGE = 0.1
# MACE's default ratio of the enhance walk (quantize_stat --enhance_ratio); the one default of every caller.
ENHANCE_RATIO = 10.0


@dataclass(frozen=True)
class Range:
    """A closed float interval [min, max] of a tensor's values; both finite, min <= max."""

    min: float
    max: float

    def __post_init__(self) -> None:
        lo, hi = float(self.min), float(self.max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RangeError(f"range [{lo!r}, {hi!r}] is not finite")
        if lo > hi:
            raise RangeError(f"range [{lo!r}, {hi!r}] has min > max")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)


# Tensor name -> range; insertion order is first-seen (topological) order.
RangeTable = dict[str, Range]


@dataclass
class TensorSamples:
    """Per-inference extrema of one tensor: `mins[k]`, `maxs[k]` are the min and max of inference k."""

    mins: list[float] = field(default_factory=list)
    maxs: list[float] = field(default_factory=list)

    def append(self, lo: float, hi: float) -> None:
        """Record one inference's extrema.

        Args:
            lo: the tensor's minimum in that inference.
            hi: its maximum.
        """
        self.mins.append(float(lo))
        self.maxs.append(float(hi))


# Tensor name -> per-inference extrema; insertion order is first-seen order.
RangeLog = dict[str, TensorSamples]


# ---------------------------------------------------------------------------------------------- range log


def format_range_log_line(name: str, min: float, max: float) -> str:
    """``Tensor range @@<name>@@<min>,<max>`` with full precision (``repr(float)``), no trailing newline.

    Args:
        name: the tensor name.
        min: its minimum.
        max: its maximum.

    Returns:
        The log line.

    Raises:
        RangeError: a name that cannot be written (empty or containing a newline).
    """
    if not name or "\n" in name or "\r" in name:
        raise RangeError(f"tensor name {name!r} cannot be written to a range log (empty or newline)")
    return f"{RANGE_LOG_MARKER}{name}{SEPARATOR}{float(min)!r},{float(max)!r}"


def format_range_log(log: RangeLog) -> str:
    """The whole log as MACE prints it: inference by inference, each tensor in first-seen order.

    Args:
        log: tensor name -> TensorSamples.

    Returns:
        The log text, one line per tensor and inference.
    """
    samples = max((len(s.mins) for s in log.values()), default=0)
    lines = [
        format_range_log_line(name, s.mins[k], s.maxs[k])
        for k in range(samples)
        for name, s in log.items()
        if k < len(s.mins)
    ]
    return "".join(line + "\n" for line in lines)


def parse_range_log(lines: Iterable[str], source: str) -> RangeLog:
    """Collect per-inference extrema from MACE's ``run --quantize_stat`` output.

    Only lines containing ``Tensor range @@`` count; anything before the marker (log prefix) and every
    other line is ignored. The name is the text between the marker and the last ``@@`` (MACE splits on every
    ``@@``, so it cannot read names containing one; qmace can, as bounds never contain ``@@``).

    Args:
        lines: the log's lines.
        source: the file name, for messages.

    Returns:
        Tensor name -> TensorSamples, in first-seen order.

    Raises:
        RangeError: naming ``source:lineno`` for a malformed range line, a NaN/Inf bound or min > max (MACE
            logs FLT_MAX,-FLT_MAX for an empty tensor), and when there is no range line at all.
        ResourceLimitError: more range lines than ``limits.MAX_RANGE_LOG_LINES``.
    """
    from qmace import limits

    log: RangeLog = {}
    count = 0
    for lineno, line in enumerate(lines, start=1):
        at = line.find(RANGE_LOG_MARKER)
        if at < 0:
            continue
        count += 1
        if count > limits.MAX_RANGE_LOG_LINES:
            raise ResourceLimitError(f"{source}:{lineno}: more than {limits.MAX_RANGE_LOG_LINES:,} range lines "
                                     "(qmace.limits.MAX_RANGE_LOG_LINES)")
        where = f"{source}:{lineno}"
        name, lo, hi = _split_range_line(line[at + len(RANGE_LOG_MARKER) :], where)
        log.setdefault(name, TensorSamples()).append(lo, hi)
    if not log:
        raise RangeError(f"{source}: no '{RANGE_LOG_MARKER}<name>@@<min>,<max>' lines (is it a range log?)")
    return log


# ---------------------------------------------------------------------------------------- quantize_stat


def quantize_stat(
    log: RangeLog, percentile: float = 0.0, enhance: bool = False, enhance_ratio: float = ENHANCE_RATIO
) -> RangeTable:
    """MACE's `quantize_stat.py`: one range per tensor from its per-inference extrema.

    With n inferences and P = `percentile` (in [0, 50)):

        min = numpy.percentile(mins, P),  max = numpy.percentile(maxs, 100 - P)   (linear interpolation)

    `enhance` then runs MACE's outlier walk (see `_enhance`). Tensors keep first-seen order.

    Args:
        log: tensor name -> per-inference extrema (``parse_range_log``).
        percentile: P in [0, 50).
        enhance: run MACE's outlier walk.
        enhance_ratio: the walk's ratio (> 0).

    Returns:
        Tensor name -> (min, max).

    Raises:
        RangeError: percentile or enhance_ratio out of range, a tensor with no or unequal minima/maxima, or
            a resulting range that is not finite (naming the tensor).
    """
    if not (0.0 <= percentile < 50.0):
        raise RangeError(f"percentile must be in [0, 50), got {percentile!r}")
    if not (enhance_ratio > 0 and math.isfinite(enhance_ratio)):
        raise RangeError(f"enhance_ratio must be a positive number, got {enhance_ratio!r}")
    table: RangeTable = {}
    for name, samples in log.items():
        if not samples.mins or len(samples.mins) != len(samples.maxs):
            raise RangeError(
                f"tensor {name!r}: {len(samples.mins)} minima and {len(samples.maxs)} maxima in the range log"
            )
        lo = float(np.percentile(samples.mins, percentile, method="linear"))
        hi = float(np.percentile(samples.maxs, 100.0 - percentile, method="linear"))
        # MACE: `if not enhance or samples <= 1`; a constant tensor would divide by a zero range.
        if enhance and len(samples.mins) > 1 and lo < hi:
            lo, hi = _enhance(samples, lo, hi, enhance_ratio)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RangeError(f"tensor {name!r}: its range [{lo!r}, {hi!r}] from the range log is not finite "
                             "(extrema near the float64 limit)")
        table[name] = Range(lo, hi)
    return table


def _enhance(samples: TensorSamples, lo: float, hi: float, ratio: float) -> tuple[float, float]:
    """MACE's enhancement mode, step for step (quantize_stat.py, QuantizeStat.run).

    mins sorted ascending, maxs sorted descending; for i = 0 .. n-1, first the min side, then the max side:
      stop if mins[i] + 0.1 > cur_max;
      tighten cur_min to mins[i] if  ((mins[i] - cur_min) / (cur_max - cur_min))
                                   / ((i - min_idx) / (n - min_idx))  > ratio   (and i > min_idx);
      stop if cur_min + 0.1 > maxs[i];
      tighten cur_max to maxs[i] likewise with (cur_max - maxs[i]) and max_idx.
    i.e. a bound moves inward when the fraction of range removed exceeds `ratio` times the fraction of the
    not-yet-clipped samples it clips. Returns (cur_min, cur_max).
    """
    n = len(samples.mins)
    mins = np.sort(np.asarray(samples.mins, dtype=np.float64))
    maxs = np.sort(np.asarray(samples.maxs, dtype=np.float64))[::-1]
    cur_min, cur_max = lo, hi
    min_idx = max_idx = 0
    for i in range(n):
        if mins[i] + ENHANCE_MIN_RANGE > cur_max:
            break
        delta_range = (mins[i] - cur_min) / (cur_max - cur_min)
        delta_quantile = float(i - min_idx) / (n - min_idx)
        if delta_quantile > 0 and delta_range / delta_quantile > ratio:
            min_idx, cur_min = i, float(mins[i])
        if cur_min + ENHANCE_MIN_RANGE > maxs[i]:
            break
        delta_range = (cur_max - maxs[i]) / (cur_max - cur_min)
        delta_quantile = float(i - max_idx) / (n - max_idx)
        if delta_quantile > 0 and delta_range / delta_quantile > ratio:
            max_idx, cur_max = i, float(maxs[i])
    return cur_min, cur_max


# ------------------------------------------------------------------------------------------- range file


def format_range_file(table: RangeTable) -> str:
    """One ``name@@min,max`` line per tensor, table order, full precision (``repr(float)``).

    Args:
        table: tensor name -> (min, max).

    Returns:
        The file's text.

    Raises:
        RangeError: a name that cannot be read back (empty, a newline, leading/trailing blank, leading ``#``).
    """
    out = []
    for name, rng in table.items():
        _check_name(name, "range file")
        out.append(f"{name}{SEPARATOR}{rng.min!r},{rng.max!r}\n")
    return "".join(out)


def write_range_file(path: str | os.PathLike, table: RangeTable) -> None:
    """Write ``format_range_file(table)`` atomically (never half-written).

    Args:
        path: the range file.
        table: tensor name -> (min, max).

    Raises:
        RangeError: as for ``format_range_file``.
        FileAccessError: the file cannot be written.
    """
    text = format_range_file(table)
    with atomic_write(path) as f:
        f.write(text)


def read_range_file(path: str | os.PathLike) -> RangeTable:
    """Read a range file written by qmace or by MACE's quantize_stat (``%f``).

    Blank lines and lines starting with ``#`` are ignored.

    Args:
        path: the range file.

    Returns:
        Tensor name -> (min, max), in file order.

    Raises:
        RangeError: naming ``file:line`` for a line that is not ``name@@min,max``, NaN/Inf, min > max or a
            repeated name; naming the file when it is unreadable, not UTF-8 text, or has no ranges.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RangeError(f"{path}: cannot read range file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise RangeError(f"{path}: cannot read range file: not UTF-8 text (byte {e.start})") from e
    table: RangeTable = {}
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        name, lo, hi = _split_range_line(stripped, where)
        if name in table:
            raise RangeError(f"{where}: tensor {name!r} appears twice in the range file")
        table[name] = Range(lo, hi)
    if not table:
        raise RangeError(f"{path}: range file has no 'name@@min,max' lines")
    return table


# ------------------------------------------------------------------------------------------------ helpers


def _split_range_line(text: str, where: str) -> tuple[str, float, float]:
    """`<name>@@<min>,<max>` -> (name, min, max), validated; errors name `where` (file:line)."""
    name, sep, minmax = text.rstrip("\r\n").rpartition(SEPARATOR)
    parts = minmax.strip().split(",")
    if not sep or not name or len(parts) != 2:
        raise RangeError(f"{where}: malformed range line {text.strip()!r}, expected '<name>@@<min>,<max>'")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise RangeError(f"{where}: tensor {name!r}: bounds {minmax.strip()!r} are not two numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RangeError(f"{where}: tensor {name!r}: range {lo!r},{hi!r} is not finite")
    if lo > hi:
        raise RangeError(f"{where}: tensor {name!r}: min {lo!r} > max {hi!r}")
    return name, lo, hi


def _check_name(name: str, what: str) -> None:
    """Names must survive a write/read round trip: non-empty, one line, no surrounding blanks, no `#` start."""
    if not name or "\n" in name or "\r" in name or name != name.strip() or name.startswith("#"):
        raise RangeError(
            f"tensor name {name!r} cannot be written to a {what} "
            "(empty, newline, leading/trailing blank or leading '#')"
        )
