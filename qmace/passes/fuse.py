"""Activation fusion: Relu, or Clip with constant bounds (ReLU6), into the producing Conv, ConvTranspose,
Gemm or MatMul. MACE's naming rule: the fused op takes over the activation's output name, so range logs
of the float graph and the quantized graph name the same tensors. Not across an imported Q/DQ pair whose
parameters differ from the activation output's (the source model rounds twice there)."""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph

FUSE_INTO = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _clip_bounds(graph: Graph, node) -> list[float] | None:
    lo = graph.constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else np.array(-np.inf)
    hi = graph.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else np.array(np.inf)
    if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:
        return None  # Clip's bounds are scalars; anything else is left to the Clip kernel's named error
    return [float(np.asarray(lo).reshape(())), float(np.asarray(hi).reshape(()))]


def fuse_activations(graph: Graph) -> int:
    """Fuse each Relu, or Clip with constant scalar bounds, into the Conv/ConvTranspose/Gemm/MatMul that
    produces its input when the activation is that output's only reader (attributes ``qm_activation`` and
    ``qm_clip``); the producer takes the activation's output name.

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of activations fused.
    """
    fused = 0
    producers, consumers = graph.producers(), graph.consumers()
    for act in list(graph.nodes):
        if act.op_type not in ("Relu", "Clip"):
            continue
        src = act.inputs[0]
        prod = producers.get(src)
        if prod is None or prod.op_type not in FUSE_INTO or prod.attrs.get("qm_activation"):
            continue
        if len(consumers.get(src, [])) != 1 or src in graph.outputs:
            continue
        if graph.has_fixed_params(src) and graph.fixed_params_json(src) != graph.fixed_params_json(act.outputs[0]):
            continue  # an imported Q/DQ pair between producer and activation rounds differently: keep both
        if act.op_type == "Clip":
            bounds = _clip_bounds(graph, act)
            if bounds is None:
                continue
            prod.attrs["qm_activation"], prod.attrs["qm_clip"] = "Clip", bounds
        else:
            prod.attrs["qm_activation"] = "Relu"
        graph.nodes.remove(act)
        graph.tensors.pop(src, None)
        prod.outputs[0] = act.outputs[0]
        producers, consumers = graph.producers(), graph.consumers()
        fused += 1
    graph.remove_unused()
    return fused
