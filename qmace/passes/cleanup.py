"""Removal of nodes that do nothing at inference: Identity, Dropout (mask unused)."""

from __future__ import annotations

from qmace.ir import Graph

_NOOPS = {"Identity", "Dropout"}


def remove_identities(graph: Graph) -> int:
    """Remove Identity and Dropout nodes (a Dropout only when its mask output is unread): readers read the
    input instead; when the output is a graph output, the producer takes over that name (if it can).

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of nodes removed.
    """
    removed = 0
    producers = graph.producers()
    consumers = graph.consumers()
    for node in list(graph.nodes):
        if node.op_type not in _NOOPS:
            continue
        mask = node.outputs[1] if len(node.outputs) > 1 else ""
        if mask and (mask in consumers or mask in graph.outputs):
            continue  # Dropout mask is read
        src, dst = node.inputs[0], node.outputs[0]
        if dst in graph.outputs:
            # The graph output name must survive: the producer takes it over, if src is private to us.
            prod = producers.get(src)
            if prod is None or src in graph.outputs or len(consumers.get(src, [])) > 1:
                continue
            graph.nodes.remove(node)
            graph.tensors.pop(dst, None)
            graph.rename_tensor(src, dst)
        else:
            graph.nodes.remove(node)
            graph.replace_uses(dst, src)
        producers = graph.producers()
        consumers = graph.consumers()
        removed += 1
    graph.remove_unused()
    return removed
