"""``run --validate`` oracle for Caffe models: OpenCV's DNN module runs the prototxt + caffemodel without
Caffe (OpenCV 4.x; OpenCV 5 dropped the Caffe importer). Layer fusion and Winograd convolution are turned
off so OpenCV computes each layer as written. OpenCV names a layer's outputs by the layer, so a tensor is
asked for by the layer that wrote it (the last writer, for an in-place blob's final version). OpenCV's memory
reuse keeps only the first output of each requested layer intact, so a layer whose later outputs are wanted
runs in a forward pass of its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qmace.errors import ModelError

if TYPE_CHECKING:
    from qmace.config import ModelConfig

INSTALL_HINT = "pip install 'qmace[caffe]' (OpenCV 4.x DNN runs Caffe models)"


def tensor_writers(prototxt: str) -> dict[str, tuple[str, int]]:
    """qmace tensor name -> (Caffe layer name, output index): the same SSA names as the converter.

    Args:
        prototxt: the ``.prototxt`` path.

    Returns:
        The mapping.

    Raises:
        ModelError: the prototxt cannot be read or parsed.
    """
    from qmace.frontends.caffe.net import _ssa_names, net_layers
    from qmace.frontends.caffe.proto import read_prototxt

    net = read_prototxt(prototxt)
    layers = [la for la in net_layers(net) if la.type != "Input"]
    inputs = list(net.input) + [t for la in net_layers(net) if la.type == "Input" for t in la.tops]
    writers = {}
    for layer, names in zip(layers, _ssa_names(layers, inputs)):
        for k, name in enumerate(names):
            writers[name] = (layer.name, k)
    return writers


@dataclass
class OpenCvOracle:
    """The source Caffe model run by OpenCV's dnn module (the validation oracle for platform caffe)."""
    net: Any
    writers: dict[str, tuple[str, int]]
    label: str

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once and fetch the wanted tensors.

        Args:
            outputs: qmace tensor names to return.
            feeds: input name -> array.

        Returns:
            One array per name in ``outputs``.

        Raises:
            ModelError: a tensor no Caffe layer writes.
        """
        for name, value in feeds.items():
            self.net.setInput(np.ascontiguousarray(value, np.float32), name)
        missing = [o for o in outputs if o not in self.writers]
        if missing:
            raise ModelError(f"OpenCV oracle: no Caffe layer writes {', '.join(map(repr, missing))}")
        layers = list(dict.fromkeys(self.writers[o][0] for o in outputs))
        # OpenCV keeps only the first output of each requested layer out of its memory reuse: a layer whose
        # later outputs are wanted (Slice, Split) gets a forward pass of its own.
        multi = {self.writers[o][0] for o in outputs if self.writers[o][1] > 0}
        single = [la for la in layers if la not in multi]
        got = dict(zip(single, self.net.forwardAndRetrieve(single))) if single else {}
        for la in multi:
            got[la] = self.net.forwardAndRetrieve([la])[0]
        return [np.array(got[self.writers[o][0]][self.writers[o][1]]) for o in outputs]


def caffe_oracle(m: ModelConfig, num_threads: int | None = None) -> OpenCvOracle | None:
    """The validation oracle for a Caffe model entry.

    Args:
        m: the YAML model entry.
        num_threads: OpenCV threads, or None.

    Returns:
        An OpenCvOracle, or None when OpenCV (with dnn) is not installed.

    Raises:
        ModelError: OpenCV cannot load the model.
    """
    try:
        import cv2
    except ImportError:
        return None
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        return None
    if num_threads:
        cv2.setNumThreads(int(num_threads))
    try:
        net = cv2.dnn.readNetFromCaffe(str(m.model_file_path), str(m.weight_file_path))
    except cv2.error as e:
        raise ModelError(f"{m.model_file_path}: OpenCV could not load the Caffe model: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    net.enableFusion(False)
    if hasattr(net, "enableWinograd"):
        net.enableWinograd(False)
    return OpenCvOracle(net, tensor_writers(str(m.model_file_path)), f"OpenCV {cv2.__version__} DNN on the source files")
