"""A read ``.tflite`` model -> ``ir.Graph`` (the float model) + fixed quantization parameters.

Float models map op by op (``qmace.frontends.tflite.ops``). Constants behind ``DEQUANTIZE`` (float16 or
8-bit weights) and ``DENSIFY`` (sparse weights, densified by the reader) are folded into float32
constants.

Quantized models (TensorFlow's converter with a representative dataset, PTQ or QAT) become their float
model plus the parameters TFLite stored, which travel the way ONNX QDQ parameters do
(``Graph.fixed_params``, see ``qmace.frontends.qdq_import``):
- every 8-bit activation tensor (int8 or uint8, per-tensor ``scale``/``zero_point``) is a float tensor
  of the IR whose parameters are recorded under its name; the activation that an op fuses (RELU6, ...)
  shares the op output's parameters;
- int8 weights (per-axis along ``quantized_dimension``, or per tensor) become the dequantized float
  constant with their parameters recorded, the axis mapped to the IR layout; re-quantizing gives back
  the file's codes exactly;
- int32 biases become ``codes · scale``; the quantizer derives the codes again from ``s_x · s_w[c]``;
- ``QUANTIZE`` of a float tensor (the model's float input) records the parameters on that tensor;
  ``QUANTIZE`` of an 8-bit tensor (a requantization) becomes an unbounded Clip, which qmace runs as
  ``quantize(dequantize(x))`` into the new parameters; ``DEQUANTIZE`` of an activation is dropped (its
  float output takes the producer's place and parameters).
With ``quantize: 1`` the quantizer then uses these parameters instead of ranges, so the integer model
computes on the same grids as TFLite (requantization differs: see docs/mace-compatibility.md).
"""

from __future__ import annotations

import logging

from qmace.errors import ModelError, UnsupportedOpsError
from qmace.frontends.tflite.builder import Builder
from qmace.frontends.tflite.ops import CONVERTERS, CUSTOM_CONVERTERS
from qmace.frontends.tflite.reader import SUPPORTED_DTYPES, TflModel, TflOp
from qmace.ir import Graph
from qmace.qmath import QuantParams

log = logging.getLogger(__name__)

__all__ = ["supported_tflite_ops", "tflite_to_graph"]

_QUANT_OPS = ("QUANTIZE", "DEQUANTIZE", "DENSIFY")
_CONVERT_ERRORS = (ValueError, IndexError, KeyError, AttributeError, TypeError, ZeroDivisionError)


def supported_tflite_ops() -> list[str]:
    """Builtin op names the converter reads, plus ``CUSTOM <code>`` for known custom ops."""
    return sorted([*CONVERTERS, *_QUANT_OPS]) + [f"CUSTOM {c}" for c in sorted(CUSTOM_CONVERTERS)]


def _check_supported(model: TflModel) -> None:
    counts: dict[str, int] = {}
    for op in model.ops:
        ok = (op.custom_code in CUSTOM_CONVERTERS) if op.op == "CUSTOM" else (op.op in CONVERTERS or op.op in _QUANT_OPS)
        if not ok:
            counts[op.label] = counts.get(op.label, 0) + 1
    if counts:
        items = ", ".join(f"{k} ({v} operator{'s' if v > 1 else ''})" for k, v in sorted(counts.items()))
        raise UnsupportedOpsError(f"{model.path}: unsupported TFLite ops: {items}; see docs/supported-ops.md")
    bad = sorted({f"{model.tensors[i].name!r} ({model.tensors[i].dtype})" for op in model.ops
                  for i in op.inputs + op.outputs if i >= 0 and model.tensors[i].dtype not in SUPPORTED_DTYPES})
    if bad:
        raise ModelError(f"{model.path}: tensors of unsupported types: {', '.join(bad)}")


def _is_const(b: Builder, index: int) -> bool:
    return index >= 0 and b.data(index) is not None


def _quant_op(b: Builder, op: TflOp) -> None:
    """QUANTIZE / DEQUANTIZE / DENSIFY (see the module docstring)."""
    src, dst = op.inputs[0], op.outputs[0]
    if _is_const(b, src):
        b.source[dst] = src  # folded: readers get the constant (float32, or codes with their scales)
        return
    if op.op == "DENSIFY":
        raise ModelError(f"{b.where(op)}: DENSIFY of a run-time tensor is not supported")
    t_src = b.t(src)
    if op.op == "QUANTIZE" and t_src.dtype in ("float32", "float16"):
        name = b.value(src)
        out_params = b.output(dst)  # registers the parameters under the output's name ...
        qp = b.params.pop(out_params, None)
        del b.graph.tensors[out_params]
        if qp is not None:
            b.params[name] = qp  # ... which move to the float tensor the IR keeps
        b.alias[dst] = name
        return
    if op.op == "QUANTIZE":  # requantization between two 8-bit grids
        b.node("Clip", [b.value(src)], [b.output(dst)])
        return
    x, out = b.value(src), b.output(dst)
    b.node("Identity", [x], [out])
    if x in b.params:
        b.params.setdefault(out, b.params[x])


def _absorb_identities(graph: Graph, params: dict[str, dict]) -> None:
    """Identity ``x -> y`` from a dropped DEQUANTIZE: the producer of ``x`` writes ``y`` directly when ``x``
    is private to it (so ``y`` keeps its name and parameters through the passes)."""
    for node in [n for n in graph.nodes if n.op_type == "Identity"]:
        x, y = node.inputs[0], node.outputs[0]
        producers, consumers = graph.producers(), graph.consumers()
        if x not in producers or x in graph.inputs or x in graph.outputs or len(consumers.get(x, [])) != 1:
            continue
        graph.nodes.remove(node)
        del graph.tensors[y]
        params.pop(x, None)
        graph.rename_tensor(x, y)


def tflite_to_graph(model: TflModel) -> Graph:
    """Convert a read ``.tflite`` model (see the module docstring).

    Args:
        model: the model from ``read_tflite``.

    Returns:
        The float Graph, with ``fixed_params`` for quantized models.

    Raises:
        UnsupportedOpsError: listing every unsupported op.
        ModelError: naming the operator or tensor otherwise.
    """
    _check_supported(model)
    b = Builder(model)
    for i in model.inputs:
        b.graph.inputs.append(b.output(i))
    for op in model.ops:
        try:
            if op.op in _QUANT_OPS:
                _quant_op(b, op)
            elif op.op == "CUSTOM":
                CUSTOM_CONVERTERS[op.custom_code](b, op)
            else:
                CONVERTERS[op.op](b, op)
        except ModelError:
            raise
        except _CONVERT_ERRORS as e:
            raise ModelError(f"{b.where(op)}: cannot convert ({type(e).__name__}: {e})") from e
    outputs = []
    for i in model.outputs:
        name = b.alias.get(i, b.names[i])
        if name not in b.graph.tensors:
            raise ModelError(f"{model.path}: graph output {b.names[i]!r} is written by no operator")
        outputs.append(name)
    b.graph.outputs = outputs
    _absorb_identities(b.graph, b.params)
    b.graph.toposort()
    b.graph.remove_unused()
    if b.params:
        b.graph.fixed_params = {k: v if isinstance(v, QuantParams) else QuantParams.from_json(v)
                                for k, v in b.params.items() if k in b.graph.tensors}
        log.info("TFLite import: %d quantization parameter sets recorded", len(b.graph.fixed_params))
    return b.graph
