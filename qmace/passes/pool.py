"""A mean over every spatial axis becomes ``GlobalAveragePool`` (TensorFlow spells global average pooling
``Mean(x, [1, 2])``, ONNX exports from PyTorch ``GlobalAveragePool`` + ``Flatten``).

``ReduceMean(x, axes = {2, ..., r-1}, keepdims=1)`` on an (N, C, *S) tensor of rank r >= 3 is
``GlobalAveragePool(x)``; with ``keepdims=0`` it is ``Flatten(GlobalAveragePool(x), axis=1)`` (the reduced
axes have size 1, so the flattened shape is (N, C)). Both compute ``y[n, c] = sum_s x[n, c, s] / |S|``.

Why it matters beyond the op count: the two spellings quantize differently. ``GlobalAveragePool`` shares its
input's quantization parameters and passes per-channel scales through (equalization rescales the producing
convolution against the following Gemm across it); ``ReduceMean`` calibrates its own range and stops
equalization. The same network must give the same int8 model whichever framework wrote it. Left alone: a
ReduceMean whose input or output has fixed quantization parameters from the source model (an int8 ``.tflite``
MEAN has its own output scale), axes that are not exactly the spatial ones, an unknown input rank.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op


def _spatial_mean(graph: Graph, node: Node) -> bool:
    x = graph.tensors.get(node.inputs[0])
    if x is None or x.shape is None or len(x.shape) < 3:
        return False
    axes = graph.constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if axes is None or axes.size == 0:  # no axes: every axis (or none): not a spatial mean
        return False
    rank = len(x.shape)
    got = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
    return got == list(range(2, rank))


def spatial_means_to_global_pool(graph: Graph) -> int:
    """Rewrite ReduceMean over all spatial axes as GlobalAveragePool (+ Flatten when keepdims=0).

    Formulas and the cases left alone in the module docstring. Needs inferred shapes (the input's rank).

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of ReduceMeans rewritten.
    """
    rewritten = 0
    for node in list(graph.nodes):
        if node.op_type != "ReduceMean" or not _spatial_mean(graph, node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if graph.has_fixed_params(x) or graph.has_fixed_params(y):
            continue
        keep = int(get_op("ReduceMean").attr(node, "keepdims"))
        if keep:
            node.op_type, node.inputs, node.attrs = "GlobalAveragePool", [x], {}
        else:
            pooled = graph.unique_name(f"{y}/pooled")
            shape = graph.tensors[x].shape
            graph.add_tensor(Tensor(pooled, graph.tensors[x].dtype, (*shape[:2], *([1] * (len(shape) - 2)))))
            node.op_type, node.inputs, node.outputs, node.attrs = "GlobalAveragePool", [x], [pooled], {}
            at = graph.nodes.index(node) + 1
            graph.nodes.insert(at, Node(graph.unique_name(f"{node.name}/flatten"), "Flatten", [pooled], [y],
                                        {"axis": 1}))
        rewritten += 1
    if rewritten:
        graph.remove_unused()
    return rewritten
