"""The reference executor: runs a graph node by node with the numpy kernels of ``qmace.ops``.

It is the exact oracle for the quantized kernels (docs/quantization.md) and can hand every intermediate
tensor to a callback (calibration statistics, per-layer error reports) or keep them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from qmace.errors import ModelError
from qmace.ir import Graph, Node
from qmace.ops.kernel import run_kernel

log = logging.getLogger(__name__)

TensorCallback = Callable[[str, np.ndarray], None]


def _uses_integer_kernel(graph: Graph, node: Node) -> bool:
    """A node touching a quantized tensor runs its quantized kernel (QuantizeLinear/DequantizeLinear too)."""
    return any(graph.tensors[t].is_quantized for t in (*node.inputs, *node.outputs) if t)


def run_node(graph: Graph, node: Node, values: list[np.ndarray | None]) -> list[np.ndarray]:
    """Run one node with qmace's numpy kernels.

    Quantized nodes whose op has an integer kernel run on codes (``Op.run_quantized`` with the tensors'
    QuantParams; an ``accumulate`` op whose integer kernel does not cover its 16-bit tensors runs
    ``Op.run_float_defined``); everything else runs ``Op.run`` on float (or integer-typed) values.

    Args:
        graph: the graph (gives the tensors' quantization parameters).
        node: the node.
        values: its input arrays, None for omitted optional inputs.

    Returns:
        Its output arrays.

    Raises:
        KernelError: the kernel rejected the inputs (naming the node).
    """
    if _uses_integer_kernel(graph, node):
        in_qp = [graph.tensors[i].quant if i else None for i in node.inputs]
        out_qp = [graph.tensors[o].quant if o else None for o in node.outputs]
        return run_kernel(node, values, in_qp, out_qp)
    return run_kernel(node, values)


def execute(
    graph: Graph,
    feeds: dict[str, np.ndarray],
    *,
    outputs: list[str] | None = None,
    on_tensor: TensorCallback | None = None,
    keep_all: bool = False,
    op_times: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``feeds`` with the reference kernels.

    Tensors are freed as soon as their last reader has run, so memory stays at the model's working set.

    Args:
        graph: the graph.
        feeds: graph input name -> array.
        outputs: the tensors wanted (default: the graph outputs).
        on_tensor: ``on_tensor(name, value)`` is called for every node output as soon as it is computed.
        keep_all: return every tensor instead of ``outputs``.
        op_times: if given, accumulates seconds per node name.

    Returns:
        Tensor name -> array.

    Raises:
        ModelError: a graph input missing from ``feeds``, or a kernel failing on a node (naming it).
    """
    wanted = list(outputs or graph.outputs)
    missing = [i for i in graph.inputs if i not in feeds]
    if missing:
        raise ModelError(f"missing input tensors: {', '.join(missing)}")
    env: dict[str, np.ndarray] = {}
    for name, t in graph.tensors.items():
        if t.data is not None:
            env[name] = t.data
    env.update(feeds)
    last_use: dict[str, int] = {}
    for idx, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = idx
    keep = set(wanted)
    for idx, node in enumerate(graph.nodes):
        values = [env[i] if i else None for i in node.inputs]
        t0 = time.perf_counter() if op_times is not None else 0.0
        results = run_node(graph, node, values)
        if op_times is not None:
            op_times[node.name] = op_times.get(node.name, 0.0) + time.perf_counter() - t0
        for name, value in zip(node.outputs, results):
            if name:
                env[name] = value
                if on_tensor is not None:
                    on_tensor(name, value)
        if not keep_all:
            for i in set(node.inputs):
                if i and last_use.get(i) == idx and i not in keep and graph.tensors[i].data is None:
                    env.pop(i, None)
    if keep_all:
        return {k: v for k, v in env.items() if graph.tensors.get(k) is not None and graph.tensors[k].data is None}
    return {k: env[k] for k in wanted}
