"""The validation oracle for ``platform: tensorflow``: the frozen graph run by TensorFlow itself.

Feeds arrive in the model's layout (channels-first for rank-4 tensors whose YAML data format is NHWC or
NCHW, see ``convert``): they are transposed to TensorFlow's NHWC before the run, and rank-4 results back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qmace.frontends.tensorflow.builder import tensor_ref

if TYPE_CHECKING:
    from qmace.config import ModelConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'qmace[tf]' (tensorflow)"


@dataclass
class _TfOracle:
    session: Any
    formats: dict[str, str]  # YAML tensor name -> data format
    label: str = "TensorFlow on the source graph"

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tf_feeds = {}
        for name, x in feeds.items():
            x = np.asarray(x)
            if self.formats.get(name, "NONE") != "NONE" and x.ndim == 4:
                x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            tf_feeds[tensor_ref(name)] = x
        got = self.session.run([tensor_ref(o) for o in outputs], tf_feeds)
        return [np.ascontiguousarray(y.transpose(0, 3, 1, 2))
                if self.formats.get(o, "NONE") != "NONE" and np.ndim(y) == 4 else np.asarray(y)
                for o, y in zip(outputs, got)]


def tf_oracle(m: ModelConfig, num_threads: int | None = None) -> _TfOracle | None:
    """TensorFlow running ``m``'s frozen graph, or None when TensorFlow is not installed.

    Args:
        m: the YAML model entry (its model file, tensor names and data formats).
        num_threads: TensorFlow's intra-op thread count, or None for its default.

    Returns:
        An oracle whose ``run(outputs, feeds)`` returns TensorFlow's outputs in the model's layout, or None.
    """
    try:
        import tensorflow as tf
    except ImportError:
        return None
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(m.model_file_path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto()
    if num_threads:
        config.intra_op_parallelism_threads = num_threads
        config.inter_op_parallelism_threads = 1
    sub = m.subgraph
    formats = dict(zip(sub.input_tensors, sub.input_data_formats)) | dict(zip(sub.output_tensors,
                                                                              sub.output_data_formats))
    return _TfOracle(tf.compat.v1.Session(graph=graph, config=config), formats)
