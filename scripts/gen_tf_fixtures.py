"""Generate the tiny frozen TensorFlow graphs of tests/data/tf/ and TensorFlow's outputs on them.

Needs TensorFlow (the converter does not): run it with an environment that has
``tensorflow==2.21.0 tf-keras==2.21.0 tensorflow-model-optimization==0.8.1``, e.g.
``TF_USE_LEGACY_KERAS=0 ~/.cache/qmace/venv-tf/bin/python scripts/gen_tf_fixtures.py``. It writes, per graph,
``<name>.pb`` (binary frozen GraphDef) and ``<name>.npz`` (``x``: the NHWC input, ``y``: TensorFlow's output,
plus ``x_range`` for QAT graphs), seeds fixed. The tfmot graph is made in a subprocess with
``TF_USE_LEGACY_KERAS=1`` (tfmot needs tf_keras) so the Keras-3 graph can be made in this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tf"


def _session_graph(build):
    """Build a tf.compat.v1 graph with ``build(tf) -> (input, output)``; returns (graph_def, run)."""
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x, y = build(tf)
    sess = tf.compat.v1.Session(graph=g)
    return g.as_graph_def(), lambda v: sess.run(y, {x: v}), x.name, y.name


def _save(name: str, graph_def, run, x: np.ndarray, **extra) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.pb").write_bytes(graph_def.SerializeToString())
    np.savez(OUT / f"{name}.npz", x=x, y=run(x), **extra)
    print(f"{name}: {len(graph_def.node)} nodes, {(OUT / f'{name}.pb').stat().st_size} bytes")


def convnet() -> None:
    """Plain tf.compat.v1 ops: conv/depthwise/BN/pools/resize/pad/concat, Keras-3 style arithmetic batch
    norm, shape arithmetic, int64 constants and a Transpose pair (ONNX-converted style) around a residual add."""
    rng = np.random.default_rng(0)

    def c(tf, shape, scale=0.3, name=None):
        return tf.identity(tf.constant(rng.normal(0, scale, shape).astype(np.float32)), name=name)

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3], name="input")
        h = tf.nn.conv2d(x, c(tf, [3, 3, 3, 8]), 1, "SAME")
        h = tf.nn.relu6(tf.nn.bias_add(h, c(tf, [8], 0.1)))
        h = tf.nn.depthwise_conv2d(h, c(tf, [3, 3, 8, 1]), [1, 2, 2, 1], "SAME")
        h, *_ = tf.compat.v1.nn.fused_batch_norm(h, c(tf, [8]) + 1.0, c(tf, [8]), c(tf, [8]),
                                                 tf.abs(c(tf, [8])) + 0.5, epsilon=1e-3, is_training=False)
        h = tf.nn.relu(h)
        # Keras 3 batch norm spelling after a conv: x * (gamma * rsqrt(var + eps)) + (beta - mean * inv)
        y = tf.nn.conv2d(h, c(tf, [1, 1, 8, 8]), 1, "VALID")
        inv = tf.math.rsqrt(tf.abs(c(tf, [8])) + 0.5 + 1e-3) * (c(tf, [8]) + 1.0)
        y = y * inv + (c(tf, [8]) - c(tf, [8]) * inv)
        # residual add between Transposes, as graphs converted from ONNX have it
        a = tf.transpose(y, [0, 3, 1, 2])
        b = tf.transpose(h, [0, 3, 1, 2])
        h = tf.transpose(a + b, [0, 2, 3, 1])
        p = tf.nn.avg_pool2d(tf.pad(h, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 1, "VALID")
        m = tf.nn.max_pool2d(h, 2, 1, "SAME")
        h = tf.concat([p, m], axis=3)
        h = tf.compat.v1.image.resize_bilinear(h, [8, 8], half_pixel_centers=True)
        h = tf.nn.conv2d(h, c(tf, [3, 3, 16, 4]), 2, "SAME")
        h = tf.tile(h, tf.constant([1, 1, 1, 2], tf.int64))  # int64 constant
        n = tf.shape(h)[0]
        flat = tf.reshape(tf.reduce_mean(h, axis=[1, 2], keepdims=True), tf.stack([n, -1]))
        logits = tf.nn.bias_add(tf.matmul(flat, c(tf, [8, 5])), c(tf, [5], 0.1))
        return x, tf.nn.softmax(logits, name="output")

    gd, run, _, _ = _session_graph(build)
    _save("convnet", gd, run, rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32))


def fakequant_v1() -> None:
    """Hand-written tf.compat.v1 QAT layout: FakeQuant on the input and every activation (min/max constants
    behind Identity, or attributes), per-channel narrow-range weight FakeQuants, a [1] depthwise range."""
    rng = np.random.default_rng(1)

    def c(tf, value):
        return tf.identity(tf.constant(np.asarray(value, np.float32)))

    def fq(tf, t, lo, hi):
        return tf.quantization.fake_quant_with_min_max_vars(t, c(tf, lo), c(tf, hi), num_bits=8)

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3], name="input")
        h = fq(tf, x, -1.0, 1.0)
        w = rng.normal(0, 0.4, (3, 3, 3, 8)).astype(np.float32)
        wmax = np.abs(w).max(axis=(0, 1, 2))
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(c(tf, w), c(tf, -wmax), c(tf, wmax),
                                                                     num_bits=8, narrow_range=True)
        h = tf.nn.relu6(tf.nn.bias_add(tf.nn.conv2d(h, w, 1, "SAME"), c(tf, rng.normal(0, 0.1, 8))))
        h = fq(tf, h, 0.0, 5.3)
        dw = rng.normal(0, 0.4, (3, 3, 8, 1)).astype(np.float32)
        dmax = np.abs(dw).max()
        dw = tf.quantization.fake_quant_with_min_max_vars_per_channel(c(tf, dw), c(tf, [-dmax]), c(tf, [dmax]),
                                                                      num_bits=8, narrow_range=True)
        h = tf.nn.depthwise_conv2d(h, dw, [1, 1, 1, 1], "SAME")
        h, *_ = tf.compat.v1.nn.fused_batch_norm(h, c(tf, rng.uniform(0.5, 1.5, 8) * np.sign(rng.normal(size=8))),
                                                 c(tf, rng.normal(0, 0.2, 8)), c(tf, rng.normal(0, 0.2, 8)),
                                                 c(tf, rng.uniform(0.5, 1.5, 8)), epsilon=1e-3, is_training=False)
        h = tf.quantization.fake_quant_with_min_max_args(tf.nn.relu(h), min=0.0, max=4.1)
        h = fq(tf, tf.reduce_mean(h, axis=[1, 2]), 0.0, 2.2)
        k = rng.normal(0, 0.5, (8, 5)).astype(np.float32)
        kmax = float(np.abs(k).max())
        k = tf.quantization.fake_quant_with_min_max_vars(c(tf, k), c(tf, -kmax), c(tf, kmax), narrow_range=True)
        y = tf.nn.bias_add(tf.matmul(h, k), c(tf, rng.normal(0, 0.1, 5)))
        return x, tf.identity(fq(tf, y, -3.1, 2.7), name="output")

    gd, run, _, _ = _session_graph(build)
    xs = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fakequant_v1.pb").write_bytes(gd.SerializeToString())
    np.savez(OUT / "fakequant_v1.npz", x=xs, y=np.concatenate([run(xs[i:i + 1]) for i in range(4)]))
    print(f"fakequant_v1: {len(gd.node)} nodes")


def _freeze(model, shape) -> tuple:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda t: model(t, training=False))
    conc = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(conc)
    gd = frozen.graph.as_graph_def()
    return gd, frozen.inputs[0].name, frozen.outputs[0].name


def keras3() -> None:
    """A small Keras 3 model (batch norm spelled Rsqrt/Mul/Sub/AddV2 once frozen)."""
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 3), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU(6.0)(h)
    h2 = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h2 = keras.layers.BatchNormalization()(h2)
    h = keras.layers.Add()([h, h2])
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(5)(h)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(2)
    for layer in model.layers:  # non-trivial BN statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, .2, n), rng.normal(0, .2, n),
                               rng.uniform(0.5, 1.5, n)])
    gd, xname, yname = _freeze(model, (1, 8, 8, 3))
    x = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "keras3.pb").write_bytes(gd.SerializeToString())
    np.savez(OUT / "keras3.npz", x=x, y=model(x, training=False).numpy(), input_name=xname, output_name=yname)
    print(f"keras3: {len(gd.node)} nodes, ops {sorted({n.op for n in gd.node})}, in {xname} out {yname}")


def tfmot_qat() -> None:
    """A tfmot QAT model from tf_keras (Conv-BN-ReLU6, DepthwiseConv-BN-ReLU6, Conv-BN, Add, GAP, Dense),
    trained a few steps so the ranges move, then frozen. Run under TF_USE_LEGACY_KERAS=1."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    tf.random.set_seed(3)
    rng = np.random.default_rng(3)
    inp = keras.Input((8, 8, 3), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU(6.0)(h)
    h2 = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h2 = keras.layers.BatchNormalization()(h2)
    h2 = keras.layers.ReLU(6.0)(h2)
    h2 = keras.layers.Conv2D(8, 1, use_bias=False)(h2)
    h2 = keras.layers.BatchNormalization()(h2)
    h = keras.layers.Add()([h, h2])
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(5)(h)
    qat = tfmot.quantization.keras.quantize_model(keras.Model(inp, out))
    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    xs = rng.uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    qat.fit(xs, rng.normal(0, 1, (32, 5)).astype(np.float32), batch_size=1, epochs=1, verbose=0)
    gd, xname, yname = _freeze(qat, (1, 8, 8, 3))
    x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    y = np.concatenate([qat(x[i:i + 1], training=False).numpy() for i in range(4)])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tfmot_qat.pb").write_bytes(gd.SerializeToString())
    np.savez(OUT / "tfmot_qat.npz", x=x, y=y, input_name=xname, output_name=yname)
    print(f"tfmot_qat: {len(gd.node)} nodes, ops {sorted({n.op for n in gd.node})}, in {xname} out {yname}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "tfmot":
        tfmot_qat()
        return
    convnet()
    fakequant_v1()
    keras3()
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    subprocess.run([sys.executable, __file__, "tfmot"], check=True, env=env)


if __name__ == "__main__":
    main()
