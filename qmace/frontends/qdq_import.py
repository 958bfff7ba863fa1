"""QDQ import: ONNX QuantizeLinear/DequantizeLinear nodes -> a float graph plus fixed quantization parameters.

Models exported with explicit quantization (PyTorch, NNCF, ONNX Runtime's ``quantize_static`` in QDQ
format) hold their parameters in Q/DQ nodes with ONNX's three inputs ``[x, scale, zero_point]`` and an
``axis`` attribute. :func:`strip_qdq` runs at the end of the ONNX import, before any pass or kernel sees
those nodes, and turns the model into its float model:

- activation pair ``x -> Q(s, zp) -> q -> DQ(s, zp) -> y``: both nodes go, readers of ``y`` read ``x``,
  and ``graph.fixed_params[x]`` records the parameters. ``x`` is the name the float passes keep: for
  ``Conv -> Relu -> Q -> DQ`` it is the Relu output, which activation fusion gives to the fused Conv.
  When ``y`` is a graph output its name is kept: the producer of ``x`` is renamed to ``y`` (or, when ``x``
  is a graph input/output itself, an Identity ``x -> y`` is inserted) and ``y`` is recorded.
- ONNX Runtime's QDQ quantizer drops a Relu/Clip that follows a quantized op and lets the Q's clamp do
  its work (the activation's range then starts at 0: ``zero_point == qmin``). A dropped Relu is restored
  when the clamp at 0 matters, i.e. when ``x`` is not known to be non-negative: the producer writes
  ``<x>__pre_relu`` and a Relu writes ``x`` (activation fusion folds it back into Conv/Gemm/MatMul/
  ConvTranspose; other producers get the same parameters on ``<x>__pre_relu``, so the integer model
  computes exactly what the QDQ model computes). A dropped ReLU6's upper bound cannot be told apart from
  the range's maximum; the quantized kernel clamps at that maximum anyway.
- weight ``W_codes (constant) -> DQ(s, zp, axis) -> w``: ``w`` becomes the float constant
  ``qmath.dequantize(W_codes, params)`` and ``fixed_params[w]`` records the parameters (per-channel axis
  kept). Re-quantizing ``w`` with them gives back ``W_codes`` exactly.
- PyTorch-style fake quantization of a float weight, ``W_float -> Q -> DQ``: folded to the fake-quantized
  float values (``dequantize(quantize(W))``), parameters recorded for the DQ output.
- int32 bias ``B_codes -> DQ(s_x * s_w, 0)``: replaced by the dequantized float constant, nothing recorded:
  the quantizer recomputes the bias codes with scale ``s_x * s_w`` from the recorded input and weight
  parameters, which gives back the same codes.
- graph input ``x -> Q -> DQ``: ``fixed_params[x]``; the quantizer consults fixed parameters before
  ``input_ranges`` (``qmace.quantize.plan``), so the QDQ parameters win over the YAML's range.

Parameters land in ``graph.fixed_params`` (tensor name -> ``QuantParams``), which
``quantize_for_config`` hands to the quantizer as ``QuantizeOptions.fixed_params``; tensors without
parameters take the range file's range (MACE's "mixing usage").

A float op between its own Q/DQ pairs (ORT's quantizer writes a BatchNormalization after a convolution that
way when the model was not pre-processed) keeps its numerics: BatchNorm folding and activation fusion do not
fuse across a tensor with recorded parameters (``Graph.has_fixed_params``), and the quantizer rounds such a
tensor with its parameters even between two float ops (``DQ(Q(x))``, as the source does). Measured on ORT-made
QDQ models with unfolded BN, HardSwish, squeeze-excite and Resize: the same codes as ORT running the file
(tests/test_qdq_faithful.py).

Names the float passes drop: BatchNorm folding replaces a Conv's weight by ``<node>_weight_bnfold`` (the
recorded weight parameters no longer describe the folded values, so the quantizer derives new ones) and
drops the pre-BN activation; fusion drops a Conv output read only by a Relu. ``Graph.remove_unused`` drops
their entries with the tensors, and ``Graph.rename_tensor`` carries an entry to the new name.

Q/DQ nodes that fit none of these patterns (codes entering or leaving the model, parameters computed at
run time, blocked or 16-bit quantization) stay in the float graph as ops with their explicit
``[x, scale, zero_point]`` inputs (``qmace.ops.qdq``: ONNX's formulas). Q->DQ pairs whose parameters are
constants but unsupported as activation parameters (per-channel, not 8-bit) are reported in a ModelError.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import helper

from qmace import qmath
from qmace.errors import ModelError, QuantizationError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op, is_supported
from qmace.qmath import QuantParams

log = logging.getLogger(__name__)

__all__ = ["strip_qdq"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_CODE_DTYPES = ("uint8", "int8")


def _is_explicit(node: Node) -> bool:
    return node.op_type in _QDQ and len(node.inputs) > 1 and bool(node.inputs[1])


def _node_params(graph: Graph, node: Node, rank: int | None) -> tuple[np.ndarray, np.ndarray, str, int | None]:
    """(scale, zero_point, code dtype, axis) of an ONNX-style Q/DQ node; axis normalized, None per tensor."""
    if int(get_op(node.op_type).attr(node, "block_size") or 0):
        raise ModelError(f"{node.op_type} node {node.name!r}: blocked quantization is not supported")
    scale = graph.constant(node.inputs[1])
    if scale is None:
        raise ModelError(f"{node.op_type} node {node.name!r}: scale {node.inputs[1]!r} is not a constant")
    zp_name = node.inputs[2] if len(node.inputs) > 2 else ""
    zp = graph.constant(zp_name) if zp_name else None
    if zp_name and zp is None:
        raise ModelError(f"{node.op_type} node {node.name!r}: zero point {zp_name!r} is not a constant")
    if zp is not None:
        dtype = str(zp.dtype)
    elif node.op_type == "QuantizeLinear" and int(get_op(node.op_type).attr(node, "output_dtype") or 0):
        dtype = str(np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"]))))
    elif node.op_type == "DequantizeLinear" and graph.constant(node.inputs[0]) is not None:
        dtype = str(graph.constant(node.inputs[0]).dtype)
    else:
        dtype = "uint8"
    scale = np.asarray(scale, np.float32)
    zp = np.zeros(scale.shape, np.int64) if zp is None else np.asarray(zp).astype(np.int64)
    if scale.ndim == 1 and scale.size == 1:  # a one-element 1-D scale is per tensor
        scale, zp = scale.reshape(()), zp.reshape(())
    axis = None
    if scale.ndim == 1:
        axis = int(get_op(node.op_type).attr(node, "axis"))
        if rank is not None:
            if not -rank <= axis < rank:
                raise ModelError(f"{node.op_type} node {node.name!r}: axis {axis} out of range for rank {rank}")
            axis %= rank
    elif scale.ndim > 1:
        raise ModelError(f"{node.op_type} node {node.name!r}: scale of shape {scale.shape} is not supported")
    if zp.shape != scale.shape:
        raise ModelError(f"{node.op_type} node {node.name!r}: zero point shape {zp.shape} != scale shape {scale.shape}")
    return scale, zp, dtype, axis


def _quant_params(node: Node, scale, zp, dtype, axis) -> QuantParams:
    try:
        return QuantParams(scale, zp.astype(np.int32), dtype, axis)
    except QuantizationError as e:
        raise ModelError(f"{node.op_type} node {node.name!r}: {e}") from e


def _same(a, b) -> bool:
    return a[2] == b[2] and a[3] == b[3] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _dequantize_any(q: np.ndarray, scale, zp, axis) -> np.ndarray:
    """ORT's DequantizeLinear for any integer code type: float32(q - zp) * scale."""
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = scale.shape[0]
    centered = (q.astype(np.int64) - zp.reshape(shape if axis is not None else ())).astype(np.float32)
    return centered * scale.reshape(shape if axis is not None else ())


def _fold_constant(graph: Graph, node: Node, params: dict[str, QuantParams]) -> None:
    x = graph.constant(node.inputs[0])
    scale, zp, dtype, axis = _node_params(graph, node, x.ndim)
    out = graph.tensors[node.outputs[0]]
    if node.op_type == "QuantizeLinear":
        if dtype not in _CODE_DTYPES:
            raise ModelError(f"QuantizeLinear node {node.name!r}: code type {dtype} is not supported")
        value = qmath.quantize(x, _quant_params(node, scale, zp, dtype, axis))
    else:
        if not np.issubdtype(x.dtype, np.integer):
            raise ModelError(f"DequantizeLinear node {node.name!r}: input {node.inputs[0]!r} is not integer codes")
        value = _dequantize_any(x, scale, zp, axis)
        if dtype in _CODE_DTYPES:
            qp = _quant_params(node, scale, zp, dtype, axis)
            value = qmath.dequantize(x, qp)
            params[node.outputs[0]] = qp
        elif dtype != "int32":
            log.warning("DequantizeLinear node %r: %s weights are dequantized without keeping their parameters",
                        node.name, dtype)
    value = np.ascontiguousarray(value)
    out.data, out.dtype, out.shape = value, str(value.dtype), tuple(value.shape)
    graph.nodes.remove(node)


class _Sign:
    """Which tensors are known non-negative in the float model (so a clamp at 0 is a no-op there)."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.memo: dict[str, bool] = {}

    def nonneg(self, name: str) -> bool:
        if name not in self.memo:
            self.memo[name] = False  # cycles cannot happen; this also bounds recursion on odd graphs
            self.memo[name] = self._compute(name)
        return self.memo[name]

    def _compute(self, name: str) -> bool:
        t = self.g.tensors.get(name)
        if t is None:
            return False
        if t.data is not None:
            return bool(t.data.size == 0 or np.all(t.data >= 0))
        prod = self.g.producers().get(name)
        if prod is None or not is_supported(prod.op_type):
            return False
        return get_op(prod.op_type).output_nonneg(prod, self.g.constant, self.nonneg)  # the op's sign trait


def strip_qdq(graph: Graph) -> Graph:
    """Remove ONNX-style Q/DQ nodes (see the module docstring), in place.

    Records ``graph.fixed_params`` (tensor name -> ``QuantParams``) when the model held any Q/DQ node.

    Args:
        graph: the imported graph.

    Returns:
        ``graph``.

    Raises:
        ModelError: listing every Q/DQ node that fits no supported pattern.
    """
    if not any(_is_explicit(n) for n in graph.nodes):
        return graph
    params = graph.fixed_params  # renames and removals below keep it in step (Graph.rename_tensor, remove_unused)
    conflicts: list[str] = []
    removed: set[int] = set()

    def record(name: str, qp: QuantParams) -> None:
        old = params.get(name)
        if old is not None and old != qp:
            conflicts.append(name)
            return
        params[name] = qp

    # 1. Constant folding of weight/bias Q and DQ (in order, so W_float -> Q -> DQ folds completely).
    for node in list(graph.nodes):
        if _is_explicit(node) and graph.constant(node.inputs[0]) is not None:
            _fold_constant(graph, node, params)

    # 2. Activation pairs.
    sign = _Sign(graph)
    for node in list(graph.nodes):
        if id(node) in removed or node.op_type != "QuantizeLinear" or not _is_explicit(node):
            continue
        x, q = node.inputs[0], node.outputs[0]
        dqs = graph.consumers().get(q, [])
        if not dqs or q in graph.outputs or any(not (d.op_type == "DequantizeLinear" and _is_explicit(d)
                                                     and d.inputs[0] == q) for d in dqs):
            continue  # reported below
        rank = len(graph.tensors[x].shape) if graph.tensors[x].shape is not None else None
        qparams = _node_params(graph, node, rank)
        if any(not _same(qparams, _node_params(graph, d, rank)) for d in dqs):
            raise ModelError(f"QuantizeLinear node {node.name!r} and its DequantizeLinear node(s) "
                             f"{', '.join(d.name for d in dqs)} have different parameters")
        if qparams[3] is not None:
            raise ModelError(f"QuantizeLinear node {node.name!r}: per-channel activation quantization of "
                             f"{x!r} is not supported")
        if qparams[2] not in _CODE_DTYPES:
            raise ModelError(f"QuantizeLinear node {node.name!r}: {qparams[2]} activations are not supported "
                             f"(8-bit only)")
        qp = _quant_params(node, *qparams)
        for n in (node, *dqs):
            graph.nodes.remove(n)
            removed.add(id(n))
        graph.tensors.pop(q, None)
        prod = graph.producers().get(x)
        if int(qp.zero_point) == qp.qmin and prod is not None and not sign.nonneg(x):
            # ONNX Runtime dropped a Relu here and let the Q clamp at 0: restore it (see module docstring).
            pre = graph.unique_name(f"{x}__pre_relu")
            graph.add_tensor(Tensor(pre, graph.tensors[x].dtype, graph.tensors[x].shape))
            prod.outputs = [pre if o == x else o for o in prod.outputs]
            graph.nodes.insert(graph.nodes.index(prod) + 1,
                               Node(graph.unique_name(f"{x}__Relu"), "Relu", [pre], [x]))
            if not get_op(prod.op_type).fuses_activation:
                record(pre, qp)
            sign.memo.clear()
        for d in dqs:
            y = d.outputs[0]
            if y not in graph.outputs:
                graph.replace_uses(y, x)
                graph.tensors.pop(y, None)
                continue
            renamable = (graph.producers().get(x) is not None and x not in graph.inputs
                         and x not in graph.outputs and graph.tensors[x].data is None)
            if renamable:
                graph.tensors.pop(y, None)
                graph.rename_tensor(x, y)  # moves x's recorded parameters to y
                x = y
            else:
                graph.nodes.append(Node(graph.unique_name(f"{y}__Identity"), "Identity", [x], [y]))
                record(y, qp)
        record(x, qp)
        sign.memo.clear()

    left = [f"{n.name} ({n.op_type})" for n in graph.nodes if _is_explicit(n)]
    if left:
        log.info("QuantizeLinear/DequantizeLinear nodes kept as ops (codes entering or leaving the model): %s",
                 ", ".join(left))
    if conflicts:
        log.warning("tensors with differing parameters in consecutive Q/DQ pairs keep the first: %s",
                    ", ".join(conflicts))
    graph.toposort()
    graph.remove_unused()
    log.info("QDQ import: %d Q/DQ parameter sets recorded", len(graph.fixed_params))
    return graph
