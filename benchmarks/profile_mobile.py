#!/usr/bin/env python3
"""Where the time goes: ONNX Runtime's profiler on the FP32 and the qmace-quantized mobile models (issue 10,
"int8 >= 1.4x FP32 at one thread"), one thread, batch 1.

Per model: the quantized graph of ``bench_mobile_models.py``'s qmace row (same calibration images and recipe),
lowered as ``Session`` lowers it; both models run ``--runs`` times in one ORT session each with
``SessionOptions.enable_profiling``; per op type of ORT's *optimized* graph (what actually ran: QLinearConv,
fused Conv, DequantizeLinear, ...): node count, microseconds per inference, share of the model's node time.
Shares are robust to machine load (every node slows alike); absolute times are not.

    python benchmarks/profile_mobile.py --models seg,cls --schema int8_w7 [--runs 200] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnx
import onnxruntime as ort
from bench_mobile_models import load_models, qmace_quantize

from qmace.onnx_bridge import to_onnx
from qmace.runtime.session import int8_activations_as_uint8, int8_weights_as_uint8, ort_u8s8_exact


def profile(model_bytes: bytes, x: np.ndarray, runs: int, work: Path, tag: str) -> tuple[dict, dict, int]:
    """(op type -> [nodes, us per inference], node -> [op type, median us], runs) over ``runs`` inferences."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / tag)
    opts.optimized_model_filepath = str(work / f"{tag}_optimized.onnx")
    s = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    for _ in range(runs + 5):
        s.run(None, {name: x})
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    durs: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        ops[node] = e["args"].get("op_name", "?")
        durs[node].append(float(e["dur"]))
    # per node the median over the runs (robust to other processes' load spikes)
    by_node = {k: [ops[k], float(np.median(v))] for k, v in durs.items()}
    by_type: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for op, us in by_node.values():
        by_type[op][0] += 1
        by_type[op][1] += us
    return dict(by_type), by_node, runs


def table(fp: dict, q: dict, top: int) -> list[str]:
    tf, tq = sum(v[1] for v in fp.values()), sum(v[1] for v in q.values())
    lines = [(f"node time per inference: FP32 {tf / 1000:.2f} ms, quantized {tq / 1000:.2f} ms "
             f"(FP32/quantized {tf / tq:.2f}x)"), "",
             ("| op type (ORT optimized graph) | FP32 nodes | FP32 us | FP32 share | quantized nodes | quantized us "
             "| quantized share |"), "|---|---|---|---|---|---|---|"]
    keys = sorted(set(fp) | set(q), key=lambda k: -max(fp.get(k, [0, 0])[1], q.get(k, [0, 0])[1]))
    for k in keys[:top]:
        a, b = fp.get(k, [0, 0.0]), q.get(k, [0, 0.0])
        lines.append(f"| {k} | {a[0]} | {a[1]:.0f} | {100 * a[1] / tf:.1f}% | {b[0]} | {b[1]:.0f} | "
                     f"{100 * b[1] / tq:.1f}% |")
    rest = keys[top:]
    if rest:
        a = sum(fp.get(k, [0, 0.0])[1] for k in rest)
        b = sum(q.get(k, [0, 0.0])[1] for k in rest)
        lines.append(f"| other ({len(rest)} types) | | {a:.0f} | {100 * a / tf:.1f}% | | {b:.0f} | {100 * b / tq:.1f}% |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="seg,cls")
    ap.add_argument("--schema", default="int8_w7")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    logging.getLogger("qmace").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp())
    for m in load_models(args.models.split(","), work):
        qg, _, _ = qmace_quantize(m, args.schema)
        qm = to_onnx(qg)
        kernels = "u8 x s8 (fast)"
        if args.schema == "int8" and not ort_u8s8_exact() and int8_weights_as_uint8(qm):
            int8_activations_as_uint8(qm)
            kernels = "u8 x u8 (exact path)"
        x = m.evals[:1]
        fp, _, _ = profile(onnx.load(str(m.fp32_onnx)).SerializeToString(), x, args.runs, work, f"{m.name}_fp32")
        q, qnodes, n = profile(qm.SerializeToString(), x, args.runs, work, f"{m.name}_{args.schema}")
        print(f"\n### {m.name}, qmace {args.schema} ({kernels}), {n} profiled runs, one thread\n")
        print("\n".join(table(fp, q, args.top)))
        print("\nslowest quantized nodes:")
        for node, (op, us) in sorted(qnodes.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {op:24s} {us:8.0f} us  {node}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
