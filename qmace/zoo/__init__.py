"""Model zoo and real-data plumbing for demos and benchmarks.

Nothing here imports torch or Pillow at import time: both are optional and imported lazily by the
functions that need them.
"""

from qmace.zoo.mobilenet_v2 import build_mobilenet_v2, export_onnx, load_mobilenet_v2
from qmace.zoo.stamps import (
    default_cache,
    fashion_mnist,
    imagenet_labels,
    load_images,
    load_split,
    preprocess,
    read_idx,
    shared_data_dir,
    stamps_dir,
)

__all__ = [
    "build_mobilenet_v2",
    "default_cache",
    "export_onnx",
    "fashion_mnist",
    "imagenet_labels",
    "load_images",
    "load_mobilenet_v2",
    "load_split",
    "preprocess",
    "read_idx",
    "shared_data_dir",
    "stamps_dir",
]
