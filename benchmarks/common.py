"""Shared helpers for the MobileNetV2 benchmarks (bench_runtime.py, bench_ptq.py).

- the real MobileNetV2 ONNX file (torchvision ImageNet weights, exported once into the qmace cache);
- the Tux Paint photo stamps: 64 calibration / 233 evaluation images, hand labels;
- a MACE deployment YAML (with the file's real sha256) written into a temp dir;
- interleaved median timing, logits metrics, peak-RSS measurement, markdown tables.

Nothing here changes library behaviour; it only drives the public API.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from qmace.metrics import compare, sqnr_db
from qmace.runtime.session import ort_session as qmace_ort_session
from qmace_zoo import (
    default_cache,
    export_onnx,
    imagenet_labels,
    load_images,
    load_mobilenet_v2,
    load_split,
    stamps_dir,
)

INPUT, OUTPUT = "input", "output"
# The preprocessed stamps (ImageNet mean/std) lie inside about [-2.12, 2.64]; MACE's input_ranges must
# cover them or the model input is clipped when quantized.
INPUT_RANGE = (-2.1179039478302, 2.640000104904175)


# ------------------------------------------------------------------------------------------------ assets


def mobilenet_onnx(cache: Path | None = None) -> Path:
    """The FP32 MobileNetV2 ONNX (dynamic batch) in the cache; exported from the .pth if missing."""
    cache = Path(cache) if cache else default_cache()
    path = cache / "mobilenet_v2_fp32.onnx"
    if not path.is_file():
        export_onnx(load_mobilenet_v2(cache / "mobilenet_v2-b0353104.pth"), path)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_images(which: str, cache: Path | None = None, data: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, 3, 224, 224) float32 images of the split `which` ("calib" or "eval") and their paths."""
    split = load_split(data)
    paths = list(split[which])
    return load_images(paths, root=stamps_dir(cache)), paths


def labels_for(paths: list[str], data: Path | None = None) -> dict[int, set[int]]:
    """Index in `paths` -> acceptable ImageNet classes, for the hand-labelled images."""
    lab = imagenet_labels(data)
    return {i: set(lab[p]) for i, p in enumerate(paths) if p in lab}


# -------------------------------------------------------------------------------------------------- YAML


def write_yaml(
    directory: Path,
    onnx_path: Path,
    *,
    batch: int = 1,
    name: str = "mobilenet",
    quantize: bool = False,
    range_file: Path | None = None,
    schema: str | None = None,
    input_range: tuple[float, float] = INPUT_RANGE,
    filename: str | None = None,
) -> Path:
    """A MACE deployment YAML for the MobileNetV2 ONNX (NCHW input of batch `batch`); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        f"library_name: {name}",
        "target_abis: [host]",
        "model_graph_format: file",
        "model_data_format: file",
        "models:",
        f"  {name}:",
        "    platform: onnx",
        f"    model_file_path: {Path(onnx_path).resolve()}",
        f"    model_sha256_checksum: {sha256(Path(onnx_path))}",
        "    runtime: cpu",
    ]
    if quantize:
        lines.append("    quantize: 1")
        if range_file is not None:
            lines.append(f"    quantize_range_file: {Path(range_file).resolve()}")
    if schema is not None:
        lines.append(f'    quantize_schema: "{schema}"')
    lines += [
        "    subgraphs:",
        f"      - input_tensors: [{INPUT}]",
        f"        input_shapes: [{batch},3,224,224]",
        "        input_data_formats: [NCHW]",
        f"        input_ranges: [{input_range[0]!r},{input_range[1]!r}]",
        f"        output_tensors: [{OUTPUT}]",
        f"        output_shapes: [{batch},1000]",
        "        output_data_formats: [NONE]",
    ]
    path = directory / (filename or f"{name}_b{batch}.yml")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- sessions


def ort_session(model: Path | bytes, threads: int, exact_int8: bool = False):
    """Plain ONNX Runtime (CPU EP, all graph optimizations) with `threads` intra-op threads: the same
    session options as qmace's own onnxruntime backend. A peer's model runs as ORT runs it
    (``exact_int8=False``: on CPUs without VNNI its u8 x s8 kernels saturate, as they do for ORT's users);
    ``exact_int8=True`` hands int8 weights over as qmace's backend does (uint8 + 128 where needed)."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return qmace_ort_session(data, threads, exact_int8=exact_int8)


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 1) -> np.ndarray:
    """Apply `fn` (array of `batch` images -> logits) over `x`; the last partial batch is zero-padded."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(np.asarray(fn(np.ascontiguousarray(chunk)))[:n])
    return np.concatenate(outs)


# ------------------------------------------------------------------------------------------------ timing


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3, budget_s: float | None = None
) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved round-robin (so machine noise hits all alike).

    `budget_s` stops early (after at least 5 rounds) when the total time spent exceeds it.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def warm_medians(fns: dict[str, Callable[[], object]], rounds: int = 15, block: int = 20,
                 settle: int = 2) -> dict[str, float]:
    """Median ms per call with warm caches: each round runs every function ``block`` times in a row (the first
    ``settle`` calls of a block not counted), rounds rotate over the functions (so machine noise still hits
    all alike). ``interleaved_medians`` switches model on every call, so each call starts with the other
    models' weights in the caches; a deployed model runs call after call, which this measures.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if i >= settle:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------- metrics


def cosine(ref: np.ndarray, x: np.ndarray) -> float:
    return compare(ref, x).cosine


def top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :5]


def logits_metrics(ref: np.ndarray, x: np.ndarray, labels: dict[int, set[int]]) -> dict[str, float]:
    """Top-1 agreement and top-5 overlap with `ref`, SQNR over all logits, labelled top-1/top-5 (%)."""
    t5r, t5x = top5(ref), top5(x)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5r.tolist(), t5x.tolist())])
    hit1 = sum(int(t5x[i, 0] in ok) for i, ok in labels.items())
    hit5 = sum(int(bool(ok & set(t5x[i].tolist()))) for i, ok in labels.items())
    n = max(1, len(labels))
    return {
        "agree": 100.0 * float(np.mean(t5r[:, 0] == t5x[:, 0])),
        "top5_overlap": 100.0 * float(overlap),
        "sqnr": sqnr_db(ref, x),
        "cos": cosine(ref, x),
        "top1": 100.0 * hit1 / n,
        "top5": 100.0 * hit5 / n,
    }


def agreement_gap(ref: np.ndarray, a: np.ndarray, b: np.ndarray, boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Top-1 agreement with `ref` of `a` minus that of `b` (points), with a 95% paired bootstrap interval.

    Per image ``d_i = [argmax a_i = argmax ref_i] - [argmax b_i = argmax ref_i]`` (in {-1, 0, 1}); the gap is
    ``100 mean(d)``, the interval the 2.5 / 97.5 percentiles of ``100 mean(d[idx])`` over `boot` resamples of
    the images with replacement (fixed `seed`). ``only_a`` / ``only_b``: images only one of the two agrees on.
    """
    r = np.argmax(ref, axis=1)
    d = (np.argmax(a, axis=1) == r).astype(np.int64) - (np.argmax(b, axis=1) == r).astype(np.int64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(boot, len(d)))
    means = 100.0 * d[idx].mean(axis=1)
    return {"gap": 100.0 * float(d.mean()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "only_a": int(np.sum(d > 0)), "only_b": int(np.sum(d < 0))}


# ------------------------------------------------------------------------------------------------ memory


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process's address space (VmHWM), in MB.

    Unlike ``ru_maxrss`` it starts afresh at exec: a child forked from a large parent inherits the parent's
    ``ru_maxrss``, which would hide the child's own peak. Falls back to ``max_rss_mb``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return max_rss_mb()


def current_rss_mb() -> float:
    """Current resident set size in MB (from /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return max_rss_mb()


# -------------------------------------------------------------------------------------------------- text


def machine_note() -> str:
    import onnxruntime as ort

    return (f"{platform.machine()}, {os.cpu_count()} vCPU (shared), Python {platform.python_version()}, "
            f"numpy {np.__version__}, onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}")


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
