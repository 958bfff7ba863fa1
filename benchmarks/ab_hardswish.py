#!/usr/bin/env python3
"""Issue 10, item 3 ("int8 >= 1.4x FP32"): HardSwish / HardSigmoid as ONNX Runtime integer kernels vs float islands.

    python benchmarks/ab_hardswish.py [--models seg,cls,det] [--schema int8_w7] [--repeats 30]

Setup: ``python scripts/fetch_assets.py rapidocr mediapipe stamps extra-photos``.

One PTQ result per model (benchmarks/bench_mobile_models.py's ``bc`` row: ``qmace quantize --method percentile
--percentile 99.95``, calibration images only), run two ways in one process: as qmace quantizes it now (the
quantizer marks HardSwish / HardSigmoid ``qm_arith="qlinear"``: QLinearAdd (+ QLinearMul) on uint8 codes,
docs/quantization.md) and with that mark removed (the float island DequantizeLinear -> HardSigmoid, Mul ->
QuantizeLinear that main ran before). Same weights, same activation parameters; only those nodes' arithmetic
differs. Printed per model: the ops ONNX Runtime runs on float tensors, one-thread latency (interleaved
medians with FP32 in the same run, ONNX Runtime and OpenVINO), the task metric / ok images / SQNR vs FP32 on
the evaluation images, and how many output codes the ORT backend and the reference differ by (4 images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mobile_models as B
from common import interleaved_medians, machine_note

from qmace.metrics import compare
from qmace.onnx_bridge import to_onnx
from qmace.ops.activation import QLINEAR
from qmace.ops.base import ARITH
from qmace.runtime import Session


def island(graph):
    """``graph`` with the integer-form mark removed: every marked node runs as its float island again."""
    g = graph.copy()
    for n in g.nodes:
        if n.attrs.get(ARITH) == QLINEAR:
            del n.attrs[ARITH]
    return g


def ort_float_ops(graph) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        p.write_bytes(to_onnx(graph).SerializeToString())
        return B.float_ops_in_ort(p)


def code_steps(m, graph, xs: np.ndarray) -> tuple[float, float]:
    """Worst |ORT - reference| in output steps and the share of differing outputs, over ``xs``."""
    q = graph.tensors[next(n.inputs[0] for n in graph.nodes if n.outputs[0] == m.output_name)].quant
    ref, ort = Session(graph, backend="reference"), Session(graph, backend="onnxruntime", num_threads=1)
    steps = np.concatenate([np.abs(ref.run({m.input_name: x[None]})[m.output_name].astype(np.float64)
                                   - ort.run({m.input_name: x[None]})[m.output_name]).ravel() for x in xs])
    steps /= float(q.scale)
    return float(steps.max()), float(np.mean(steps > 0.5))


def bench(m, schema: str, repeats: int) -> dict:
    t0 = time.perf_counter()
    res = B.qmace_ptq(m, schema)
    new = res.graph
    marked = sum(n.attrs.get(ARITH) == QLINEAR for n in new.nodes)
    variants = {"island (before)": island(new), "integer (now)": new}
    out = {"model": m.name, "schema": schema, "marked_nodes": marked, "ptq_s": time.perf_counter() - t0, "rows": {}}
    fns, runs = {}, {}
    fp = B.ort_session(m.fp32_onnx, 1)
    fns["FP32|ort"] = lambda: fp.run(None, {fp.get_inputs()[0].name: m.evals[:1]})
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    c = core.compile_model(core.read_model(str(m.fp32_onnx)), "CPU", cfg)
    req = c.create_infer_request()
    fns["FP32|ov"] = lambda: req.infer({0: m.evals[:1]})
    for label, g in variants.items():
        for be in ("onnxruntime", "openvino"):
            s = Session(g, backend=be, num_threads=1)
            key = f"{label}|{'ort' if be == 'onnxruntime' else 'ov'}"
            runs[key] = lambda x, s=s: s.run({m.input_name: x})[m.output_name]
            fns[key] = lambda s=s: s.run({m.input_name: m.evals[:1]})
    ref = B.run_all(lambda x: fp.run(None, {fp.get_inputs()[0].name: x})[0], m.evals)
    for label, g in variants.items():
        row = {"float_ops_ort": ort_float_ops(g)}
        row["ort_vs_reference_steps"] = code_steps(m, g, m.evals[:4])
        for be in ("ort", "ov"):
            o = B.run_all(runs[f"{label}|{be}"], m.evals)
            metric, ok, pooled = B.task_metric(m, ref, o)
            row[be] = {"metric": metric, "ok": ok, "pooled": pooled, "sqnr": compare(ref, o).sqnr_db}
        out["rows"][label] = row
    lat = interleaved_medians(fns, repeats=repeats, warmup=3)
    out["latency_ms"] = lat
    return out


def report(r: dict) -> str:
    lat = r["latency_ms"]
    metric = "top-1 agr." if r["model"] == "cls" else "mean IoU"
    lines = [f"{r['model']} ({r['schema']}, {r['marked_nodes']} HardSwish/HardSigmoid nodes):",
             (f"| variant | float ops in ORT | ORT ms | FP32/int8 ORT | OV ms | FP32/int8 OV | {metric} ORT | ok ORT "
              f"| SQNR dB ORT | {metric} OV | ok OV | ORT vs reference (worst steps, share) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             (f"| FP32 | - | {lat['FP32|ort']:.2f} | 1.00x | {lat['FP32|ov']:.2f} | 1.00x | 1.000 | 100% | inf "
              "| 1.000 | 100% | - |")]
    for label, row in r["rows"].items():
        fo = row["float_ops_ort"]
        kinds = ", ".join(sorted(set(fo)))
        w, share = row["ort_vs_reference_steps"]
        lines.append(
            f"| {label} | {len(fo)}{f' ({kinds})' if fo else ''} | {lat[label + '|ort']:.2f} "
            f"| {lat['FP32|ort'] / lat[label + '|ort']:.2f}x | {lat[label + '|ov']:.2f} "
            f"| {lat['FP32|ov'] / lat[label + '|ov']:.2f}x | {row['ort']['metric']:.3f} | {100 * row['ort']['ok']:.0f}% "
            f"| {row['ort']['sqnr']:.1f} | {row['ov']['metric']:.3f} | {100 * row['ov']['ok']:.0f}% "
            f"| {w:.0f}, {100 * share:.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="seg,cls,det")
    ap.add_argument("--schema", default="int8_w7", choices=("int8_w7", "int8", "uint8"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args(argv)
    from qmace_zoo import default_cache

    work = default_cache() / "bench-mobile"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for name in a.models.split(","):
        m = B.load_models([name], work)[0]
        r = bench(m, a.schema, a.repeats)
        results.append(r)
        print(report(r) + "\n", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"{machine_note()}; run time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
