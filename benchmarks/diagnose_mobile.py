#!/usr/bin/env python3
"""Where the error of qmace's quantized mobile models (bench_mobile_models.py) comes from, on CALIBRATION
images only (so that whatever it points to can be chosen without looking at the evaluation split).

    python benchmarks/diagnose_mobile.py --model seg [--schema int8_w7] [--refine bc] [--images 32]
        [--top 12] [--no-singles] [--weight-layers] [--json OUT]

1. Cumulative SQNR of every quantized activation along the graph: the dequantized codes of the integer model
   (ONNX Runtime, ``int8_w7`` is exact there) vs the same tensor of the float graph after equalization (same
   channel scaling, float weights).
2. Ablations on the lowered QDQ model (the same model qmace's onnxruntime backend runs): all weights float,
   all activations float, then for every activation "everything quantized except this tensor" and for every
   layer "everything quantized except this layer's weights (and bias)": how much of the output error each
   one, kept float, recovers (output SQNR vs FP32, mean IoU / top-1, share of images within MACE's cosine
   0.98 or task metric >= 0.95).
3. ``--weight-layers`` (instead of the one-at-a-time ablations of 2): every activation float, each layer's
   weights quantized alone, then every layer's but the k most costly (``weight_layers``): whether the weights
   alone keep a model from the 95% criterion, and which layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mobile_models import load_models, qmace_ptq, task_metric
from common import md_table, ort_session

from qmace.data import Sample
from qmace.metrics import compare
from qmace.onnx_bridge import to_onnx
from qmace.qmath import dequantize
from qmace.quantize.bias_correction import layer_weight
from qmace.quantize.recipe import equalize_on
from qmace.runtime import Session
from qmace_zoo import default_cache


def run_model(model_bytes: bytes, input_name: str, xs: np.ndarray, optimize: bool = True) -> np.ndarray:
    """The model's first output on each of ``xs`` (ONNX Runtime, one thread). ``optimize=False``: no graph
    optimizations, as the surgery variants need (ORT's optimizer would quantize a float weight that sits
    between DequantizeLinear and QuantizeLinear itself, 8-bit per tensor: measured, it does)."""
    if optimize:
        s = ort_session(model_bytes, 1)
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {input_name: x[None]})[0] for x in xs])


def per_layer_sqnr(qg, g_eq, input_name: str, xs: np.ndarray) -> dict[str, float]:
    """Cumulative SQNR (dB) of every quantized activation of ``qg`` vs ``g_eq``'s float tensor of that name."""
    names = [n for n, t in qg.tensors.items() if t.is_quantized and t.data is None and n in g_eq.tensors
             and g_eq.tensors[n].data is None and n != input_name]
    sq = Session(qg, backend="onnxruntime", num_threads=1)
    sf = Session(g_eq, backend="onnxruntime", num_threads=1)
    sig = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for x in xs:
        q = sq.run({input_name: x[None]}, observe=names)
        f = sf.run({input_name: x[None]}, observe=names)
        for n in names:
            ref = f[n].astype(np.float64)
            d = dequantize(q[n], qg.tensors[n].quant).astype(np.float64)
            if ref.shape != d.shape:
                continue
            sig[n] += float(np.sum(ref**2))
            noise[n] += float(np.sum((ref - d) ** 2))
    return {n: 10 * np.log10(sig[n] / noise[n]) if noise[n] > 0 else float("inf") for n in names if sig[n] > 0}


class Surgery:
    """The lowered QDQ model of ``qg`` with chosen quantizations bypassed: activation ``T`` (``T__f`` ->
    QuantizeLinear -> ``T`` -> DequantizeLinear ``T__DQ`` -> ``T__dq``) by making ``T__DQ`` an Identity of
    ``T__f``; a layer's weights and bias by reading the equalized float graph's constants instead."""

    def __init__(self, qg, g_eq):
        import onnx

        self.model = to_onnx(qg)
        self.g_eq = g_eq
        nodes = self.model.graph.node
        produced = {o for n in nodes for o in n.output}
        self.acts = {}
        for i, n in enumerate(nodes):
            if n.op_type == "DequantizeLinear" and n.name.endswith("__DQ"):
                t = n.name[: -len("__DQ")]
                if f"{t}__f" in produced:
                    self.acts[t] = i
        eq_nodes = {n.name: n for n in g_eq.nodes}
        self.layers = {}
        for i, n in enumerate(nodes):
            src = eq_nodes.get(n.name)
            if src is not None and layer_weight(g_eq, src) is not None:
                self.layers[n.name] = (i, src)
        self._onnx = onnx

    def build(self, float_acts=(), float_layers=()) -> bytes:
        from onnx import helper, numpy_helper

        m = self._onnx.ModelProto()
        m.CopyFrom(self.model)
        nodes = m.graph.node
        for t in float_acts:
            i = self.acts[t]
            nodes[i].CopyFrom(helper.make_node("Identity", [f"{t}__f"], [nodes[i].output[0]], name=f"{t}__DQ"))
        for name in float_layers:
            i, src = self.layers[name]
            for k in (1, 2):
                if k < len(src.inputs) and src.inputs[k] and k < len(nodes[i].input):
                    fname = f"{name}__float{k}"
                    m.graph.initializer.append(numpy_helper.from_array(
                        np.ascontiguousarray(self.g_eq.constant(src.inputs[k]).astype(np.float32)), fname))
                    nodes[i].input[k] = fname
        return m.SerializeToString()


def weight_layers(sur: Surgery, m, xs: np.ndarray, score) -> dict:
    """Whether the weights cap a model, and which layers: every activation float, (1) each layer's weights
    quantized alone (its output SQNR vs FP32: the layer's share of the weights-only error), (2) every layer's
    weights quantized except the ``k`` layers of (1) with the lowest SQNR, for k = 0, 1, 2, 4, 8, 16 (what a
    weight-precision lever on ``k`` layers could recover at most, with float activations). Printed and returned."""
    acts, layers = list(sur.acts), list(sur.layers)
    alone = []
    for name in layers:
        r = score(run_model(sur.build(float_acts=acts, float_layers=[n for n in layers if n != name]),
                            m.input_name, xs, False))
        alone.append([name, r])
    alone.sort(key=lambda a: a[1]["sqnr"])
    rows = []
    for k in (0, 1, 2, 4, 8, 16):
        if k <= len(layers):
            keep = [n for n, _ in alone[:k]]
            rows.append([k, ", ".join(keep[:4]) + (" ..." if k > 4 else ""),
                         score(run_model(sur.build(float_acts=acts, float_layers=keep), m.input_name, xs, False))])
    print(f"\nActivations float; one layer's weights quantized alone (the 12 most costly of {len(layers)}):\n")
    print(md_table(["layer", "SQNR dB", "metric", "ok images"],
                   [[n, r["sqnr"], r["metric"], f"{100 * r['ok']:.0f}%"] for n, r in alone[:12]]))
    print("\nActivations float; every layer's weights quantized except the k most costly:\n")
    print(md_table(["k", "kept float", "SQNR dB", "metric", "ok images"],
                   [[k, kept or "-", r["sqnr"], r["metric"], f"{100 * r['ok']:.0f}%"] for k, kept, r in rows]))
    return {"alone": alone, "all_but_k": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="seg")
    ap.add_argument("--schema", default="int8_w7")
    ap.add_argument("--refine", default="bc")
    ap.add_argument("--images", type=int, default=32, help="calibration images used (first N)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--no-singles", action="store_true", help="skip the one-tensor-at-a-time ablations")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--weight-layers", action="store_true",
                    help="instead of the one-at-a-time ablations: activations float, each layer's weights quantized "
                         "alone, then all weights but the K most costly layers' (does a weight-precision lever help?)")
    args = ap.parse_args()
    work = default_cache() / "bench-mobile"
    m = load_models([args.model], work)[0]
    xs = m.calib[: args.images]
    res = qmace_ptq(m, args.schema, args.refine)
    qg = res.graph
    g_eq, _ = equalize_on(m.graph, [Sample("", {m.input_name: x[None]}) for x in m.calib], 1, args.schema)
    ref = run_model(m.fp32_onnx.read_bytes(), m.input_name, xs)
    out: dict = {"model": m.name, "schema": args.schema, "refine": args.refine, "images": len(xs)}

    per = per_layer_sqnr(qg, g_eq, m.input_name, xs)
    order = [o for n in g_eq.nodes for o in n.outputs if o in per]
    op_of = {o: n.op_type for n in g_eq.nodes for o in n.outputs}
    out["per_layer"] = [[name, op_of[name], round(per[name], 2)] for name in order]

    sur = Surgery(qg, g_eq)
    base = run_model(sur.build(), m.input_name, xs, False)

    def score(y):
        metric, within, _ = task_metric(m, ref, y)
        return {"sqnr": round(compare(ref, y).sqnr_db, 2), "metric": round(metric, 4), "ok": round(within, 4)}

    real = np.concatenate([Session(qg, backend="onnxruntime", num_threads=1).run({m.input_name: x[None]})[m.output_name]
                           for x in xs])
    out["qmace_backend"] = score(real)
    out["all_quantized"] = score(base)
    out["weights_float"] = score(run_model(sur.build(float_layers=list(sur.layers)), m.input_name, xs, False))
    out["acts_float"] = score(run_model(sur.build(float_acts=list(sur.acts)), m.input_name, xs, False))
    print(json.dumps({k: out[k] for k in ("qmace_backend", "all_quantized", "weights_float", "acts_float")}), flush=True)
    if args.weight_layers:
        out["weight_layers"] = weight_layers(sur, m, xs, score)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    singles = []
    for t in [] if args.no_singles else sur.acts:
        singles.append(["act", t, score(run_model(sur.build(float_acts=[t]), m.input_name, xs, False))])
    for name in [] if args.no_singles else sur.layers:
        singles.append(["weights", name, score(run_model(sur.build(float_layers=[name]), m.input_name, xs, False))])
    singles.sort(key=lambda r: -r[2]["sqnr"])
    out["single"] = singles
    print(f"## {m.name} {args.schema} {args.refine}: {len(xs)} calibration images\n")
    print(md_table(["variant", "SQNR dB", "metric", "ok images"],
                   [[k, out[k]["sqnr"], out[k]["metric"], f"{100 * out[k]['ok']:.0f}%"]
                    for k in ("qmace_backend", "all_quantized", "weights_float", "acts_float")]))
    print("\nPer-layer cumulative SQNR (every 5th quantized activation):\n")
    print(md_table(["#", "tensor", "op", "SQNR dB"], [[i, n, op, f"{s:.1f}"] for i, (n, op, s) in enumerate(out["per_layer"])
                                                   if i % 5 == 0 or i == len(out["per_layer"]) - 1]))
    print(f"\nKept float alone, the {args.top} that recover most:\n")
    print(md_table(["kind", "tensor / layer", "SQNR dB", "metric", "ok images"],
                   [[k, n, s["sqnr"], s["metric"], f"{100 * s['ok']:.0f}%"] for k, n, s in singles[: args.top]]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
