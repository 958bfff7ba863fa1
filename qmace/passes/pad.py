"""Zero Pad folded into the Conv that reads it (TensorFlow graphs spell torch-style padding as an explicit
``Pad`` + ``VALID`` convolution).

``Pad(x, pads=[0, 0, t, l, 0, 0, b, r], constant 0) -> Conv(pads=p)`` becomes ``Conv(x, pads=p + [t, l, b, r])``:
the convolution pads with zeros itself (the zero point in the integer kernel, which is what a quantized
zero Pad writes). Only constant-mode pads of value 0 on the spatial axes of an (N, C, H, W) tensor, read by
Convs only (each gets the pads), with explicit or VALID padding.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph
from qmace.ops import get_op


def fold_pads(graph: Graph) -> int:
    """Fold zero constant Pads on the spatial axes into the Convs reading them (see the module docstring).

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of Pads folded.
    """
    folded = 0
    consumers = graph.consumers()
    for pad in list(graph.nodes):
        if pad.op_type != "Pad" or get_op("Pad").attr(pad, "mode") != "constant":
            continue
        pads = graph.constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = graph.constant(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] else np.zeros(())
        if pads is None or value is None or np.any(value != 0) or (len(pad.inputs) > 3 and pad.inputs[3]):
            continue
        if pads.size != 8 or np.any(pads[[0, 1, 4, 5]] != 0) or np.any(pads < 0):
            continue
        out = pad.outputs[0]
        readers = consumers.get(out, [])
        if (not readers or out in graph.outputs
                or any(r.op_type != "Conv" or r.inputs[0] != out
                       or get_op("Conv").attr(r, "auto_pad") not in ("NOTSET", "VALID", "") for r in readers)):
            continue
        extra = [int(v) for v in pads[[2, 3, 6, 7]]]
        for conv in readers:
            old = get_op("Conv").attr(conv, "pads") if get_op("Conv").attr(conv, "auto_pad") != "VALID" else None
            old = list(old) if old else [0, 0, 0, 0]
            conv.attrs["pads"] = [a + b for a, b in zip(old, extra)]
            conv.attrs.pop("auto_pad", None)
            conv.inputs[0] = pad.inputs[0]
        graph.nodes.remove(pad)
        consumers = graph.consumers()
        folded += 1
    graph.remove_unused()
    return folded
