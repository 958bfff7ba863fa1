"""Caffe frontend: ``platform: caffe`` (``.prototxt`` + ``.caffemodel``) -> ``ir.Graph``.

Parsing uses the protobuf runtime with Caffe's message definitions (``proto``); layers map to ONNX-named
ops in ``layers``; ``net`` handles phases, weights, in-place blobs and shapes; ``graph`` puts them together. The validation oracle is
OpenCV's DNN module (its Caffe importer; ``pip install 'qmace[caffe]'``), absent in OpenCV 5.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from qmace.frontends.caffe.graph import caffe_to_graph
from qmace.frontends.caffe.oracle import caffe_oracle
from qmace.frontends.caffe.proto import messages, parse_prototxt, read_caffemodel, read_prototxt

if TYPE_CHECKING:
    from qmace.config import ModelConfig
    from qmace.ir import Graph

__all__ = ["caffe_oracle", "caffe_to_graph", "load_caffe", "load_caffe_files", "messages", "parse_prototxt",
           "read_caffemodel", "read_prototxt"]


def load_caffe_files(prototxt: str | Path, caffemodel: str | Path | None = None,
                     yaml_shapes: dict[str, tuple[int, ...]] | None = None, keep: Iterable[str] = ()) -> Graph:
    """Read and convert a prototxt (+ caffemodel) to the float IR.

    Args:
        prototxt: the ``.prototxt`` file.
        caffemodel: the ``.caffemodel`` weights, or None when the prototxt carries its own blobs.
        yaml_shapes: input shapes (model layout) the prototxt does not declare.
        keep: tensors that must survive the BatchNorm + Scale merge.

    Returns:
        The float Graph.

    Raises:
        ModelError: a missing or malformed file, an unsupported layer, weights of the wrong shape.
    """
    net = read_prototxt(prototxt)
    weights = read_caffemodel(caffemodel) if caffemodel is not None else None
    return caffe_to_graph(net, weights, prototxt, caffemodel, yaml_shapes, keep)


def load_caffe(m: ModelConfig) -> Graph:
    """The Caffe files of a YAML model entry -> float IR (input shapes the prototxt lacks come from the YAML).

    Args:
        m: the YAML model entry (platform caffe).

    Returns:
        The float Graph.

    Raises:
        ModelError: as for ``load_caffe_files``.
    """
    from qmace.data import model_shape

    sub = m.subgraph
    shapes = {n: tuple(model_shape(tuple(s), f)) for n, s, f in
              zip(sub.input_tensors, sub.input_shapes, sub.input_data_formats)}
    return load_caffe_files(m.model_file_path, m.weight_file_path, shapes,
                            keep=(*sub.output_tensors, *sub.check_tensors))
