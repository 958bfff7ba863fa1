#!/usr/bin/env python3
"""TensorFlow side of benchmarks/bench_tensorflow.py: frozen MobileNetV2 graphs with our real ImageNet
weights, and TensorFlow's own outputs on the 233 evaluation stamps.

Needs TensorFlow (never the converter): run it in an environment with ``tensorflow==2.21.0
tf-keras==2.21.0 tensorflow-model-optimization==0.8.1`` (and torch, to read the .pth), e.g.

    python scripts/fetch_assets.py mobilenet stamps
    VENV_TF/bin/python benchmarks/make_tf_mobilenet.py                           # tf1 + keras3 graphs
    TF_USE_LEGACY_KERAS=1 VENV_TF/bin/python benchmarks/make_tf_mobilenet.py qat [EPOCHS]   # after tf1
    VENV_TF/bin/python benchmarks/make_tf_mobilenet.py qat-intbias                # after qat

Writes into ``~/.cache/qmace/tf/``: ``mobilenet_v2_tf1.pb`` (plain tf.nn ops, FusedBatchNormV3, explicit
Pad + VALID convolutions = torchvision's padding), ``mobilenet_v2_keras3.pb`` (Keras 3 layers, batch norm
spelled Rsqrt/Mul/Sub/AddV2 once frozen), ``mobilenet_v2_qat.pb`` (tfmot ``quantize_model`` of a tf_keras
MobileNetV2 with the same weights and batch norm folded into the convolutions, every range calibrated on
the 64 calibration stamps, then EPOCHS epochs (default 0) of distillation on those stamps),
``mobilenet_v2_qat_intbias.pb`` (the same graph with its biases on the int32 grid of an integer model),
``mobilenet_v2_qat.tflite`` (TensorFlow's TFLite converter's integer model of ``mobilenet_v2_qat.pb``) and
``<name>.npz`` with TensorFlow's logits on the evaluation stamps (``y``). TensorFlow runs on one thread.
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


def walk_blocks(h, unit, add):
    """MobileNetV2's body over ``blocks()``: each unit through ``unit(h, prefix, kind, stride, relu)``, each
    residual block's input joined to its output by ``add(input, output)``; returns the last tensor."""
    for u in blocks():
        if u[0] == "block":
            y = h
            for layer in u[1]:
                y = unit(y, *layer)
            h = add(h, y) if u[2] else y
        else:
            h = unit(h, *u)
    return h


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

        h = walk_blocks(x, unit, lambda a, b: a + b)
        h = tf.reduce_mean(h, axis=[1, 2])
        logits = tf.nn.bias_add(tf.matmul(h, sd["classifier.1.weight"].T), sd["classifier.1.bias"], name="output")
    return g.as_graph_def(), g, x, logits


def assemble_keras(keras, sd, inp, unit, weights):
    """The MobileNetV2 body from ``unit(h, prefix, kind, stride, relu)`` (one convolution unit, which appends
    its ``(layer, weights)`` pairs to ``weights``), residual ``Add``s, global average pooling and the
    classifier; sets every layer's weights and returns the Keras model."""
    L = keras.layers
    h = walk_blocks(inp, unit, lambda a, b: L.Add()([a, b]))
    h = L.GlobalAveragePooling2D()(h)
    dense = L.Dense(1000)
    out = dense(h)
    weights.append((dense, [sd["classifier.1.weight"].T, sd["classifier.1.bias"]]))
    model = keras.Model(inp, out)
    for layer, ws in weights:
        layer.set_weights(ws)
    return model


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

    return assemble_keras(keras, sd, inp, unit, weights)


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

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one core: the machine is shared
    tf.config.threading.set_inter_op_parallelism_threads(1)

    cache = default_cache()
    out = cache / "tf"
    out.mkdir(parents=True, exist_ok=True)
    split = load_split()
    xe = load_images(list(split["eval"]), root=stamps_dir()).transpose(0, 2, 3, 1).copy()  # NHWC
    sd = state_dict(cache)
    if sys.argv[1:] == ["qat-intbias"]:
        qat_intbias(out, xe)
        return
    if sys.argv[1:2] == ["qat"]:
        epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 0
        qat(out, sd, xe, load_images(list(split["calib"]), root=stamps_dir()).transpose(0, 2, 3, 1).copy(), epochs)
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


def folded_keras_model(keras, sd):
    """MobileNetV2 in tf_keras layers with every batch norm folded into its convolution, the network the
    TFLite converter and qmace quantize: ``Conv2D``/``DepthwiseConv2D(use_bias=True)`` holding
    ``w' = w * s`` and ``b' = beta - mean * s`` with ``s = gamma / sqrt(var + eps)`` per output channel
    (folded in float64, stored in float32), ``ReLU(6)``, ``Add``, explicit ``ZeroPadding2D`` (torchvision's
    padding), global average pooling and the classifier."""
    L = keras.layers
    inp = keras.Input((224, 224, 3), batch_size=1, name="input")
    weights = []

    def unit(h, prefix, kind, stride, relu):
        w, (gamma, beta, mean, var) = unit_params(sd, prefix)
        s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
        wf = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
        bf = (beta - mean.astype(np.float64) * s).astype(np.float32)
        k = w.shape[-1]
        if k > 1:
            h = L.ZeroPadding2D(k // 2)(h)
        if kind == "dw":
            conv = L.DepthwiseConv2D(k, stride, "valid", use_bias=True)
            weights.append((conv, [wf.transpose(2, 3, 0, 1), bf]))
        else:
            conv = L.Conv2D(w.shape[0], k, stride, "valid", use_bias=True)
            weights.append((conv, [wf.transpose(2, 3, 1, 0), bf]))
        h = conv(h)
        return L.ReLU(6.0)(h) if relu else h

    return assemble_keras(keras, sd, inp, unit, weights)


def calibrate_ranges(qmodel, xc: np.ndarray) -> None:
    """Set every tfmot range variable from the 64 calibration stamps in one training-mode pass with the
    moving-average decay forced to 0: each activation range becomes ``[min(0, lo), max(0, hi)]`` of its
    tensor over the whole batch (upstream layers already fake-quantized with their new ranges, since each
    FakeQuant reads the freshly assigned min/max), each weight range the kernel's own (per channel for
    Conv2D, per tensor for DepthwiseConv2D and Dense, symmetric narrow range), the input range that of the
    stamps. tfmot would otherwise start every activation at [-6, 6] and move it with EMA decay 0.999."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    ema = quant_ops.MovingAvgQuantize

    def no_decay(*args, **kwargs):
        kwargs["ema_decay"] = 0.0
        return ema(*args, **kwargs)

    quant_ops.MovingAvgQuantize = no_decay
    try:
        qmodel(xc, training=True)
    finally:
        quant_ops.MovingAvgQuantize = ema


def keep_conv_weight_quantization() -> None:
    """Make tfmot 0.8.1 quantize the kernels of ``Conv2D``/``DepthwiseConv2D`` layers followed by ``ReLU``.

    Its ``LayerReLUQuantize`` layout transform (pattern ``ReLU`` after ``Add|Conv2D|DepthwiseConv2D|Dense``)
    gives the producer a ``NoOpQuantizeConfig`` to keep a FakeQuant from sitting between it and the ReLU;
    that also drops the producer's weight quantizer, so a batch-norm-free Conv -> ReLU6 network trains and
    freezes with float kernels in 35 of MobileNetV2's 52 convolutions (no integer model can compute that).
    For Conv2D/DepthwiseConv2D this replaces it with what tfmot's own Conv-BN-ReLU transform does: the
    layer keeps its default 8-bit config (weights quantized) and its ``activation`` becomes tfmot's
    ``NoOpActivation`` (no FakeQuant on the pre-ReLU output). Add and Dense keep tfmot's behaviour."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_aware_activation, utils
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_transforms as transforms,
    )

    original = transforms.LayerReLUQuantize.replacement

    def replacement(self, match_layer):
        producer = match_layer.input_layers[0]
        if producer.layer["class_name"] not in ("Conv2D", "DepthwiseConv2D"):
            return original(self, match_layer)
        producer.layer["config"]["activation"] = utils.serialize_activation(
            quantize_aware_activation.NoOpActivation(), use_legacy_format=True)
        return match_layer

    def custom_objects(self):
        return {**original_objects(self), "NoOpActivation": quantize_aware_activation.NoOpActivation}

    original_objects = transforms.LayerReLUQuantize.custom_objects
    transforms.LayerReLUQuantize.replacement = replacement
    transforms.LayerReLUQuantize.custom_objects = custom_objects


def agreement(ref: np.ndarray, y: np.ndarray) -> str:
    top1 = float(np.mean(ref.argmax(1) == y.argmax(1))) * 100
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - y) ** 2))
    return f"top-1 agreement {top1:.1f}%, SQNR {sqnr:.2f} dB"


def qat(out: Path, sd, xe: np.ndarray, xc: np.ndarray, epochs: int) -> None:
    """tfmot QAT of the batch-norm-folded tf_keras MobileNetV2 (tfmot then quantizes the folded kernels:
    per channel for Conv2D, per tensor for DepthwiseConv2D, as its default 8-bit scheme does), every range
    calibrated on the 64 calibration stamps (:func:`calibrate_ranges`), then ``epochs`` epochs of
    distillation on those stamps only (MSE to the float logits, Adam 1e-5, batch 8; 0 = none); then
    frozen. The evaluation stamps are used for nothing but the reported figures and the saved logits."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    tf.random.set_seed(0)
    model = folded_keras_model(keras, sd)
    with np.load(out / "mobilenet_v2_tf1.npz", allow_pickle=False) as z:
        y_tf1 = z["y"]
    yf = np.concatenate([model(xe[i:i + 1], training=False).numpy() for i in range(len(xe))])
    print(f"folded float model vs tf1 graph: max |diff| {np.abs(yf - y_tf1).max():.3g}, {agreement(y_tf1, yf)}")
    target = model.predict(xc, batch_size=8, verbose=0)
    keep_conv_weight_quantization()
    qmodel = tfmot.quantization.keras.quantize_model(model)
    calibrate_ranges(qmodel, xc)

    def evaluate(tag: str) -> np.ndarray:
        y = np.concatenate([qmodel(xe[i:i + 1], training=False).numpy() for i in range(len(xe))])
        print(f"TF QAT model ({tag}) vs float on the 233 evaluation stamps: {agreement(yf, y)}", flush=True)
        return y

    evaluate("calibrated ranges, no fine-tune")
    if epochs:
        qmodel.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
        t0 = time.perf_counter()
        qmodel.fit(xc, target, batch_size=8, epochs=epochs, verbose=0)
        print(f"QAT fine-tune ({epochs} epochs): {time.perf_counter() - t0:.0f} s")
    gd, xname, yname = freeze(qmodel)
    t0 = time.perf_counter()
    ys = evaluate(f"after {epochs} epochs")
    save(out, "mobilenet_v2_qat", gd, ys, time.perf_counter() - t0, input_name=xname, output_name=yname)


def tf_scale(fq) -> np.ndarray:
    """The step TensorFlow's FakeQuant node ``fq`` quantizes with: ``(max - min) / (qmax - qmin)`` in
    float32 (nudging moves min and max, never the step); one value per channel for the PerChannel op."""
    lo, hi = fq["min"], fq["max"]
    qmin = 1 if fq["narrow_range"] else 0
    return (hi - lo) / np.float32(2 ** fq["num_bits"] - 1 - qmin)


def snap_biases(gd):
    """A copy of a frozen QAT GraphDef whose convolution and dense biases lie on the int32 grid an integer
    model stores them on: ``b' = round(b / (s_in * s_w)) * s_in * s_w`` per output channel, with ``s_in``
    the step of the FakeQuant feeding the layer (through Pad/Identity) and ``s_w`` that of its weight
    FakeQuant. tfmot (like TensorFlow's fake quantization in general) leaves biases in float; every integer
    runtime (TFLite, qmace) adds them to the int32 accumulator in units of ``s_in * s_w``. Returns the graph
    and how many biases were snapped."""
    from tensorflow.python.framework import tensor_util

    gd2 = type(gd)()
    gd2.CopyFrom(gd)
    nodes = {n.name: n for n in gd2.node}

    def src(name: str):
        return nodes[name.split(":")[0].lstrip("^")]

    def through(n, ops):
        while n.op in ops:
            n = src(n.input[0])
        return n

    def const(name: str) -> np.ndarray:
        return tensor_util.MakeNdarray(through(src(name), ("Identity",)).attr["value"].tensor)

    def fake_quant(n):
        return {"min": const(n.input[1]), "max": const(n.input[2]), "num_bits": n.attr["num_bits"].i,
                "narrow_range": n.attr["narrow_range"].b}

    snapped = 0
    for n in gd2.node:
        conv = src(n.input[0]) if n.op == "BiasAdd" else None
        if conv is None or conv.op not in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
            continue
        a = through(src(conv.input[0]), ("Identity", "Pad"))
        w = through(src(conv.input[1]), ("Identity",))
        if not (a.op.startswith("FakeQuant") and w.op.startswith("FakeQuant")):
            continue
        unit = tf_scale(fake_quant(a)).astype(np.float64) * tf_scale(fake_quant(w)).astype(np.float64)
        bnode = through(src(n.input[1]), ("Identity",))
        b = tensor_util.MakeNdarray(bnode.attr["value"].tensor).astype(np.float64)
        bnode.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto((np.round(b / unit) * unit).astype(np.float32)))
        snapped += 1
    return gd2, snapped


def qat_intbias(out: Path, xe: np.ndarray) -> None:
    """``mobilenet_v2_qat_intbias``: mobilenet_v2_qat.pb with :func:`snap_biases`, and TensorFlow's logits
    of that graph on the evaluation stamps."""
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString((out / "mobilenet_v2_qat.pb").read_bytes())
    with np.load(out / "mobilenet_v2_qat.npz", allow_pickle=False) as z:
        xname, yname, y_qat = str(z["input_name"]), str(z["output_name"]), z["y"]
    gd2, snapped = snap_biases(gd)
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(gd2, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        t0 = time.perf_counter()
        ys = np.concatenate([sess.run(yname, {xname: xe[i:i + 1]}) for i in range(len(xe))])
    print(f"{snapped} biases snapped to the int32 grid; logits vs the float-bias QAT graph: {agreement(y_qat, ys)}")
    save(out, "mobilenet_v2_qat_intbias", gd2, ys, time.perf_counter() - t0, input_name=xname, output_name=yname)
    tflite_from_qat(out, gd)


def tflite_from_qat(out: Path, gd) -> None:
    """``mobilenet_v2_qat.tflite``: TensorFlow's own integer model of the frozen QAT graph (the TFLite
    converter's FakeQuant path: ``inference_type`` int8, float input and output), whose integer kernels are
    the deployment reference for what the fake-quantized graph means once integer."""
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util

    nodes = {n.name: n for n in gd.node}
    fq = next(n for n in gd.node if n.op.startswith("FakeQuant") and n.input[0] == "input")

    def const(name: str) -> np.ndarray:
        n = nodes[name]
        while n.op == "Identity":
            n = nodes[n.input[0]]
        return tensor_util.MakeNdarray(n.attr["value"].tensor)

    lo, hi = const(fq.input[1]), const(fq.input[2])
    scale = tf_scale({"min": lo, "max": hi, "num_bits": 8, "narrow_range": fq.attr["narrow_range"].b})
    zp = float(np.clip(np.floor(-lo / scale + 0.5), 0, 255)) - 128.0  # TF's uint8 zero point, as int8
    conv = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(out / "mobilenet_v2_qat.pb"), ["input"], ["Identity"], {"input": [1, 224, 224, 3]})
    conv.inference_type = tf.int8
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32
    conv.quantized_input_stats = {"input": (zp, float(1.0 / scale))}
    (out / "mobilenet_v2_qat.tflite").write_bytes(conv.convert())
    print(f"mobilenet_v2_qat.tflite written (input scale {float(scale):.6g}, int8 zero point {zp:.0f})")


if __name__ == "__main__":
    main()
