"""QAT's access to the ops' kernels: each op's own ``run_torch`` (``qmace.ops``), never a table of QAT's own.

An op without a torch kernel cannot pass gradients. :func:`untrainable_nodes` finds such nodes on the path
the gradients take (from the trainable weights and the fake-quantized activations to the outputs), and
``prepare`` refuses the graph naming them; off that path (shape arithmetic on constants, say) the op's numpy
kernel runs, which is exact and needs no gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from qmace.errors import UnsupportedOpsError
from qmace.ir import Graph, Node
from qmace.ops import get_op

#: Nodes the QAT module runs itself (fake quantization), not through an op kernel.
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _carries_floats(graph: Graph, name: str) -> bool:
    """Whether tensor ``name`` holds real values in training (float, or quantized: fake-quantized floats)."""
    t = graph.tensors.get(name)
    return t is not None and (t.is_quantized or str(t.dtype).startswith(("float", "bfloat")))


def untrainable_nodes(graph: Graph, trainable: set[str]) -> list[Node]:
    """The nodes on the gradient path whose op has no torch kernel.

    The gradient path starts at the trainable tensors and at every QuantizeLinear output (learned scales)
    and follows tensors that carry real values; a node reading such a tensor and writing one is on it.

    Args:
        graph: the quantized graph the module runs.
        trainable: names of the tensors holding trainable parameters (weights, biases).

    Returns:
        The offending nodes, in graph order (empty when QAT can train through the whole graph).
    """
    live = set(trainable)
    bad = []
    for node in graph.nodes:
        if node.op_type == "QuantizeLinear":
            live.update(o for o in node.outputs if o)
            continue
        if not any(i in live for i in node.inputs if i):
            continue
        outs = [o for o in node.outputs if o and _carries_floats(graph, o)]
        live.update(outs)
        if outs and node.op_type not in _QDQ and not get_op(node.op_type).has_torch_kernel():
            bad.append(node)
    return bad


def check_trainable(graph: Graph, trainable: set[str]) -> None:
    """Refuse a graph QAT cannot train through (see :func:`untrainable_nodes`).

    Args:
        graph: the quantized graph.
        trainable: names of the trainable tensors.

    Raises:
        UnsupportedOpsError: naming every such node and its op.
    """
    bad = untrainable_nodes(graph, trainable)
    if bad:
        listed = ", ".join(f"{n.name!r} ({n.op_type})" for n in bad)
        raise UnsupportedOpsError(f"QAT cannot train through ops without a torch kernel: node {listed}")


def run_torch_op(node: Node, inputs: list) -> list:
    """Run ``node`` on torch tensors: its op's ``run_torch`` (differentiable), or, for an op without one whose
    inputs need no gradient, its numpy ``run`` (exact, no gradient).

    Args:
        node: the IR node.
        inputs: its input values (torch tensors or numpy arrays), in the node's input order.

    Returns:
        The node's outputs as tensors.

    Raises:
        UnsupportedOpsError: the op has no torch kernel and one of its inputs needs a gradient.
    """
    op = get_op(node.op_type)
    if op.has_torch_kernel():
        return op.run_torch(node, inputs)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        raise UnsupportedOpsError(
            f"QAT: node {node.name!r} (op {node.op_type}) has no torch kernel, so no "
            "gradient can pass through it"
        )
    outs = op.run(node, [_np(x) if x is not None else None for x in inputs])
    dev = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    return [torch.from_numpy(np.ascontiguousarray(o)).to(dev) for o in outs]
