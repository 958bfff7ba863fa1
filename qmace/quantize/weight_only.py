"""``quantize_large_weights: 1``: weight-only 8-bit storage; inference stays float.

Which weights (MACE's rule, ``transformer.py`` ``quantize_large_tensor``): a float constant is stored 8-bit
when its only reader is a Conv2D or FullyConnected op. In ONNX terms: input 1 of a ``Conv`` with
``group == 1`` (MACE turns depthwise convolutions into its separate DepthwiseConv2d op, so their weights stay
float), of a ``Gemm`` (MACE's FullyConnected), or of a ``MatMul`` whose right operand is a constant (MACE's
TensorFlow converter turns reshape -> MatMul with a constant weight into FullyConnected; qmace takes every
such MatMul). MACE's rule leaves ``ConvTranspose`` (its Deconv2D) and any
weight read by several ops in float; so does qmace. qmace adds one rule MACE does not have: a weight with
fewer than ``min_elements`` elements stays float (it saves less than 3 KB and its scales and dequantize node
cost part of that back; see docs/quantization.md for the measurement).

Storage (``weight_schema``):
- ``int8`` (default): the int8 schema's weight rule, symmetric per output channel,
  ``scale_c = max|w_c| / 127``, codes in [-127, 127];
- ``uint8``: MACE's own storage, asymmetric per tensor, ``scale = (max - min) / 255`` over the range widened
  to contain 0.
Both come from ``Op.weight_params`` (``qmace.ops.base``), the function the full quantizer's weight
rounding follows. Each stored weight is turned back into float by a DequantizeLinear node
(``w' = scale * (q - zero_point)``), which ONNX Runtime folds into a constant when the session is created.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from qmace import qmath
from qmace.config import LARGE_WEIGHTS_SCHEMAS
from qmace.errors import QuantizationError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op

log = logging.getLogger(__name__)

WEIGHT_SCHEMAS = LARGE_WEIGHTS_SCHEMAS  # the YAML key quantize_large_weights_schema
DEFAULT_WEIGHT_SCHEMA = WEIGHT_SCHEMAS[0]
#: Weights with fewer elements stay float. 1024 is also TensorFlow Lite's default for its weight-only
#: ("dynamic range") quantization; measured on MobileNetV2 in docs/quantization.md.
MIN_ELEMENTS = 1024
# MACE's rule (module docstring) names MACE ops, so this translation of it names their ONNX counterparts
# (an allowed op-name list: tests/test_op_names.py).
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Reasons a weight of one of _WEIGHT_OPS stays float; the summary groups the tensor names by them.
DEPTHWISE = "grouped/depthwise Conv (MACE: DepthwiseConv2d, not in its rule)"
DECONV = "ConvTranspose (MACE: Deconv2D, not in its rule)"
SHARED = "read by more than one op (MACE's rule needs a single consumer)"


def _small(min_elements: int) -> str:
    return f"fewer than {min_elements} elements (saves too little)"


def _reason_float(g: Graph, node: Node, name: str, n_readers: int, min_elements: int) -> str | None:
    """Why the weight ``name`` (input 1 of ``node``) stays float, or None when it is stored 8-bit."""
    if node.op_type == "ConvTranspose":
        return DECONV
    if node.op_type == "Conv" and int(get_op("Conv").attr(node, "group")) != 1:
        return DEPTHWISE
    if n_readers > 1:
        return SHARED
    if g.tensors[name].data.size < min_elements:
        return _small(min_elements)
    return None


def quantize_large_weights(graph: Graph, weight_schema: str = DEFAULT_WEIGHT_SCHEMA,
                           min_elements: int = MIN_ELEMENTS) -> Graph:
    """A copy of ``graph`` whose Conv/Gemm/MatMul weights chosen by MACE's rule (module docstring) are stored
    8-bit and dequantized at load.

    ``graph.metadata["quantization"]`` records ``schema: large_weights``, the ``weight_schema``,
    ``min_elements``, ``quantized_weights`` (count), ``float_weights`` (reason -> tensor names) and
    ``weight_bytes`` (``float``: 4 bytes per element of the stored weights; ``stored``: their codes plus
    their parameters as the model file writes them, JSON text of about 25 bytes per channel).

    Args:
        graph: the optimized float graph (not changed).
        weight_schema: ``"int8"`` or ``"uint8"`` (module docstring).
        min_elements: weights with fewer elements stay float.

    Returns:
        The weight-only quantized copy.

    Raises:
        QuantizationError: an unknown ``weight_schema`` or a negative ``min_elements``.
    """
    if weight_schema not in WEIGHT_SCHEMAS:
        raise QuantizationError(f"unknown weight schema {weight_schema!r}; expected one of {', '.join(WEIGHT_SCHEMAS)}")
    if min_elements < 0:
        raise QuantizationError(f"min_elements must be >= 0, got {min_elements}")
    g = graph.copy()
    readers = {name: len(nodes) for name, nodes in g.consumers().items()}
    kept: dict[str, list[str]] = {}
    seen: set[str] = set()
    float_bytes = stored_bytes = 0
    for node in list(g.nodes):
        if node.op_type not in _WEIGHT_OPS or len(node.inputs) < 2:
            continue
        name = node.inputs[1]
        t = g.tensors.get(name) if name else None
        if t is None or t.data is None or t.dtype != "float32" or name in seen:
            continue
        seen.add(name)
        reason = _reason_float(g, node, name, readers.get(name, 0), min_elements)
        if reason is not None:
            kept.setdefault(reason, []).append(name)
            continue
        w = t.data.astype(np.float32)
        qp = get_op(node.op_type).weight_params(node, 1, w, weight_schema)
        codes = qmath.quantize(w, qp)
        qname = g.unique_name(f"{name}__quant")
        fname = g.unique_name(f"{name}__dequant")
        g.add_tensor(Tensor(qname, qp.dtype, tuple(w.shape), codes, qp))
        g.add_tensor(Tensor(fname, "float32", tuple(w.shape)))
        g.nodes.insert(g.nodes.index(node), Node(g.unique_name(f"{name}__DQ"), "DequantizeLinear", [qname], [fname]))
        node.inputs[1] = fname
        float_bytes += 4 * w.size
        stored_bytes += codes.nbytes + len(json.dumps(qp.to_json()))  # the model file keeps parameters as JSON
    g.remove_unused()
    g.metadata["quantization"] = {
        "schema": "large_weights",
        "weight_schema": weight_schema,
        "min_elements": int(min_elements),
        "quantized_weights": len(seen) - sum(len(v) for v in kept.values()),
        "float_weights": kept,
        "weight_bytes": {"float": int(float_bytes), "stored": int(stored_bytes)},
    }
    for reason, names in kept.items():
        log.info("quantize_large_weights: %d weight(s) stay float: %s", len(names), reason)
    return g


def describe(meta: dict, file_size: int, max_names: int = 4) -> list[str]:
    """Summary lines for a weight-only model: what is 8-bit, the file size against the float model's, and
    the weights that stayed float grouped by reason (at most ``max_names`` names per reason).

    The float size is ``file_size - stored + float`` with ``weight_bytes`` from the metadata: exact up to the
    few hundred bytes of the dequantize nodes.

    Args:
        meta: the model's ``metadata["quantization"]`` (as ``quantize_large_weights`` writes it).
        file_size: the model file's size in bytes.
        max_names: the most weight names listed per reason.

    Returns:
        The summary lines.
    """
    wb = meta.get("weight_bytes", {})
    storage = ("int8 symmetric per channel" if meta.get("weight_schema") == "int8"
               else "uint8 asymmetric per tensor (MACE's storage)")
    float_size = file_size - wb.get("stored", 0) + wb.get("float", 0)
    ratio = file_size / float_size if float_size else 1.0
    lines = [(f"weight-only quantized (inference in float): {meta.get('quantized_weights', 0)} weight(s) stored "
              f"{storage}; file {file_size / 1e6:.2f} MB vs {float_size / 1e6:.2f} MB float ({ratio:.2f}x)")]
    kept = meta.get("float_weights", {})
    if kept:
        lines.append(f"{sum(len(v) for v in kept.values())} weight(s) kept float:")
        for reason, names in kept.items():
            more = f" (+{len(names) - max_names} more)" if len(names) > max_names else ""
            lines.append(f"  {len(names)} {reason}: {', '.join(names[:max_names])}{more}")
    return lines
