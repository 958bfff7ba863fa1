#!/usr/bin/env python3
"""TensorFlow side of benchmarks/bench_tensorflow.py: frozen MobileNetV2 graphs with our real ImageNet
weights, and TensorFlow's own outputs on the 233 evaluation stamps.

Needs TensorFlow (never the converter): run it in an environment with ``tensorflow==2.21.0
tf-keras==2.21.0 tensorflow-model-optimization==0.8.1`` (and torch, to read the .pth), e.g.

    python scripts/fetch_assets.py mobilenet stamps
    ~/.cache/qmace/venv-tf/bin/python benchmarks/make_tf_mobilenet.py            # tf1 + keras3 graphs
    TF_USE_LEGACY_KERAS=1 ~/.cache/qmace/venv-tf/bin/python benchmarks/make_tf_mobilenet.py qat

Writes into ``~/.cache/qmace/tf/``: ``mobilenet_v2_tf1.pb`` (plain tf.nn ops, FusedBatchNormV3, explicit
Pad + VALID convolutions = torchvision's padding), ``mobilenet_v2_keras3.pb`` (Keras 3 layers, batch norm
spelled Rsqrt/Mul/Sub/AddV2 once frozen), ``mobilenet_v2_qat.pb`` (tfmot ``quantize_model`` of a tf_keras
MobileNetV2 with the same weights, fine-tuned briefly on the 64 calibration stamps by distillation from
the float logits) and ``<name>.npz`` with TensorFlow's logits on the evaluation stamps (``y``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from qmace_zoo import default_cache, load_images, load_split, stamps_dir
from qmace_zoo.mobilenet_v2 import INVERTED_RESIDUAL_SETTING


def state_dict(cache: Path) -> dict[str, np.ndarray]:
    import torch

    sd = torch.load(cache / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in sd.items()}


def blocks():
    """(prefix, kind, stride) of every Conv-BN(-ReLU6) unit in torchvision's order, and residual marks."""
    units = [("features.0", "conv", 2, True)]
    inp, idx = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            layers = []
            j = 0
            if t != 1:
                layers.append((f"{p}.{j}", "conv", 1, True))
                j += 1
            layers.append((f"{p}.{j}", "dw", stride, True))
            layers.append((f"{p}.{j + 1}|{p}.{j + 2}", "conv", 1, False))
            units.append(("block", layers, stride == 1 and inp == c))
            inp, idx = c, idx + 1
    units.append((f"features.{idx}", "conv", 1, True))
    return units


def unit_params(sd, prefix: str):
    """(weight, bn gamma, beta, mean, var) of a ConvBNReLU6 prefix or of 'conv|bn' prefixes."""
    conv, bn = (prefix.split("|") if "|" in prefix else (f"{prefix}.0", f"{prefix}.1"))
    return sd[f"{conv}.weight"], [sd[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def tf1_graph(sd):
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 224, 224, 3], name="input")

        def unit(h, prefix, kind, stride, relu):
            w, (gamma, beta, mean, var) = unit_params(sd, prefix)
            k = w.shape[-1]
            if k > 1:
                h = tf.pad(h, [[0, 0], [k // 2, k // 2], [k // 2, k // 2], [0, 0]])
            if kind == "dw":
                h = tf.nn.depthwise_conv2d(h, tf.constant(w.transpose(2, 3, 0, 1)), [1, stride, stride, 1], "VALID")
            else:
                h = tf.nn.conv2d(h, tf.constant(w.transpose(2, 3, 1, 0)), stride, "VALID")
            h, *_ = tf.compat.v1.nn.fused_batch_norm(h, gamma, beta, mean, var, epsilon=1e-5, is_training=False)
            return tf.nn.relu6(h) if relu else h

        h = x
        for u in blocks():
            if u[0] == "block":
                y = h
                for layer in u[1]:
                    y = unit(y, *layer)
                h = h + y if u[2] else y
            else:
                h = unit(h, *u)
        h = tf.reduce_mean(h, axis=[1, 2])
        logits = tf.nn.bias_add(tf.matmul(h, sd["classifier.1.weight"].T), sd["classifier.1.bias"], name="output")
    return g.as_graph_def(), g, x, logits


def keras_model(keras, sd):
    """MobileNetV2 in Keras layers (Keras 3 or tf_keras) with the torchvision weights."""
    L = keras.layers
    inp = keras.Input((224, 224, 3), batch_size=1, name="input")
    weights = []

    def unit(h, prefix, kind, stride, relu):
        w, bn = unit_params(sd, prefix)
        k = w.shape[-1]
        if k > 1:
            h = L.ZeroPadding2D(k // 2)(h)
        if kind == "dw":
            conv = L.DepthwiseConv2D(k, stride, "valid", use_bias=False)
            weights.append((conv, [w.transpose(2, 3, 0, 1)]))
        else:
            conv = L.Conv2D(w.shape[0], k, stride, "valid", use_bias=False)
            weights.append((conv, [w.transpose(2, 3, 1, 0)]))
        h = conv(h)
        norm = L.BatchNormalization(epsilon=1e-5)
        weights.append((norm, bn))
        h = norm(h)
        return L.ReLU(6.0)(h) if relu else h

    h = inp
    for u in blocks():
        if u[0] == "block":
            y = h
            for layer in u[1]:
                y = unit(y, *layer)
            h = L.Add()([h, y]) if u[2] else y
        else:
            h = unit(h, *u)
    h = L.GlobalAveragePooling2D()(h)
    dense = L.Dense(1000)
    out = dense(h)
    weights.append((dense, [sd["classifier.1.weight"].T, sd["classifier.1.bias"]]))
    model = keras.Model(inp, out)
    for layer, ws in weights:
        layer.set_weights(ws)
    return model


def freeze(model):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda t: model(t, training=False))
    conc = fn.get_concrete_function(tf.TensorSpec((1, 224, 224, 3), tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(conc)
    return frozen.graph.as_graph_def(), frozen.inputs[0].name, frozen.outputs[0].name


def save(out: Path, name: str, graph_def, y: np.ndarray, seconds: float, **names) -> None:
    (out / f"{name}.pb").write_bytes(graph_def.SerializeToString())
    np.savez(out / f"{name}.npz", y=y, seconds=seconds, **names)
    print(f"{name}: {len(graph_def.node)} nodes, ops {sorted({n.op for n in graph_def.node})}, {names}")


def main() -> None:
    import tensorflow as tf

    cache = default_cache()
    out = cache / "tf"
    out.mkdir(parents=True, exist_ok=True)
    split = load_split()
    xe = load_images(list(split["eval"]), root=stamps_dir()).transpose(0, 2, 3, 1).copy()  # NHWC
    sd = state_dict(cache)
    if sys.argv[1:] == ["qat"]:
        qat(out, sd, xe, load_images(list(split["calib"]), root=stamps_dir()).transpose(0, 2, 3, 1).copy())
        return
    gd, g, x, y = tf1_graph(sd)
    with tf.compat.v1.Session(graph=g) as sess:
        t0 = time.perf_counter()
        ys = np.concatenate([sess.run(y, {x: xe[i:i + 1]}) for i in range(len(xe))])
        save(out, "mobilenet_v2_tf1", gd, ys, time.perf_counter() - t0, input_name="input", output_name="output")
    import keras

    model = keras_model(keras, sd)
    gd, xname, yname = freeze(model)
    t0 = time.perf_counter()
    ys = np.concatenate([model(xe[i:i + 1], training=False).numpy() for i in range(len(xe))])
    save(out, "mobilenet_v2_keras3", gd, ys, time.perf_counter() - t0, input_name=xname, output_name=yname)


def qat(out: Path, sd, xe: np.ndarray, xc: np.ndarray) -> None:
    """tfmot QAT of the tf_keras MobileNetV2: ReLU6 output ranges start at [0, 6], 2 epochs on the 64
    calibration stamps, MSE to the float logits (distillation; no labels), Adam 1e-5; then frozen."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    tf.random.set_seed(0)
    model = keras_model(keras, sd)
    target = model.predict(xc, batch_size=8, verbose=0)
    qmodel = tfmot.quantization.keras.quantize_model(model)
    # tfmot starts every moving-average activation range at [-6, 6] with EMA decay 0.999, so a short
    # fine-tune leaves ReLU6 outputs with half their codes below 0: start those at ReLU6's own [0, 6].
    relu_mins = [v for v in qmodel.variables if "re_lu" in v.name and v.name.endswith("output_min:0")]
    for v in relu_mins:
        v.assign(tf.zeros_like(v))
    print(f"{len(relu_mins)} ReLU6 output ranges start at [0, 6]")
    qmodel.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
    t0 = time.perf_counter()
    qmodel.fit(xc, target, batch_size=8, epochs=2, verbose=0)
    print(f"QAT fine-tune: {time.perf_counter() - t0:.0f} s")
    gd, xname, yname = freeze(qmodel)
    t0 = time.perf_counter()
    ys = np.concatenate([qmodel(xe[i:i + 1], training=False).numpy() for i in range(len(xe))])
    save(out, "mobilenet_v2_qat", gd, ys, time.perf_counter() - t0, input_name=xname, output_name=yname)


if __name__ == "__main__":
    main()
