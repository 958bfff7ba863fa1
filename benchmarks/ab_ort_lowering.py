#!/usr/bin/env python3
"""Issue 10, "int8 >= 1.4x FP32": the onnxruntime backend's exact float-kernel lowering (qmace/runtime/ort_lowering.py)
against the plain QDQ lowering, on the same quantized graphs.

    python benchmarks/ab_ort_lowering.py [--models cls,seg,det] [--schemas int8,int8_w7] [--repeats 200]

Setup: ``python scripts/fetch_assets.py rapidocr mediapipe stamps extra-photos``.

Per model and schema: one PTQ result (benchmarks/bench_mobile_models.py's ``bc`` row, calibration images only),
run by two ``Session(backend="onnxruntime", num_threads=1)`` objects in one process: as qmace lowers it now (MaxPool
on codes and padding-heavy depthwise convolutions through ORT's float kernels) and with ``lower_for_ort`` switched
off (what main ran before). Printed: the rewritten nodes, one-thread latency of FP32 and both lowerings
(interleaved medians in one run), and whether the two give identical outputs on every evaluation image.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mobile_models as B
from common import interleaved_medians, machine_note

from qmace.onnx_bridge import to_onnx
from qmace.runtime import ort_lowering
from qmace.runtime.session import Session, ort_session


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cls,seg,det")
    ap.add_argument("--schemas", default="int8,int8_w7")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(machine_note(), flush=True)
    work = Path(tempfile.mkdtemp())
    lower = ort_lowering.lower_for_ort
    rows = []
    for m in B.load_models(args.models.split(","), work):
        fp32 = ort_session(str(m.fp32_onnx), 1)
        name = fp32.get_inputs()[0].name
        for schema in args.schemas.split(","):
            qg, _, _ = B.qmace_quantize(m, schema)
            rewritten = lower(to_onnx(qg))
            new = Session(qg, backend="onnxruntime", num_threads=1)
            ort_lowering.lower_for_ort = lambda model: []
            try:
                old = Session(qg, backend="onnxruntime", num_threads=1)
            finally:
                ort_lowering.lower_for_ort = lower
            same = sum(np.array_equal(new.run({m.input_name: x[None]})[m.output_name],
                                      old.run({m.input_name: x[None]})[m.output_name]) for x in m.evals)
            feeds = {m.input_name: m.evals[:1]}
            lat = interleaved_medians({"FP32": lambda s=fp32, f={name: feeds[m.input_name]}: s.run(None, f),
                                       "plain": lambda s=old, f=feeds: s.run(f),
                                       "lowered": lambda s=new, f=feeds: s.run(f)}, repeats=args.repeats)
            rows.append((m.name, schema, len(rewritten), lat, same, len(m.evals)))
            print(f"{m.name} {schema}: rewritten {len(rewritten)}: {', '.join(rewritten) or '-'}", flush=True)
    print("\n| model | schema | nodes rewritten | FP32 ms | int8 plain ms | int8 lowered ms | FP32/int8 plain | "
          "FP32/int8 lowered | identical outputs |\n|---|---|---|---|---|---|---|---|---|")
    for name, schema, n, lat, same, total in rows:
        print(f"| {name} | {schema} | {n} | {lat['FP32']:.3f} | {lat['plain']:.3f} | {lat['lowered']:.3f} | "
              f"{lat['FP32'] / lat['plain']:.2f}x | {lat['FP32'] / lat['lowered']:.2f}x | {same}/{total} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
