#!/usr/bin/env python3
"""Fast and exact int8 on CPUs without VNNI: what ONNX Runtime's u8 x s8 saturation costs, and the ways out.

On x86 CPUs with AVX2 but no VNNI, ONNX Runtime's u8 x s8 kernels (vpmaddubsw) saturate pairs of
products at 16 bits. qmace's onnxruntime backend probes the host (`ort_u8s8_exact`) and, where they
saturate, hands full-range int8 weights to ORT as uint8 + 128 (same values; ORT's u8 x u8 kernels are exact,
but slow). `quantize_schema: int8_w7` (7-bit weights, codes in [-63, 63]) cannot saturate and runs on the
fast u8 x s8 kernels. One run, MobileNetV2 with its real weights, calibrated on the 64 calibration stamps,
measured on the 233 evaluation stamps against FP32 ONNX Runtime:

- qmace `int8` and `int8_w7` (`qmace quantize` defaults: equalization, percentile, bias correction), each
  run by the numpy reference backend (the exact oracle), the onnxruntime backend and, if installed, the
  openvino backend; the `int8` QDQ export also in plain ORT (u8 x s8, saturating on such a CPU);
- ONNX Runtime's own `quantize_static` models (per-channel int8 weights, Percentile), with and without
  `reduce_range` (ORT's 7-bit weights), run as ORT runs them.
Columns: logits equal to the same model's reference backend, top-1 agreement and SQNR vs FP32, batch-1
latency on one thread (interleaved medians: the model changes on every call) and its ratio to FP32 ORT, and
the same with warm caches (``common.warm_medians``: 20 calls in a row per model, rounds rotating).

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_host_int8.py [--repeats 40]     # with `pip install qmace[openvino]` for OpenVINO
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from qmace.api import export, quantize_one_shot
from qmace.quantize.recipe import PTQRecipe
from qmace.runtime import Session
from qmace.runtime.session import ort_u8s8_exact


def _write_samples(directory: Path, images: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        x[None].astype(np.float32).tofile(directory / f"{common.INPUT}_{i:03d}")
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40, help="latency rounds (interleaved, medians)")
    ap.add_argument("--warm-rounds", type=int, default=15,
                    help="rounds of the warm timing (20 calls in a row per model per round; 0: skip)")
    args = ap.parse_args(argv)
    import bench_ptq

    from qmace.runtime.openvino_backend import OpenVINOSession, available

    t0 = time.perf_counter()
    onnx_path = common.mobilenet_onnx()
    xc, _ = common.stamp_images("calib")
    xe, _ = common.stamp_images("eval")
    backends = ["onnxruntime"] + (["openvino"] if available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = _write_samples(tmp / "calib", xc)
        fp32 = common.ort_session(onnx_path, 1)
        ref = common.run_batched(lambda x: fp32.run(None, {common.INPUT: x})[0], xe)
        sessions: dict[str, object] = {"FP32 ORT": fp32}
        if "openvino" in backends:
            sessions["FP32 OpenVINO"] = OpenVINOSession(onnx_path.read_bytes(), 1)
        refs: dict[str, str] = {}  # row -> its model's reference row
        untimed = {}
        for schema in ("int8", "int8_w7"):
            yml = common.write_yaml(tmp / schema, onnx_path, schema=schema)
            res = quantize_one_shot(yml, input_dir=calib, build_dir=tmp / schema / "build",
                                    recipe=PTQRecipe(method="percentile"))
            graph = res.convert.graph
            oracle = f"qmace {schema}, reference backend (oracle)"
            untimed[oracle] = Session(graph, backend="reference")
            for b in backends:
                sessions[f"qmace {schema}, {b} backend"] = Session(graph, backend=b, num_threads=1)._ort
                refs[f"qmace {schema}, {b} backend"] = oracle
            if schema == "int8":
                qdq = export(yml, tmp / "qmace_int8.onnx", build_dir=tmp / schema / "build")
                sessions["qmace int8 QDQ export in plain ORT (u8 x s8)"] = common.ort_session(qdq, 1)
                refs["qmace int8 QDQ export in plain ORT (u8 x s8)"] = oracle
        for rr in (False, True):
            name = f"ORT quantize_static int8{' reduce_range' if rr else ''} (peer)"
            peer = bench_ptq.ort_quantize(onnx_path, tmp / f"ort_int8_{rr}.onnx", xc, "int8", True, "Percentile",
                                          reduce_range=rr)
            sessions[name] = common.ort_session(peer, 1)
        t_prep = time.perf_counter() - t0
        outs = {k: common.run_batched(lambda x, s=s: s.run({common.INPUT: x})[common.OUTPUT], xe)
                for k, s in untimed.items()}
        outs |= {k: common.run_batched(lambda x, s=s: s.run([common.OUTPUT], {common.INPUT: x})[0], xe)
                 for k, s in sessions.items() if not k.startswith("FP32 ORT")}
        x1 = np.ascontiguousarray(xe[:1])
        timed = {k: (lambda s=s: s.run([common.OUTPUT], {common.INPUT: x1})) for k, s in sessions.items()}
        ms = common.interleaved_medians(timed, repeats=args.repeats)
        warm = common.warm_medians(timed, rounds=args.warm_rounds) if args.warm_rounds else {}
    def warm_cols(k: str) -> list[str]:
        if k not in warm:
            return ["-", "-"] if warm else []
        return [f"{warm[k]:.2f}", f"{warm['FP32 ORT'] / warm[k]:.2f}"]

    rows = [["FP32 ORT", "-", "100.00", "-", f"{ms['FP32 ORT']:.2f}", "1.00", *warm_cols("FP32 ORT")]]
    for k in [*sessions, *untimed]:
        if k == "FP32 ORT":
            continue
        y = outs[k]
        same = f"{np.mean(y == outs[refs[k]]):.2%}" if k in refs else "-"
        agree = float(np.mean(y.argmax(1) == ref.argmax(1)) * 100)
        lat = f"{ms[k]:.2f}" if k in ms else "-"
        ratio = f"{ms['FP32 ORT'] / ms[k]:.2f}" if k in ms else "-"
        rows.append([k, same, f"{agree:.2f}", f"{common.sqnr_db(ref, y):.2f}", lat, ratio, *warm_cols(k)])
    print(common.machine_note())
    print(f"ONNX Runtime u8 x s8 exact on this CPU: {ort_u8s8_exact()}; backends: {', '.join(backends)}; "
          f"preparation {t_prep:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print(common.md_table(["model", "logits equal to its reference", "top-1 agreement %", "SQNR dB",
                           "b1 ms 1 thread", "speed-up vs FP32 ORT"]
                          + (["b1 ms warm", "speed-up warm"] if warm else []), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
