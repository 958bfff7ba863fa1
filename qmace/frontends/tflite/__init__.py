"""TFLite frontend (``platform: tflite``, beyond MACE): ``.tflite`` flatbuffers read with the ``tflite``
package's accessors (no TensorFlow), mapped to the IR in NCHW; validation oracle: the LiteRT interpreter
(``ai-edge-litert``, the optional extra ``qmace[tflite]``) when it is installed."""

from __future__ import annotations

from pathlib import Path

from qmace.frontends.tflite.convert import supported_tflite_ops, tflite_to_graph
from qmace.frontends.tflite.oracle import LITERT_HINT, LiteRTOracle, litert_oracle
from qmace.frontends.tflite.reader import read_tflite
from qmace.ir import Graph


def load_tflite(path: str | Path) -> Graph:
    """``.tflite`` file -> float IR graph (with ``fixed_params`` for quantized models).

    Args:
        path: the ``.tflite`` file.

    Returns:
        The float Graph.

    Raises:
        ModelError: the file is missing, malformed, or wrong at some tensor/operator (named).
        UnsupportedOpsError: operators qmace cannot convert (listed).
    """
    return tflite_to_graph(read_tflite(path))


__all__ = ["LITERT_HINT", "LiteRTOracle", "litert_oracle", "load_tflite", "read_tflite", "supported_tflite_ops", "tflite_to_graph"]
