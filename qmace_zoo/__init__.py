"""Model zoo and real-data plumbing for demos and benchmarks.

Nothing here imports torch or Pillow at import time: both are optional and imported lazily by the
functions that need them.
"""

from qmace_zoo.mobilenet_v2 import build_mobilenet_v2, export_onnx, load_mobilenet_v2
from qmace_zoo.stamps import (
    data_dir_of,
    default_cache,
    fashion_mnist,
    imagenet_labels,
    load_images,
    load_split,
    preprocess,
    read_idx,
    stamps_dir,
)

__all__ = [
    "build_mobilenet_v2",
    "data_dir_of",
    "default_cache",
    "export_onnx",
    "fashion_mnist",
    "imagenet_labels",
    "load_images",
    "load_mobilenet_v2",
    "load_split",
    "preprocess",
    "read_idx",
    "stamps_dir",
]
