#!/usr/bin/env python3
"""Post-training quantization benchmark (issue 3): MobileNetV2 (real weights) on the real photo stamps.

In one run, calibrating on the 64 calibration stamps and evaluating on the 233 evaluation stamps:
- peers: ONNX Runtime `quantize_static` (QDQ, u8 activations, same calibration images): int8 weights with
  MinMax / Percentile x per_channel off / on, and uint8 weights (per-tensor MinMax, per-channel Percentile);
- qmace: every row is a `PTQRecipe` run by `run_ptq`, as `qmace quantize` does: schema (`int8`, `uint8`) x
  calibration method (`mace` P=0 and P=5, histogram `percentile` 99.95 and 99.99, `mse`), each with the
  default weight bias correction, plus AdaRound rows (`--adaround-iters`, default 400) for
  `--adaround-methods`; then "+equalization" rows for `--eq-methods` (a channel-maxima pass, the rescaled
  model, its calibration pass: `qmace quantize`'s default) with AdaRound rows for `--eq-adaround-methods`.
  Each row calibrates on its own (one pass over the 64 images, two with equalization) and runs on qmace's
  `onnxruntime` backend. (`entropy` and `percentile` 99.999 were dropped: never best, entropy slow; `--methods`
  can add them back.) An accuracy-only ablation shows the int8 rows without bias correction.
Per row: top-1 agreement with FP32 ORT, top-5 overlap, logits SQNR (all 233x1000 logits), labelled top-1 /
top-5, latency at batch 1 and 8 (median of interleaved rounds; `--threads` and 1 thread), speed-up vs FP32 ORT
and ratio to ORT's best-accuracy int8 model at batch 1; per recipe run under both schemas, `int8`'s top-1 agreement
minus `uint8`'s with a 95% paired bootstrap interval (issue 10 item 5). Then calibration peak memory at 100 vs 1000 samples
(the 64 images repeated; one fresh subprocess per run; peak RSS growth of calibration + bias correction /
AdaRound), and optionally (`--diagnose`) a diagnosis of where the int8 error comes from.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_ptq.py [--threads 2] [--repeats 40] [--repeats-b8 10] [--no-memory] [--diagnose]

Batch 8: the YAML fixes the input shape, so each quantized model is built twice (batch 1 and 8) from the
same range table: `run_ptq(..., variants=[batch-8 graph])` gives the batch-8 graph the batch-1 graph's refined
(equalized, bias-corrected, AdaRounded) constants; the run checks batch-8 logits equal batch-1 logits.
ORT's quantized models keep the source's dynamic batch.
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
from ptq_diagnose import diagnose
from ptq_memory import ADAROUND_TAG, ALL_METHODS, EQ_TAG, calib_memory_child, memory_runs, recipe_for, samples

from qmace.config import load_config
from qmace.pipeline import load_float_graph
from qmace.quantize.recipe import options_for, run_ptq
from qmace.runtime import Session

DEFAULT_METHODS = "mace P=0,mace P=5,percentile 99.95,percentile 99.99,mse"
DEFAULT_ADAROUND = "percentile 99.95"
DEFAULT_EQ = "percentile 99.95,percentile 99.99,mse"
DEFAULT_EQ_ADAROUND = "percentile 99.95"


# ------------------------------------------------------------------------------------------ ORT peers


class _Reader:
    def __init__(self, x: np.ndarray):
        self.x, self.i = x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {common.INPUT: self.x[self.i - 1][None]}

    def rewind(self):
        self.i = 0


ORT_PEERS = [  # label, weight type, per_channel, method
    ("ORT int8 w, per-channel, MinMax", "int8", True, "MinMax"),
    ("ORT int8 w, per-channel, Percentile", "int8", True, "Percentile"),
    ("ORT int8 w, per-tensor, MinMax", "int8", False, "MinMax"),
    ("ORT int8 w, per-tensor, Percentile", "int8", False, "Percentile"),
    ("ORT uint8 w, per-tensor, MinMax", "uint8", False, "MinMax"),
    ("ORT uint8 w, per-channel, Percentile", "uint8", True, "Percentile"),
]


def ort_quantize(src: Path, dst: Path, xc: np.ndarray, wtype: str, per_channel: bool, method: str,
                 reduce_range: bool = False) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), _Reader(xc), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8 if wtype == "int8" else QuantType.QUInt8,
        calibrate_method=getattr(CalibrationMethod, method), reduce_range=reduce_range,
    )
    return dst


# ------------------------------------------------------------------------------------------------ rows


def _labels(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def recipe_rows(args) -> list[tuple[str, str, str, bool]]:
    """The qmace rows in table order: (row label, recipe label, schema, bias correction). Per schema: the
    methods, their AdaRound rows, the equalized methods, their AdaRound rows; the int8 rows without bias
    correction (the ablation) come last."""
    rows, ablation = [], []
    for schema in ("int8", "uint8"):
        keys = ([*_labels(args.methods)] + [k + ADAROUND_TAG for k in _labels(args.adaround_methods)]
                + [k + EQ_TAG for k in _labels(args.eq_methods)]
                + [k + EQ_TAG + ADAROUND_TAG for k in _labels(args.eq_adaround_methods)])
        rows += [(f"qmace {schema}, {k}", k, schema, True) for k in keys]
        if schema == "int8":
            ablation += [(f"qmace {schema}, {k}, no bias correction", k, schema, False) for k in _labels(args.methods)]
    return rows + ablation


def qmace_rows(args, g1, g8, m1, m8, xc, xe, T) -> tuple[list[dict], list[dict], dict]:
    """Every qmace row by ``run_ptq`` (batch 1, with the batch-8 build as a variant), evaluated on ``xe``.

    Returns:
        The table rows, the ablation rows, and (schema, recipe label) -> PTQResult.
    """
    rows, ablation, results = [], [], {}
    opts1, opts8 = options_for(m1), options_for(m8)
    for label, key, schema, bc in recipe_rows(args):
        t1 = time.perf_counter()
        recipe = recipe_for(key, schema, bias_correction=bc, adaround_iters=args.adaround_iters)
        res = run_ptq(g1, lambda: samples(xc), recipe, opts1, num_threads=T, variants=[(g8, opts8)])
        qg1, qg8 = res.graph, res.variants[0]
        s = Session(qg1, backend="onnxruntime", num_threads=T)
        lg = common.run_batched(lambda a, s=s: s.run({common.INPUT: a})[common.OUTPUT], xe)
        s8 = Session(qg8, backend="onnxruntime", num_threads=T)
        d8 = float(np.max(np.abs(s8.run({common.INPUT: np.ascontiguousarray(xe[:8])})[common.OUTPUT] - lg[:8])))
        if d8 > 1e-3:
            print(f"  WARNING {label}: batch-8 model differs from batch-1 model by {d8:g}", flush=True)
        row = {"label": label, "kind": "qmace", "schema": schema, "b1": qg1, "b8": qg8, "fallbacks": len(res.fallbacks),
               "logits": lg, "latency": bc, "b8diff": d8}
        (rows if bc else ablation).append(row)
        if bc:
            results[(schema, key)] = res
        print(f"  {label}: {res.equalized_tensors} tensors equalized, {res.corrected_layers} layers corrected, "
              f"{time.perf_counter() - t1:.0f} s", flush=True)
    return rows, ablation, results


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None):
    """The command line (the memory child's hidden flags included)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40, help="interleaved latency rounds at batch 1")
    ap.add_argument("--repeats-b8", type=int, default=10, help="interleaved latency rounds at batch 8")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated labels of ALL_METHODS")
    ap.add_argument("--adaround-methods", default=DEFAULT_ADAROUND, help="methods that also get AdaRound rows")
    ap.add_argument("--adaround-iters", type=int, default=400)
    ap.add_argument("--eq-methods", default=DEFAULT_EQ, help="methods that also get rows on the equalized model")
    ap.add_argument("--eq-adaround-methods", default=DEFAULT_EQ_ADAROUND,
                    help="methods that also get equalized + AdaRound rows")
    ap.add_argument("--mem-samples", default="100,1000")
    ap.add_argument("--mem-methods", default="mace P=0,percentile 99.95 +equalization",
                    help=f"labels; suffix '{EQ_TAG}' for equalization, then '{ADAROUND_TAG}' for AdaRound")
    ap.add_argument("--mem-adaround-samples", default="100,1000",
                    help="sample counts for the AdaRound memory rows (its statistics cost ~1 s per sample)")
    ap.add_argument("--mem-parallel", type=int, default=2, help="memory child processes at once")
    ap.add_argument("--mem-adaround-iters", type=int, default=50,
                    help="AdaRound iterations in the memory runs (its state does not grow with iterations)")
    ap.add_argument("--diag-images", type=int, default=4, help="images for the reference-backend per-layer SQNR")
    ap.add_argument("--diag-method", default="mse")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="also run the int8 error diagnosis (slow)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the calibration-memory runs")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--_mem-child", dest="_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_images", help=argparse.SUPPRESS)
    ap.add_argument("--_yaml", help=argparse.SUPPRESS)
    ap.add_argument("--_method", help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def latency(args, rows: list[dict], xe: np.ndarray, times: dict) -> None:
    """Median latency of every row's models, all interleaved, per (threads, batch); stored in the rows."""
    T = args.threads
    thread_list = list(dict.fromkeys([T, 1]))
    lat_rows = [r for r in rows if r.get("latency", True)]
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for threads in thread_list:
        for b in (1, 8):
            t1 = time.perf_counter()
            feeds = {common.INPUT: np.ascontiguousarray(xe[rng.choice(len(xe), b, replace=False)])}
            fns = {}
            for i, r in enumerate(lat_rows):
                src = r[f"b{b}"]
                if isinstance(src, Path):
                    s = common.ort_session(src, threads)
                    fns[i] = lambda s=s, feeds=feeds: s.run([common.OUTPUT], feeds)
                else:
                    s = Session(src, backend="onnxruntime", num_threads=threads)
                    fns[i] = lambda s=s, feeds=feeds: s.run(feeds)
            reps = args.repeats if b == 1 else args.repeats_b8
            med = common.interleaved_medians(fns, repeats=reps, warmup=3)
            for i, r in enumerate(lat_rows):
                r[f"t{threads}b{b}"] = med[i]
            del fns
            print(f"  latency threads {threads} batch {b}: {reps} rounds, {time.perf_counter() - t1:.0f} s",
                  flush=True)
    times["latency"] = time.perf_counter() - t0


def report(args, rows: list[dict], ablation: list[dict], labels) -> list[str]:
    """The accuracy/latency table, the bias-correction ablation and the int8 targets (also printed)."""
    T = args.threads
    thread_list = list(dict.fromkeys([T, 1]))
    out: list[str] = []
    fp = rows[0]
    ort_best = next(r for r in rows if r["label"] == "ORT int8 w, per-channel, Percentile")
    headers = ["model", "top-1 agree %", "top-5 overlap %", "SQNR dB", "labelled top-1 %", "labelled top-5 %"]
    for threads in thread_list:
        headers += [f"b1 ms {threads}t", f"b8 ms {threads}t"]
    headers += [f"speed-up vs FP32 b1 {T}t", "speed-up vs FP32 b1 1t", f"time / ORT pc-Percentile b1 {T}t",
                "time / ORT pc-Percentile b1 1t"]
    table_rows = []
    for r in rows:
        m = r["m"]
        row = [r["label"], m["agree"], m["top5_overlap"], m["sqnr"] if r["kind"] != "fp32" else float("nan"),
               m["top1"], m["top5"]]
        for threads in thread_list:
            row += [r.get(f"t{threads}b1", float("nan")), r.get(f"t{threads}b8", float("nan"))]
        row += [fp.get(f"t{T}b1", np.nan) / r.get(f"t{T}b1", np.nan), fp.get("t1b1", np.nan) / r.get("t1b1", np.nan),
                r.get(f"t{T}b1", np.nan) / ort_best.get(f"t{T}b1", np.nan),
                r.get("t1b1", np.nan) / ort_best.get("t1b1", np.nan)]
        table_rows.append(row)
    out.append(f"233 evaluation stamps ({len(labels)} labelled); calibration on the 64; latency = median of "
               f"{args.repeats} (batch 1) / {args.repeats_b8} (batch 8) interleaved rounds, ms per batch.\n")
    out.append(common.md_table(headers, table_rows))
    out += ["", "Bias-correction ablation (int8 schema, accuracy only):", "",
            common.md_table(["model", "top-1 agree %", "top-5 overlap %", "SQNR dB", "labelled top-1 %"],
                            [[r["label"], r["m"]["agree"], r["m"]["top5_overlap"], r["m"]["sqnr"], r["m"]["top1"]]
                             for r in ablation])]
    print("\n".join(out[-6:]), flush=True)

    # ---- targets
    ort_q = [r for r in rows if r["kind"] == "ort" and "int8 w" in r["label"]]
    tl = ["", "### Targets (int8 schema)", ""]
    for r in rows:
        if r.get("schema") != "int8":
            continue
        m = r["m"]
        lat, lat1 = r.get(f"t{T}b1", np.nan), r.get("t1b1", np.nan)
        fastest = min(q.get(f"t{T}b1", np.inf) for q in ort_q)
        sp, sp1 = fp.get(f"t{T}b1", np.nan) / lat, fp.get("t1b1", np.nan) / lat1
        tl.append(f"- {r['label']}: agreement {m['agree']:.1f}% ({'ok' if m['agree'] >= 90 else 'MISS'} >= 90), "
                  f"SQNR {m['sqnr']:.1f} dB ({'ok' if m['sqnr'] >= 15 else 'MISS'} >= 15), "
                  f"b1 {T}t {lat:.2f} ms vs ORT pc-Percentile {ort_best.get(f't{T}b1', np.nan):.2f} / fastest ORT "
                  f"int8-w {fastest:.2f} ms, speed-up vs FP32 {sp:.2f}x {T}t / {sp1:.2f}x 1t "
                  f"({'ok' if min(sp, sp1) >= 1.8 else 'MISS'} >= 1.8)")
    out += tl
    print("\n".join(tl), flush=True)
    out += schema_gaps(rows)
    return out


def schema_gaps(rows: list[dict]) -> list[str]:
    """Issue 10 item 5: per recipe, `int8`'s top-1 agreement minus `uint8`'s on the same images (target <= 5
    points) with its 95% paired bootstrap interval (``common.agreement_gap``), so that a miss or a pass can be
    told apart from the flips of a few borderline images."""
    ref = rows[0]["logits"]
    by = {(r["schema"], r["label"].split(", ", 1)[1]): r for r in rows if r["kind"] == "qmace"}
    gl = ["", "### uint8 vs int8 top-1 agreement (issue 10 item 5: gap <= 5 points)", ""]
    for (schema, key), r8 in by.items():
        ru = by.get(("uint8", key))
        if schema != "int8" or ru is None:
            continue
        g = common.agreement_gap(ref, r8["logits"], ru["logits"])
        gl.append(f"- {key}: int8 - uint8 = {g['gap']:.2f} points (95% paired bootstrap {g['lo']:.2f} .. "
                  f"{g['hi']:.2f}; {g['only_a']} images agree only under int8, {g['only_b']} only under uint8) "
                  f"({'ok' if g['gap'] <= 5 else 'MISS'} <= 5)")
    print("\n".join(gl), flush=True)
    return gl


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        return calib_memory_child(args)

    import logging

    logging.getLogger("qmace").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    T = args.threads
    out: list[str] = [f"## PTQ benchmark: MobileNetV2 (real weights), Tux Paint stamps\n\n{common.machine_note()}\n",
                      "Command: `python benchmarks/bench_ptq.py " + " ".join(sys.argv[1:]) + "`\n"]

    onnx_path = common.mobilenet_onnx(args.cache)
    xc, _ = common.stamp_images("calib", args.cache, args.data)
    xe, pe = common.stamp_images("eval", args.cache, args.data)
    labels = common.labels_for(pe, args.data)
    tmp = Path(tempfile.mkdtemp(prefix="qmace_bench_ptq_"))
    yaml1 = common.write_yaml(tmp, onnx_path, batch=1)
    if args.memory_only:
        out += memory_runs(args, xc, tmp, yaml1, T, times)
        times["total"] = time.perf_counter() - t_start
        print("\n".join(out + ["", "Run times: " + "; ".join(f"{k} {v:.0f} s" for k, v in times.items())]))
        return 0
    yaml8 = common.write_yaml(tmp, onnx_path, batch=8)
    m1, m8 = load_config(yaml1).model(), load_config(yaml8).model()
    g1, g8 = load_float_graph(m1), load_float_graph(m8)

    fp32 = common.ort_session(onnx_path, T)
    ref = common.run_batched(lambda a: fp32.run([common.OUTPUT], {common.INPUT: a})[0], xe)

    rows: list[dict] = [{"label": "FP32 ONNX Runtime", "kind": "fp32", "b1": onnx_path, "b8": onnx_path,
                         "logits": ref}]

    # ---- ORT peers
    t0 = time.perf_counter()
    for label, wtype, pc, method in ORT_PEERS:
        dst = ort_quantize(onnx_path, tmp / f"ort_{wtype}_{int(pc)}_{method}.onnx", xc, wtype, pc, method)
        s = common.ort_session(dst, T)
        rows.append({"label": label, "kind": "ort", "b1": dst, "b8": dst,
                     "logits": common.run_batched(lambda a, s=s: s.run([common.OUTPUT], {common.INPUT: a})[0], xe)})
        print(f"  {label}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    times[f"ORT quantize_static x{len(ORT_PEERS)} + eval"] = time.perf_counter() - t0

    # ---- qmace: one run_ptq per row
    t0 = time.perf_counter()
    q_rows, ablation, results = qmace_rows(args, g1, g8, m1, m8, xc, xe, T)
    rows += q_rows
    times[f"qmace run_ptq + eval, {len(q_rows) + len(ablation)} rows"] = time.perf_counter() - t0
    for r in rows + ablation:
        r["m"] = common.logits_metrics(ref, r["logits"], labels)

    if not args.no_latency:
        latency(args, rows, xe, times)
    out += report(args, rows, ablation, labels)

    # ---- calibration memory, fresh subprocess per run
    if not args.no_memory:
        try:
            out += memory_runs(args, xc, tmp, yaml1, T, times)
        except Exception:  # keep the measured tables
            import traceback

            traceback.print_exc()

    # ---- diagnosis
    if args.diagnose:
        t0 = time.perf_counter()
        tables = {key: res.ranges for (schema, key), res in results.items() if schema == "int8"}
        qgraphs = {k: res.graph for k, res in results.items()}
        gbc = next(res.float_graph for (schema, key), res in results.items() if schema == "int8" and key in ALL_METHODS)
        out += diagnose(args, g1, gbc, m1, tables, qgraphs, xe, ref, labels, T)
        times["diagnosis"] = time.perf_counter() - t0

    times["total"] = time.perf_counter() - t_start
    out += ["", "Run times: " + "; ".join(f"{k} {v:.0f} s" for k, v in times.items())]
    print("\n\n# ===== full report =====\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
