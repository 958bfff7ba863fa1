"""Constant folding: nodes whose inputs are all constants, and Shape of tensors with static shapes, are
evaluated once with the reference kernels and replaced by constant tensors."""

from __future__ import annotations

import math

import numpy as np

from qmace import limits
from qmace.ir import Graph
from qmace.ops.kernel import run_kernel

_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear"}


def fold_constants(graph: Graph) -> int:
    """Evaluate every node whose inputs are all constants (and Shape of a fully static shape) with the
    reference kernels, once; its outputs become constants and the node is removed. Quantize/Dequantize
    nodes are never folded.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of nodes folded.

    Raises:
        KernelError: a kernel rejects a node's constant inputs (naming the node and the input shapes).
        ResourceLimitError: an output whose inferred shape exceeds the memory budget.
    """
    folded = 0
    keep = []
    src = graph.metadata.get("source", graph.name)
    for node in graph.nodes:
        ins = [graph.tensors[i] if i else None for i in node.inputs]
        value = None
        if node.op_type in _NEVER_FOLD:
            pass
        elif node.op_type == "Shape" and ins[0] is not None and ins[0].data is None:
            shape = ins[0].shape
            if shape is not None and all(d is not None for d in shape):
                value = run_kernel(node, [np.zeros(shape, np.uint8)], where=f"{src}: ")
        elif all(t is None or t.data is not None for t in ins) and node.inputs:
            for o in node.outputs:  # a shape inference already knows: refuse before allocating
                shape = graph.tensors[o].shape if o and o in graph.tensors else None
                if shape is not None and all(isinstance(d, int) for d in shape):
                    limits.check_tensor_bytes(
                        math.prod(shape) * np.dtype(graph.tensors[o].dtype).itemsize,
                        f"{src}: {node.op_type} node {node.name!r} output {o!r}")
            value = run_kernel(node, [t.data if t is not None else None for t in ins], where=f"{src}: ")
        if value is None:
            keep.append(node)
            continue
        for name, arr in zip(node.outputs, value):
            if name:
                arr = np.asarray(arr)
                t = graph.tensors[name]
                t.data, t.dtype, t.shape = arr, str(arr.dtype), tuple(arr.shape)
        folded += 1
    graph.nodes = keep
    return folded
