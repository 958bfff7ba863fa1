#!/usr/bin/env python3
"""Issue 9, TFLite half: real .tflite models through `platform: tflite`, validated against LiteRT.

    python benchmarks/bench_tflite.py [--tf-python PY] [--skip-mediapipe] [--skip-mobilenet] [--skip-ptq]
        [--qat-tflite PATH] [--repeats 20]

A. MediaPipe 0.10.21's 14 float models (`python scripts/fetch_assets.py mediapipe`): each converted with
   `qmace convert` (a MACE YAML per model, the model's own input size), then run by qmace (ONNX Runtime
   backend) and by LiteRT on the 233 evaluation stamps resized to the model's input (bilinear, RGB in
   [-1, 1]); cosine similarity per output, the minimum over photos and outputs reported (outputs whose
   LiteRT value has norm < 1e-6, e.g. a presence score of 1e-30, are left out of the cosine: their cosine
   is 0/0), and the largest absolute difference over every output.
B. MobileNetV2 with our real ImageNet weights (the same ONNX the other benchmarks use, BN folded by qmace),
   rebuilt in Keras and converted by TensorFlow's TFLite converter (`tflite_mobilenet_build.py`, run with
   `--tf-python`, a Python that has tensorflow-cpu==2.21.0): a float .tflite and a full-integer int8
   .tflite calibrated on the 64 calibration stamps. Evaluated on the 233 evaluation stamps:
   float: cosine vs LiteRT; int8 converted with `quantize: 1` (no range file): codes vs LiteRT's int8
   model (fraction of logits off by 1 step and by more, top-1 equal), and agreement/SQNR of both int8
   models vs FP32; latency ratio int8 / FP32 for qmace (ONNX Runtime backend) and LiteRT, one thread,
   interleaved medians.
C. The same for TensorFlow's integer model of the tfmot QAT MobileNetV2 (`--qat-tflite`, default
   <cache>/tf/mobilenet_v2_qat.tflite from benchmarks/make_tf_mobilenet.py; FP32 = the float model of B).
   For B and C, codes are compared with LiteRT as users run it (default op resolver: XNNPACK delegate) and
   with LiteRT's builtin kernels only (no delegate).
Intermediate files go to <cache>/bench-tflite/ (never the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    interleaved_medians,
    labels_for,
    logits_metrics,
    mobilenet_onnx,
    sha256,
    stamp_images,
    write_yaml,
)

from qmace.api import convert, load_float_graph
from qmace.config import load_config
from qmace.frontends.tflite import LiteRTOracle, read_tflite
from qmace.frontends.tflite.builder import ir_names
from qmace.metrics import compare
from qmace.runtime import Session
from qmace_zoo import default_cache, load_split, stamps_dir

HERE = Path(__file__).resolve().parent


def tflite_yaml(directory: Path, model: Path, name: str, quantize: bool = False,
                input_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """A MACE YAML for a .tflite file, inputs/outputs/shapes read from the file (NHWC, TFLite's layout)."""
    m = read_tflite(model)
    names = ir_names(m)
    ins = [m.tensors[i] for i in m.inputs]
    outs = [m.tensors[i] for i in m.outputs]
    lines = [f"library_name: {name}", "target_abis: [host]", "model_graph_format: file", "model_data_format: file",
             "models:", f"  {name}:", "    platform: tflite", f"    model_file_path: {model}",
             f"    model_sha256_checksum: {sha256(model)}", "    runtime: cpu"]
    if quantize:
        lines += ["    quantize: 1", "    quantize_schema: int8"]
    lines += ["    subgraphs:",
              f"      - input_tensors: {json.dumps([names[t.index] for t in ins])}",
              f"        input_shapes: {json.dumps([','.join(map(str, t.shape)) for t in ins])}",
              f"        input_ranges: {json.dumps([f'{input_range[0]},{input_range[1]}'] * len(ins))}",
              f"        output_tensors: {json.dumps([names[t.index] for t in outs])}",
              f"        output_shapes: {json.dumps([','.join(map(str, t.shape)) for t in outs])}"]
    path = directory / f"{name}{'_q' if quantize else ''}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def photos_nhwc(paths: list[str], h: int, w: int) -> np.ndarray:
    """Stamps alpha-composited on white, RGB, resized to (h, w) bilinear, scaled to [-1, 1]; (N, h, w, 3)."""
    from PIL import Image

    out = np.empty((len(paths), h, w, 3), np.float32)
    root = stamps_dir()
    for i, p in enumerate(paths):
        with Image.open(root / p) as im:
            rgba = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        out[i] = np.asarray(rgb.resize((w, h), Image.BILINEAR), np.float32) / 127.5 - 1.0
    return out


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---- A. MediaPipe -----------------------------------------------------------------------------------

def bench_mediapipe(work: Path, repeats: int) -> list[dict]:
    manifest = default_cache() / "mediapipe-models.json"
    if not manifest.is_file():
        raise SystemExit("run `python scripts/fetch_assets.py mediapipe` first")
    models = [Path(p) for p in json.loads(manifest.read_text())["photos"]]
    eval_paths = list(load_split()["eval"])
    rows = []
    for model in models:
        name = model.stem
        cfg = tflite_yaml(work, model, name)
        t0 = time.perf_counter()
        try:
            res = convert(cfg, build_dir=work / "build")
        except Exception as e:  # report and go on (an unsupported op is an expected outcome here)
            rows.append({"model": name, "error": str(e).split(": ", 1)[-1]})
            print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        g = res.graph
        sub = load_config(cfg).model(None).subgraph
        shape = [int(v) for v in sub.input_shapes[0]]
        x = photos_nhwc(eval_paths, shape[1], shape[2])
        oracle = LiteRTOracle(model, 1, g.outputs)
        sess = Session(g, "onnxruntime", num_threads=1)
        worst, max_abs, skipped = 1.0, 0.0, 0
        for xi in x:
            feed = {g.inputs[0]: nchw(xi[None])}
            ours = sess.run(feed)
            ref = oracle.run(g.outputs, feed)
            for o, r in zip(g.outputs, ref):
                max_abs = max(max_abs, float(np.max(np.abs(r - ours[o]))))
                if float(np.linalg.norm(r)) < 1e-6:
                    skipped += 1
                    continue
                worst = min(worst, compare(r, ours[o]).cosine)
        feed, outs = {g.inputs[0]: nchw(x[:1])}, list(g.outputs)
        lat = interleaved_medians({"qmace": lambda s=sess, f=feed: s.run(f),
                                   "litert": lambda o=oracle, f=feed, n=outs: o.run(n, f)}, repeats=repeats, warmup=2)
        ops = ", ".join(f"{k} x{v}" for k, v in g.op_counts().items())
        rows.append({"model": name, "seconds": seconds, "input": "x".join(map(str, shape[1:])),
                     "min_cosine": worst, "max_abs_diff": max_abs, "near_zero_outputs": skipped,
                     "photos": len(x), "ops": ops,
                     "ms_qmace": lat["qmace"], "ms_litert": lat["litert"]})
        print(f"{name}: convert {seconds:.2f} s, min cosine {worst:.6f} over {len(x)} photos x {len(g.outputs)} "
              f"outputs ({skipped} near-zero left out), max |diff| {max_abs:.3g}, {lat['qmace']:.1f} ms qmace-ORT / "
              f"{lat['litert']:.1f} ms LiteRT", flush=True)
    return rows


# ---- B. MobileNetV2 ---------------------------------------------------------------------------------

def dump_mobilenet(work: Path) -> None:
    """qmace's float graph of the MobileNetV2 ONNX (BN folded, ReLU6 fused) -> npz for the Keras build."""
    cfg = write_yaml(work, mobilenet_onnx())
    g = load_float_graph(load_config(cfg).model(None))
    arrays, nodes = {}, []
    for i, n in enumerate(g.nodes):
        entry = {"op": n.op_type, "inputs": list(n.inputs), "outputs": list(n.outputs)}
        if n.op_type == "Conv":
            act = n.attrs.get("qm_activation")
            if act not in (None, "Clip") or (act == "Clip" and list(n.attrs["qm_clip"]) != [0.0, 6.0]):
                raise SystemExit(f"unexpected activation on {n.name}: {act}")
            entry.update(pads=list(n.attrs.get("pads") or [0, 0, 0, 0]), strides=list(n.attrs.get("strides") or [1, 1]),
                         group=int(n.attrs.get("group", 1)), act="relu6" if act else None)
            arrays[f"w{i}"], arrays[f"b{i}"] = g.tensors[n.inputs[1]].data, g.tensors[n.inputs[2]].data
        elif n.op_type == "Gemm":
            assert n.attrs.get("transB") == 1
            arrays[f"w{i}"], arrays[f"b{i}"] = g.tensors[n.inputs[1]].data, g.tensors[n.inputs[2]].data
        nodes.append(entry)
    graph = {"input": g.inputs[0], "output": g.outputs[0], "nodes": nodes}
    np.savez(work / "mobilenet_graph.npz", graph=np.array(json.dumps(graph)), **arrays)


def steps_vs(q: np.ndarray, ref: np.ndarray, out_scale: float) -> dict:
    """How far codes ``q`` are from ``ref`` in output steps: share off by 1 / by more, max, top-1 equal."""
    steps = np.rint(np.abs(q - ref) / out_scale)
    return {"off1": float(np.mean(steps == 1)), "off_gt1": float(np.mean(steps > 1)), "max_steps": int(steps.max()),
            "top1_same": float(np.mean(q.argmax(1) == ref.argmax(1)))}


def bench_quantized(work: Path, q_t: Path, name: str, x_eval: np.ndarray, ref_fp32: np.ndarray, labels: dict,
                    rng: tuple[float, float], fp: dict, repeats: int) -> dict:
    """An int8 .tflite converted with `quantize: 1` (no range file), run by qmace's reference and ONNX Runtime
    backends against LiteRT (default resolver: XNNPACK, and builtin kernels only); accuracy vs FP32; latency
    interleaved with the float model (``fp``: its qmace session, LiteRT oracle and output name)."""
    out: dict = {"model": str(q_t), "n": len(x_eval)}
    t0 = time.perf_counter()
    res_q = convert(tflite_yaml(work, q_t, name, quantize=True, input_range=rng), build_dir=work / "build")
    out["int8_seconds"] = time.perf_counter() - t0
    g_q = res_q.graph
    out["fallbacks"] = res_q.fallbacks
    out["litert_adds"] = sum(n.attrs.get("qm_arith") == "litert" for n in g_q.nodes)
    lit_q = LiteRTOracle(q_t, 1, g_q.outputs)
    lit_b = LiteRTOracle(q_t, 1, g_q.outputs, delegates=False)
    s_q = {b: Session(g_q, b, num_threads=1) for b in ("onnxruntime", "reference")}
    q_name = g_q.outputs[0]
    out_scale = float(g_q.tensors[f"{q_name}__quant"].quant.scale)
    lq, lb = [], []
    qq = {b: [] for b in s_q}
    for x in x_eval:
        feed = {g_q.inputs[0]: x[None]}
        lq.append(lit_q.run([q_name], feed)[0][0])
        lb.append(lit_b.run([q_name], feed)[0][0])
        for b, s in s_q.items():
            qq[b].append(s.run(feed)[q_name][0])
    lq, lb = np.stack(lq), np.stack(lb)
    qq = {b: np.stack(v) for b, v in qq.items()}
    for b, q in qq.items():
        out[f"codes_{b}"] = steps_vs(q, lq, out_scale)
        out[f"codes_{b}_vs_builtin"] = steps_vs(q, lb, out_scale)
    out["litert_builtin_vs_default"] = steps_vs(lb, lq, out_scale)
    out["litert_int8"] = logits_metrics(ref_fp32, lq, labels)
    out["qmace_int8"] = logits_metrics(ref_fp32, qq["onnxruntime"], labels)
    out["qmace_int8_reference"] = logits_metrics(ref_fp32, qq["reference"], labels)
    feed, f_feed = {g_q.inputs[0]: x_eval[:1]}, {fp["input"]: x_eval[:1]}
    f_out = fp["output"]
    lat = interleaved_medians({
        "qmace_fp32": lambda: fp["session"].run(f_feed), "qmace_int8": lambda: s_q["onnxruntime"].run(feed),
        "litert_fp32": lambda: fp["litert"].run([f_out], f_feed), "litert_int8": lambda: lit_q.run([q_name], feed)},
        repeats=repeats, warmup=3)
    out["latency_ms"] = lat
    print(json.dumps(out, indent=1), flush=True)
    return out


def bench_mobilenet(work: Path, tf_python: str, repeats: int, qat: Path | None, skip_ptq: bool) -> dict:
    calib, _ = stamp_images("calib")
    x_eval, eval_paths = stamp_images("eval")
    labels = labels_for(eval_paths)
    fp_t, q_t = work / "mobilenet_v2_float.tflite", work / "mobilenet_v2_int8.tflite"
    if not (fp_t.is_file() and q_t.is_file()):
        dump_mobilenet(work)
        np.save(work / "calib_nhwc.npy", np.ascontiguousarray(calib.transpose(0, 2, 3, 1)))
        subprocess.run([tf_python, str(HERE / "tflite_mobilenet_build.py"), str(work)], check=True)
    # the FP32 reference: qmace's float graph of the ONNX file (== ONNX Runtime on it, see bench_runtime)
    onnx_cfg = write_yaml(work, mobilenet_onnx())
    fp32 = Session(load_float_graph(load_config(onnx_cfg).model(None)), "onnxruntime", num_threads=1)
    out: dict = {"n": len(x_eval)}
    rng = (float(calib.min()), float(calib.max()))
    t0 = time.perf_counter()
    g_f = convert(tflite_yaml(work, fp_t, "mnv2_float", input_range=rng), build_dir=work / "build").graph
    out["float_seconds"] = time.perf_counter() - t0
    lit_f = LiteRTOracle(fp_t, 1, g_f.outputs)
    s_f = Session(g_f, "onnxruntime", num_threads=1)
    o_name = g_f.outputs[0]
    ref_fp32, lf, qf = [], [], []
    for x in x_eval:
        feed = {g_f.inputs[0]: x[None]}
        ref_fp32.append(fp32.run({"input": x[None]})["output"][0])
        lf.append(lit_f.run([o_name], feed)[0][0])
        qf.append(s_f.run(feed)[o_name][0])
    ref_fp32, lf, qf = map(np.stack, (ref_fp32, lf, qf))
    out["float_cosine_min"] = min(compare(a, b).cosine for a, b in zip(lf, qf))
    out["float_vs_onnx_cosine_min"] = min(compare(a, b).cosine for a, b in zip(ref_fp32, lf))
    out["fp32_labels"] = logits_metrics(ref_fp32, ref_fp32, labels)
    fp = {"session": s_f, "litert": lit_f, "input": g_f.inputs[0], "output": o_name}
    if not skip_ptq:
        out["ptq"] = bench_quantized(work, q_t, "mnv2_int8", x_eval, ref_fp32, labels, rng, fp, repeats)
    if qat is not None:
        out["qat"] = bench_quantized(work, qat, "mnv2_qat", x_eval, ref_fp32, labels, rng, fp, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tf-python", default=os.environ.get("QMACE_TF_PYTHON", sys.executable),
                    help="a Python with tensorflow-cpu==2.21.0 (for the MobileNetV2 .tflite files; default: "
                         "$QMACE_TF_PYTHON, else this Python)")
    ap.add_argument("--skip-mediapipe", action="store_true")
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--qat-tflite", type=Path, default=default_cache() / "tf" / "mobilenet_v2_qat.tflite",
                    help="TensorFlow's integer model of the tfmot QAT MobileNetV2 (benchmarks/make_tf_mobilenet.py "
                         "qat-intbias); skipped when missing")
    ap.add_argument("--skip-ptq", action="store_true", help="skip the PTQ int8 .tflite (the QAT one only)")
    args = ap.parse_args()
    qat = args.qat_tflite if args.qat_tflite.is_file() else None
    if qat is None:
        print(f"{args.qat_tflite} not found: the QAT .tflite is skipped", flush=True)
    work = default_cache() / "bench-tflite"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_mediapipe:
            (work / "results_mediapipe.json").write_text(json.dumps(bench_mediapipe(Path(tmp), args.repeats), indent=1))
        if not args.skip_mobilenet:
            (work / "results_mobilenet.json").write_text(
                json.dumps(bench_mobilenet(work, args.tf_python, args.repeats, qat, args.skip_ptq), indent=1))
    print(f"results: {work}/results_*.json")


if __name__ == "__main__":
    main()
