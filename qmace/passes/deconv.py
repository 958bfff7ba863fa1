"""ConvTranspose with kernel == stride as a 1x1 Conv + DepthToSpace, and its bias Add folded into it.

A 2-D ConvTranspose whose kernel equals its stride ``s`` (no padding, no dilation, one group) writes every
output pixel from exactly one input pixel and one kernel tap:

    y[n, o, h*s + i, w*s + j] = sum_c x[n, c, h, w] * W[c, o, i, j] + b[o]

which is a 1x1 Conv with ``C_out * s * s`` output channels, ``W'[o*s*s + i*s + j, c] = W[c, o, i, j]`` and
``b'[o*s*s + i*s + j] = b[o]``, followed by ``DepthToSpace(blocksize=s, mode="CRD")`` (output channel ``o``,
position ``(i, j)`` of each block reads input channel ``o*s*s + i*s + j``). The same sums, so the float function
is unchanged up to the summation order; what changes is the quantized model: the Conv has an exact integer
kernel (ONNX Runtime's QLinearConv) and DepthToSpace moves codes, where ConvTranspose has no integer kernel and
ONNX Runtime does not fuse a QDQ ConvTranspose (a float island). DB text detectors and segmentation heads
upsample this way (PP-OCR's DBHead, MediaPipe's selfie segmentation). A fused activation moves to the Conv
(it acts element by element, so it commutes with DepthToSpace). The DepthToSpace takes over the
ConvTranspose's output name, so range files name the same tensors.

``fold_deconv_bias`` first folds ``Add(ConvTranspose(x, W), b)`` with a constant per-output-channel ``b``
(PaddlePaddle's export writes the bias that way) into the ConvTranspose's bias, so that BatchNormalization
folding and activation fusion can reach the ConvTranspose.

Left alone: other geometries, a tensor with parameters imported from a QDQ source model, non-constant weights.
"""

from __future__ import annotations

import numpy as np

from qmace.ir import Graph, Node, Tensor


def _fixed(graph: Graph, node: Node) -> bool:
    return any(n and graph.has_fixed_params(n) for n in [*node.inputs, *node.outputs])


def _channel_vector(c: np.ndarray | None, m: int) -> np.ndarray | None:
    """``c`` as an (m,) vector when it broadcasts per channel of an NCHW tensor with m channels, else None."""
    if c is None or c.size != m:
        return None
    shape = tuple(c.shape)
    if shape in ((m,) + (1,) * 2, (1, m, 1, 1)) or (m == 1 and c.size == 1):
        return c.reshape(m)
    return None


def fold_deconv_bias(graph: Graph) -> int:
    """Fold a constant per-channel Add after a ConvTranspose into its bias (module docstring).

    Args:
        graph: the graph, edited in place.

    Returns:
        The number of Adds folded.
    """
    folded = 0
    producers, consumers = graph.producers(), graph.consumers()
    for add in list(graph.nodes):
        if add.op_type != "Add" or len(add.inputs) != 2:
            continue
        for k in (0, 1):
            src, cst = add.inputs[k], add.inputs[1 - k]
            prod = producers.get(src)
            if prod is None or prod.op_type != "ConvTranspose" or prod.attrs.get("qm_activation"):
                continue
            w = graph.constant(prod.inputs[1]) if len(prod.inputs) > 1 else None
            shape = graph.tensors[src].shape
            if w is None or shape is None or len(shape) != 4 or shape[1] is None:
                continue
            b = _channel_vector(graph.constant(cst), int(shape[1]))
            if b is None or len(consumers.get(src, [])) != 1 or src in graph.outputs or _fixed(graph, prod) or _fixed(
                    graph, add):
                continue
            old = graph.constant(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] else np.zeros_like(b)
            if old is None:
                continue
            name = graph.unique_name(f"{prod.name}_bias")
            value = (old.astype(np.float32) + b.astype(np.float32)).astype(np.float32)
            graph.add_tensor(Tensor(name, "float32", tuple(value.shape), value))
            while len(prod.inputs) < 3:
                prod.inputs.append("")
            prod.inputs[2] = name
            graph.nodes.remove(add)
            graph.tensors.pop(src, None)
            prod.outputs[0] = add.outputs[0]
            producers, consumers = graph.producers(), graph.consumers()
            folded += 1
            break
    if folded:
        graph.remove_unused()
    return folded


def _as_conv_geometry(node: Node, w: np.ndarray) -> int | None:
    """The stride s when ``node`` is a 2-D ConvTranspose with kernel == stride == (s, s), else None."""
    a = node.attrs
    if w.ndim != 4 or int(a.get("group", 1)) != 1 or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if a.get("output_shape") or any(int(v) for v in (a.get("output_padding") or [])):
        return None
    if any(int(v) for v in (a.get("pads") or [])) or any(int(v) != 1 for v in (a.get("dilations") or [])):
        return None
    strides = [int(v) for v in (a.get("strides") or [1, 1])]
    kernel = list(w.shape[2:])
    if a.get("kernel_shape") and [int(v) for v in a["kernel_shape"]] != kernel:
        return None
    if len(strides) != 2 or strides[0] != strides[1] or kernel != strides or strides[0] < 2:
        return None
    return strides[0]


def deconv_to_conv(graph: Graph) -> int:
    """Rewrite every ConvTranspose with kernel == stride as a 1x1 Conv + DepthToSpace (module docstring).

    Args:
        graph: the graph, edited in place (shapes are re-inferred by the caller).

    Returns:
        The number of ConvTransposes rewritten.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op_type != "ConvTranspose" or len(node.inputs) < 2 or _fixed(graph, node):
            continue
        w = graph.constant(node.inputs[1])
        if w is None:
            continue
        s = _as_conv_geometry(node, w)
        if s is None:
            continue
        cin, cout = w.shape[0], w.shape[1]
        b = graph.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else np.zeros(cout, np.float32)
        if b is None or b.shape != (cout,):
            continue
        # W'[o*s*s + i*s + j, c, 0, 0] = W[c, o, i, j]
        w2 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(cout * s * s, cin, 1, 1).astype(np.float32))
        b2 = np.repeat(b.astype(np.float32), s * s)
        wn, bn = graph.unique_name(f"{node.name}_as_conv_w"), graph.unique_name(f"{node.name}_as_conv_b")
        graph.add_tensor(Tensor(wn, "float32", tuple(w2.shape), w2))
        graph.add_tensor(Tensor(bn, "float32", tuple(b2.shape), b2))
        mid = graph.unique_name(f"{node.outputs[0]}_blocks")
        graph.add_tensor(Tensor(mid, "float32", None))
        attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
        attrs.update({k: v for k, v in node.attrs.items() if k.startswith("qm_")})
        conv = Node(graph.unique_name(f"{node.name}_as_conv"), "Conv", [node.inputs[0], wn, bn], [mid], attrs)
        d2s = Node(graph.unique_name(f"{node.name}_d2s"), "DepthToSpace", [mid], [node.outputs[0]],
                   {"blocksize": s, "mode": "CRD"})
        at = graph.nodes.index(node)
        graph.nodes[at:at + 1] = [conv, d2s]
        count += 1
    if count:
        graph.remove_unused()
    return count
