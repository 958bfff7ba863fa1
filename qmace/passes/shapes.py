"""Shape inference: lower the IR to ONNX and let ONNX's shape inference (with data propagation) fill in
dtypes and shapes of every tensor."""

from __future__ import annotations

import logging

import onnx

from qmace.errors import first_line
from qmace.ir import Graph
from qmace.onnx_bridge import np_dtype, shape_of, to_onnx

log = logging.getLogger(__name__)


def infer_shapes(graph: Graph) -> int:
    """Fill ``Tensor.shape``/``dtype`` from ONNX shape inference. Returns the number of tensors updated.

    Constants and quantized tensors are left as they are; when ONNX shape inference fails, a warning is
    logged and nothing changes.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of tensors whose shape changed.
    """
    model = to_onnx(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        log.warning("shape inference failed: %s", first_line(e))
        return 0
    updated = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = graph.tensors.get(vi.name)
        if t is None or t.data is not None or t.is_quantized:
            continue
        shape = shape_of(vi)
        if vi.type.tensor_type.elem_type:
            t.dtype = np_dtype(vi.type.tensor_type.elem_type)
        if shape is not None and shape != t.shape:
            t.shape = shape
            updated += 1
    return updated
