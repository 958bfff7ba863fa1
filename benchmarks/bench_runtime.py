#!/usr/bin/env python3
"""Runtime benchmark (issue 2): MobileNetV2 with its real ImageNet weights, in one run.

qmace `reference` backend vs qmace `onnxruntime` backend vs plain ONNX Runtime on the original ONNX file:
latency at batch 1 and 8 (median of interleaved runs, `--threads` threads and 1 thread), ratio to plain
ORT, and the logits' max |difference| and cosine vs plain ORT over the 233 evaluation stamps.

The graph goes through the public path: a MACE YAML with the file's real sha256 -> `qmace.api.convert`
into a temp build dir -> `qmace.modelfile.load_graph` -> `qmace.runtime.Session`. The YAML fixes the input
shape, so the model is converted twice, once per batch size (1 and 8); the source ONNX has a dynamic batch.
Finally `qmace run --config <yaml> --validate` runs as a subprocess (random inputs from input_ranges, and
8 real photos via --input_dir) and its exit code and cosine are shown.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_runtime.py [--threads 2] [--repeats 30]

The reference backend is numpy + OpenBLAS: its thread count is OpenBLAS's (all cores unless
OPENBLAS_NUM_THREADS is set before start), not `--threads`.
Targets: onnxruntime backend <= 1.05x plain ORT latency; cosine >= 0.9999.
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

from qmace.api import convert
from qmace.modelfile import load_graph
from qmace.runtime import Session


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved rounds per configuration")
    ap.add_argument("--ref-repeats", type=int, default=8, help="rounds for the (slow) reference backend")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    onnx_path = common.mobilenet_onnx(args.cache)
    x_eval, _ = common.stamp_images("eval", args.cache, args.data)
    tmp = Path(tempfile.mkdtemp(prefix="qmace_bench_rt_"))
    build = tmp / "build"

    graphs, yamls = {}, {}
    for b in (1, 8):
        yamls[b] = common.write_yaml(tmp, onnx_path, batch=b, name=f"mobilenet_b{b}")
        res = convert(yamls[b], build_dir=build)
        graphs[b] = load_graph(res.path)
    print(f"converted: {', '.join(str(p) for p in build.rglob('*.qmace'))}")
    print(f"graph: {graphs[1].op_counts()}")

    # ---- accuracy vs plain ORT over the 233 evaluation images (batch 1 models, 2 threads)
    plain = common.ort_session(onnx_path, args.threads)
    ref_logits = common.run_batched(lambda a: plain.run([common.OUTPUT], {common.INPUT: a})[0], x_eval)
    acc_rows = []
    for backend in ("onnxruntime", "reference"):
        s = Session(graphs[1], backend=backend, num_threads=args.threads)
        t0 = time.perf_counter()
        got = common.run_batched(lambda a, s=s: s.run({common.INPUT: a})[common.OUTPUT], x_eval)
        dt = time.perf_counter() - t0
        acc_rows.append([f"qmace {backend}", f"{float(np.abs(got - ref_logits).max()):.3g}",
                         f"{common.cosine(ref_logits, got):.9f}",
                         f"{100 * float(np.mean(got.argmax(1) == ref_logits.argmax(1))):.1f}%", f"{dt:.1f}"])

    # ---- latency
    thread_list = list(dict.fromkeys([args.threads, 1]))
    lat_rows = []
    rng = np.random.default_rng(0)
    for threads in thread_list:
        for b in (1, 8):
            xb = np.ascontiguousarray(x_eval[rng.choice(len(x_eval), b, replace=False)])
            p = common.ort_session(onnx_path, threads)
            q = Session(graphs[b], backend="onnxruntime", num_threads=threads)
            feeds = {common.INPUT: xb}
            fns = {
                "ort": lambda p=p, feeds=feeds: p.run([common.OUTPUT], feeds),
                "qmace_ort": lambda q=q, feeds=feeds: q.run(feeds),
            }
            med = common.interleaved_medians(fns, repeats=args.repeats, warmup=5)
            # Reference separately with fewer rounds (it is 10-50x slower), still median of interleaved.
            r = Session(graphs[b], backend="reference")
            med_ref = common.interleaved_medians(
                {"ref": lambda r=r, feeds=feeds: r.run(feeds), "ort": fns["ort"]},
                repeats=args.ref_repeats, warmup=1)
            lat_rows.append([threads, b, med["ort"], med["qmace_ort"], med["qmace_ort"] / med["ort"],
                             med_ref["ref"], med_ref["ref"] / med_ref["ort"]])
            print(f"  threads {threads} batch {b}: ort {med['ort']:.2f} ms, qmace ort {med['qmace_ort']:.2f} ms, "
                  f"reference {med_ref['ref']:.1f} ms", flush=True)

    # ---- the CLI: qmace run --validate (random inputs; then 8 real photos)
    in_dir = tmp / "inputs"
    in_dir.mkdir()
    for i in range(8):
        x_eval[i : i + 1].astype(np.float32).tofile(in_dir / f"input_{i:03d}")
    cli_rows = []
    for label, extra in (("random inputs from input_ranges", []), ("8 real photos (--input_dir)", ["--input_dir", str(in_dir)])):
        cmd = [sys.executable, "-m", "qmace", "run", "--config", str(yamls[1]), "--build_dir", str(build),
               "--validate", "--num_threads", str(args.threads), *extra]
        pr = subprocess.run(cmd, check=False, capture_output=True, text=True)
        cos = [float(m.group(1)) for m in re.finditer(r"^\s*\S+\s+output\s+([0-9.]+)\s", pr.stdout, re.MULTILINE)]
        cli_rows.append([label, pr.returncode, f"{min(cos):.6f}" if cos else "?",
                         "passed" if "validation passed" in pr.stdout else (pr.stdout + pr.stderr).strip().splitlines()[-1]])

    print()
    print(f"## Runtime benchmark: MobileNetV2 (real weights)\n\n{common.machine_note()}\n")
    print("Accuracy vs plain ONNX Runtime on the original ONNX, 233 evaluation stamps (batch 1):\n")
    print(common.md_table(["backend", "max abs diff (logits)", "cosine", "top-1 agreement", "time s"], acc_rows))
    print(f"\nLatency, ms per batch (median of interleaved runs; {args.repeats} rounds ORT/qmace-ORT, "
          f"{args.ref_repeats} rounds reference):\n")
    print(common.md_table(["threads", "batch", "plain ORT", "qmace onnxruntime", "ratio vs ORT",
                           "qmace reference", "ratio vs ORT"], lat_rows))
    print("\n`qmace run --config <yaml> --validate` (subprocess, batch-1 YAML):\n")
    print(common.md_table(["inputs", "exit code", "min cosine", "result"], cli_rows))
    worst = max(r[4] for r in lat_rows)
    cos_ok = all(float(r[2]) >= 0.9999 for r in acc_rows)
    print(f"\nTargets: qmace onnxruntime <= 1.05x plain ORT: worst ratio {worst:.3f} -> "
          f"{'MET' if worst <= 1.05 else 'MISSED'}; cosine >= 0.9999: {'MET' if cos_ok else 'MISSED'}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
