#!/usr/bin/env python3
"""Exact int8 on CPUs without VNNI: what ONNX Runtime's u8 x s8 saturation costs, and what qmace does.

On x86 CPUs with AVX2 but no VNNI, ONNX Runtime's u8 x s8 kernels (vpmaddubsw) saturate pairs of
products at 16 bits. qmace's onnxruntime backend probes the host (`ort_u8s8_exact`) and, where they
saturate, hands int8 weights to ORT as uint8 + 128 (same values; ORT's u8 x u8 kernels are exact). One run,
MobileNetV2 with its real weights, calibrated on the 64 calibration stamps, measured on the 233 evaluation
stamps against FP32 ONNX Runtime:

- qmace int8 (`qmace quantize` defaults: equalization, percentile, bias correction), three ways to run it:
  the numpy reference backend (the exact oracle), the onnxruntime backend (exact rewrite where needed), and
  the same exported QDQ file in plain ORT (u8 x s8, saturating on such a CPU);
- ONNX Runtime's own `quantize_static` model (per-channel int8 weights, Percentile), run as ORT runs it.
Columns: codes equal to the reference's (share of logits identical), top-1 agreement and SQNR vs FP32,
batch-1 latency on one thread (interleaved medians) and its ratio to FP32.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_host_int8.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from qmace.quantize.api import export, quantize_one_shot  # noqa: E402
from qmace.runtime import Session  # noqa: E402
from qmace.runtime.session import ort_u8s8_exact  # noqa: E402


def _write_samples(directory: Path, images: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        x[None].astype(np.float32).tofile(directory / f"{common.INPUT}_{i:03d}")
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40, help="latency rounds (interleaved, medians)")
    args = ap.parse_args(argv)
    import bench_ptq

    t0 = time.perf_counter()
    onnx_path = common.mobilenet_onnx()
    xc, _ = common.stamp_images("calib")
    xe, _ = common.stamp_images("eval")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = common.ort_session(onnx_path, 1)
        ref = common.run_batched(lambda x: fp32.run(None, {common.INPUT: x})[0], xe)
        yml = common.write_yaml(tmp, onnx_path, schema="int8")
        res = quantize_one_shot(yml, input_dir=_write_samples(tmp / "calib", xc), build_dir=tmp / "build",
                                method="percentile")
        graph = res.convert.graph
        qdq = export(yml, tmp / "qmace_int8.onnx", build_dir=tmp / "build")
        peer = bench_ptq.ort_quantize(onnx_path, tmp / "ort_int8.onnx", xc, "int8", True, "Percentile")
        t_prep = time.perf_counter() - t0
        reference = Session(graph, backend="reference")
        runs = {
            "qmace int8, reference backend (oracle)": lambda x: reference.run({common.INPUT: x})[common.OUTPUT],
        }
        sessions = {
            "qmace int8, onnxruntime backend": Session(graph, backend="onnxruntime", num_threads=1)._ort,
            "qmace int8 QDQ export in plain ORT": common.ort_session(qdq, 1),
            "ORT quantize_static int8 (peer)": common.ort_session(peer, 1),
        }
        for k, s in sessions.items():
            runs[k] = lambda x, s=s: s.run(None, {common.INPUT: x})[0]
        outs = {k: common.run_batched(fn, xe) for k, fn in runs.items()}
        oracle = outs["qmace int8, reference backend (oracle)"]
        x1 = np.ascontiguousarray(xe[:1])
        timed = {"FP32 ORT": lambda: fp32.run(None, {common.INPUT: x1})} | {
            k: (lambda s=s: s.run(None, {common.INPUT: x1})) for k, s in sessions.items()}
        ms = common.interleaved_medians(timed, repeats=args.repeats)
    rows = [["FP32 ORT", "-", 100.0, "-", f"{ms['FP32 ORT']:.2f}", "1.00"]]
    for k, y in outs.items():
        same = "-" if "peer" in k else f"{np.mean(y == oracle):.2%}"
        agree = float(np.mean(y.argmax(1) == ref.argmax(1)) * 100)
        lat = f"{ms[k]:.2f}" if k in ms else "-"
        ratio = f"{ms['FP32 ORT'] / ms[k]:.2f}" if k in ms else "-"
        rows.append([k, same, f"{agree:.2f}", f"{common.sqnr_db(ref, y):.2f}", lat, ratio])
    print(common.machine_note())
    print(f"ONNX Runtime u8 x s8 exact on this CPU: {ort_u8s8_exact()}; preparation {t_prep:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s")
    print(common.md_table(["model", "logits equal to reference", "top-1 agreement %", "SQNR dB",
                           "b1 ms 1 thread", "speed-up vs FP32"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
