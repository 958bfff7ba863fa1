#!/usr/bin/env python3
"""Caffe benchmark: Yahoo's open_nsfw (ResNet-50-1by2, `platform: caffe`) on real photos (Tux Paint stamps).

    python scripts/fetch_assets.py open-nsfw stamps
    python benchmarks/bench_caffe_nsfw.py [--threads 1] [--cache DIR] [--data DIR]

Every step goes through the `qmace` CLI, as a MACE user would run it (one subprocess per command):
1. FP32: `convert`, then `run --validate` on the 233 `eval` stamps against OpenCV DNN (the Caffe model run
   by OpenCV from the same prototxt + caffemodel) with a 0.9999 cosine threshold on the `pool` features
   (1024), the `fc_nsfw` logits and the `prob` output.
2. MACE's four PTQ steps (uint8 schema) at percentile 0 and 5: `run --quantize_stat` on the 64 `calib`
   stamps, `quantize-stat`, `convert` with `quantize: 1`, `run` on the 233 `eval` stamps.
3. `qmace quantize` (one shot: equalization, bias correction) on the 64 `calib` stamps, int8 and uint8.
Figures on the 233 `eval` stamps, disjoint from the 64 calibration stamps, against the FP32 reference
(OpenCV DNN): agreement of the SFW/NSFW decision (argmax of `prob`), SQNR of the NSFW score, of both
probabilities and of the logits, and the largest NSFW-score change.

Preprocessing is open_nsfw's own (the `nsfw` package / classify_nsfw.py): RGB (stamps composited on white,
as qmace_zoo does), resize to 256x256 bilinear, re-encode as JPEG (Pillow's default quality) and decode,
centre crop 224, HWC -> CHW, RGB -> BGR, values 0..255 minus the mean (104, 117, 123).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # qmace_zoo is not installed

from qmace.metrics import sqnr_db
from qmace_zoo import default_cache, load_split, stamps_dir

MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
PROTOTXT, CAFFEMODEL = "deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel"
OUTPUTS = ["pool", "fc_nsfw", "prob"]


def preprocess(path: Path) -> np.ndarray:
    """One image -> (3, 224, 224) float32 BGR minus mean, as open_nsfw (see the module docstring)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((256, 256), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    buf.seek(0)
    with Image.open(buf) as im:
        arr = np.asarray(im.convert("RGB"), np.float32)
    off = (256 - 224) // 2
    arr = arr[off:off + 224, off:off + 224, ::-1] - MEAN_BGR  # RGB -> BGR
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def write_inputs(directory: Path, paths: list[str], root: Path) -> np.ndarray:
    directory.mkdir(parents=True, exist_ok=True)
    xs = np.stack([preprocess(root / p) for p in paths])
    for i, x in enumerate(xs):
        x[None].astype(np.float32).tofile(directory / f"data_{i:03d}")
    return xs


def write_yaml(path: Path, model_dir: Path, *, quantize: bool = False, range_file: Path | None = None,
               schema: str | None = None) -> Path:
    from hashlib import sha256

    def digest(p: Path) -> str:
        return sha256(p.read_bytes()).hexdigest()

    lines = [
        "library_name: open_nsfw",
        "target_abis: [host]",
        "model_graph_format: file",
        "model_data_format: file",
        "models:",
        "  open_nsfw:",
        "    platform: caffe",
        f"    model_file_path: {model_dir / PROTOTXT}",
        f"    model_sha256_checksum: {digest(model_dir / PROTOTXT)}",
        f"    weight_file_path: {model_dir / CAFFEMODEL}",
        f"    weight_sha256_checksum: {digest(model_dir / CAFFEMODEL)}",
        "    runtime: cpu",
        "    validation_threshold: 0.9999",
    ]
    if quantize:
        lines.append("    quantize: 1")
        if range_file is not None:
            lines.append(f"    quantize_range_file: {range_file}")
    if schema is not None:
        lines.append(f"    quantize_schema: {schema}")
    lines += [
        "    subgraphs:",
        "      - input_tensors: data",
        "        input_shapes: 1,3,224,224",
        "        input_data_formats: NCHW",
        "        input_ranges: -123,151",  # 0..255 minus the BGR mean
        f"        output_tensors: [{', '.join(OUTPUTS)}]",
        "        output_shapes: [\"1,1024,1,1\", \"1,2\", \"1,2\"]",
        "        output_data_formats: NONE",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def qmace(*args: object, threads: int) -> str:
    """Run one qmace CLI command; its stdout. Exits with its stderr when it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "qmace", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def read_outputs(directory: Path, n: int) -> dict[str, np.ndarray]:
    return {o: np.concatenate([np.load(directory / f"{o}_{i:03d}.npy").reshape(1, -1) for i in range(n)])
            for o in OUTPUTS}


def opencv_outputs(model_dir: Path, xs: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """The FP32 reference: OpenCV DNN on the Caffe files (fusion and Winograd off)."""
    import cv2

    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(model_dir / PROTOTXT), str(model_dir / CAFFEMODEL))
    net.enableFusion(False)
    net.enableWinograd(False)
    out: dict[str, list] = {o: [] for o in OUTPUTS}
    for x in xs:
        net.setInput(x[None], "data")
        for o, v in zip(OUTPUTS, net.forward(OUTPUTS)):
            out[o].append(np.asarray(v).reshape(-1))
    return {o: np.stack(v) for o, v in out.items()}


def row(label: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str:
    agree = float(np.mean(ref["prob"].argmax(1) == got["prob"].argmax(1)))
    score_ref, score = ref["prob"][:, 1], got["prob"][:, 1]
    return (f"| {label} | {100 * agree:.1f}% ({round(agree * len(score))}/{len(score)}) | "
            f"{sqnr_db(score_ref, score):.1f} | {sqnr_db(ref['prob'], got['prob']):.1f} | "
            f"{sqnr_db(ref['fc_nsfw'], got['fc_nsfw']):.1f} | {np.abs(score - score_ref).max():.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--no-reference-int8", action="store_true",
                    help="skip running the int8 model on the exact reference backend (about 3 s per image)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cache = args.cache or default_cache()
    model_dir = cache / "open_nsfw"
    if not (model_dir / CAFFEMODEL).is_file():
        sys.exit(f"{model_dir}: open_nsfw not fetched (run: python scripts/fetch_assets.py open-nsfw)")
    split = load_split(args.data)
    root = stamps_dir(cache)
    with tempfile.TemporaryDirectory(prefix="qmace_bench_caffe_") as d:
        return run_all(args, model_dir, split, root, Path(d), t_start)


def cosines(ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity (float64) of (N, D) arrays."""
    ref, x = ref.astype(np.float64), x.astype(np.float64)
    return (ref * x).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(x, axis=1))


def run_all(args, model_dir: Path, split: dict, root: Path, tmp: Path, t_start: float) -> int:
    T = args.threads
    build = tmp / "build"
    calib_dir, eval_dir = tmp / "calib", tmp / "eval"
    write_inputs(calib_dir, split["calib"], root)
    xe = write_inputs(eval_dir, split["eval"], root)
    n = len(xe)
    print(f"inputs: {len(split['calib'])} calib, {n} eval stamps ({time.perf_counter() - t_start:.0f} s)", flush=True)

    ref = opencv_outputs(model_dir, xe, T)
    out = ["## Caffe: open_nsfw (ResNet-50-1by2), Tux Paint stamps", "",
           "Command: `python benchmarks/bench_caffe_nsfw.py " + " ".join(sys.argv[1:]) + "`", ""]

    # 1. FP32 convert + validate against OpenCV DNN
    fp32_yaml = write_yaml(tmp / "fp32.yml", model_dir)
    summary = qmace("convert", "--config", fp32_yaml, "--build_dir", build, threads=T)
    text = qmace("run", "--config", fp32_yaml, "--build_dir", build, "--input_dir", eval_dir, "--validate",
                 "--output_dir", tmp / "out_fp32", "--num_threads", T, threads=T)
    checks = len(re.findall(r"^\s+_\d+\s+(?:pool|fc_nsfw|prob)\s", text, re.MULTILINE))
    verdict = "passed" if "validation passed" in text else "FAILED"
    fp32 = read_outputs(tmp / "out_fp32", n)
    out += ["FP32: `qmace run --validate` against OpenCV " + _cv_version() + f" DNN on the {n} eval stamps, "
            f"threshold cosine >= 0.9999 on each of the 3 outputs: **{verdict}** ({checks} checks). The same "
            "outputs (written by `--output_dir`) against OpenCV, per image in float64:", "",
            "| tensor | min cosine | 1 - min cosine | max abs error | decision agreement |", "|---|---|---|---|---|"]
    for o in OUTPUTS:
        c = cosines(ref[o], fp32[o])
        agree = f"{100 * np.mean(fp32['prob'].argmax(1) == ref['prob'].argmax(1)):.1f}%" if o == "prob" else ""
        out.append(f"| {o} | {c.min():.9f} | {1 - c.min():.1e} | {np.abs(fp32[o] - ref[o]).max():.2e} | {agree} |")
    nsfw = int((ref["prob"].argmax(1) == 1).sum())
    out += ["", f"Converted model: `{summary.splitlines()[0]}`; `{summary.splitlines()[1]}`.", "",
            (f"The FP32 decision is NSFW for {nsfw} of the {n} eval stamps (score >= 0.5); the NSFW scores "
            f"range {ref['prob'][:, 1].min():.4f} .. {ref['prob'][:, 1].max():.4f} (median "
            f"{np.median(ref['prob'][:, 1]):.4f})."), ""]
    print("\n".join(out), flush=True)

    # 2. MACE's four steps (uint8), percentile 0 and 5
    rows = [row("qmace FP32", ref, fp32)]
    range_log = tmp / "range_log"
    range_log.write_text(qmace("run", "--config", fp32_yaml, "--build_dir", build, "--quantize_stat",
                               "--input_dir", calib_dir, "--num_threads", T, threads=T))
    for p in (0, 5):
        rng_file = tmp / f"overall_range_p{p}"
        rng_file.write_text(qmace("quantize-stat", "--log_file", range_log, "--percentile", p, threads=T))
        yq = write_yaml(tmp / f"uint8_p{p}.yml", model_dir, quantize=True, range_file=rng_file)
        qmace("convert", "--config", yq, "--build_dir", tmp / f"build_p{p}", threads=T)
        qmace("run", "--config", yq, "--build_dir", tmp / f"build_p{p}", "--input_dir", eval_dir,
              "--output_dir", tmp / f"out_p{p}", "--num_threads", T, threads=T)
        rows.append(row(f"MACE 4 steps, uint8, percentile {p}", ref, read_outputs(tmp / f"out_p{p}", n)))
        print(rows[-1], flush=True)

    # 3. qmace quantize (one shot), int8 and uint8
    for schema in ("int8", "uint8"):
        yq = write_yaml(tmp / f"quantize_{schema}.yml", model_dir, quantize=True, schema=schema)
        qmace("quantize", "--config", yq, "--build_dir", tmp / f"build_q{schema}", "--input_dir", calib_dir,
              "--num_threads", T, threads=T)
        qmace("run", "--config", yq, "--build_dir", tmp / f"build_q{schema}", "--input_dir", eval_dir,
              "--output_dir", tmp / f"out_q{schema}", "--num_threads", T, threads=T)
        rows.append(row(f"`qmace quantize --schema {schema}`", ref, read_outputs(tmp / f"out_q{schema}", n)))
        print(rows[-1], flush=True)
    if not args.no_reference_int8:
        # ONNX Runtime's u8 x s8 kernels saturate on AVX2 CPUs without VNNI; qmace's reference backend runs
        # the documented integer arithmetic exactly (slow: seconds per image).
        qmace("run", "--config", tmp / "quantize_int8.yml", "--build_dir", tmp / "build_qint8", "--input_dir",
              eval_dir, "--output_dir", tmp / "out_qint8_ref", "--backend", "reference", "--num_threads", T,
              threads=T)
        rows.append(row("`qmace quantize --schema int8`, run with `--backend reference`", ref,
                        read_outputs(tmp / "out_qint8_ref", n)))
        print(rows[-1], flush=True)

    out += [(f"Quantized, calibrated on the 64 `calib` stamps, evaluated on the {n} `eval` stamps against the "
            "FP32 reference (OpenCV DNN):"), "",
            ("| model | SFW/NSFW decision agreement | NSFW score SQNR dB | prob SQNR dB | logits SQNR dB | "
            "max abs NSFW score change |"), "|---|---|---|---|---|---|", *rows, "",
            f"Run time {time.perf_counter() - t_start:.0f} s, {T} thread(s)."]
    print("\n" + "\n".join(out))
    return 0


def _cv_version() -> str:
    import cv2

    return cv2.__version__


if __name__ == "__main__":
    sys.exit(main())
