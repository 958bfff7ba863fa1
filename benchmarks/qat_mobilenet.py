#!/usr/bin/env python3
"""Benchmark B (label-free QAT): MobileNetV2 (torchvision ImageNet weights), PTQ vs QAT, both schemas.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/qat_mobilenet.py [--epochs 6] [--batch 16]

PTQ: MACE min/max ranges from the 64 calibration stamps. QAT: ``qmace.qat.prepare`` from the same ranges,
then label-free distillation (KL to the FP32 model's softmax) on the 64 calibration stamps with augmentation
(random resized crops and horizontal flips; never the 233 evaluation stamps). Evaluation on the 233
evaluation stamps against FP32 (ONNX Runtime): top-1 agreement and logits SQNR. Quantized models run in
ONNX Runtime (bit-exact with qmace's reference runtime). Target: QAT recovers at least half of the
agreement PTQ lost, per schema.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from qmace.zoo.stamps import CROP, IMAGENET_MEAN, IMAGENET_STD


def load_resized(paths, root: Path, short: int = 256) -> list[np.ndarray]:
    """Images composited on white, shorter side resized to ``short`` (uint8 HWC)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(root / p) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        w, h = rgb.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        out.append(np.asarray(rgb.resize(size, Image.BILINEAR)))
    return out


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop (scale 0.5-1 of the shorter side, resized to 224) + horizontal flip -> CHW normalised."""
    from PIL import Image

    h, w, _ = img.shape
    side = int(min(h, w) * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(img[top:top + side, left:left + side]).resize((CROP, CROP), Image.BILINEAR)
    x = np.asarray(crop, np.float32) / 255.0
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - x).astype(np.float64) ** 2)))


def run_batched(graph, x, batch=1):
    from qmace.runtime import Session

    s = Session(graph, num_threads=2)
    name, out = graph.inputs[0], graph.outputs[0]
    return np.concatenate([s.run({name: x[i:i + batch]})[out] for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6, help="passes over the 64 augmented calibration stamps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--range-lr", type=float, default=1e-4)
    ap.add_argument("--schemas", default="uint8,int8")
    args = ap.parse_args(argv)

    import torch

    from qmace.frontends.onnx_frontend import onnx_to_graph, read_onnx
    from qmace.passes import optimize
    from qmace.qat import prepare, train
    from qmace.qat.train import float_teacher
    from qmace.quantize.api import calibrate
    from qmace.quantize.calibration import make_calibrator
    from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
    from qmace.zoo import default_cache, export_onnx, load_images, load_mobilenet_v2, load_split, stamps_dir

    t_start = time.perf_counter()
    torch.set_num_threads(2)
    cache = default_cache()
    onnx_path = cache / "mobilenet_v2_fp32.onnx"
    if not onnx_path.is_file():
        export_onnx(load_mobilenet_v2(cache / "mobilenet_v2-b0353104.pth"), onnx_path)
    graph = optimize(onnx_to_graph(read_onnx(onnx_path), onnx_path))
    graph.tensors[graph.inputs[0]].shape = (1, 3, 224, 224)
    split = load_split()
    root = stamps_dir(cache)
    x_cal = load_images(split["calib"], root=root)
    x_eval = load_images(split["eval"], root=root)
    resized = load_resized(split["calib"], root)

    ref = run_batched(graph, x_eval)
    cal = make_calibrator("mace")
    calibrate(graph, [SimpleNamespace(name=str(i), feeds={"input": x_cal[i:i + 1]}) for i in range(len(x_cal))], cal)
    ranges = cal.ranges()
    in_range = (float(x_cal.min()), float(x_cal.max()))

    rows = []
    for schema in args.schemas.split(","):
        opts = QuantizeOptions(schema=schema, input_ranges={"input": in_range})
        ptq = run_batched(quantize_graph(graph, ranges, opts).graph, x_eval)
        t0 = time.perf_counter()
        module = prepare(graph, ranges, opts)
        teacher = float_teacher(module)

        def batches(epoch, _rng=np.random.default_rng(0)):
            order = _rng.permutation(len(resized))
            for i in range(0, len(order), args.batch):
                yield np.stack([augment(resized[j], _rng) for j in order[i:i + args.batch]])

        losses = train(module, batches, epochs=args.epochs, lr=args.lr, range_lr=args.range_lr, teacher=teacher)
        qat = run_batched(module.quantized_graph(), x_eval)
        t_qat = time.perf_counter() - t0
        top = ref.argmax(1)
        rows.append((schema, float((ptq.argmax(1) == top).mean() * 100), float((qat.argmax(1) == top).mean() * 100),
                     sqnr_db(ref, ptq), sqnr_db(ref, qat), t_qat, losses))
        print(f"{schema}: distillation loss per epoch {', '.join(f'{v:.4f}' for v in losses)}", flush=True)

    print(f"\nMobileNetV2 (torchvision weights), 233 evaluation stamps vs FP32; PTQ: MACE min/max on the 64 "
          f"calibration stamps; QAT: {args.epochs} epochs of distillation on the 64 augmented calibration stamps, "
          f"batch {args.batch}, lr {args.lr:g} (ranges {args.range_lr:g}), LSQ ranges")
    print("| schema | PTQ top-1 agr. | QAT top-1 agr. | PTQ SQNR | QAT SQNR | recovered | QAT time |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for schema, pa, qa, ps, qs, t, _ in rows:
        lost = 100 - pa
        rec = (qa - pa) / lost if lost > 0 else float("nan")
        ok &= lost <= 0 or rec >= 0.5
        print(f"| {schema} | {pa:.1f}% | {qa:.1f}% | {ps:.2f} dB | {qs:.2f} dB | {rec:.0%} of {lost:.1f} pt | {t:.0f} s |")
    print(f"target (QAT recovers >= half of the agreement PTQ lost, per schema): {'met' if ok else 'NOT met'}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
