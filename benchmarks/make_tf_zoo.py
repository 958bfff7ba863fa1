#!/usr/bin/env python3
"""Frozen Keras-applications graphs for benchmarks/bench_tensorflow.py ``--models zoo``: op coverage of
``platform: tensorflow`` on real architectures (issue 9: MobileNet V1/V3, Inception v3, ResNet-50 v1/v2).

Needs TensorFlow (never the converter); run it in the TensorFlow venv, e.g.

    python scripts/fetch_assets.py stamps
    ~/.cache/qmace/venv-tf/bin/python benchmarks/make_tf_zoo.py [name ...]

Each model is ``keras.applications.<Arch>(weights=None, input_shape=(224, 224, 3),
classifier_activation=None)`` (Keras 3: batch norm frozen as Rsqrt/Mul/Sub/AddV2) with seed 0, its batch
norms given random inference statistics (gamma U(0.5, 1.5), beta N(0, 0.1), mean N(0, 0.1), var U(0.5, 2),
seeded) so that folding them is not a no-op. No pretrained weights are downloaded: the architectures and the
ops they freeze to are what is measured. Writes ``~/.cache/qmace/tf/zoo_<name>.pb`` and ``.npz`` (``y``:
TensorFlow's logits on the 233 evaluation stamps, NHWC, 224x224 also for Inception v3; ``input_name``,
``output_name``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from benchmarks.make_tf_mobilenet import freeze, save
from qmace_zoo import default_cache, load_images, load_split, stamps_dir

ARCHS = {"mobilenet_v1": "MobileNet", "mobilenet_v3_small": "MobileNetV3Small",
         "mobilenet_v3_large": "MobileNetV3Large", "inception_v3": "InceptionV3", "resnet50": "ResNet50",
         "resnet50_v2": "ResNet50V2"}


def build(keras, arch: str):
    """The Keras application with seeded random weights and random batch-norm statistics."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(224, 224, 3),
                                              classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            ws = layer.get_weights()
            c = ws[-1].shape[0]
            stats = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2, c)]
            names = (["gamma"] if layer.scale else []) + (["beta"] if layer.center else []) + ["mean", "var"]
            pick = {"gamma": stats[0], "beta": stats[1], "mean": stats[2], "var": stats[3]}
            layer.set_weights([pick[n].astype(np.float32) for n in names])
    return model


def main(names: list[str]) -> None:
    import keras

    out = default_cache() / "tf"
    out.mkdir(parents=True, exist_ok=True)
    xe = load_images(list(load_split()["eval"]), root=stamps_dir()).transpose(0, 2, 3, 1).copy()  # NHWC
    for name in names or list(ARCHS):
        model = build(keras, ARCHS[name])
        gd, xname, yname = freeze(model)
        t0 = time.perf_counter()
        ys = np.concatenate([model.predict(xe[i:i + 16], verbose=0) for i in range(0, len(xe), 16)])
        save(out, f"zoo_{name}", gd, ys, time.perf_counter() - t0, input_name=xname, output_name=yname)


if __name__ == "__main__":
    main(sys.argv[1:])
