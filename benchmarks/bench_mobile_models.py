#!/usr/bin/env python3
"""Issue 10: real mobile models beyond MobileNetV2, quantized by qmace, ORT ``quantize_static`` and NNCF.

    python benchmarks/bench_mobile_models.py [--models det,seg,cls] [--schemas int8_w7,int8,uint8]
        [--refine bc,adaround] [--no-peers] [--nncf-python PY] [--repeats 15] [--json OUT]

Setup: ``python scripts/fetch_assets.py rapidocr mediapipe stamps extra-photos``.

Models (all from packages):
- ``det``: PP-OCRv4 text detector (RapidOCR's ch_PP-OCRv4_det_infer.onnx; HardSwish written as
  ``x * Clip(x+3, 0, 6) / 6``, HardSigmoid, squeeze-excite Mul, Resize, ConvTranspose, sigmoid map out),
  input 1x3x480x640 (BGR, (x/255 - 0.5)/0.5 as RapidOCR). Task metric: IoU of the map thresholded at 0.3
  (RapidOCR's ``thresh``) vs FP32's, per image (1.0 when both are empty).
- ``seg``: MediaPipe selfie segmentation (selfie_segmentation.tflite, through qmace's TFLite frontend; its
  FP32 ONNX for ORT/NNCF is qmace's lowering of the float graph), input 1x3x256x256 RGB in [0, 1]. Task
  metric: IoU of the mask thresholded at 0.5 vs FP32's (1.0 when both are empty).
- ``cls``: PP-OCR text-direction classifier (ch_ppocr_mobile_v2.0_cls_infer.onnx, MobileNetV3-small:
  HardSwish, squeeze-excite, softmax over {0, 180} degrees), input 1x3x48x192. Task metric: top-1 agreement
  with FP32 (and accuracy against the true orientation).

Data (real photos, text drawn with Pillow's built-in font): the Tux Paint stamps of data/stamps-split.json
(alpha-composited on white) and the 17 extra photos (mate-backgrounds + scikit-image). **Rule: calibration
images come only from the split's 64 ``calib`` stamps, evaluation images only from its 233 ``eval`` stamps and
the extra photos; the drawn text uses a different random seed for each side.** det: 16 calibration images,
48 eval stamps + 17 photos; seg: 32 / 60 + 17; cls: 64 text lines cut from calibration stamps / 200 from
evaluation stamps (half of each rotated 180 degrees).

Per model and quantizer: float ops left (qmace: the quantizer's fallback list; peers: ops that run on float
tensors between DequantizeLinear and QuantizeLinear, i.e. every non-QDQ node whose ONNX Runtime graph is not a
fused QLinear kernel is counted from ORT's optimized graph), latency at one thread on ONNX Runtime and OpenVINO
(interleaved medians, ratio FP32 / int8 > 1 means int8 is faster), the task metric, the fraction of images
with MACE's cosine >= 0.98 vs FP32, and SQNR over all outputs. qmace's pipeline is ``qmace quantize
--method percentile --percentile 99.95`` (activation equalization, histogram percentile 99.95, bias correction,
the pipeline docs/quantization.md recommends; each row is one ``run_ptq`` with its own ``PTQRecipe``, so
equalization follows the row's schema; ``--refine adaround`` adds ``--adaround`` rows, ``--refine u16`` a diagnostic
row with every activation 16-bit; the inputs of
Sigmoid/Tanh/HardSigmoid/Softmax ranged by ``qmace.quantize.dense``). ORT's own int8 models run
as ORT runs them (its u8 x s8 kernels, which saturate on CPUs without VNNI); qmace's int8 models run on
qmace's backend (exact: int8 weights as uint8 + 128 where ORT's kernels would saturate).
Intermediate files go to <cache>/bench-mobile/ (never the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnxruntime

onnxruntime.set_default_logger_severity(3)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved_medians, md_table, ort_session, warm_medians

from qmace.api import convert_model, load_float_graph
from qmace.config import load_config
from qmace.data import Sample
from qmace.metrics import compare
from qmace.onnx_bridge import to_onnx
from qmace.qmath import Range
from qmace.quantize.bias_correction import layer_weight
from qmace.quantize.quantizer import QuantizeOptions
from qmace.quantize.recipe import PTQRecipe, run_ptq
from qmace.runtime import Session
from qmace_zoo import default_cache, load_split, stamps_dir

COSINE = 0.98
WORDS = ("OPEN", "SALE", "exit", "Coffee", "42", "Station", "qmace", "NO PARKING", "Menu", "2026", "river",
         "Hotel", "push", "Bus 7", "Danger", "welcome", "MILK", "tea", "Library", "open 9-5", "Zone B", "fish")


# ----------------------------------------------------------------------------------------------- images


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _stamp(path: str):
    from PIL import Image

    with Image.open(stamps_dir() / path) as im:
        rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _photo(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _sources(side: str, n_stamps: int, photos: bool) -> list:
    """PIL images of one side: ``n_stamps`` stamps spread evenly over the split's ``side`` list, plus (eval
    only) the extra photos."""
    paths = list(load_split()[side])
    idx = np.linspace(0, len(paths) - 1, min(n_stamps, len(paths))).round().astype(int)
    imgs = [_stamp(paths[i]) for i in dict.fromkeys(idx.tolist())]
    if photos:
        manifest = default_cache() / "extra-photos.json"
        imgs += [_photo(p) for p in json.loads(manifest.read_text())["photos"]]
    return imgs


def _draw_text(img, rng: np.random.Generator, lines: int):
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(lines):
        size = int(rng.integers(max(10, h // 30), max(12, h // 9)))
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))).tolist())
        dark = rng.random() < 0.5
        color = tuple(int(v) for v in (rng.integers(0, 60, 3) if dark else rng.integers(200, 256, 3)))
        d.text((int(rng.integers(0, max(1, w * 2 // 3))), int(rng.integers(0, max(1, h - size)))), text,
               fill=color, font=_font(size))
    return img


def det_input(im, rng: np.random.Generator) -> np.ndarray:
    """One PIL image as det's input: resized to 640x480, 2-6 text lines drawn with ``rng``, (3, 480, 640) BGR
    in [-1, 1]."""
    im = _draw_text(im.resize((640, 480)), rng, int(rng.integers(2, 7)))
    a = np.asarray(im, np.float32)[:, :, ::-1] / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def seg_input(im) -> np.ndarray:
    """One PIL image as seg's input: (3, 256, 256) RGB in [0, 1]."""
    return np.asarray(im.resize((256, 256)), np.float32).transpose(2, 0, 1) / 255.0


def det_inputs(side: str) -> np.ndarray:
    """(N, 3, 480, 640) BGR in [-1, 1], text drawn on each image (seed by side)."""
    rng = np.random.default_rng(1 if side == "calib" else 2)
    return np.stack([det_input(im, rng) for im in _sources(side, 16 if side == "calib" else 48, side == "eval")])


def seg_inputs(side: str) -> np.ndarray:
    """(N, 3, 256, 256) RGB in [0, 1]."""
    return np.stack([seg_input(im) for im in _sources(side, 32 if side == "calib" else 60, side == "eval")])


def cls_inputs(side: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 48, 192) text-line crops ((x/255 - 0.5)/0.5, right-padded with 0 as RapidOCR), and the true
    orientation (0: upright, 1: rotated 180 degrees)."""
    from PIL import Image

    rng = np.random.default_rng(3 if side == "calib" else 4)
    n = 64 if side == "calib" else 200
    imgs = _sources(side, 64 if side == "calib" else 233, False)
    xs, ys = [], []
    for i in range(n):
        src = imgs[i % len(imgs)]
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))).tolist())
        font = _font(int(rng.integers(20, 34)))
        l, t, r, b = font.getbbox(text)
        tw, th = r - l + 8, b - t + 8
        sw, sh = src.size
        sx, sy = int(rng.integers(0, max(1, sw - tw))), int(rng.integers(0, max(1, sh - th)))
        crop = src.resize((max(sw, tw), max(sh, th))).crop((sx, sy, sx + tw, sy + th))
        from PIL import ImageDraw

        dark = float(np.asarray(crop, np.float32).mean()) > 127
        ImageDraw.Draw(crop).text((4 - l, 4 - t), text, fill=(20, 20, 20) if dark else (240, 240, 240), font=font)
        flip = i % 2
        if flip:
            crop = crop.rotate(180)
        ratio = crop.size[0] / crop.size[1]
        width = min(192, int(np.ceil(48 * ratio)))
        a = (np.asarray(crop.resize((width, 48), Image.BILINEAR), np.float32)[:, :, ::-1] / 255.0 - 0.5) / 0.5
        x = np.zeros((3, 48, 192), np.float32)
        x[:, :, :width] = a.transpose(2, 0, 1)
        xs.append(x)
        ys.append(flip)
    return np.stack(xs), np.array(ys)


# ----------------------------------------------------------------------------------------------- models


@dataclass
class Model:
    name: str
    fp32_onnx: Path  # fixed-shape FP32 ONNX: the baseline and the peers' input
    graph: object  # qmace's optimized float graph
    input_name: str
    output_name: str
    input_range: tuple[float, float]
    calib: np.ndarray
    evals: np.ndarray
    labels: np.ndarray | None = None
    metric: str = "iou"
    thresh: float = 0.5
    notes: dict = field(default_factory=dict)


def fixed_shape_onnx(src: Path, dest: Path, shape: tuple[int, ...]) -> Path:
    """``src`` with its (single) input's shape fixed to ``shape``, written to ``dest``."""
    import onnx

    m = onnx.load(src)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        d.dim_value = v
    onnx.save(m, dest)
    return dest


def load_models(which: list[str], work: Path) -> list[Model]:
    cache = default_cache()
    out = []
    for name in which:
        if name in ("det", "cls"):
            src = cache / "rapidocr" / ("ch_PP-OCRv4_det_infer.onnx" if name == "det"
                                       else "ch_ppocr_mobile_v2.0_cls_infer.onnx")
            if not src.is_file():
                raise SystemExit("run `python scripts/fetch_assets.py rapidocr` first")
            shape = (1, 3, 480, 640) if name == "det" else (1, 3, 48, 192)
            fp32 = fixed_shape_onnx(src, work / f"{name}_fp32.onnx", shape)
            g = convert_model(fp32)
            if name == "det":
                out.append(Model(name, fp32, g, "x", g.outputs[0], (-1.0, 1.0), det_inputs("calib"),
                                 det_inputs("eval"), thresh=0.3))
            else:
                xc, _ = cls_inputs("calib")
                xe, ye = cls_inputs("eval")
                out.append(Model(name, fp32, g, "x", g.outputs[0], (-1.0, 1.0), xc, xe, labels=ye, metric="top1"))
        elif name == "seg":
            from bench_tflite import tflite_yaml

            src = cache / "mediapipe-models" / "selfie_segmentation.tflite"
            if not src.is_file():
                raise SystemExit("run `python scripts/fetch_assets.py mediapipe` first")
            cfg = tflite_yaml(work, src, "selfie_segmentation", input_range=(0.0, 1.0))
            g = load_float_graph(load_config(cfg).model(None))
            fp32 = work / "seg_fp32.onnx"
            fp32.write_bytes(to_onnx(g).SerializeToString())
            out.append(Model(name, fp32, g, g.inputs[0], g.outputs[0], (0.0, 1.0), seg_inputs("calib"),
                             seg_inputs("eval")))
        else:
            raise SystemExit(f"unknown model {name!r} (det, seg, cls)")
    return out


# ------------------------------------------------------------------------------------------- quantizers


#: qmace's pipelines: ``bc`` is ``qmace quantize --method percentile --percentile 99.95`` (equalization,
#: histogram percentile 99.95, bias correction); ``adaround`` adds ``--adaround`` (learned rounding with its
#: own bias correction instead of plain bias correction). Both fixed before any evaluation image was seen.
#: ``u16`` is a diagnostic row, not a deployment: every activation 16-bit (``wide_activations: all``, MACE's
#: ``mace_htp_u16a_s8w``) with min/max ranges (``--method mace``), to show what the 8-bit weights alone cost.
REFINES = {"bc": {}, "adaround": {"adaround": True}, "u16": {"method": "mace", "percentile": None}}


def qmace_recipe(schema: str, refine: str) -> PTQRecipe:
    """The ``PTQRecipe`` of one qmace row: the command's recipe for ``schema`` (equalization follows the
    schema's rule: per-tensor weights keep every producer's range for ``uint8``)."""
    return PTQRecipe(**{"method": "percentile", "percentile": 99.95, "schema": schema, **refine_settings(refine)})


def refine_settings(refine: str) -> dict:
    """``REFINES[refine]``, or for ``s16_K`` the ``bc`` pipeline plus ``--sensitivity_16bit K`` (the K activations
    whose 8-bit quantization alone costs the calibration images most get 16 bits)."""
    if refine.startswith("s16_") and refine[4:].isdigit():
        return {"sensitivity_16bit": int(refine[4:])}
    if refine not in REFINES:
        raise SystemExit(f"unknown --refine {refine!r}: {', '.join(REFINES)} or s16_K")
    return REFINES[refine]


def qmace_ptq(m: Model, schema: str, refine: str = "bc", recipe: PTQRecipe | None = None):
    """``run_ptq`` with ``recipe`` (default ``qmace_recipe(schema, refine)``) on the calibration images."""
    samples = [Sample("", {m.input_name: x[None]}) for x in m.calib]
    opts = QuantizeOptions(schema=schema, input_ranges={m.input_name: Range(*m.input_range)},
                           wide_activations="all" if refine == "u16" else "rule")
    return run_ptq(m.graph, samples, recipe or qmace_recipe(schema, refine), opts, num_threads=1)


def qmace_quantize(m: Model, schema: str, refine: str = "bc") -> tuple[object, list[str], dict]:
    """``qmace_ptq``: the quantized graph, its fallback list and the recipe's figures
    (``metadata["quantization"]``: equalized tensors, corrected / AdaRounded layers)."""
    res = qmace_ptq(m, schema, refine)
    figures = {k: res.graph.metadata["quantization"].get(k) for k in
               ("equalized_tensors", "bias_corrected_layers", "adaround", "adaround_optimised_layers")}
    figures["linear_layers"] = sum(layer_weight(res.float_graph, n) is not None for n in res.float_graph.nodes)
    return res.graph, res.fallbacks, figures


class _Reader:
    def __init__(self, name: str, xs: np.ndarray):
        self.it = iter([{name: x[None]} for x in xs])

    def get_next(self):
        return next(self.it, None)


def ort_quantize(m: Model, work: Path) -> Path:
    """ONNX Runtime ``quantize_static`` with its defaults (QDQ, u8 activations, s8 per-tensor weights, MinMax)."""
    from onnxruntime.quantization import quantize_static

    out = work / f"{m.name}_ort_qdq.onnx"
    quantize_static(str(m.fp32_onnx), str(out), _Reader(m.input_name, m.calib))
    return out


def nncf_quantize(m: Model, work: Path, python: str) -> Path | None:
    out = work / f"{m.name}_nncf.onnx"
    calib = work / f"{m.name}_calib.npz"
    np.savez(calib, **{m.input_name: m.calib})
    script = Path(__file__).resolve().parent / "nncf_quantize_onnx.py"
    r = subprocess.run([python, str(script), str(m.fp32_onnx), str(calib), str(out)], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{m.name}: NNCF failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return out


def float_ops_in_ort(model: Path) -> list[str]:
    """Op types ONNX Runtime runs on float tensors in its optimized graph of a QDQ model (QuantizeLinear /
    DequantizeLinear themselves and fused QLinear*/QGemm/com.microsoft kernels excluded)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.intra_op_num_threads = 1
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath).graph
    skip = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Reshape", "Flatten", "Squeeze",
            "Unsqueeze", "Transpose", "Shape", "Identity", "Constant", "ReorderInput", "ReorderOutput"}
    return [n.op_type for n in g.node if n.op_type not in skip and not n.op_type.startswith(("QLinear", "QGemm"))
            and n.domain not in ("com.microsoft",)]


# ----------------------------------------------------------------------------------------------- metrics


def task_metric(m: Model, ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """(task metric over the eval set, fraction of images whose task score >= 0.95 or whose cosine >= 0.98,
    and for maps the IoU of all eval pixels pooled: sum of intersections / sum of unions)."""
    cos = np.array([compare(r, o).cosine for r, o in zip(ref, out)])
    if m.metric == "top1":
        agree = ref.reshape(len(ref), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)
        return float(agree.mean()), float((cos >= COSINE).mean()), float("nan")
    a, b = ref > m.thresh, out > m.thresh
    pooled = float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))
    ious = []
    for r, o in zip(ref, out):
        a, b = r > m.thresh, o > m.thresh
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    ious = np.array(ious)
    return float(ious.mean()), float(np.mean((ious >= 0.95) | (cos >= COSINE))), pooled


def per_image(m: Model, ref: np.ndarray, out: np.ndarray) -> list[list[float]]:
    """Per evaluation image: [task score (IoU, or 1/0 top-1 agreement), cosine vs FP32] (which images fail)."""
    rows = []
    for r, o in zip(ref, out):
        if m.metric == "top1":
            score = float(r.argmax() == o.argmax())
        else:
            a, b = r > m.thresh, o > m.thresh
            union = np.logical_or(a, b).sum()
            score = 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
        rows.append([round(score, 4), round(float(compare(r, o).cosine), 5)])
    return rows


def run_all(fn, xs: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(x[None]) for x in xs])


def bench_model(m: Model, schemas: list[str], work: Path, nncf_python: str | None, repeats: int,
                refines: list[str] = ("bc",), peers_on: bool = True, warm_rounds: int = 0) -> list[dict]:
    import openvino as ov

    core = ov.Core()
    ov_cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}

    def ov_fn(path: Path):
        try:
            c = core.compile_model(core.read_model(str(path)), "CPU", ov_cfg)
        except RuntimeError as e:  # OpenVINO rejecting a peer's file is a result to report
            first = next((ln for ln in str(e).splitlines() if "CALLBACK" in ln or "Check" in ln), str(e)[:200])
            print(f"{m.name}: OpenVINO cannot compile {path.name}: {first.strip()}", flush=True)
            return None
        req = c.create_infer_request()
        return lambda x: np.array(req.infer({0: x})[c.outputs[0]])

    def ort_fn(path: Path, exact: bool = False):
        s = ort_session(path, 1, exact_int8=exact)
        name = s.get_inputs()[0].name
        return lambda x: s.run(None, {name: x})[0]

    variants: dict[str, dict] = {"FP32": {"ort": ort_fn(m.fp32_onnx), "ov": ov_fn(m.fp32_onnx), "float_ops": "-"}}
    for schema, refine in [(s, r) for r in refines for s in schemas]:
        t0 = time.perf_counter()
        qg, fallbacks, figures = qmace_quantize(m, schema, refine)
        print(f"{m.name} {schema} {refine}: {figures}", flush=True)
        s_ort = Session(qg, backend="onnxruntime", num_threads=1)
        s_ov = Session(qg, backend="openvino", num_threads=1)
        kinds = sorted({f.split("(")[1].split(")")[0] for f in fallbacks})
        variants[f"qmace {schema}" + ("" if refine == "bc" else f" {refine}")] = {
            "ort": lambda x, s=s_ort: s.run({m.input_name: x})[m.output_name],
            "ov": lambda x, s=s_ov: s.run({m.input_name: x})[m.output_name],
            "float_ops": f"{len(fallbacks)} ({', '.join(kinds)})" if fallbacks else "0",
            "build_s": time.perf_counter() - t0, "figures": figures}
    peers = [("ORT quantize_static", lambda: ort_quantize(m, work))]
    if not peers_on:
        peers = []
    elif nncf_python:
        peers.append(("NNCF", lambda: nncf_quantize(m, work, nncf_python)))
    for label, make in peers:
        try:
            path = make()
        except Exception as e:  # a peer failing on a real model is a result to report
            print(f"{m.name}: {label} failed: {str(e).splitlines()[0]}", flush=True)
            continue
        if path is None:
            continue
        ops = float_ops_in_ort(path)
        kinds = sorted(set(ops))
        variants[label] = {"ort": ort_fn(path), "ov": ov_fn(path),
                           "float_ops": f"{len(ops)} ({', '.join(kinds)})" if ops else "0"}
    ref = run_all(variants["FP32"]["ort"], m.evals)
    rows = []
    timed = {}
    x1 = m.evals[:1]
    for label, v in variants.items():
        for be in ("ort", "ov"):
            if v[be] is not None:
                timed[(label, be)] = (lambda f=v[be]: f(x1))
    print(f"{m.name}: timing {len(timed)} runs x {repeats}", flush=True)
    lat = interleaved_medians({f"{k[0]}|{k[1]}": f for k, f in timed.items()}, repeats=repeats, warmup=2)
    warm = (warm_medians({f"{k[0]}|{k[1]}": f for k, f in timed.items()}, rounds=warm_rounds)
            if warm_rounds else {})
    for label, v in variants.items():
        row = {"model": m.name, "quantizer": label, "float_ops": v["float_ops"],
               "ort_ms": lat[f"{label}|ort"], "ov_ms": lat.get(f"{label}|ov", float("nan"))}
        row["ort_speedup"] = lat["FP32|ort"] / row["ort_ms"]
        row["ov_speedup"] = lat["FP32|ov"] / row["ov_ms"] if row["ov_ms"] == row["ov_ms"] else float("nan")
        for be in ("ort", "ov") if warm else ():
            w = warm.get(f"{label}|{be}", float("nan"))
            row[f"{be}_warm_ms"], row[f"{be}_warm_speedup"] = w, warm[f"FP32|{be}"] / w
        if "figures" in v:
            row["figures"] = v["figures"]
        for be in ("ort", "ov"):
            if v[be] is None:
                row.update({f"{be}_metric": float("nan"), f"{be}_within": float("nan"), f"{be}_sqnr": float("nan"),
                            f"{be}_pooled": float("nan")})
                continue
            out = run_all(v[be], m.evals)
            metric, within, pooled = task_metric(m, ref, out)
            row[f"{be}_per_image"] = per_image(m, ref, out)
            row[f"{be}_pooled"] = pooled
            row[f"{be}_metric"] = metric
            row[f"{be}_within"] = within
            row[f"{be}_sqnr"] = compare(ref, out).sqnr_db
            if m.labels is not None:
                row[f"{be}_acc"] = float((out.reshape(len(out), -1).argmax(1) == m.labels).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    """One markdown table per model (rows as ``bench_model`` returns them, or read back from ``--json``)."""
    parts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == name]
        top1 = name == "cls"
        metric = "top-1 agr." if top1 else "mean IoU"

        def f(v, fmt):
            return "n/a" if v != v else format(v, fmt)

        warm = "ort_warm_ms" in mr[0]
        head = ["quantizer", "float ops", "ORT ms", "FP32/int8 ORT", "OV ms", "FP32/int8 OV"]
        head += ["FP32/int8 ORT warm", "FP32/int8 OV warm"] if warm else []
        for be in ("ORT", "OV"):
            head += [f"{metric} {be}"] + ([] if top1 else [f"pooled IoU {be}"]) + [f"ok images {be}", f"SQNR dB {be}"]
        body = []
        for r in mr:
            line = [r["quantizer"], r["float_ops"], f(r["ort_ms"], ".2f"), f(r["ort_speedup"], ".2f") + "x",
                    f(r["ov_ms"], ".2f"), f(r["ov_speedup"], ".2f") + "x"]
            line += [f(r[f"{be}_warm_speedup"], ".2f") + "x" for be in ("ort", "ov")] if warm else []
            for be in ("ort", "ov"):
                line += [f(r[f"{be}_metric"], ".3f")] + ([] if top1 else [f(r.get(f"{be}_pooled", float("nan")), ".3f")])
                line += [f(100 * r[f"{be}_within"], ".0f") + "%", f(r[f"{be}_sqnr"], ".1f")]
            body.append(line)
        parts.append(f"### {name}\n\n" + md_table(head, body))
    return "\n\n".join(parts)


def failures(rows: list[dict], work: Path, small: float = 0.05) -> str:
    """Which evaluation images miss the per-image criterion, for the map models of a ``--json`` file: the
    FP32 map's foreground (pixels above the model's threshold) of the failing vs the passing images, and how
    many of each have a foreground under ``small`` of the image (a sliver: a few hundred pixels decide the IoU)."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] != "cls"):
        m = load_models([name], work)[0]
        s = ort_session(m.fp32_onnx, 1)
        fg = np.array([float((s.run(None, {m.input_name: x[None]})[0] > m.thresh).mean()) for x in m.evals])
        lines.append(f"{name}: {int((fg < small).sum())} of {len(fg)} evaluation images have an FP32 foreground "
                     f"under {100 * small:.0f}% ({int((fg == 0).sum())} none)")
        for r in rows:
            if r["model"] != name or "ort_per_image" not in r or not r["quantizer"].startswith("qmace"):
                continue
            bad = np.array([not (sc >= 0.95 or cos >= COSINE) for sc, cos in r["ort_per_image"]])
            lines.append(f"  {r['quantizer']} (ORT): {int(bad.sum())} fail; FP32 foreground median "
                         f"{100 * np.median(fg[bad]) if bad.any() else float('nan'):.1f}% failing vs "
                         f"{100 * np.median(fg[~bad]):.1f}% passing; failing with foreground < {100 * small:.0f}%: "
                         f"{int((fg[bad] < small).sum())} ({int((fg[bad] == 0).sum())} with none: int8 marks pixels FP32 does not)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="det,seg,cls")
    ap.add_argument("--schemas", default="int8_w7,int8,uint8")
    ap.add_argument("--nncf-python", default=os.environ.get("QMACE_NNCF_PYTHON", ""),
                    help="a Python with nncf installed, e.g. a venv's (default $QMACE_NNCF_PYTHON; empty: skip NNCF)")
    ap.add_argument("--refine", default="bc",
                    help="qmace pipelines, comma-separated: bc (bias correction), adaround, u16 (diagnostic), s16_K "
                         "(bc plus --sensitivity_16bit K) (default bc)")
    ap.add_argument("--no-peers", action="store_true", help="skip ORT quantize_static and NNCF")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warm-rounds", type=int, default=0,
                    help="also time with warm caches: rounds of 20 calls in a row per variant (common.warm_medians)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--report", type=Path, default=None, help="only print the tables of a --json file")
    ap.add_argument("--failures", type=Path, default=None,
                    help="only say which evaluation images of a --json file miss the criterion (FP32 foreground)")
    args = ap.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    work = default_cache() / "bench-mobile"
    work.mkdir(parents=True, exist_ok=True)
    if args.failures is not None:
        print(failures(json.loads(args.failures.read_text()), work))
        return 0
    nncf_python = args.nncf_python if args.nncf_python and Path(args.nncf_python).exists() else None
    models = load_models(args.models.split(","), work)
    rows = []
    for m in models:
        rows += bench_model(m, args.schemas.split(","), work, nncf_python, args.repeats, args.refine.split(","),
                            not args.no_peers, args.warm_rounds)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
