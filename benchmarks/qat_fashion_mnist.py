#!/usr/bin/env python3
"""Benchmark A (labelled QAT): a small CNN trained here on Fashion-MNIST, PTQ vs QAT, both schemas.

    python scripts/fetch_assets.py fashion-mnist
    python benchmarks/qat_fashion_mnist.py [--epochs 1] [--qat-steps 40]

1. Train a small CNN (Conv-BN-ReLU x3, MaxPool, GlobalAveragePool, Linear) in torch on the 60k train split.
2. Export ONNX, convert with qmace (BN folding, activation fusion).
3. PTQ: ``calibrate`` (MACE min/max) on 512 train images, quantize per schema.
4. QAT: ``qmace.qat.prepare`` from the same ranges, fine-tune with cross-entropy on train images, then
   ``module.quantized_graph()``.
All accuracies on the official 10k test split, quantized models run by ONNX Runtime (bit-exact with the
reference runtime, docs/quantization.md). Target: QAT within 0.5 pt of float and >= PTQ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed


def build_cnn():
    from torch import nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def accuracy_ort(graph, x, y, batch=500) -> float:
    from qmace.runtime import Session

    s = Session(graph, num_threads=2)
    name, out = graph.inputs[0], graph.outputs[0]
    pred = np.concatenate([s.run({name: x[i:i + batch]})[out].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean() * 100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1, help="float training epochs")
    ap.add_argument("--qat-steps", type=int, default=40, help="QAT steps (batch 64)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--range-lr", type=float, default=1e-4)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from qmace.frontends.onnx_frontend import onnx_to_graph, read_onnx
    from qmace.passes import optimize
    from qmace.qat import prepare, train
    from qmace.quantize.calibration import make_calibrator
    from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
    from qmace.quantize.recipe import calibrate
    from qmace_zoo import fashion_mnist

    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d = fashion_mnist()
    norm = lambda a: ((a.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None]
    xtr, ytr = norm(d["train_images"]), d["train_labels"].astype(np.int64)
    xte, yte = norm(d["test_images"]), d["test_labels"].astype(np.int64)

    # 1. float training
    t0 = time.perf_counter()
    model = build_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = args.epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(args.epochs):
        order = rng.permutation(len(xtr))
        for i in range(0, len(order) - 127, 128):
            idx = order[i:i + 128]
            xb = torch.from_numpy(xtr[idx])
            if rng.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    t_train = time.perf_counter() - t0

    # 2. export + convert
    tmp = Path(tempfile.mkdtemp())
    onnx_path = tmp / "fmnist_cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    graph = optimize(onnx_to_graph(read_onnx(onnx_path), onnx_path))
    acc_float = accuracy_ort(graph, xte, yte)

    # 3. PTQ ranges on 512 train images
    cal_idx = np.random.default_rng(1).choice(len(xtr), 512, replace=False)
    cal = make_calibrator("mace")
    calibrate(graph, [SimpleNamespace(name=str(i), feeds={"input": xtr[i:i + 1]}) for i in cal_idx], cal)
    ranges = cal.ranges()

    rows = []
    for schema in ("uint8", "int8"):
        opts = QuantizeOptions(schema=schema, input_ranges={"input": (float(xtr.min()), float(xtr.max()))})
        acc_ptq = accuracy_ort(quantize_graph(graph, ranges, opts).graph, xte, yte)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        module = prepare(graph, ranges, opts)
        qrng = np.random.default_rng(2)
        batches = []
        for _ in range(args.qat_steps):
            idx = qrng.choice(len(xtr), 64, replace=False)
            batches.append((xtr[idx], ytr[idx]))
        losses = train(module, batches, epochs=1, lr=args.lr, range_lr=args.range_lr)
        acc_qat = accuracy_ort(module.quantized_graph(), xte, yte)
        rows.append((schema, acc_ptq, acc_qat, time.perf_counter() - t0, losses[-1]))

    total = time.perf_counter() - t_start
    print(f"\nFashion-MNIST small CNN ({sum(p.numel() for p in model.parameters()):,} params; float trained "
          f"{args.epochs} epochs in {t_train:.0f} s); test split 10,000 images; PTQ: MACE min/max on 512 train "
          f"images; QAT: {args.qat_steps} steps x 64 train images, cross-entropy, LSQ ranges")
    print("| schema | float | PTQ | QAT | QAT - float | QAT - PTQ | QAT time |")
    print("|---|---|---|---|---|---|---|")
    for schema, p, q, t, _ in rows:
        print(f"| {schema} | {acc_float:.2f}% | {p:.2f}% | {q:.2f}% | {q - acc_float:+.2f} | {q - p:+.2f} | {t:.0f} s |")
    ok = all(q >= acc_float - 0.5 and q >= p for _, p, q, _, _ in rows)
    print(f"target (QAT within 0.5 pt of float and >= PTQ): {'met' if ok else 'NOT met'}")
    print(f"total time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
