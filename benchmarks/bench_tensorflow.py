#!/usr/bin/env python3
"""platform: tensorflow on the real MobileNetV2 (our ImageNet weights), against TensorFlow's outputs.

First make the frozen graphs and TensorFlow's logits with benchmarks/make_tf_mobilenet.py (needs
TensorFlow); this script needs only qmace (no TensorFlow):

    python benchmarks/bench_tensorflow.py [--threads 1] [--skip-mace-steps]

Per graph (tf1: plain tf.nn + FusedBatchNormV3; keras3: Rsqrt/Mul/Sub/AddV2 batch norm) and for the
ONNX export of the same weights: conversion time; float cosine to the source framework on the 233
evaluation stamps (minimum over images); MACE's three steps through the CLI (run --quantize_stat on the
64 calibration stamps, quantize-stat, convert with quantize: 1 and the range file, uint8); ``qmace
quantize`` (int8) top-1 agreement and SQNR of the logits against FP32; int8 / FP32 latency (interleaved
medians, ONNX Runtime backend). With ``--models zoo``: the Keras-applications graphs of benchmarks/make_tf_zoo.py (MobileNet V1/V3,
Inception v3, ResNet-50 v1/v2 with seeded random weights) the same way, without MACE's steps. For the tfmot
QAT graphs (``qat``: as tfmot freezes it, biases in float; ``qat_intbias``: biases on the int32 grid):
conversion with ``quantize: 1`` + input_ranges only (int8 schema), qmace's exact integer reference backend,
against TensorFlow's fake-quantized logits and, when ``mobilenet_v2_qat.tflite`` and LiteRT are there,
against TensorFlow's own integer model of the same graph run by LiteRT: elements off by more than one
output quantization step, off at all, top-1 the same.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    INPUT_RANGE,
    interleaved_medians,
    labels_for,
    logits_metrics,
    md_table,
    mobilenet_onnx,
    sha256,
    stamp_images,
)
from qmace import api
from qmace.api import quantize_one_shot
from qmace.config import input_name_format
from qmace.quantize.recipe import PTQRecipe
from qmace.runtime import Session
from qmace_zoo import default_cache


def write_yaml(d: Path, model: Path, platform: str, inp: str, out: str, nhwc: bool, name: str,
               quantize: bool = False, range_file: Path | None = None, schema: str | None = None) -> Path:
    shape = "1,224,224,3" if nhwc else "1,3,224,224"
    lines = [f"library_name: {name}", "target_abis: [host]", "models:", f"  {name}:",
             f"    platform: {platform}", f"    model_file_path: {model}",
             f"    model_sha256_checksum: {sha256(model)}", "    runtime: cpu"]
    if quantize:
        lines.append("    quantize: 1")
    if range_file:
        lines.append(f"    quantize_range_file: {range_file}")
    if schema:
        lines.append(f"    quantize_schema: {schema}")
    lines += ["    subgraphs:", f"      - input_tensors: {inp}", f"        input_shapes: {shape}",
              f"        input_data_formats: {'NHWC' if nhwc else 'NCHW'}",
              f"        input_ranges: {INPUT_RANGE[0]!r},{INPUT_RANGE[1]!r}", f"        output_tensors: {out}",
              "        output_shapes: 1,1000", "        output_data_formats: NONE"]
    path = d / f"{name}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_inputs(d: Path, inp: str, x_nhwc: np.ndarray) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(x_nhwc):
        x[None].astype(np.float32).tofile(d / f"{input_name_format(inp)}_{i:03d}")
    return d


def logits(graph, inp: str, out: str, x_nchw: np.ndarray, threads: int, backend: str = "onnxruntime") -> np.ndarray:
    s = Session(graph, backend=backend, num_threads=threads)
    return np.concatenate([s.run({inp: x_nchw[i:i + 1]})[out] for i in range(len(x_nchw))])


def qmace_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "qmace", *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"qmace {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def bench_model(label: str, platform: str, model: Path, inp: str, out: str, ref: np.ndarray, xe, xc,
                labels, tmp: Path, threads: int, mace_steps: bool) -> list:
    nhwc = platform == "tensorflow"
    d = tmp / label
    d.mkdir()
    yml = write_yaml(d, model, platform, inp, out, nhwc, label.replace("-", "_"))
    t0 = time.perf_counter()
    conv = api.convert(yml, build_dir=d / "build")
    t_conv = time.perf_counter() - t0
    yf = logits(conv.graph, inp, out, xe, threads)
    cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ref, yf)]
    m_float = logits_metrics(ref, yf, labels)
    calib = write_inputs(d / "calib", inp, xc.transpose(0, 2, 3, 1) if nhwc else xc)
    mace = "-"
    if mace_steps:  # MACE's three steps through the CLI, uint8 (MACE's default schema)
        log = qmace_cli("run", "--config", str(yml), "--build_dir", str(d / "build"), "--quantize_stat",
                        "--input_dir", str(calib))
        (d / "range_log").write_text(log)
        ranges = qmace_cli("quantize-stat", "--log_file", str(d / "range_log"))
        (d / "overall_range").write_text(ranges)
        ymq = write_yaml(d, model, platform, inp, out, nhwc, label.replace("-", "_") + "_q", True,
                         d / "overall_range")
        qg = api.convert(ymq, build_dir=d / "build").graph
        mq = logits_metrics(yf, logits(qg, inp, out, xe, threads), labels)
        mace = f"uint8 {mq['agree']:.1f}% / {mq['sqnr']:.1f} dB"
    one = quantize_one_shot(yml, input_dir=calib, build_dir=d / "build_q", recipe=PTQRecipe(schema="int8"),
                            num_threads=threads)
    q8 = one.convert.graph
    yq = logits(q8, inp, out, xe, threads)
    mq8 = logits_metrics(yf, yq, labels)
    sf = Session(conv.graph, backend="onnxruntime", num_threads=threads)
    sq = Session(q8, backend="onnxruntime", num_threads=threads)
    feed = {inp: xe[:1]}
    med = interleaved_medians({"fp32": lambda: sf.run(feed), "int8": lambda: sq.run(feed)}, 30)
    ratio = med["int8"] / med["fp32"]
    print(f"{label}: convert {t_conv:.1f} s, float cos min {min(cos):.6f}, top-1 agreement with source "
          f"{m_float['agree']:.1f}%, MACE steps {mace}, int8 agree {mq8['agree']:.1f}% SQNR {mq8['sqnr']:.2f} dB, "
          f"latency int8/fp32 {ratio:.2f}", flush=True)
    return [label, f"{t_conv:.1f} s", f"cos min {min(cos):.6f} (mean {np.mean(cos):.6f}), top-1 {m_float['agree']:.1f}%",
            mace, f"{mq8['agree']:.1f}% / {mq8['sqnr']:.2f} dB", f"{ratio:.2f}x"]


QAT_GRAPHS = {
    "qat": "tfmot QAT (.pb, quantize: 1 + input_ranges)",
    "qat_intbias": "tfmot QAT, biases on the int32 grid (.pb, quantize: 1 + input_ranges)",
}


def bench_qat(key: str, label: str, model: Path, inp: str, out: str, ref: np.ndarray, xe, tmp: Path,
              threads: int) -> list:
    d = tmp / key
    d.mkdir()
    yml = write_yaml(d, model, "tensorflow", inp, out, True, key, quantize=True, schema="int8")
    t0 = time.perf_counter()
    conv = api.convert(yml, build_dir=d / "build")
    t_conv = time.perf_counter() - t0
    g = conv.graph
    # qmace's exact integer reference kernels: ONNX Runtime's u8 x s8 kernels saturate on AVX2 without VNNI
    y = logits(g, inp, out, xe, threads, backend="reference")
    dq = next(n for n in g.nodes if n.outputs[0] == out)
    step = float(g.tensors[dq.inputs[0]].quant.scale)
    cmp = f"vs TF fake-quant: {steps_report(y, ref, step)}"
    print(f"{key}: convert {t_conv:.1f} s, step {step:.4g}, {cmp}, fallbacks {len(conv.fallbacks)}", flush=True)
    lite = model.parent / "mobilenet_v2_qat.tflite"
    if lite.is_file():  # TensorFlow's own integer model of the QAT graph, run by LiteRT
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(str(lite), num_threads=threads)
        it.allocate_tensors()
        i_in, i_out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        y_lite = []
        for x in xe.transpose(0, 2, 3, 1):
            it.set_tensor(i_in, x[None].astype(np.float32))
            it.invoke()
            y_lite.append(it.get_tensor(i_out).copy())
        y_lite = np.concatenate(y_lite)
        lite_msg = f"vs LiteRT on {lite.name}: {steps_report(y, y_lite, step)}"
        print(f"{key}: qmace {lite_msg}; LiteRT vs TF fake-quant: {steps_report(y_lite, ref, step)}", flush=True)
        cmp += f"; {lite_msg}"
    return [label, f"{t_conv:.1f} s", cmp, "-", "-", "-"]


def steps_report(y: np.ndarray, ref: np.ndarray, step: float) -> str:
    """How far ``y`` is from ``ref`` in output quantization steps: % of elements off by more than one step,
    % off at all, the largest distance, and on how many images the top-1 class is the same."""
    off = np.abs(y - ref) / step
    same = int(np.sum(y.argmax(1) == ref.argmax(1)))
    return (f"{100 * np.mean(off > 1.0 + 1e-3):.3f}% of logits > 1 step (max {off.max():.2f}), "
            f"{100 * np.mean(off > 1e-3):.2f}% differ at all, top-1 same {same}/{len(y)}")


def ulp_noise(seeds: list[int], xe, xc, labels, tmp: Path, threads: int) -> list:
    """The noise floor of int8 top-1 agreement: the ONNX MobileNetV2 with its folded weights and biases moved
    by one float32 ulp (up or down at random) on a random 40% of elements, the size of the differences
    between the ONNX, tf1 and Keras 3 graphs; seed 0 = unperturbed. Same pipeline as ``qmace quantize``
    (equalization, MACE's calibrator, bias correction, int8), ONNX Runtime backend."""
    from qmace.api import load_float_graph, samples_for
    from qmace.config import load_config
    from qmace.quantize.bias_correction import ChannelMeans, correct_biases
    from qmace.quantize.calibration import make_calibrator
    from qmace.quantize.recipe import calibrate, equalize_on, quantize_for_config

    d = tmp / "ulp"
    d.mkdir()
    m = load_config(write_yaml(d, mobilenet_onnx(), "onnx", "input", "output", False, "ulp")).model(None)
    calib = write_inputs(d / "calib", "input", xc)
    base = load_float_graph(m)
    yf = logits(base, "input", "output", xe, threads)
    rows = []
    for seed in seeds:
        g = base.copy()
        rng = np.random.default_rng(seed)
        for n in g.nodes if seed else []:
            if n.op_type in ("Conv", "Gemm"):
                for name in n.inputs[1:3]:
                    v = g.tensors[name].data
                    up = np.where(rng.random(v.shape) < 0.5, np.inf, -np.inf).astype(np.float32)
                    g.tensors[name].data = np.where(rng.random(v.shape) < 0.4, np.nextafter(v, up), v).astype(np.float32)
        g, _ = equalize_on(g, samples_for(m, calib, 0), threads)
        cal = make_calibrator("mace", percentile=0.0, enhance=False, enhance_ratio=10.0)
        means = ChannelMeans(g)
        calibrate(g, samples_for(m, calib, 0), cal, threads, observers=[means])
        g, _ = correct_biases(g, means, "int8")
        q, _ = quantize_for_config(g, m, table=cal.ranges(), schema="int8")
        r = logits_metrics(yf, logits(q, "input", "output", xe, threads), labels)
        print(f"ulp noise seed {seed}: int8 agree {r['agree']:.1f}% SQNR {r['sqnr']:.2f} dB", flush=True)
        rows.append([f"ONNX, 1-ulp noise seed {seed}", "-", "-", "-", f"{r['agree']:.1f}% / {r['sqnr']:.2f} dB", "-"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-mace-steps", action="store_true")
    ap.add_argument("--models", default="onnx,tf1,keras3,qat,qat_intbias",
                    help="comma-separated subset to run; 'zoo' adds the Keras-applications graphs of "
                         "benchmarks/make_tf_zoo.py (random weights: op coverage; no MACE steps)")
    ap.add_argument("--zoo-photos", type=int, default=233,
                    help="zoo models: validate and evaluate int8 on the first N evaluation photos (calibration: all 64)")
    ap.add_argument("--zoo", default="", help="zoo models: comma-separated names (default: every zoo_*.pb)")
    ap.add_argument("--ulp-noise", default="", help="comma-separated seeds: int8 agreement of the ONNX model "
                    "with one-ulp weight noise (0 = none), the noise floor of the int8 comparison")
    args = ap.parse_args(argv)
    cache = default_cache()
    tfdir = cache / "tf"
    xe, paths = stamp_images("eval")
    xc, _ = stamp_images("calib")
    labels = labels_for(paths)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wanted = set(args.models.split(","))
        if "onnx" in wanted:
            import onnxruntime as ort

            onnx_path = mobilenet_onnx()
            s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            ref_onnx = np.concatenate([s.run(None, {"input": xe[i:i + 1]})[0] for i in range(len(xe))])
            rows.append(bench_model("mobilenet_v2 ONNX", "onnx", onnx_path, "input", "output", ref_onnx, xe, xc,
                                    labels, tmp, args.threads, not args.skip_mace_steps))
        for name in [f"mobilenet_v2_{k}" for k in ("tf1", "keras3") if k in wanted]:
            pb = tfdir / f"{name}.pb"
            if not pb.is_file():
                print(f"{pb}: missing; run benchmarks/make_tf_mobilenet.py first", file=sys.stderr)
                continue
            with np.load(tfdir / f"{name}.npz", allow_pickle=False) as z:
                ref, inp, out = z["y"], str(z["input_name"]), str(z["output_name"])
            rows.append(bench_model(f"{name} (.pb)", "tensorflow", pb, inp, out, ref, xe, xc, labels, tmp,
                                    args.threads, not args.skip_mace_steps))
        if "zoo" in wanted:
            n = args.zoo_photos
            zoo_labels = {i: v for i, v in labels.items() if i < n}
            only = set(args.zoo.split(",")) if args.zoo else None
            for pb in sorted(tfdir.glob("zoo_*.pb")):
                if only is not None and pb.stem[4:] not in only:
                    continue
                with np.load(pb.with_suffix(".npz"), allow_pickle=False) as z:
                    ref, inp, out = z["y"][:n], str(z["input_name"]), str(z["output_name"])
                rows.append(bench_model(f"{pb.stem[4:]} (.pb, random weights, {len(ref)} photos)", "tensorflow", pb,
                                        inp, out, ref, xe[:len(ref)], xc, zoo_labels, tmp, args.threads, False))
        if args.ulp_noise:
            rows += ulp_noise([int(v) for v in args.ulp_noise.split(",")], xe, xc, labels, tmp, args.threads)
        for key, label in QAT_GRAPHS.items():
            pb = tfdir / f"mobilenet_v2_{key}.pb"
            if key not in wanted:
                continue
            if not pb.is_file():
                print(f"{pb}: missing; run benchmarks/make_tf_mobilenet.py {key.replace('_', '-')} first",
                      file=sys.stderr)
                continue
            with np.load(pb.with_suffix(".npz"), allow_pickle=False) as z:
                ref, inp, out = z["y"], str(z["input_name"]), str(z["output_name"])
            rows.append(bench_qat(key, label, pb, inp, out, ref, xe, tmp, args.threads))
    print(md_table(["model (format)", "conversion", "float vs source framework (233 stamps)",
                    "MACE steps: top-1 agree / SQNR vs FP32", "qmace quantize int8: top-1 agree / SQNR vs FP32",
                    "latency int8 / FP32"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
