"""Two ONNX Runtime lowerings that give the same integer codes through ORT's faster float kernels.

ORT runs a quantized model's ``DequantizeLinear -> op -> QuantizeLinear`` patterns as integer kernels. For two
patterns its integer kernel is slower than its float one, by a factor that mobile classifiers feel (measured in
benchmarks/README.md, issue 10 "Run 7"):

- **MaxPool** on uint8 / int8 codes runs ORT's generic pooling loop (11x its float MaxPool on the OCR
  direction classifier's [1,200,2,96] map). It becomes ``Cast -> MaxPool -> Cast``: the maximum of codes is
  the code of the maximum (dequantization is increasing), and every code is exact in float32.
- **Depthwise convolutions whose windows fall mostly in the padding** (a 5x5 kernel over a map 2 or 3 rows
  high): ORT's integer depthwise kernel multiplies every tap, padding included; its float kernel skips them.
  Such a convolution becomes ``DequantizeLinear(x; scale 1, zero point z_x) -> Conv(integer weights and bias
  as float) [-> Relu] -> Mul(M) -> QuantizeLinear(scale 1, z_y)``. The float convolution adds integer products whose
  partial sums stay below 2^24, so float32 computes the int32 accumulator exactly in any order; ``M`` is
  QLinearConv's float32 multiplier ``s_x * s_w / s_y`` and the last two nodes round ``acc * M`` half to even
  and add ``z_y``, as QLinearConv's requantization does. The session must not fold ``Mul(M)`` into the
  weights: run it with ``DISABLED_OPTIMIZERS``.

Both give bit for bit the codes of the integer kernels (the reference's definition, docs/quantization.md
"Exact float kernels"; tests/test_ort_lowering.py). Only the onnxruntime backend's lowering uses them;
``qmace export`` writes the plain QDQ patterns.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import TensorProto

from qmace.errors import ModelError
from qmace.onnx_bridge import attr_value, sort_nodes

log = logging.getLogger(__name__)

#: ORT optimizers that would change the rewritten convolutions' arithmetic (folding Mul(M) into the weights).
DISABLED_OPTIMIZERS = ("ConvMulFusion",)

#: A depthwise convolution goes through the float kernel when fewer than this share of its taps read the map
#: (the rest read padding). Chosen from the kernel timings of benchmarks/README.md, issue 10 "Run 7": at 38%
#: and 58% the float route was 2-4x faster, at 86% (16x16 maps) slower once its layout changes are counted.
USEFUL_TAP_SHARE = 0.75

#: Integer sums below this are exact in float32.
_EXACT = 2 ** 24


def _useful_share(size: int, k: int, stride: int, pad0: int, pad1: int, dilation: int) -> float:
    """Share of (output position, tap) pairs along one axis that read the map rather than padding."""
    out = (size + pad0 + pad1 - dilation * (k - 1) - 1) // stride + 1
    if out <= 0:
        return 1.0
    inside = sum(0 <= o * stride - pad0 + j * dilation < size for o in range(out) for j in range(k))
    return inside / (out * k)


class _Model:
    """Lookups over one model's graph: initializers, producers, readers, shapes."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.outputs = {v.name for v in self.g.output}
        self._shapes: dict[str, list[int]] | None = None
        self._inferred = False
        self._np = numpy_helper

    def shape(self, name: str) -> list[int]:
        """The static shape of ``name`` (0 for an unknown dimension; [] if unknown), from the model's value
        infos, else from ONNX shape inference (run once, on the first name the value infos lack)."""
        if self._shapes is None:
            self._shapes = self._dims(list(self.g.value_info) + list(self.g.input))
        if name not in self._shapes and not self._inferred:
            from onnx import shape_inference

            self._inferred = True
            try:
                self._shapes.update(self._dims(shape_inference.infer_shapes(self.model).graph.value_info))
            except Exception as e:  # a model ONNX cannot infer: no shapes, so no rewrite that needs them
                log.debug("ONNX Runtime lowering: no shape inference (%s)", e)
        return self._shapes.get(name, [])

    @staticmethod
    def _dims(infos) -> dict[str, list[int]]:
        return {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
                for v in infos}

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else self._np.to_array(t)

    def dq_of(self, name: str, zero_point: bool = True):
        """The DequantizeLinear node producing ``name`` with a constant scale and a constant zero point (or,
        unless ``zero_point``, none), or None."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            return None
        has_zp = len(n.input) > 2 and bool(n.input[2])
        if self.const(n.input[1]) is None or (has_zp and self.const(n.input[2]) is None) or (zero_point and not has_zp):
            return None
        return n

    def only_quantize_reader(self, name: str):
        """The single QuantizeLinear reading ``name`` (constant scalar scale and zero point), or None."""
        rs = self.readers.get(name, [])
        if len(rs) != 1 or name in self.outputs:
            return None
        q = rs[0]
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) < 3:
            return None
        s, z = self.const(q.input[1]), self.const(q.input[2])
        return q if s is not None and z is not None and s.size == 1 and z.size == 1 else None

    def add_init(self, array: np.ndarray, name: str) -> str:
        self.g.initializer.append(self._np.from_array(array, name))
        return name


def _maxpool(m: _Model, node) -> bool:
    from onnx import helper

    dq = m.dq_of(node.input[0])
    q = m.only_quantize_reader(node.output[0]) if len(node.output) == 1 else None
    if dq is None or q is None or m.inits[q.input[2]].data_type != m.inits[dq.input[2]].data_type:
        return False
    same = all(np.array_equal(m.const(dq.input[i]), m.const(q.input[i])) for i in (1, 2))
    if not same or m.const(dq.input[1]).size != 1:
        return False
    p = node.name or node.output[0]
    node.input[0] = f"{p}__codes_f32"
    m.g.node.append(helper.make_node("Cast", [dq.input[0]], [node.input[0]], to=TensorProto.FLOAT, name=f"{p}__cast_in"))
    codes_type = m.inits[q.input[2]].data_type
    q.op_type = "Cast"
    del q.input[1:]
    del q.attribute[:]
    q.attribute.append(helper.make_attribute("to", codes_type))
    return True


def _attr(node, name: str, default):
    return next((attr_value(a) for a in node.attribute if a.name == name), default)


def _depthwise(m: _Model, node) -> bool:
    from onnx import helper

    if len(node.input) < 2 or _attr(node, "auto_pad", "NOTSET") != "NOTSET":
        return False
    dqx, dqw = m.dq_of(node.input[0]), m.dq_of(node.input[1])
    dqb = m.dq_of(node.input[2], zero_point=False) if len(node.input) > 2 and node.input[2] else None
    rs = m.readers.get(node.output[0], [])
    relu = rs[0] if len(rs) == 1 and rs[0].op_type == "Relu" and node.output[0] not in m.outputs else None
    last = relu or node  # a Relu before the QuantizeLinear stays (on the integer accumulator: exact)
    q = m.only_quantize_reader(last.output[0])
    if dqx is None or dqw is None or q is None or (len(node.input) > 2 and node.input[2] and dqb is None):
        return False
    w_codes = m.const(dqw.input[0])
    sx, zx = m.const(dqx.input[1]), m.const(dqx.input[2])
    shape = m.shape(node.input[0]) if w_codes is not None and w_codes.ndim == 4 and w_codes.shape[1] == 1 else []
    if (w_codes is None or w_codes.ndim != 4 or len(shape) != 4 or 0 in shape or sx.size != 1 or zx.size != 1
            or _attr(node, "group", 1) != w_codes.shape[0] or w_codes.shape[1] != 1 or shape[1] != w_codes.shape[0]):
        return False
    ks = w_codes.shape[2:]
    strides, dil = _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1])
    pads = _attr(node, "pads", [0, 0, 0, 0])
    share = (_useful_share(shape[2], ks[0], strides[0], pads[0], pads[2], dil[0])
             * _useful_share(shape[3], ks[1], strides[1], pads[1], pads[3], dil[1]))
    if share >= USEFUL_TAP_SHARE:
        return False
    c = w_codes.shape[0]
    sw, zw = m.const(dqw.input[1]).astype(np.float32), m.const(dqw.input[2])
    w_int = w_codes.astype(np.int64) - zw.astype(np.int64).reshape(-1, 1, 1, 1)  # zero point per channel or one
    b_int = m.const(dqb.input[0]).astype(np.int64) if dqb is not None else np.zeros(c, np.int64)
    b_zp = m.const(dqb.input[2]) if dqb is not None and len(dqb.input) > 2 and dqb.input[2] else 0
    if b_int.shape != (c,) or np.any(b_zp != 0):
        return False
    # 8-bit codes only: ORT runs those as QLinearConv, whose codes the float route reproduces (16-bit ones it
    # runs as a float island, whose arithmetic is not QLinearConv's)
    eight_bit = (TensorProto.UINT8, TensorProto.INT8)
    if any(m.inits[t].data_type not in eight_bit for t in (dqx.input[2], dqw.input[2], q.input[2])):
        return False
    if int((np.abs(w_int).reshape(c, -1).sum(1) * 255 + np.abs(b_int)).max()) >= _EXACT:
        return False
    sy = m.const(q.input[1]).astype(np.float32)
    # QLinearConv's multiplier, in its float32 order: (s_x * s_w) / s_y
    mult = ((np.float32(sx.reshape(())) * sw.reshape(-1)) / sy.reshape(())).astype(np.float32)
    mult = np.broadcast_to(mult, (c,)).reshape(c, 1, 1)
    p = node.name or node.output[0]
    one = m.add_init(np.array(1.0, np.float32), f"{p}__one")
    xi = f"{p}__x_int"
    m.g.node.append(helper.make_node("DequantizeLinear", [dqx.input[0], one, dqx.input[2]], [xi], name=f"{p}__x_int"))
    node.input[0] = xi
    node.input[1] = m.add_init(w_int.astype(np.float32), f"{p}__w_int")
    if dqb is not None:
        node.input[2] = m.add_init(b_int.astype(np.float32), f"{p}__b_int")
    acc = last.output[0]
    last.output[0] = f"{p}__acc"
    m.g.node.append(helper.make_node("Mul", [last.output[0], m.add_init(mult, f"{p}__multiplier")], [acc],
                                     name=f"{p}__requantize"))
    q.input[1] = one
    return True


def _prune(g) -> None:
    """Drop the nodes (in topological order) and initializers no graph output depends on."""
    needed = {v.name for v in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = needed | {v.name for v in g.input}  # (an initializer may be an input)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def lower_for_ort(model) -> list[str]:
    """Rewrite ``model`` in place for ONNX Runtime: uint8/int8 MaxPool through ``Cast``, and depthwise
    convolutions that read mostly padding through ORT's float kernel, exactly (module docstring).

    Args:
        model: an ``onnx.ModelProto`` in QDQ form (``to_onnx``'s output).

    Returns:
        The names of the rewritten nodes (empty: the model is unchanged). A session running a model with
        rewritten convolutions must disable ``DISABLED_OPTIMIZERS``.
    """
    m = _Model(model)
    done = []
    for node in list(m.g.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if (node.op_type == "MaxPool" and _maxpool(m, node)) or (node.op_type == "Conv" and _depthwise(m, node)):
            done.append(node.name or node.output[0])
    if done:
        stuck = sort_nodes(m.g)  # the new nodes were appended after their readers
        if stuck is not None:
            raise ModelError(f"ONNX Runtime lowering left node {stuck!r} without its inputs")
        _prune(m.g)
        log.debug("ONNX Runtime lowering: %d node(s) through exact float kernels: %s", len(done), ", ".join(done))
    return done
