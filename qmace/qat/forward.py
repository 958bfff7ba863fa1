"""The two forward passes of the QAT module (docs/qat.md), both walking the quantized graph node by node.

- :func:`forward_train`: float32 torch kernels (each op's ``run_torch``) on fake-quantized values: every
  quantized activation is ``fake_quant``-ed with its current parameters, the weights of accumulate ops
  with ``qmath.weight_params`` of their current values, biases with ``qmath.quantize_bias``'s rule.
  Straight-through gradients reach the weights and the learnable ranges.
- :func:`forward_exact`: integer codes as the reference runtime computes them: accumulate ops run their own
  integer kernel (``AccumulateOp.run_quantized``) on torch tensors of codes, every other op its
  ``run_quantized``; the result equals ``reference.execute(module.quantized_graph(), ...)`` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from qmace import qmath
from qmace.ir import Node
from qmace.ops import get_op
from qmace.qat.fakequant import fake_quant, fake_quant_bias, fake_quant_weight
from qmace.qat.kernels import run_torch_op
from qmace.qat.ranges import SAME, range_rule


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _shares_input_params(node: Node) -> bool:
    """A copy op whose output shares input 0's parameters: its output is already on the input's grid."""
    return get_op(node.op_type).quant_kernel == "copy" and range_rule(node.op_type) == SAME


def forward_train(m, feeds: dict) -> dict:
    """The differentiable fake-quant simulation (module docstring).

    Args:
        m: the QATModule.
        feeds: ``{input name: tensor or array}``.

    Returns:
        Every computed tensor by name (torch tensors).
    """
    g = m.qgraph
    dev = m.act_min.device
    qps, scales = m.act_params()
    env: dict = {
        k: (v.float() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32))).to(dev)
        for k, v in feeds.items()
    }

    def fq(name, y):
        qp = qps[name]
        yq = fake_quant(y, scales[name], float(qp.zero_point), qp.qmin, qp.qmax)
        if m.training and m.act_drop > 0:  # QDrop: keep the float value with probability act_drop
            return torch.where(torch.rand_like(y) < m.act_drop, y, yq)
        return yq

    def value(name):
        if name not in env:
            t = g.tensors[name]
            if t.data is None:
                raise KeyError(name)
            data = qmath.dequantize(t.data, t.quant) if t.is_quantized else t.data
            env[name] = torch.from_numpy(np.array(data, np.float32 if t.is_quantized else None)).to(dev)
        return env[name]

    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            x = value(node.inputs[0])
            o = node.outputs[0]
            if node.op_type == "QuantizeLinear":
                m.ema_update(o, x)
                x = fq(o, x)
            env[o] = x
            continue
        wn = m.weight_names(node)
        ins = [
            None if not name else m.weight(wn[i]) if i in wn else value(name)
            for i, name in enumerate(node.inputs)
        ]
        quantized = any(g.tensors[o].is_quantized for o in node.outputs if o)
        if quantized and get_op(node.op_type).quant_kernel == "accumulate":
            ins = _fake_quant_weights(m, node, ins, wn, scales[node.inputs[0]])
        for o, y in zip(node.outputs, run_torch_op(node, ins)):
            if not o:
                continue
            if quantized and g.tensors[o].is_quantized and not _shares_input_params(node):
                m.ema_update(o, y)
                y = fq(o, y)
            env[o] = y
    return env


def _fake_quant_weights(m, node: Node, ins: list, wn: dict[int, str], x_scale: torch.Tensor) -> list:
    """``ins`` with the node's trainable weights and bias fake-quantized by the plan's rules."""
    op = get_op(node.op_type)
    ins = list(ins)
    w_scale = None
    for i in wn:
        if op.is_weight(node, i):
            wqp = m.weight_qp(node, i, ins[i].detach().cpu().numpy())
            ins[i] = fake_quant_weight(ins[i], wqp)
            w_scale = torch.from_numpy(np.array(wqp.scale, np.float32)).to(x_scale.device)
    b = op.bias_input
    if b is not None and b in wn and w_scale is not None:
        ins[b] = fake_quant_bias(
            ins[b], x_scale * w_scale
        )  # float32 product (qmath.bias_params), diff. in s_x
    return ins


def forward_exact(m, feeds: dict) -> dict:
    """The integer-exact simulation (module docstring); no gradient.

    Args:
        m: the QATModule.
        feeds: ``{input name: tensor or array}``.

    Returns:
        The graph outputs by name (torch tensors).
    """
    g = m.qgraph
    with torch.no_grad():
        qps, _ = m.act_params()
    env: dict = {k: np.asarray(_np(v), np.float32) for k, v in feeds.items()}

    def qp_of(name):
        if name in qps:
            return qps[name]
        t = g.tensors.get(name)
        return t.quant if t is not None else None

    for node in g.nodes:
        op = get_op(node.op_type)
        ins = [(env[i] if i in env else g.tensors[i].data) if i else None for i in node.inputs]
        wn = m.weight_names(node)
        touches = any(g.tensors[t].is_quantized for t in (*node.inputs, *node.outputs) if t)
        if touches and op.quant_kernel == "accumulate":
            outs = _accumulate_exact(m, node, ins, wn, qp_of)
        elif touches:
            in_qp = [qp_of(i) if i else None for i in node.inputs]
            outs = op.run_quantized(node, ins, in_qp, [qp_of(o) if o else None for o in node.outputs])
        else:
            outs = op.run(
                node, [m.weight(wn[i]).detach().cpu().numpy() if i in wn else v for i, v in enumerate(ins)]
            )
        for o, y in zip(node.outputs, outs):
            if o:
                env[o] = y
    return {o: torch.from_numpy(np.asarray(env[o])) for o in g.outputs}


def _accumulate_exact(m, node: Node, ins: list, wn: dict[int, str], qp_of) -> list[np.ndarray]:
    """The op's own integer kernel on torch tensors of codes, the trainable weights quantized with their
    current parameters (``weight_qp``) and the bias with ``qmath.quantize_bias``."""
    op = get_op(node.op_type)
    in_qp = [qp_of(i) if i else None for i in node.inputs]
    codes = list(ins)
    for i in wn:
        if op.is_weight(node, i):
            w = m.weight(wn[i]).detach().cpu().numpy()
            in_qp[i] = m.weight_qp(node, i, w)
            codes[i] = qmath.quantize(w, in_qp[i])
    b = op.bias_input
    if b is not None and b in wn:
        w_index = next(i for i in range(len(node.inputs)) if op.is_weight(node, i))
        codes[b] = qmath.quantize_bias(m.weight(wn[b]).detach().cpu().numpy(), in_qp[0], in_qp[w_index])
        # the current bias scale s_x * s_w (the prepared graph's is stale once the weights moved): the
        # DQ -> op -> Q path of 16-bit activations dequantizes the bias codes with it
        in_qp[b] = qmath.bias_params(in_qp[0], in_qp[w_index])
    tensors = [None if c is None else torch.from_numpy(np.ascontiguousarray(c)) for c in codes]
    return op.run_quantized(node, tensors, in_qp, [qp_of(o) if o else None for o in node.outputs])
