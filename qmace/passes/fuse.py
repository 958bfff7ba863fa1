"""Activation fusion: a ``fusable_activation`` op (Relu, or Clip with constant bounds: ReLU6) into the
producing op that ``fuses_activation`` (Conv, ConvTranspose, Gemm, MatMul). MACE's naming rule: the fused op
takes over the activation's output name, so range logs of the float graph and the quantized graph name the
same tensors. Not across an imported Q/DQ pair whose parameters differ from the activation output's (the
source model rounds twice there)."""

from __future__ import annotations

from qmace.ir import Graph
from qmace.ops import get_op


def fuse_activations(graph: Graph) -> int:
    """Fuse each ``fusable_activation`` node into the ``fuses_activation`` node that produces its input when
    the activation is that output's only reader (the attributes of ``Op.fusion_attrs``: ``qm_activation``,
    ``qm_clip``); the producer takes the activation's output name.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of activations fused.
    """
    fused = 0
    producers, consumers = graph.producers(), graph.consumers()
    for act in list(graph.nodes):
        act_op = get_op(act.op_type)
        if not act_op.fusable_activation:
            continue
        src = act.inputs[0]
        prod = producers.get(src)
        if prod is None or not get_op(prod.op_type).fuses_activation or prod.attrs.get("qm_activation"):
            continue
        if len(consumers.get(src, [])) != 1 or src in graph.outputs:
            continue
        if graph.has_fixed_params(src) and graph.fixed_params.get(src) != graph.fixed_params.get(act.outputs[0]):
            continue  # an imported Q/DQ pair between producer and activation rounds differently: keep both
        attrs = act_op.fusion_attrs(act, graph.constant)
        if attrs is None:
            continue
        prod.attrs.update(attrs)
        graph.nodes.remove(act)
        graph.tensors.pop(src, None)
        prod.outputs[0] = act.outputs[0]
        producers, consumers = graph.producers(), graph.consumers()
        fused += 1
    graph.remove_unused()
    return fused
