#!/usr/bin/env python3
"""Post-training quantization benchmark (issue 3): MobileNetV2 (real weights) on the real photo stamps.

In one run, calibrating on the 64 calibration stamps and evaluating on the 233 evaluation stamps:
- peers: ONNX Runtime `quantize_static` (QDQ, u8 activations, same calibration images): int8 weights with
  MinMax / Percentile x per_channel off / on, and uint8 weights (per-tensor MinMax, per-channel Percentile);
- qmace, the same steps as `qmace quantize`: schema (`int8`, `uint8`) x calibration method (`mace` P=0 and
  P=5, histogram `percentile` 99.95 and 99.99, `mse`), each with the default weight bias correction
  (`ChannelMeans` + `correct_biases`), plus AdaRound rows (`InputStatistics` + `adaround`, `--adaround-iters`,
  default 400) for `--adaround-methods`; then "+equalization" rows for `--eq-methods` (the channel maxima of
  the same first pass -> `equalize_activations` -> a second calibration pass on the rescaled model, as
  `qmace quantize` does by default) with AdaRound rows for `--eq-adaround-methods`. One streamed `calibrate`
  pass over the 64 images feeds every calibrator and the observers; then `correct_biases` / `adaround` per
  schema and `quantize_for_config` per row, run on qmace's `onnxruntime` backend. (`entropy` and `percentile`
  99.999 were dropped: never best, entropy slow; `--methods` can add them back.) An accuracy-only ablation
  shows the int8 rows without bias correction.
Per row: top-1 agreement with FP32 ORT, top-5 overlap, logits SQNR (all 233x1000 logits), labelled top-1 /
top-5, latency at batch 1 and 8 (median of interleaved rounds; `--threads` and 1 thread), speed-up vs FP32 ORT
and ratio to ORT's best-accuracy int8 model at batch 1. Then calibration peak memory at 100 vs 1000 samples
(the 64 images repeated; one fresh subprocess per run; peak RSS growth of calibration + bias correction /
AdaRound), and optionally (`--diagnose`) a diagnosis of where the int8 error comes from.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/bench_ptq.py [--threads 2] [--repeats 40] [--repeats-b8 10] [--no-memory] [--diagnose]

Batch 8: the YAML fixes the input shape, so each quantized model is built twice (batch 1 and 8) from the
same range table; the batch-8 AdaRound graph takes the batch-1 graph's rounded weights and corrected biases
(AdaRound is deterministic and batch-independent; the run checks batch-8 logits equal batch-1 logits).
ORT's quantized models keep the source's dynamic batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from qmace.api import load_float_graph
from qmace.config import load_config
from qmace.data import Sample
from qmace.quantize.adaround import InputStatistics, adaround
from qmace.quantize.bias_correction import ChannelMeans, correct_biases
from qmace.quantize.calibration import make_calibrator
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.ranges import Range
from qmace.quantize.recipe import calibrate, equalize_on, quantize_for_config
from qmace.runtime import Session

ALL_METHODS = {  # label -> (method, options)
    "mace P=0": ("mace", {"percentile": 0.0}),
    "mace P=5": ("mace", {"percentile": 5.0}),
    "percentile 99.95": ("percentile", {"percentile": 99.95}),
    "percentile 99.99": ("percentile", {"percentile": 99.99}),
    "percentile 99.999": ("percentile", {"percentile": 99.999}),
    "entropy": ("entropy", {}),
    "mse": ("mse", {}),
}
DEFAULT_METHODS = "mace P=0,mace P=5,percentile 99.95,percentile 99.99,mse"
DEFAULT_ADAROUND = "percentile 99.95"
DEFAULT_EQ = "percentile 99.95,percentile 99.99,mse"
DEFAULT_EQ_ADAROUND = "percentile 99.95"
EQ_TAG = " +equalization"
ADAROUND_TAG = " +AdaRound"


def transplant(src, dst):
    """A copy of `dst` (same model, other batch) with the weights/biases `src`'s nodes now read (AdaRound's
    rounded weights and corrected biases are batch-independent constants)."""
    g = dst.copy()
    by_name = {n.name: n for n in src.nodes}
    for n in g.nodes:
        o = by_name[n.name]
        for i, name in enumerate(o.inputs):
            if name and src.constant(name) is not None and (i >= len(n.inputs) or n.inputs[i] != name):
                g.add_tensor(src.tensors[name])
                while len(n.inputs) <= i:
                    n.inputs.append("")
                n.inputs[i] = name
        n.attrs = dict(o.attrs)
    g.remove_unused()
    return g


class FanOut:
    """Feeds every observed tensor to several calibrators: one calibration pass for all methods."""

    def __init__(self, calibrators: dict):
        self.calibrators = calibrators

    def observe(self, name: str, values: np.ndarray) -> None:
        for c in self.calibrators.values():
            c.observe(name, values)


def samples(x: np.ndarray, n: int | None = None):
    """`n` single-image samples cycling through `x` (all of `x` once when n is None)."""
    n = len(x) if n is None else n
    for i in range(n):
        yield Sample(f"_{i}", {common.INPUT: x[i % len(x)][None]})


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


# --------------------------------------------------------------------------------------- memory child


def calib_memory_child(args) -> int:
    """Child mode: the steps of `qmace quantize` for `--_n` samples with `--_method` (for a `... +equalization`
    label first the channel-maxima pass and `equalize_activations`; calibration with bias correction's channel
    means, or with AdaRound's input statistics for a `... +AdaRound` label; then `ranges()` and
    `correct_biases` / `adaround`); print peak RSS growth as JSON."""
    xc = np.load(args._images)
    m = load_config(args._yaml).model()
    g = load_float_graph(m)
    label = args._method
    ar = label.endswith(ADAROUND_TAG)
    label = label[: -len(ADAROUND_TAG)] if ar else label
    eq = label.endswith(EQ_TAG)
    method, opts = ALL_METHODS[label[: -len(EQ_TAG)] if eq else label]
    cal = make_calibrator(method, **opts)
    peak_load = common.peak_rss_mb()  # loading the model and images
    reset = common.reset_peak_rss()
    before = common.current_rss_mb()
    t0 = time.perf_counter()
    if eq:  # the equalization statistics pass, then the rescaled model, as `qmace quantize` does
        g, _ = equalize_on(g, samples(xc, args._n), args.threads)
    obs = InputStatistics(g) if ar else ChannelMeans(g)
    n = calibrate(g, samples(xc, args._n), cal, num_threads=args.threads, observers=[obs])
    table = cal.ranges()
    t_cal = time.perf_counter() - t0
    if ar:
        adaround(g, obs, "int8", iters=args.adaround_iters)
    else:
        correct_biases(g, obs, "int8")
    dt = time.perf_counter() - t0
    peak = common.peak_rss_mb()  # VmHWM: this process only (ru_maxrss would include the forking parent's)
    if not reset:
        peak = max(peak, peak_load)
    print(json.dumps({"n": n, "tensors": len(table), "rss_before": before, "peak_load": peak_load,
                      "peak_reset": reset, "peak": max(peak, peak_load), "growth": peak - before, "seconds": dt,
                      "calib_seconds": t_cal}))
    return 0


# ------------------------------------------------------------------------------------------- diagnosis


def tensor_kinds(g) -> dict[str, str]:
    """Activation tensor -> its role in MobileNetV2 (stem, expand, dw, project, add, head, pool, logits)."""
    kinds = {common.INPUT: "input"}
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    for n in g.nodes:
        o = n.outputs[0]
        if n.op_type == "Conv":
            if n is convs[0]:
                kinds[o] = "stem"
            elif n is convs[-1]:
                kinds[o] = "head 1x1"
            elif int(n.attrs.get("group", 1)) > 1:
                kinds[o] = "depthwise"
            elif n.attrs.get("qm_activation"):
                kinds[o] = "expand 1x1"
            else:
                kinds[o] = "project 1x1"
        elif n.op_type == "Add":
            kinds[o] = "residual add"
        elif n.op_type == "Gemm":
            kinds[o] = "logits (gemm)"
        else:
            kinds[o] = n.op_type.lower()
    return kinds


def per_layer_reference(g_float, qg, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Cumulative SQNR of every quantized activation on the reference backend: dequantized codes of the
    integer graph vs the float graph's tensor of the same name. name -> (SQNR dB, max|float|)."""
    from qmace.qmath import dequantize
    from qmace.runtime import reference

    sig: dict[str, float] = {}
    noise: dict[str, float] = {}
    amax: dict[str, float] = {}
    rename = {"output__quant": common.OUTPUT}
    for i in range(len(x)):
        feeds = {common.INPUT: x[i : i + 1]}
        f = reference.execute(g_float, feeds, keep_all=True)
        q = reference.execute(qg, feeds, keep_all=True)
        for name, v in q.items():
            t = qg.tensors[name]
            fname = rename.get(name, name)
            if not t.is_quantized or fname not in f or f[fname].shape != v.shape:
                continue
            ref = f[fname].astype(np.float64)
            d = dequantize(v, t.quant).astype(np.float64)
            sig[fname] = sig.get(fname, 0.0) + float(np.sum(ref**2))
            noise[fname] = noise.get(fname, 0.0) + float(np.sum((ref - d) ** 2))
            amax[fname] = max(amax.get(fname, 0.0), float(np.abs(ref).max()))
    return {k: (10 * np.log10(sig[k] / noise[k]) if noise[k] > 0 else float("inf"), amax[k]) for k in sig}


class QDQSurgery:
    """The lowered QDQ model of a qmace-quantized graph, with chosen quantizations bypassed.

    Activation T: lowered as QuantizeLinear(X) -> T -> DequantizeLinear -> D; bypass = D := Identity(X).
    Weight/bias W (initializer `<w>__quant`): DequantizeLinear -> D; bypass = D := Identity(float `<w>`).
    """

    def __init__(self, qg, g_float):
        from qmace.onnx_bridge import to_onnx

        self.model = to_onnx(qg)
        self.g_float = g_float
        nodes = self.model.graph.node
        q_by_out = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear"}
        inits = {t.name for t in self.model.graph.initializer}
        self.act: dict[str, tuple[int, str]] = {}  # float tensor name -> (DQ node index, Q input)
        self.weights: dict[str, list[tuple[int, str]]] = {}  # consumer float output -> [(DQ idx, float w)]
        consumer_out = {}
        for n in nodes:
            for i in n.input:
                consumer_out.setdefault(i, n.output[0])
        for idx, n in enumerate(nodes):
            if n.op_type != "DequantizeLinear":
                continue
            src = n.input[0]
            if src in q_by_out:
                name = src.removesuffix("__quant")
                name = {"input": common.INPUT}.get(name, name)
                if src == "output__quant":
                    name = common.OUTPUT
                self.act.setdefault(name, (idx, q_by_out[src].input[0]))
            elif src in inits and src.endswith("__quant"):
                fw = src[: -len("__quant")]
                if fw in g_float.tensors and g_float.tensors[fw].data is not None:
                    out = consumer_out.get(n.output[0], "?")
                    self.weights.setdefault(out, []).append((idx, fw))

    def build(self, keep_acts: set[str] | None = None, keep_weights: bool = True, drop_acts: set[str] = frozenset()):
        """A model with activations outside `keep_acts` (None: all kept) or in `drop_acts` in float, and
        all weights in float unless `keep_weights`."""
        import onnx
        from onnx import helper, numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        nodes = m.graph.node
        for name, (idx, x) in self.act.items():
            if (keep_acts is not None and name not in keep_acts) or name in drop_acts:
                nodes[idx].CopyFrom(helper.make_node("Identity", [x], [nodes[idx].output[0]]))
        if not keep_weights:
            for lst in self.weights.values():
                for idx, fw in lst:
                    fname = f"{fw}__float"
                    m.graph.initializer.append(numpy_helper.from_array(
                        np.ascontiguousarray(self.g_float.tensors[fw].data.astype(np.float32)), fname))
                    nodes[idx].CopyFrom(helper.make_node("Identity", [fname], [nodes[idx].output[0]]))
        return m.SerializeToString()


def logits_of(model_bytes: bytes, x: np.ndarray, threads: int) -> np.ndarray:
    s = common.ort_session(model_bytes, threads)
    return common.run_batched(lambda a: s.run([common.OUTPUT], {common.INPUT: a})[0], x)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)
    if args._child:
        return calib_memory_child(args)

    import logging

    logging.getLogger("qmace").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    T = args.threads
    methods = {k: ALL_METHODS[k] for k in [v.strip() for v in args.methods.split(",") if v.strip()]}
    ar_methods = [v.strip() for v in args.adaround_methods.split(",") if v.strip()]
    eq_methods = [v.strip() for v in args.eq_methods.split(",") if v.strip()]
    eq_ar_methods = [v.strip() for v in args.eq_adaround_methods.split(",") if v.strip()]
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

    # ---- qmace: one streamed calibration pass feeding every calibrator and the observers
    t0 = time.perf_counter()
    cals = {k: make_calibrator(meth, **opts) for k, (meth, opts) in methods.items()}
    means = ChannelMeans(g1)
    stats = InputStatistics(g1) if ar_methods else None
    maxima = ChannelMaxima(g1) if eq_methods else None
    calibrate(g1, samples(xc), FanOut(cals), num_threads=T, observers=[o for o in (means, stats, maxima) if o])
    tables = {k: c.ranges() for k, c in cals.items()}
    times[f"qmace calibration pass ({len(methods)} calibrators + channel means"
          + (" + AdaRound statistics" if stats else "") + (" + channel maxima" if maxima else "") + ")"] = \
        time.perf_counter() - t0
    print(f"  qmace calibration: {time.perf_counter() - t0:.0f} s", flush=True)
    # equalized: rescale activation channels, then a second calibration pass on the rescaled model
    if maxima is not None:
        t0 = time.perf_counter()
        ge1, groups = equalize_activations(g1, maxima)
        ge8, _ = equalize_activations(g8, maxima)
        eq_cals = {k: make_calibrator(ALL_METHODS[k][0], **ALL_METHODS[k][1]) for k in eq_methods}
        eq_means = ChannelMeans(ge1)
        eq_stats = InputStatistics(ge1) if eq_ar_methods else None
        calibrate(ge1, samples(xc), FanOut(eq_cals), num_threads=T,
                  observers=[o for o in (eq_means, eq_stats) if o])
        eq_tables = {k: c.ranges() for k, c in eq_cals.items()}
        times["qmace equalization + its calibration pass"] = time.perf_counter() - t0
        print(f"  qmace equalization: {len(groups)} groups, {sum(len(x.tensors) for x in groups)} tensors, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    def qrow(label, schema, gq1, gq8, table, fixed=None, latency=True):
        qg1, fb = quantize_for_config(gq1, m1, table=table, schema=schema, fixed_weights=fixed)
        qg8, _ = quantize_for_config(gq8, m8, table=table, schema=schema, fixed_weights=fixed)
        s = Session(qg1, backend="onnxruntime", num_threads=T)
        lg = common.run_batched(lambda a: s.run({common.INPUT: a})[common.OUTPUT], xe)
        s8 = Session(qg8, backend="onnxruntime", num_threads=T)
        d8 = float(np.max(np.abs(s8.run({common.INPUT: np.ascontiguousarray(xe[:8])})[common.OUTPUT] - lg[:8])))
        if d8 > 1e-3:
            print(f"  WARNING {label}: batch-8 model differs from batch-1 model by {d8:g}", flush=True)
        return {"label": label, "kind": "qmace", "schema": schema, "b1": qg1, "b8": qg8, "fallbacks": len(fb),
                "logits": lg, "latency": latency, "b8diff": d8}

    qgraphs = {}
    ablation: list[dict] = []
    t_bc = t_ar = 0.0
    t0 = time.perf_counter()

    def schema_rows(schema, tag, ga1, ga8, tabs, mns, sts, ar_ks, with_ablation):
        nonlocal t_bc, t_ar
        t1 = time.perf_counter()
        bc1, n_bc = correct_biases(ga1, mns, schema)
        bc8, n_bc8 = correct_biases(ga8, mns, schema)
        t_bc += time.perf_counter() - t1
        print(f"  {schema}{tag}: bias correction {n_bc} layers (batch 8: {n_bc8}), {time.perf_counter() - t1:.1f} s",
              flush=True)
        for k, table in tabs.items():
            r = qrow(f"qmace {schema}, {k}{tag}", schema, bc1, bc8, table)
            qgraphs[(schema, k + tag)] = r["b1"]
            rows.append(r)
            if schema == "int8" and with_ablation:
                ablation.append(qrow(f"qmace {schema}, {k}, no bias correction", schema, ga1, ga8, table,
                                     latency=False))
        if sts is not None:
            t1 = time.perf_counter()
            ar1, fixed, reports = adaround(ga1, sts, schema, iters=args.adaround_iters)
            ar8 = transplant(ar1, ga8)
            t_ar += time.perf_counter() - t1
            gain = sum(r.nearest_loss for r in reports) / max(sum(r.final_loss for r in reports), 1e-30)
            print(f"  {schema}{tag}: AdaRound {len(reports)} layers, reconstruction error {gain:.2f}x lower than "
                  f"nearest, {time.perf_counter() - t1:.0f} s", flush=True)
            for k in ar_ks:
                rows.append(qrow(f"qmace {schema}, {k}{tag}{ADAROUND_TAG}", schema, ar1, ar8, tabs[k], fixed))

    for schema in ("int8", "uint8"):
        schema_rows(schema, "", g1, g8, tables, means, stats, ar_methods, True)
        if maxima is not None:
            schema_rows(schema, EQ_TAG, ge1, ge8, eq_tables, eq_means, eq_stats, eq_ar_methods, False)
        print(f"  qmace {schema}: all models {time.perf_counter() - t0:.0f} s", flush=True)
    times["qmace bias correction (2 schemas x 2 batches)"] = t_bc
    if stats is not None or (maxima is not None and eq_stats is not None):
        times[f"qmace AdaRound, {args.adaround_iters} iters"] = t_ar
    times["qmace quantize + eval of all rows (incl. the above)"] = time.perf_counter() - t0
    for r in rows + ablation:
        r["m"] = common.logits_metrics(ref, r["logits"], labels)

    # ---- latency: all models interleaved, per (threads, batch)
    thread_list = list(dict.fromkeys([T, 1]))
    lat_rows = [r for r in rows if r.get("latency", True)]
    t0 = time.perf_counter()
    if not args.no_latency:
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
        bc1, _ = correct_biases(g1, means, "int8")
        out += diagnose(args, g1, bc1, m1, tables, qgraphs, xe, ref, labels, T)
        times["diagnosis"] = time.perf_counter() - t0

    times["total"] = time.perf_counter() - t_start
    out += ["", "Run times: " + "; ".join(f"{k} {v:.0f} s" for k, v in times.items())]
    print("\n\n# ===== full report =====\n")
    print("\n".join(out))
    return 0


def memory_runs(args, xc, tmp, yaml1, T, times) -> list[str]:
    if True:
        t0 = time.perf_counter()
        img = tmp / "calib.npy"
        np.save(img, xc)
        jobs = []  # (label, n)
        for meth in [v.strip() for v in args.mem_methods.split(",") if v.strip()]:
            ns = args.mem_adaround_samples if meth.endswith(ADAROUND_TAG) else args.mem_samples
            jobs += [(meth, int(n)) for n in ns.split(",")]
        results: dict[tuple[str, int], dict] = {}
        running: list = []
        pending = list(jobs)
        while pending or running:
            while pending and len(running) < max(1, args.mem_parallel):
                meth, n = pending.pop(0)
                cmd = [sys.executable, __file__, "--_mem-child", "--_images", str(img), "--_yaml", str(yaml1),
                       "--_method", meth, "--_n", str(n), "--threads", str(T),
                       "--adaround-iters", str(args.mem_adaround_iters)]
                running.append(((meth, n), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                            text=True)))
            time.sleep(1)
            for item in list(running):
                key, pr = item
                if pr.poll() is None:
                    continue
                running.remove(item)
                so, se = pr.communicate()
                if pr.returncode != 0:
                    print(se[-2000:], file=sys.stderr)
                    continue
                results[key] = json.loads(so.strip().splitlines()[-1])
                print(f"  memory {key[0]} @{key[1]}: growth {results[key]['growth']:.1f} MB, "
                      f"{results[key]['seconds']:.0f} s", flush=True)
        mem_rows = []
        for meth in dict.fromkeys(j[0] for j in jobs):
            ns = sorted(n for (mm, n) in results if mm == meth)
            if len(ns) < 2:
                continue
            a, b = results[(meth, ns[0])], results[(meth, ns[-1])]
            what = ("calibrate + AdaRound statistics, adaround()" if meth.endswith(ADAROUND_TAG)
                    else "calibrate + channel means, correct_biases()")
            if EQ_TAG in meth:
                what = "channel-maxima pass, equalize, " + what
            mem_rows.append([meth, what, f"{ns[0]} / {ns[-1]}", f"{a['growth']:.1f}", f"{b['growth']:.1f}",
                             f"{100 * (b['growth'] - a['growth']) / a['growth']:+.1f}%",
                             f"{a['peak']:.0f} / {b['peak']:.0f}",
                             f"{100 * (b['peak'] - a['peak']) / a['peak']:+.1f}%",
                             f"{a['seconds']:.0f} / {b['seconds']:.0f}"])
        mt = ["", ("### Calibration peak memory (64 images cycled to N samples; fresh process each; "
                   f"{args.mem_parallel} at a time)"), "",
              ("Growth = peak RSS during the measured steps minus RSS just before them (includes building the ORT "
               "session with every activation as an output)."), "",
              common.md_table(["method", "measured steps", "samples N1 / N2", "growth MB @N1", "growth MB @N2",
                               "growth change", "process peak MB", "process peak change", "seconds"], mem_rows)]
        times["calibration memory runs"] = time.perf_counter() - t0
        print("\n".join(mt), flush=True)
        return mt


def diagnose(args, g1, gbc, m1, tables, qgraphs, xe, ref, labels, T) -> list[str]:
    """`g1`: the float graph; `gbc`: the same with int8 bias correction (what the quantized rows use)."""
    t0 = time.perf_counter()
    meth = args.diag_method
    kinds = tensor_kinds(g1)
    out = ["", f"### Diagnosis: where the int8 error comes from (int8 schema, `{meth}` ranges, bias-corrected)", ""]

    # (1) cumulative per-layer SQNR on the reference backend (integer kernels) vs the float graph
    qg = qgraphs[("int8", meth)]
    per = per_layer_reference(g1, qg, xe[: args.diag_images])
    rows = []
    order = [n.outputs[0] for n in g1.nodes]
    for i, name in enumerate([common.INPUT] + order):
        if name in per:
            r = tables[meth].get(name)
            rows.append([i, kinds.get(name, "?"), name.replace("/features/", "").replace("_output_0", ""),
                         f"{per[name][0]:.1f}", f"{per[name][1]:.2f}",
                         f"[{r.min:.2f}, {r.max:.2f}]" if r is not None else "input_ranges"])
    out += [(f"Cumulative SQNR of each quantized activation, reference backend (exact integer kernels), "
             f"{args.diag_images} eval images, vs the float graph:"), "",
            common.md_table(["#", "kind", "tensor", "SQNR dB", "max|float|", "range used"], rows), ""]
    print("\n".join(out), flush=True)

    # (2) ablations on the lowered QDQ model (ORT, fake-quant semantics), all 233 images
    sur = QDQSurgery(qg, gbc)
    acts = set(sur.act)
    groups: dict[str, set[str]] = {}
    for a in acts:
        groups.setdefault(kinds.get(a, "?"), set()).add(a)
    ab_rows = []

    def row(label, mb):
        lg = logits_of(mb, xe, T)
        mm = common.logits_metrics(ref, lg, labels)
        ab_rows.append([label, mm["agree"], mm["sqnr"]])
        return mm

    row("all quantized (QDQ in ORT)", sur.build())
    row("weights only (activations float)", sur.build(keep_acts=set()))
    row("activations only (weights float)", sur.build(keep_weights=False))
    for k in sorted(groups):
        row(f"only `{k}` activations quantized ({len(groups[k])}), weights float",
            sur.build(keep_acts=groups[k], keep_weights=False))
    for k in sorted(groups):
        row(f"all quantized except `{k}` activations", sur.build(drop_acts=groups[k]))
    out += ["Ablations on the lowered QDQ model, 233 images (top-1 agreement %, logits SQNR dB):", "",
            common.md_table(["variant", "agree %", "SQNR dB"], ab_rows), ""]
    print("\n".join(out[-4:]), flush=True)

    # (3) per-tensor: only this one activation quantized (weights float) -> logits SQNR, 64 images
    xs = xe[:32]
    ref_s = ref[:32]
    single = []
    for a in sorted(acts):
        lg = logits_of(sur.build(keep_acts={a}, keep_weights=False), xs, T)
        single.append((common.sqnr_db(ref_s, lg), a))
    single.sort()
    rows = [[f"{s:.1f}", kinds.get(a, "?"), a.replace("/features/", "").replace("_output_0", ""),
             f"[{tables[meth][a].min:.2f}, {tables[meth][a].max:.2f}]" if a in tables[meth] else "input_ranges"]
            for s, a in single[:12]]
    noise = sum(10 ** (-s / 10) for s, _ in single)
    by_kind: dict[str, float] = {}
    for s, a in single:
        by_kind[kinds.get(a, "?")] = by_kind.get(kinds.get(a, "?"), 0.0) + 10 ** (-s / 10)
    out += [("The 12 activations whose quantization alone (weights float, everything else float) costs the most, "
             "32 images (logits SQNR dB):"), "",
            common.md_table(["SQNR dB alone", "kind", "tensor", "range used"], rows), "",
            "Share of the summed single-tensor noise power by kind: "
            + ", ".join(f"{k} {100 * v / noise:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])), ""]
    print("\n".join(out[-6:]), flush=True)

    # (4) range-table variants through the public API (ranges only; library unchanged)
    var_rows = []
    relu6 = {n.outputs[0] for n in g1.nodes if n.attrs.get("qm_activation") == "Clip"}
    base = dict(tables[meth])

    def variant(label, table, schema="int8"):
        qgv, _ = quantize_for_config(gbc, m1, table=table, schema=schema)
        s = Session(qgv, backend="onnxruntime", num_threads=T)
        lg = common.run_batched(lambda a: s.run({common.INPUT: a})[common.OUTPUT], xe)
        mm = common.logits_metrics(ref, lg, labels)
        var_rows.append([label, mm["agree"], mm["sqnr"]])

    variant(f"{meth} (as in the table)", base)
    variant(f"{meth}, ReLU6 outputs at their clip range [0, 6]", {**base, **{k: Range(0.0, 6.0) for k in relu6}})
    mm = tables["mace P=0"]
    variant(f"{meth}, logits at min/max", {**base, common.OUTPUT: mm[common.OUTPUT]})
    adds = groups.get("residual add", set()) | groups.get("project 1x1", set())
    variant(f"{meth}, project/add outputs at min/max", {**base, **{k: mm[k] for k in adds if k in mm}})
    variant(f"{meth}, depthwise outputs at min/max", {**base, **{k: mm[k] for k in groups.get("depthwise", ()) if k in mm}})
    variant("mace P=0, ReLU6 outputs at [0, 6]", {**mm, **{k: Range(0.0, 6.0) for k in relu6}})
    out += ["Range-table variants (int8 schema, qmace onnxruntime backend, 233 images):", "",
            common.md_table(["ranges", "agree %", "SQNR dB"], var_rows), "",
            f"(diagnosis {time.perf_counter() - t0:.0f} s)"]
    print("\n".join(out[-5:]), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
