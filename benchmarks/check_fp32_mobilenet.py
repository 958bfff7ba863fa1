#!/usr/bin/env python3
"""Check the real FP32 pipeline end to end against the shared README's reference figures.

Loads torchvision's MobileNetV2 ImageNet weights from the cache, exports ONNX (opset 17, dynamic batch),
runs the 233 evaluation stamps through ONNX Runtime and prints top-1 / top-5 accuracy on the labelled
subset (reference: 113 labelled, top-1 77.9%, top-5 86.7%). Also checks torch and ORT agree.

    python scripts/fetch_assets.py mobilenet stamps
    python benchmarks/check_fp32_mobilenet.py [--cache DIR] [--data DIR] [--onnx PATH]

Exits 1 if the figures do not match the reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from qmace.errors import QmaceError
from qmace_zoo import (
    default_cache,
    export_onnx,
    imagenet_labels,
    load_images,
    load_mobilenet_v2,
    load_split,
    stamps_dir,
)

REF_N, REF_TOP1, REF_TOP5 = 113, 77.9, 86.7


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="qmace cache (default: ~/.cache/qmace)")
    ap.add_argument(
        "--data", type=Path, default=None, help="split/labels folder (default: the repository's data/)"
    )
    ap.add_argument(
        "--onnx", type=Path, default=None, help="where to write the FP32 ONNX (default: in cache)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    try:
        cache = args.cache or default_cache()
        model = load_mobilenet_v2(cache / "mobilenet_v2-b0353104.pth")
        onnx_path = export_onnx(model, args.onnx or cache / "mobilenet_v2_fp32.onnx")
        split = load_split(args.data)
        labels = imagenet_labels(args.data)
        t0 = time.perf_counter()
        x = load_images(split["eval"], root=stamps_dir(cache))
        t_pre = time.perf_counter() - t0
    except QmaceError as e:
        print(f"check_fp32_mobilenet: error: {e}", file=sys.stderr)
        return 1

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    logits = np.concatenate([sess.run(["output"], {"input": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
    t_ort = time.perf_counter() - t0
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x[i : i + 32])) for i in range(0, len(x), 32)]).numpy()
    max_diff = float(np.abs(logits - ref).max())
    torch_agree = float((logits.argmax(1) == ref.argmax(1)).mean())

    top5 = np.argsort(-logits, axis=1)[:, :5]
    n = hit1 = hit5 = 0
    for i, p in enumerate(split["eval"]):
        if p not in labels:
            continue
        ok = set(labels[p])
        n += 1
        hit1 += int(top5[i, 0] in ok)
        hit5 += int(bool(ok.intersection(top5[i].tolist())))
    top1_pct, top5_pct = 100.0 * hit1 / n, 100.0 * hit5 / n

    print(f"onnx: {onnx_path}")
    print(f"eval stamps: {len(x)} (preprocess {t_pre:.1f}s, ORT {t_ort:.1f}s); labelled: {n}")
    print(f"ORT vs torch: max |logit diff| {max_diff:.2e}, top-1 agreement {100 * torch_agree:.1f}%")
    print(f"FP32 top-1 {top1_pct:.1f}% ({hit1}/{n}), top-5 {top5_pct:.1f}% ({hit5}/{n})")
    ok = n == REF_N and round(top1_pct, 1) == REF_TOP1 and round(top5_pct, 1) == REF_TOP5
    print(
        f"reference: {REF_N} labelled, top-1 {REF_TOP1}%, top-5 {REF_TOP5}% -> {'MATCH' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
