"""A parsed Caffe net (prototxt + caffemodel messages) -> ``ir.Graph``: ``caffe_to_graph`` runs the steps
described in ``qmace.frontends.caffe.net`` with the layer converters of ``qmace.frontends.caffe.layers``
(which build on ``net``'s ``Context``; keeping this function apart from ``net`` avoids an import cycle)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qmace.errors import ModelError, UnsupportedOpsError
from qmace.frontends.caffe.layers import CONVERTERS, IGNORED
from qmace.frontends.caffe.net import (
    Context,
    _net_inputs,
    _ssa_names,
    merge_affine_batchnorms,
    net_layers,
    net_layers_all,
)
from qmace.ir import Graph, Tensor

log = logging.getLogger(__name__)


def caffe_to_graph(net: Any, weights: Any | None, path: str | Path, weight_path: str | Path | None = None,
                   yaml_shapes: dict[str, tuple[int, ...]] | None = None, keep: Iterable[str] = ()) -> Graph:
    """Convert a parsed prototxt (``NetParameter``) with its caffemodel (``NetParameter`` holding blobs, or
    None when the prototxt carries its own blobs) to the float IR. ``yaml_shapes`` (model layout) fill in
    input shapes the prototxt does not declare; tensors in ``keep`` (the YAML's outputs and check tensors)
    survive the BatchNorm + Scale merge.

    Args:
        net: the parsed prototxt.
        weights: the parsed caffemodel, or None.
        path: the prototxt's path, for messages.
        weight_path: the caffemodel's path, for messages.
        yaml_shapes: input name -> shape (model layout).
        keep: tensor names to keep.

    Returns:
        The float Graph.

    Raises:
        ModelError: naming the file and layer for anything unsupported or inconsistent.
    """
    path = Path(path)
    weight_path = Path(weight_path) if weight_path is not None else None
    layers = net_layers(net)
    if not layers:
        raise ModelError(f"{path}: the prototxt has no layers")
    unsupported: dict[str, int] = {}
    for layer in layers:
        if layer.type not in CONVERTERS and layer.type not in IGNORED and layer.type != "Input":
            unsupported[layer.type] = unsupported.get(layer.type, 0) + 1
    if unsupported:
        items = ", ".join(f"{k} ({v} layer{'s' if v > 1 else ''})" for k, v in sorted(unsupported.items()))
        raise UnsupportedOpsError(f"{path}: unsupported Caffe layer types: {items}; see docs/mace-compatibility.md")
    if weights is not None:
        by_name = {layer.name: layer.blobs for layer in net_layers_all(weights)}
        for layer in layers:
            if by_name.get(layer.name):
                layer.blobs = by_name[layer.name]
        unused = sorted(set(by_name) - {layer.name for layer in layers})
        if unused:
            log.info("%s: %d caffemodel layer(s) not in the prototxt are ignored (as Caffe does): %s",
                     weight_path, len(unused), ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))

    input_shapes, layers = _net_inputs(net, layers, yaml_shapes or {}, path)
    graph = Graph(name=net.name or path.stem, metadata={"source": str(path), "source_format": "caffe"})
    ctx = Context(graph, path, weight_path)
    current: dict[str, str] = {}
    for name, shape in input_shapes.items():
        graph.add_tensor(Tensor(name, "float32", tuple(shape)))
        graph.inputs.append(name)
        ctx.shapes[name] = tuple(shape)
        current[name] = name
    read_after: set[str] = set()
    for layer, outs in zip(layers, _ssa_names(layers, list(input_shapes))):
        missing = [b for b in layer.bottoms if b not in current]
        if missing:
            raise ModelError(f"{path}: {layer}: bottom blob(s) {', '.join(map(repr, missing))} are produced by "
                             f"no earlier layer")
        ins = [current[b] for b in layer.bottoms]
        read_after.update(ins)
        if layer.type in IGNORED:
            continue
        CONVERTERS[layer.type](ctx, layer, ins, outs)
        for top, name in zip(layer.tops, outs):
            current[top] = name
    graph.outputs = [t for t in dict.fromkeys(current.values()) if t not in read_after and t not in graph.inputs]
    merge_affine_batchnorms(graph, set(keep))
    return graph
