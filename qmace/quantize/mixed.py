"""Which activations get 16 bits: the mixed-precision rule (docs/quantization.md, "16-bit activations").

Structural, decided from the graph alone (never from evaluation data):
1. the data input of every ``LayerNormalization``: the residual stream of a transformer block, whose mean and
   variance the op computes and whose per-tensor range is set by a few outlier channels;
2. the input of every ``Softmax`` that normalizes attention scores, i.e. whose input is computed from a
   MatMul of two activations (Q·Kᵀ) through at most elementwise scaling by constants (Mul/Div), additive
   masks (Add) and data movement (Flatten/Reshape/Transpose, as exporters write Softmax on an inner axis): exp() turns one 8-bit step of the scores into a relative error of ``exp(step)`` in the weights.
A marked tensor produced by a data-movement op (``quant_kernel == "copy"`` with ``range_rule == "input"``:
Reshape, Transpose, ...) shares its parameters with that op's input, so the input is marked too (recursively).
Tensors whose parameters the source model fixes (imported Q/DQ pairs) keep them.

Measured choices join the structural ones as ``extra`` (tensor -> reason), e.g. the calibration-sensitivity
rule of ``qmace.quantize.sensitivity`` (``qmace quantize --sensitivity_16bit N``); the sharing rule above
applies to them too.

Wide activations are asymmetric ``uint16`` (ONNX QuantizeLinear/DequantizeLinear opset 21; ONNX Runtime
runs them bit-exactly like the 8-bit ones). ``mode="all"`` widens every activation (MACE's
``mace_htp_u16a_s8w``), ``"none"`` none.
"""

from __future__ import annotations

from qmace.ir import Graph, Node
from qmace.ops import get_op

WIDE_DTYPE = "uint16"
MODES = ("rule", "none", "all")
_SCORE_PATH_OPS = {"Mul", "Div", "Add"}  # scaling by a constant, additive mask


def _is_activation(g: Graph, name: str) -> bool:
    t = g.tensors.get(name) if name else None
    return t is not None and t.data is None and t.dtype == "float32"


def _attention_scores(g: Graph, producers: dict[str, Node], name: str) -> bool:
    """``name`` is computed from a MatMul of two activations through constant scaling / additive masks."""
    seen = set()
    while name not in seen:
        seen.add(name)
        n = producers.get(name)
        if n is None:
            return False
        if n.op_type == "MatMul":
            return all(_is_activation(g, i) for i in n.inputs[:2])
        op = get_op(n.op_type)
        if op.quant_kernel == "copy" and op.range_rule == "input":  # Flatten/Reshape around the Softmax
            name = n.inputs[0]
            continue
        if n.op_type not in _SCORE_PATH_OPS:
            return False
        acts = [i for i in n.inputs if _is_activation(g, i)]
        if n.op_type in ("Mul", "Div") and len(acts) != 1:
            return False
        if not acts:
            return False
        name = acts[0]
    return False


def wide_activations(g: Graph, mode: str = "rule", extra: dict[str, str] | None = None) -> dict[str, str]:
    """The activations quantized to 16 bits, each with the reason.

    Args:
        g: the float graph about to be quantized.
        mode: ``"rule"`` (module docstring), ``"none"`` or ``"all"``.
        extra: further activations to widen (tensor -> reason), added in every mode but ``"all"``; a name that
            is no float activation of ``g`` is ignored.

    Returns:
        Tensor name -> reason (``"LayerNormalization input"``, ``"attention Softmax input"``, ``"shares
        parameters with X"``, ``"all activations"``).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown 16-bit activation mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "all":
        names = [*g.inputs, *g.activations()]
        return {n: "all activations" for n in names if _is_activation(g, n)}
    producers = g.producers()
    wide: dict[str, str] = {}
    for node in g.nodes if mode == "rule" else ():
        x = node.inputs[0] if node.inputs else ""
        if not _is_activation(g, x):
            continue
        if node.op_type == "LayerNormalization":
            wide.setdefault(x, "LayerNormalization input")
        elif node.op_type == "Softmax" and _attention_scores(g, producers, x):
            wide.setdefault(x, "attention Softmax input")
    for name, why in (extra or {}).items():
        if _is_activation(g, name):
            wide.setdefault(name, why)
    todo = list(wide)
    while todo:  # data-movement producers share parameters with their input
        name = todo.pop()
        n = producers.get(name)
        if n is None:
            continue
        op = get_op(n.op_type)
        src = n.inputs[0] if n.inputs else ""
        if op.quant_kernel == "copy" and op.range_rule == "input" and _is_activation(g, src) and src not in wide:
            wide[src] = f"shares parameters with {name}"
            todo.append(src)
    return {k: v for k, v in wide.items() if not g.has_fixed_params(k)}
