"""Model frontends: each turns a source model file into an ``ir.Graph``.

One ``Frontend`` per ``platform:`` value of the deployment YAML, registered in ``FRONTENDS``. A frontend
knows two things: how to read its model files into the IR (``load``), and how to run the original model in
its own framework for ``run --validate`` (``oracle``; ``None`` when that framework is not installed, in
which case validation compares with qmace's own float reference of the imported graph and says so).
Adding a platform = one module here that builds a ``Frontend``, one entry in ``FRONTENDS`` and the platform
name in ``qmace.config.SUPPORTED_PLATFORMS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qmace.errors import ConfigError
from qmace.frontends.caffe import caffe_oracle, load_caffe
from qmace.frontends.caffe.oracle import INSTALL_HINT as CAFFE_INSTALL_HINT
from qmace.frontends.onnx_frontend import load_onnx, onnx_to_graph

if TYPE_CHECKING:
    from qmace.config import ModelConfig
    from qmace.ir import Graph


class Oracle(Protocol):
    """The source framework running the original model: ``run(output names, feeds) -> arrays``."""

    label: str  # what the validation compares against, e.g. "ONNX Runtime on the source file"

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the original model.

        Args:
            outputs: the YAML output tensor names to return.
            feeds: YAML input tensor name -> value, in the layout of qmace's graph (channels-first for
                rank-4 tensors with an NHWC/NCHW data format).

        Returns:
            The outputs' values, in the order of ``outputs`` and in the layout of qmace's graph.
        """


@dataclass(frozen=True)
class Frontend:
    """One ``platform:``: its name, how to load its model files, how to run them in their own framework.

    ``load(m)`` reads the model entry's file(s) into a float IR graph (not yet bound to the YAML);
    ``oracle(m, num_threads)`` returns the source framework running the model, or None when that framework
    is not installed (``install_hint`` then says what to install).
    """

    platform: str
    load: Callable[[ModelConfig], Graph]  # the model entry's file(s) -> float IR graph (not yet bound to the YAML)
    oracle: Callable[[ModelConfig, int | None], Oracle | None]  # None: the framework is not installed
    install_hint: str = ""  # what to install for ``oracle`` when it returns None


@dataclass
class _OrtOracle:
    session: object
    label: str = "ONNX Runtime on the source file"

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(outputs), feeds)


def _onnx_oracle(m: ModelConfig, num_threads: int | None) -> Oracle:
    from qmace.runtime.session import ort_session

    # the path, not the bytes: ONNX Runtime then finds external data beside the file
    return _OrtOracle(ort_session(str(m.model_file_path), num_threads))


def _load_tflite(m: ModelConfig) -> Graph:
    from qmace.frontends.tflite import load_tflite

    return load_tflite(m.model_file_path)


def _tflite_oracle(m: ModelConfig, num_threads: int | None) -> Oracle | None:
    from qmace.frontends.tflite import litert_oracle

    return litert_oracle(m, num_threads)


def _tensorflow() -> Frontend:
    from qmace.frontends.tensorflow import INSTALL_HINT, load_tensorflow, tf_oracle

    return Frontend("tensorflow", load_tensorflow, tf_oracle, INSTALL_HINT)


FRONTENDS: dict[str, Frontend] = {
    "onnx": Frontend("onnx", lambda m: load_onnx(m.model_file_path), _onnx_oracle),
    "tensorflow": _tensorflow(),
    "caffe": Frontend("caffe", load_caffe, caffe_oracle, CAFFE_INSTALL_HINT),
    # beyond MACE: .tflite read with the tflite package's accessors, validated with the LiteRT interpreter
    "tflite": Frontend("tflite", _load_tflite, _tflite_oracle,
                       install_hint="pip install 'qmace[tflite]' (the LiteRT interpreter, ai-edge-litert)"),
}


def frontend_for(m: ModelConfig) -> Frontend:
    """The frontend of a YAML model entry's ``platform``; ConfigError naming the key if there is none.

    Args:
        m: the YAML model entry.

    Returns:
        The registered frontend of its platform.

    Raises:
        ConfigError: no frontend for that platform.
    """
    try:
        return FRONTENDS[m.platform]
    except KeyError:
        raise ConfigError(f"{m.yaml_path}: models.{m.name}.platform: platform {m.platform!r} is not supported "
                          f"(supported: {', '.join(FRONTENDS)})") from None


__all__ = ["FRONTENDS", "Frontend", "Oracle", "frontend_for", "load_onnx", "onnx_to_graph"]
