#!/usr/bin/env python3
"""Build MobileNetV2 (our real ImageNet weights) in Keras and convert it with TensorFlow's TFLite converter.

Runs with TensorFlow (not a qmace dependency), e.g. a separate venv; bench_tflite.py calls it:

    <tf-python> benchmarks/tflite_mobilenet_build.py <work dir>

Reads ``<work>/mobilenet_graph.npz`` (written by bench_tflite.py from qmace's float graph of the same
ONNX file the other benchmarks use: BatchNorm folded, ReLU6 fused, so the Keras model has exactly those
weights) and ``<work>/calib_nhwc.npy`` (the 64 calibration stamps, preprocessed as data/README.md says).
Writes ``<work>/mobilenet_v2_float.tflite`` and ``<work>/mobilenet_v2_int8.tflite`` (full-integer: int8
weights per channel, int8 activations, float input/output, ``representative_dataset`` = the 64 stamps), and
``<work>/keras_logits.npy`` (the Keras model's logits on the calibration stamps, a sanity reference).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf


def build(graph: dict, arrays) -> tf.keras.Model:
    """Keras functional model following qmace's node list (Conv, Add, GlobalAveragePool, Flatten, Gemm)."""
    L = tf.keras.layers
    x = L.Input((224, 224, 3), batch_size=1, name="input")
    values = {graph["input"]: x}
    for i, n in enumerate(graph["nodes"]):
        ins = [values[k] for k in n["inputs"] if k in values]
        if n["op"] == "Conv":
            w, b = arrays[f"w{i}"], arrays[f"b{i}"]
            t, left, bottom, right = n["pads"]
            y = L.ZeroPadding2D(((t, bottom), (left, right)))(ins[0]) if any(n["pads"]) else ins[0]
            act = tf.nn.relu6 if n["act"] == "relu6" else None
            if n["group"] == 1:
                layer = L.Conv2D(w.shape[0], w.shape[2:], strides=n["strides"], activation=act)
                y = layer(y)
                layer.set_weights([w.transpose(2, 3, 1, 0), b])  # OIHW -> HWIO
            else:
                layer = L.DepthwiseConv2D(w.shape[2:], strides=n["strides"], activation=act)
                y = layer(y)
                layer.set_weights([w.transpose(2, 3, 0, 1), b])  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        elif n["op"] == "Add":
            y = L.Add()(ins)
        elif n["op"] == "GlobalAveragePool":
            y = L.GlobalAveragePooling2D()(ins[0])
        elif n["op"] in ("Flatten", "Reshape"):
            y = ins[0]  # GlobalAveragePooling2D already gives (N, C)
        elif n["op"] == "Gemm":
            layer = L.Dense(arrays[f"w{i}"].shape[0])
            y = layer(ins[0])
            layer.set_weights([arrays[f"w{i}"].T, arrays[f"b{i}"]])
        else:
            raise SystemExit(f"unexpected op {n['op']}")
        values[n["outputs"][0]] = y
    return tf.keras.Model(x, values[graph["output"]])


def main(work: Path) -> None:
    arrays = np.load(work / "mobilenet_graph.npz", allow_pickle=False)
    graph = json.loads(str(arrays["graph"]))
    calib = np.load(work / "calib_nhwc.npy", allow_pickle=False)
    model = build(graph, arrays)
    np.save(work / "keras_logits.npy", model.predict(calib, batch_size=8, verbose=0))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (work / "mobilenet_v2_float.tflite").write_bytes(conv.convert())
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[None]] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (work / "mobilenet_v2_int8.tflite").write_bytes(conv.convert())
    print(f"TensorFlow {tf.__version__}: wrote {work}/mobilenet_v2_float.tflite, mobilenet_v2_int8.tflite")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
