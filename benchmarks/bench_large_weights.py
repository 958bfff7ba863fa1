#!/usr/bin/env python3
"""`quantize_large_weights` benchmark (issue 15): MobileNetV2 (real weights), 233 evaluation stamps.

Weight-only 8-bit storage, inference in float. Rows, side by side in one run, each on qmace's onnxruntime
backend against the FP32 graph on the same backend:
- "qmace before": every Conv/ConvTranspose/Gemm/MatMul weight per-tensor uint8, depthwise included (the rule
  qmace had before issue 15; emulated here, since the product no longer offers it);
- MACE's rule: only weights read by one non-depthwise Conv / Gemm / MatMul, per-tensor uint8 (MACE's storage),
  no size limit (MACE has none) and with qmace's 1024-element minimum;
- the same op set with per-channel symmetric int8 storage (the int8 schema's weight rule), with minimum sizes
  0, 1024 (the default) and 4096;
- per-channel int8 on every weight, depthwise included (emulated; to show what MACE's rule leaves out).
Per row: per-image logits cosine vs FP32 (mean, min), SQNR over all 233x1000 logits, top-1 agreement,
labelled top-1, share of photos at or above the `run --validate` threshold for weight-only models
(`validation_threshold` QUANTIZE, 0.980 by default, as MACE), weights stored 8-bit, model file size vs the
float model file. Then `qmace convert` + `qmace run --validate` (subprocess, the YAML's defaults, 8 photos).

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_large_weights.py [--threads 1]

Done when (issue 15): the default gives mean cosine >= 0.995, top-1 agreement >= 95%, file <= 0.3x float.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from qmace import qmath
from qmace.api import load_float_graph
from qmace.config import load_config
from qmace.ir import Graph, Node, Tensor
from qmace.metrics import compare
from qmace.modelfile import save_graph
from qmace.ops import get_op
from qmace.quantize.weight_only import MIN_ELEMENTS, quantize_large_weights
from qmace.runtime import Session

BATCH = 8


def every_weight(graph: Graph, schema: str) -> Graph:
    """Emulation of a rule without exceptions: every constant weight (input 1) of Conv (depthwise included),
    ConvTranspose, Gemm and MatMul stored with ``weight_params(schema)``, dequantized by a DequantizeLinear.
    With ``uint8`` this is what qmace did before issue 15."""
    g = graph.copy()
    for node in list(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        name = node.inputs[1]
        t = g.tensors.get(name)
        if t is None or t.data is None:
            continue
        w = t.data.astype(np.float32)
        qp = get_op(node.op_type).weight_params(node, 1, w, schema)
        qname, fname = g.unique_name(f"{name}__quant"), g.unique_name(f"{name}__dequant")
        g.add_tensor(Tensor(qname, qp.dtype, tuple(w.shape), qmath.quantize(w, qp), qp))
        g.add_tensor(Tensor(fname, "float32", tuple(w.shape)))
        g.nodes.insert(g.nodes.index(node), Node(g.unique_name(f"{name}__DQ"), "DequantizeLinear", [qname], [fname]))
        node.inputs[1] = fname
    g.remove_unused()
    g.metadata["quantization"] = {"schema": "large_weights"}
    return g


def stored_8bit(graph: Graph) -> tuple[int, int]:
    """(number of 8-bit weight tensors, their element count)."""
    ts = [t for t in graph.tensors.values() if t.data is not None and t.dtype in ("uint8", "int8")]
    return len(ts), int(sum(t.data.size for t in ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.perf_counter()
    onnx_path = common.mobilenet_onnx()
    x_eval, paths = common.stamp_images("eval")
    labels = common.labels_for(paths)
    with tempfile.TemporaryDirectory(prefix="qmace_lw_") as d:
        return bench(Path(d), args.threads, x_eval, labels, onnx_path, t_start)


def bench(tmp: Path, threads: int, x_eval: np.ndarray, labels: dict, onnx_path: Path, t_start: float) -> int:
    yaml = common.write_yaml(tmp, onnx_path, batch=BATCH)
    m = load_config(yaml).model()
    threshold = m.threshold_for(True)
    g = load_float_graph(m)
    n_params = g.num_parameters()

    variants: dict[str, Graph] = {
        "FP32": g,
        "qmace before (all per-tensor uint8, depthwise too)": every_weight(g, "uint8"),
        "MACE's rule, per-tensor uint8, no minimum": quantize_large_weights(g, "uint8", 0),
        f"MACE's rule, per-tensor uint8, min {MIN_ELEMENTS}": quantize_large_weights(g, "uint8", MIN_ELEMENTS),
        "MACE's op set, per-channel int8, no minimum": quantize_large_weights(g, "int8", 0),
        f"MACE's op set, per-channel int8, min {MIN_ELEMENTS} (default)": quantize_large_weights(g),
        "MACE's op set, per-channel int8, min 4096": quantize_large_weights(g, "int8", 4096),
        "per-channel int8 on every weight (depthwise too)": every_weight(g, "int8"),
    }
    rows, results = [], {}
    ref = None
    for label, vg in variants.items():
        path = save_graph(vg, tmp / f"v{len(results)}.qmace")
        size = path.stat().st_size
        s = Session(vg, backend="onnxruntime", num_threads=threads)
        logits = common.run_batched(lambda b, s=s: s.run({common.INPUT: b})[common.OUTPUT], x_eval, BATCH)
        if ref is None:
            ref, f_size = logits, size
        cos = np.array([compare(ref[i], logits[i]).cosine for i in range(len(ref))])
        met = common.logits_metrics(ref, logits, labels)
        n8, e8 = stored_8bit(vg)
        results[label] = (float(cos.mean()), met["agree"], size / f_size)
        rows.append([label, f"{cos.mean():.4f}", f"{cos.min():.4f}", f"{met['sqnr']:.1f}", f"{met['agree']:.1f}%",
                     f"{met['top1']:.1f}%", f"{100 * np.mean(cos >= threshold):.0f}%",
                     f"{n8} ({100 * e8 / n_params:.1f}%)", f"{size / 1e6:.2f} MB", f"{size / f_size:.3f}"])
        print(f"  {label}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- the public path: qmace convert + qmace run --validate with the YAML's defaults (8 photos)
    yaml1 = common.write_yaml(tmp, onnx_path, batch=1, filename="lw_b1.yml")
    with open(yaml1, "a") as f:
        f.write("    quantize_large_weights: 1\n")
    build = tmp / "build"
    conv = subprocess.run([sys.executable, "-m", "qmace", "convert", "--config", str(yaml1), "--build_dir", str(build)],
                          check=False, capture_output=True, text=True)
    in_dir = tmp / "inputs"
    in_dir.mkdir()
    for i in range(8):
        x_eval[i : i + 1].astype(np.float32).tofile(in_dir / f"input_{i:03d}")
    val = subprocess.run([sys.executable, "-m", "qmace", "run", "--config", str(yaml1), "--build_dir", str(build),
                          "--validate", "--num_threads", str(threads), "--input_dir", str(in_dir)],
                         check=False, capture_output=True, text=True)
    cli_cos = [float(mm.group(1)) for mm in re.finditer(r"^\s*\S+\s+output\s+([0-9.]+)\s", val.stdout, re.MULTILINE)]

    print(f"\n## quantize_large_weights: MobileNetV2 (real weights)\n\n{common.machine_note()}; "
          f"{threads} thread(s), batch {BATCH}, {len(x_eval)} evaluation stamps ({len(labels)} labelled)\n")
    print(common.md_table(["weights", "mean cos", "min cos", "SQNR dB", "top-1 agr.", "labelled top-1",
                           f"photos >= {threshold}", "8-bit tensors (share of params)", "file", "vs float"], rows))
    print(f"\n`qmace convert` (YAML: quantize_large_weights: 1, defaults), exit {conv.returncode}:\n")
    print("\n".join("    " + ln for ln in (conv.stdout + conv.stderr).strip().splitlines()))
    print(f"\n`qmace run --validate --input_dir` (8 photos): exit {val.returncode}, "
          f"min cosine {min(cli_cos) if cli_cos else float('nan'):.6f}, "
          f"{'passed' if 'validation passed' in val.stdout else (val.stdout + val.stderr).strip().splitlines()[-1:]}")
    mean_cos, agree, ratio = results[f"MACE's op set, per-channel int8, min {MIN_ELEMENTS} (default)"]
    ok = mean_cos >= 0.995 and agree >= 95.0 and ratio <= 0.3
    print(f"\nDone when (default): mean cos {mean_cos:.4f} >= 0.995, top-1 agreement {agree:.1f}% >= 95%, "
          f"file {ratio:.3f}x <= 0.3x float -> {'MET' if ok else 'MISSED'}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
