#!/usr/bin/env python3
"""NNCF's post-training quantization of an ONNX model with its defaults, for bench_mobile_models.py.

    <python with nncf> benchmarks/nncf_quantize_onnx.py MODEL.onnx CALIB.npz OUT.onnx

``CALIB.npz`` holds one array per model input (first axis: the samples, each fed with batch 1).
``nncf.quantize(model, nncf.Dataset(samples))`` with every option left at its default (preset PERFORMANCE:
symmetric int8 activations and per-channel weights, as NNCF writes them in QDQ form). Runs in a separate
Python that has NNCF (the benchmark calls it by subprocess); imports nothing from qmace.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    import nncf

    model_path, calib_path, out_path = argv
    model = onnx.load(model_path)
    data = np.load(calib_path)
    names = list(data.files)
    count = data[names[0]].shape[0]
    samples = [{n: data[n][i:i + 1] for n in names} for i in range(count)]
    quantized = nncf.quantize(model, nncf.Dataset(samples))  # defaults (subset_size 300 >= our calibration sets)
    onnx.save(quantized, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
