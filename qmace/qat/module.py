"""``prepare``: a converted float graph + ranges -> a torch module simulating qmace's quantized model.

The module is built FROM the quantized graph ``quantize_graph(float_graph, ranges, opts)`` produces, so it
follows the post-training plan exactly (same quantized tensors, schema, fallbacks, range rules: fixed ranges
of Sigmoid/Softmax/Tanh, copy ops sharing their input's parameters, Concat taking the union of its inputs,
``input_ranges`` of graph inputs). It holds the float weights and biases of the accumulate ops (Conv, Gemm,
MatMul) as ``nn.Parameter`` and, per range-owning activation tensor, a learnable ``(min, max)`` pair.

Two forward modes (docs/qat.md):
- training (default): float32 torch ops on fake-quantized values, straight-through gradients;
- ``exact=True``: integer accumulation for Conv/Gemm/MatMul (float64 torch conv/matmul of centred codes,
  exact) and requantization, every other op as dequantize -> float32 kernel -> quantize with qmace's
  numpy kernels: the output equals ``reference.execute(module.quantized_graph(), ...)`` bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph, Node
from qmace.ops import get_op
from qmace.ops.util import activation_bounds, clamp_codes_to_activation, conv_pads
from qmace.quantize.quantizer import ACT_DTYPE, QuantizeOptions, quantize_graph
from qmace.quantize.ranges import Range, RangeTable

RANGE_MODES = ("lsq", "ema")


# ------------------------------------------------------------------------------------------ fake quant


class _RoundSTE(torch.autograd.Function):
    """Round half to even (np.rint) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``rint(x)`` (half to even) forward, identity backward (straight-through estimator).

    Args:
        x: the values to round.

    Returns:
        The rounded tensor, differentiable as if it were ``x``.
    """
    return _RoundSTE.apply(x)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """``(clip(rint(x / scale) + zp, qmin, qmax) - zp) * scale`` in float32 = dequantize(quantize(x)).

    Straight-through for the rounding; the clip passes no gradient outside the range; the gradient to
    ``scale`` is LSQ's (``q - zp - x / scale`` inside, the clipped code outside).

    Args:
        x: the float values.
        scale: the quantization scale (scalar or broadcastable per channel).
        zp: the zero point.
        qmin, qmax: the integer code range (e.g. 0, 255 for uint8).

    Returns:
        The fake-quantized float32 tensor, same shape as ``x``.
    """
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _with_value(t: torch.Tensor, value: np.ndarray) -> torch.Tensor:
    """``t``'s gradient, ``value``'s exact value (so every scale equals qmath's bit for bit)."""
    t = t.float()
    v = torch.from_numpy(np.array(value, np.float32)).to(t.device)  # ranges are float64 parameters; the simulation runs in float32
    return t + (v - t).detach()


# -------------------------------------------------------------------------------------- torch op kernels


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _const_list(x) -> list[int]:
    return [int(v) for v in np.asarray(_np(x)).reshape(-1)]


def _pad_torch(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    nd = len(pads) // 2
    if not any(pads):
        return x
    width: list[int] = []
    for i in reversed(range(nd)):  # F.pad: last dim first
        width += [pads[i], pads[i + nd]]
    return F.pad(x, width, value=value)


def _conv(node: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    op = get_op("Conv")
    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(op.attr(node, "strides") or [1] * nd)
    dil = tuple(op.attr(node, "dilations") or [1] * nd)
    pads = conv_pads(tuple(x.shape[2:]), kernel, strides, dil, op.attr(node, "pads"), op.attr(node, "auto_pad"))
    x = _pad_torch(x, pads, 0.0)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides, dilation=dil, groups=int(op.attr(node, "group")))


def _gemm(node: Node, a, b, c):
    op = get_op("Gemm")
    if op.attr(node, "transA"):
        a = a.t()
    if op.attr(node, "transB"):
        b = b.t()
    y = a @ b
    alpha, beta = float(op.attr(node, "alpha")), float(op.attr(node, "beta"))
    if alpha != 1:
        y = y * alpha
    if c is not None and beta != 0:
        y = y + (c * beta if beta != 1 else c)
    return y


def _pool(node: Node, x: torch.Tensor, kind: str) -> torch.Tensor:
    op = get_op(node.op_type)
    kernel = tuple(op.attr(node, "kernel_shape"))
    nd = len(kernel)
    strides = tuple(op.attr(node, "strides") or [1] * nd)
    dil = tuple(op.attr(node, "dilations") or [1] * nd) if "dilations" in op.defaults else (1,) * nd
    pads = conv_pads(tuple(x.shape[2:]), kernel, strides, dil, op.attr(node, "pads"), op.attr(node, "auto_pad"))
    ceil = bool(op.attr(node, "ceil_mode")) if "ceil_mode" in op.defaults else False
    if nd != 2:
        raise NotImplementedError(f"{node.op_type} {node.name!r}: only 2-D pooling in the QAT simulation")
    sym = pads[:nd] == pads[nd:] and all(p <= k // 2 for p, k in zip(pads[:nd], kernel))
    if kind == "max":
        if sym:
            return F.max_pool2d(x, kernel, strides, tuple(pads[:nd]), dil, ceil_mode=ceil)
        return F.max_pool2d(_pad_torch(x, pads, -math.inf), kernel, strides, 0, dil, ceil_mode=ceil)
    if not sym or any(d != 1 for d in dil):
        raise NotImplementedError(f"AveragePool {node.name!r}: asymmetric pads/dilations not simulated")
    return F.avg_pool2d(x, kernel, strides, tuple(pads[:nd]), ceil_mode=ceil,
                        count_include_pad=bool(op.attr(node, "count_include_pad")))


def _axes(node: Node, inputs, index: int = 1):
    if len(inputs) > index and inputs[index] is not None:
        return _const_list(inputs[index])
    return node.attrs.get("axes")


def _reshape(node, x, shape):
    target = _const_list(shape)
    if not node.attrs.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    if target and target[0] == 1 and x.shape[0] > 1:  # a batch-1 shape folded into the graph: keep the batch
        target[0] = x.shape[0]
    return x.reshape(target)


def _flatten(node, x):
    axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1) if x.ndim else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _squeeze(node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.ndim for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(node, inputs):
    x = inputs[0]
    axes = sorted(a % (x.ndim + len(_axes(node, inputs))) for a in _axes(node, inputs))
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _clip(node, inputs):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if lo is not None:
        x = torch.maximum(x, lo.reshape(()).to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.reshape(()).to(x.dtype))
    return x


def _reduce_mean(node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs)
    keep = bool(node.attrs.get("keepdims", 1))
    if axes is None or len(axes) == 0:
        axes = list(range(x.ndim))
    return x.mean(dim=tuple(a % x.ndim for a in axes), keepdim=keep)


def _layer_norm(node, inputs):
    """LayerNormalization over the axes [axis, rank) (issue 16's fused LayerNorm)."""
    x = inputs[0]
    axis = int(node.attrs.get("axis", -1)) % x.ndim
    shape = tuple(x.shape[axis:])
    scale = inputs[1].reshape(shape) if inputs[1] is not None else None
    bias = inputs[2].reshape(shape) if len(inputs) > 2 and inputs[2] is not None else None
    return F.layer_norm(x, shape, scale, bias, eps=float(node.attrs.get("epsilon", 1e-5)))


TORCH_OPS = {
    "Add": lambda n, i: i[0] + i[1],
    "Sub": lambda n, i: i[0] - i[1],
    "Mul": lambda n, i: i[0] * i[1],
    "Div": lambda n, i: i[0] / i[1],
    "Relu": lambda n, i: torch.relu(i[0]),
    "LeakyRelu": lambda n, i: F.leaky_relu(i[0], float(n.attrs.get("alpha", 0.01))),
    "Clip": _clip,
    "Sigmoid": lambda n, i: torch.sigmoid(i[0]),
    "Tanh": lambda n, i: torch.tanh(i[0]),
    "Exp": lambda n, i: torch.exp(i[0]),
    "Log": lambda n, i: torch.log(i[0]),
    "Sqrt": lambda n, i: torch.sqrt(i[0]),
    "Neg": lambda n, i: -i[0],
    "Abs": lambda n, i: torch.abs(i[0]),
    "HardSigmoid": lambda n, i: torch.clamp(i[0] * float(n.attrs.get("alpha", 0.2)) + float(n.attrs.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda n, i: F.hardswish(i[0]),
    "Gelu": lambda n, i: F.gelu(i[0], approximate=str(n.attrs.get("approximate", "none"))),
    "Swish": lambda n, i: i[0] * torch.sigmoid(float(n.attrs.get("alpha", 1.0)) * i[0]),
    "LayerNormalization": _layer_norm,
    "Softmax": lambda n, i: torch.softmax(i[0], dim=int(n.attrs.get("axis", -1))),
    "LogSoftmax": lambda n, i: torch.log_softmax(i[0], dim=int(n.attrs.get("axis", -1))),
    "Conv": lambda n, i: _conv(n, i[0], i[1], i[2] if len(i) > 2 else None),
    "Gemm": lambda n, i: _gemm(n, i[0], i[1], i[2] if len(i) > 2 else None),
    "MatMul": lambda n, i: torch.matmul(i[0], i[1]),
    "MaxPool": lambda n, i: _pool(n, i[0], "max"),
    "AveragePool": lambda n, i: _pool(n, i[0], "avg"),
    "GlobalAveragePool": lambda n, i: i[0].mean(dim=tuple(range(2, i[0].ndim)), keepdim=True),
    "GlobalMaxPool": lambda n, i: i[0].amax(dim=tuple(range(2, i[0].ndim)), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Concat": lambda n, i: torch.cat(list(i), dim=int(n.attrs["axis"])),
    "Reshape": lambda n, i: _reshape(n, i[0], i[1]),
    "Flatten": lambda n, i: _flatten(n, i[0]),
    "Transpose": lambda n, i: i[0].permute(*(n.attrs.get("perm") or list(range(i[0].ndim))[::-1])),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": lambda n, i: i[0],
    "Dropout": lambda n, i: i[0],
}


def run_torch_op(node: Node, inputs: list) -> list[torch.Tensor]:
    """Float32 torch kernel of ``node`` (differentiable); ops without one run their numpy ``run`` with no
    gradient (an error if a gradient would be needed).

    Args:
        node: the IR node.
        inputs: its input values (torch tensors or numpy arrays), in the node's input order.

    Returns:
        The node's outputs.

    Raises:
        NotImplementedError: the op has no torch kernel and one of its inputs needs a gradient.
    """
    fn = TORCH_OPS.get(node.op_type)
    if fn is not None:
        y = fn(node, inputs)
        if node.attrs.get("qm_activation"):
            lo, hi = activation_bounds(node)
            y = torch.clamp(y, None if not math.isfinite(lo) else lo, None if not math.isfinite(hi) else hi)
        return [y]
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        raise NotImplementedError(f"QAT: op {node.op_type} (node {node.name!r}) has no torch kernel; it runs "
                                  "its numpy kernel, which cannot pass gradients")
    outs = get_op(node.op_type).run(node, [_np(x) if x is not None else None for x in inputs])
    dev = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    return [torch.from_numpy(np.ascontiguousarray(o)).to(dev) for o in outs]


# ------------------------------------------------------------------------------------------- the module


def _copy_op(op) -> bool:
    return op.output_range == "input"


class QATModule(nn.Module):
    """See the module docstring and docs/qat.md. Build with :func:`prepare`."""

    def __init__(self, float_graph: Graph, ranges: RangeTable, opts: QuantizeOptions, range_mode: str = "lsq",
                 ema_momentum: float = 0.01):
        super().__init__()
        if range_mode not in RANGE_MODES:
            raise QuantizationError(f"unknown range_mode {range_mode!r} (choose from {', '.join(RANGE_MODES)})")
        self.range_mode = range_mode
        self.ema_momentum = ema_momentum
        # QDrop (Wei et al., ICLR 2022): in training mode each activation element skips its fake quantization
        # with this probability (0: off, the default). Exact mode and the quantized graph never drop.
        self.act_drop = 0.0
        # EMA mode under data parallelism: (batch_min, batch_max) -> the global batch's (min, max); set by
        # qmace.qat.distributed so every rank moves its ranges identically. None: this process's batch.
        self.batch_range_reduce = None
        self.opts = opts
        self.float_graph = float_graph
        res = quantize_graph(float_graph, ranges, opts)
        self.qgraph = g = res.graph
        self.fallbacks = res.fallbacks
        self._base_ranges = dict(ranges) | dict(res.ranges)
        fnodes = {n.name: n for n in float_graph.nodes}

        # ---- weights: float constants feeding accumulate ops (quantized or fallback) ----
        self._weight_index: dict[str, int] = {}
        params = []
        self._node_weights: dict[str, dict[int, str]] = {}  # qgraph node -> input index -> float tensor name
        for node in g.nodes:
            fn = fnodes.get(node.name)
            op = get_op(node.op_type)
            if fn is None or op.quant_kernel != "accumulate":
                continue
            idx = {}
            for i, name in enumerate(fn.inputs):
                if not name or not (op.is_weight(node, i) or i == op.bias_input):
                    continue
                t = float_graph.tensors[name]
                if t.data is None or t.dtype != "float32":
                    continue
                if name not in self._weight_index:
                    self._weight_index[name] = len(params)
                    params.append(nn.Parameter(torch.from_numpy(np.array(t.data, np.float32))))
                idx[i] = name
            self._node_weights[node.name] = idx
        self.weights = nn.ParameterList(params)

        # ---- activation parameters: who owns each quantized activation's (min, max) ----
        producers = g.producers()
        fixed_user = set(opts.fixed_params)
        graph_out_of = {}
        for node in g.nodes:
            if node.op_type == "DequantizeLinear" and node.outputs[0] in g.outputs:
                graph_out_of[node.inputs[0]] = node.outputs[0]
        group = self._concat_groups(float_graph) if opts.change_concat_ranges else {}
        self._spec: dict[str, tuple] = {}  # quantized activation (qgraph name) -> rule
        owner_keys: dict[str, int] = {}
        self._owner_names: list[list[str]] = []  # owner index -> float tensor names
        lo_init, hi_init = [], []

        def own(fname: str) -> tuple:
            key = group.get(fname, fname)
            if key not in owner_keys:
                r = self._base_ranges.get(fname)
                if r is None:
                    raise QuantizationError(f"QAT: no range for {fname!r}")
                owner_keys[key] = len(self._owner_names)
                self._owner_names.append([])
                lo_init.append(r.min)
                hi_init.append(r.max)
            k = owner_keys[key]
            if fname not in self._owner_names[k]:
                self._owner_names[k].append(fname)
            return ("learn", k)

        for node in g.nodes:
            op = get_op(node.op_type)
            for o in node.outputs:
                t = g.tensors.get(o) if o else None
                if t is None or not t.is_quantized or t.data is not None:
                    continue
                if node.op_type == "QuantizeLinear":
                    fname = node.inputs[0]
                    if fname in opts.input_ranges or fname in fixed_user:
                        self._spec[o] = ("fixed", t.quant, fname)
                    else:
                        self._spec[o] = own(fname)
                    continue
                fname = graph_out_of.get(o, o)
                rule = op.output_range
                if _copy_op(op):
                    self._spec[o] = ("same", node.inputs[0])
                elif fname in fixed_user or isinstance(rule, tuple):
                    self._spec[o] = ("fixed", t.quant, fname)
                elif rule == "union":
                    srcs = [i for i in node.inputs if i and i in g.tensors and g.tensors[i].is_quantized
                            and g.tensors[i].data is None]
                    self._spec[o] = ("union", srcs, fname)
                else:
                    self._spec[o] = own(fname)
        # float64, as RangeTable values: calibrated ranges need not be float32 numbers (histogram quantiles),
        # and rounding them would change the scales, so the QAT start would not be the PTQ model
        if range_mode == "lsq":
            self.act_min = nn.Parameter(torch.tensor(lo_init, dtype=torch.float64))
            self.act_max = nn.Parameter(torch.tensor(hi_init, dtype=torch.float64))
        else:
            self.register_buffer("act_min", torch.tensor(lo_init, dtype=torch.float64))
            self.register_buffer("act_max", torch.tensor(hi_init, dtype=torch.float64))
        self._producers = producers

    @staticmethod
    def _concat_groups(fg: Graph) -> dict[str, str]:
        """change_concat_ranges: a Concat's float inputs and output share one range (union-find)."""
        parent: dict[str, str] = {}

        def find(a):
            while parent.get(a, a) != a:
                a = parent[a]
            return a

        for n in fg.nodes:
            if n.op_type == "Concat":
                names = [i for i in n.inputs if i and fg.tensors[i].data is None] + [n.outputs[0]]
                root = find(names[0])
                for x in names[1:]:
                    parent[find(x)] = root
        return {k: find(k) for k in list(parent) + list(set(parent.values()))}

    # ---- parameters of the current state --------------------------------------------------------------
    def _act_params(self) -> tuple[dict[str, qmath.QuantParams], dict[str, torch.Tensor]]:
        """QuantParams (qmath, exact) and differentiable torch scales of every quantized activation."""
        lo = self.act_min.detach().cpu().numpy()
        hi = self.act_max.detach().cpu().numpy()
        dev = self.act_min.device
        owner_qp, owner_scale = {}, {}
        qps: dict[str, qmath.QuantParams] = {}
        scales: dict[str, torch.Tensor] = {}

        def owner(k):
            if k not in owner_qp:
                l, h = float(lo[k]), float(hi[k])
                if l > h:
                    l = h = (l + h) / 2
                qp = qmath.params_asymmetric(l, h, ACT_DTYPE)
                qmin, qmax = qp.qmin, qp.qmax
                s = (torch.clamp(self.act_max[k], min=0) - torch.clamp(self.act_min[k], max=0)) / float(qmax - qmin)
                owner_qp[k], owner_scale[k] = qp, _with_value(s, qp.scale)
            return owner_qp[k], owner_scale[k]

        def resolve(name):
            if name in qps:
                return qps[name], scales.get(name)
            spec = self._spec[name]
            if spec[0] == "learn":
                qp, s = owner(spec[1])
            elif spec[0] == "fixed":
                qp, s = spec[1], torch.tensor(np.float32(spec[1].scale), device=dev)
            elif spec[0] == "same":
                src = spec[1]
                qp, s = (resolve(src) if src in self._spec else (self.qgraph.tensors[src].quant,
                                                                  torch.tensor(self.qgraph.tensors[src].quant.scale, device=dev)))
            else:  # union of the inputs' effective ranges (the quantizer's rule for Concat)
                parts = [resolve(x) for x in spec[1]]
                ks = [self._owner_of(x) for x in spec[1]]
                if all(k is not None for k in ks) and len(set(ks)) == 1:
                    qp, s = parts[0]
                else:
                    los = [self._range_of(x, p) for x, (p, _) in zip(spec[1], parts)]
                    l = min(r[0] for r in los)
                    h = max(r[1] for r in los)
                    qp = qmath.params_asymmetric(l, h, ACT_DTYPE)
                    s = _with_value(torch.stack([sc for _, sc in parts]).max(), qp.scale)
            qps[name], scales[name] = qp, s
            return qp, s

        for name in self._spec:
            resolve(name)
        return qps, scales

    def _owner_of(self, name):
        spec = self._spec.get(name)
        while spec is not None and spec[0] == "same":
            spec = self._spec.get(spec[1])
        return spec[1] if spec is not None and spec[0] == "learn" else None

    def _range_of(self, name: str, qp: qmath.QuantParams) -> tuple[float, float]:
        """The range the quantizer records for ``name`` (its `used` range): learned range, or the nudged
        range of fixed parameters, or the plan's range for fixed-rule tensors."""
        spec = self._spec[name]
        while spec[0] == "same":
            name = spec[1]
            spec = self._spec[name]
        if spec[0] == "learn":
            k = spec[1]
            return float(self.act_min[k].detach()), float(self.act_max[k].detach())
        if spec[0] == "fixed":
            fname = spec[2]
            if fname in self.opts.fixed_params or fname not in self._base_ranges:
                n = qmath.nudged_range(qp)
                return float(n.min), float(n.max)
            return self._base_ranges[fname].min, self._base_ranges[fname].max
        parts = [self._range_of(x, None) for x in spec[1]]
        return min(p[0] for p in parts), max(p[1] for p in parts)

    def _weight_qp(self, node: Node, index: int, w: np.ndarray) -> qmath.QuantParams:
        op = get_op(node.op_type)
        if self.weight_names(node).get(index) in self.opts.fixed_params:
            return self.opts.fixed_params[self.weight_names(node)[index]]
        return qmath.weight_params(w, op.weight_axis(node, index), self.opts.schema)

    def weight_names(self, node: Node) -> dict[int, str]:
        """The trainable weights ``node`` reads.

        Args:
            node: a node of the module's graph.

        Returns:
            ``{input index: weight tensor name}`` (empty when the node has none).
        """
        return self._node_weights.get(node.name, {})

    def weight(self, name: str) -> torch.Tensor:
        """The trainable float weight ``name`` (a parameter of this module).

        Args:
            name: the weight's tensor name in the float graph.

        Returns:
            The parameter.

        Raises:
            KeyError: ``name`` is not a trainable weight.
        """
        return self.weights[self._weight_index[name]]

    # ---- forward -----------------------------------------------------------------------------------
    def _feeds(self, x) -> dict:
        if isinstance(x, dict):
            return x
        if len(self.qgraph.inputs) != 1:
            raise ValueError(f"the model has inputs {self.qgraph.inputs}: pass a dict")
        return {self.qgraph.inputs[0]: x}

    def forward(self, x, exact: bool = False):
        """Run the simulated quantized model.

        Args:
            x: the input tensor (single-input models) or ``{input name: tensor}``, batched.
            exact: run the integer-exact simulation (bit-exact with ``quantized_graph()``, no gradient)
                instead of the differentiable fake-quant one.

        Returns:
            The output tensor, or a tuple of them for several outputs.

        Raises:
            ValueError: a bare tensor for a model with several inputs.
        """
        feeds = self._feeds(x)
        outs = self._forward_exact(feeds) if exact else self._forward_train(feeds)
        vals = [outs[o] for o in self.qgraph.outputs]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _ema_update(self, name: str, value: torch.Tensor) -> None:
        spec = self._spec.get(name)
        if spec is None or spec[0] != "learn" or not self.training:
            return
        k, m = spec[1], self.ema_momentum
        v = value.detach()
        lo, hi = v.min(), v.max()
        if self.batch_range_reduce is not None:  # data-parallel: the global batch's min/max on every rank
            lo, hi = self.batch_range_reduce(lo, hi)
        with torch.no_grad():
            self.act_min[k] = (1 - m) * self.act_min[k] + m * lo
            self.act_max[k] = (1 - m) * self.act_max[k] + m * hi

    def _forward_train(self, feeds: dict) -> dict:
        g = self.qgraph
        dev = self.act_min.device
        qps, scales = self._act_params()
        env: dict = {}
        for k, v in feeds.items():
            env[k] = (torch.as_tensor(np.asarray(v, np.float32)) if not isinstance(v, torch.Tensor) else v.float()).to(dev)

        def fq(name, y):
            qp = qps[name]
            yq = fake_quant(y, scales[name], float(qp.zero_point), qp.qmin, qp.qmax)
            if self.training and self.act_drop > 0:
                return torch.where(torch.rand_like(y) < self.act_drop, y, yq)
            return yq

        def value(name):
            if name in env:
                return env[name]
            t = g.tensors[name]
            if t.data is None:
                raise KeyError(name)
            if t.is_quantized:
                v = torch.from_numpy(np.array(qmath.dequantize(t.data, t.quant), np.float32)).to(dev)
            else:
                v = torch.from_numpy(np.array(t.data)).to(dev)
            env[name] = v
            return v

        for node in g.nodes:
            op = get_op(node.op_type)
            if node.op_type == "QuantizeLinear":
                o = node.outputs[0]
                x = value(node.inputs[0])
                if self.range_mode == "ema":
                    self._ema_update(o, x)
                env[o] = fq(o, x)
                continue
            if node.op_type == "DequantizeLinear":
                env[node.outputs[0]] = value(node.inputs[0])
                continue
            wn = self.weight_names(node)
            quantized = any(g.tensors[o].is_quantized for o in node.outputs if o)
            ins = []
            for i, name in enumerate(node.inputs):
                if not name:
                    ins.append(None)
                elif i in wn:
                    ins.append(self.weight(wn[i]))
                else:
                    ins.append(value(name))
            if quantized and op.quant_kernel == "accumulate":
                x_scale = scales[node.inputs[0]]
                for i, _name in wn.items():
                    if op.is_weight(node, i):
                        w = ins[i]
                        wqp = self._weight_qp(node, i, w.detach().cpu().numpy())
                        ax = qmath._normalize_axis(wqp.axis, w.ndim) if wqp.axis is not None else None
                        shape = [1] * w.ndim
                        if ax is not None:
                            shape[ax] = -1
                        ws = torch.from_numpy(np.array(wqp.scale, np.float32)).reshape(shape).to(dev)
                        wz = torch.from_numpy(np.array(wqp.zero_point, np.float32)).reshape(shape).to(dev)
                        ins[i] = fake_quant(w, ws, wz, wqp.qmin, wqp.qmax)
                        w_scale = torch.from_numpy(np.array(wqp.scale, np.float32)).to(dev)
                b = op.bias_input
                if b is not None and b in wn:
                    bias_scale = x_scale * w_scale  # float32 product, differentiable in s_x
                    ins[b] = round_ste(ins[b] / bias_scale).clamp(-(2**31), 2**31 - 1) * bias_scale
            outs = run_torch_op(node, ins)
            for o, y in zip(node.outputs, outs):
                if not o:
                    continue
                if quantized and g.tensors[o].is_quantized and not (op.quant_kernel == "copy" and _copy_op(op)):
                    if self.range_mode == "ema":
                        self._ema_update(o, y)
                    y = fq(o, y)
                env[o] = y
        return env

    def _forward_exact(self, feeds: dict) -> dict:
        g = self.qgraph
        with torch.no_grad():
            qps, _ = self._act_params()
        env: dict = {k: np.asarray(_np(v), np.float32) for k, v in feeds.items()}

        def qp_of(name):
            if name in qps:
                return qps[name]
            t = g.tensors.get(name)
            return t.quant if t is not None else None

        def value(name):
            if name in env:
                return env[name]
            return g.tensors[name].data

        for node in g.nodes:
            op = get_op(node.op_type)
            ins = [value(i) if i else None for i in node.inputs]
            touches = any(g.tensors[t].is_quantized for t in (*node.inputs, *node.outputs) if t)
            wn = self.weight_names(node)
            # A MatMul of two activations (issue 16) has no trainable weight: its codes come from env.
            has_weight = any(op.is_weight(node, i) for i in wn)
            if touches and op.quant_kernel == "accumulate" and node.op_type != "QuantizeLinear" and has_weight:
                outs = [self._accumulate_exact(node, op, ins, wn, qp_of)]
            elif touches:
                in_qp = [qp_of(i) if i else None for i in node.inputs]
                out_qp = [qp_of(o) if o else None for o in node.outputs]
                if op.quant_kernel == "accumulate" and not op.integer_kernel_applies(node, in_qp, out_qp):
                    outs = op.run_float_defined(node, ins, in_qp, out_qp)  # 16-bit tensors (quantize.mixed)
                else:
                    outs = op.run_quantized(node, ins, in_qp, out_qp)
            else:
                ins = [self.weight(wn[i]).detach().cpu().numpy() if i in wn else v for i, v in enumerate(ins)]
                outs = op.run(node, ins)
            for o, y in zip(node.outputs, outs):
                if o:
                    env[o] = y
        return {o: torch.from_numpy(np.asarray(env[o])) for o in g.outputs}

    def _accumulate_exact(self, node, op, ins, wn, qp_of) -> np.ndarray:
        """Integer accumulation (float64 torch, exact) + requantization (qmath)."""
        xq, yq = qp_of(node.inputs[0]), qp_of(node.outputs[0])
        w_idx = next(i for i in range(len(node.inputs)) if op.is_weight(node, i))
        w_f = self.weight(wn[w_idx]).detach().cpu().numpy()
        wq = self._weight_qp(node, w_idx, w_f)
        w_codes = qmath.quantize(w_f, wq)
        b = op.bias_input
        bias = None
        if b is not None and b in wn:
            bias = qmath.quantize_bias(self.weight(wn[b]).detach().cpu().numpy(), xq, wq).astype(np.float64)
        x = torch.from_numpy(ins[0].astype(np.float64) - float(xq.zero_point))
        zp = wq.zero_point.astype(np.float64)
        if zp.ndim:
            shape = [1] * w_codes.ndim
            shape[wq.axis % w_codes.ndim] = -1
            zp = zp.reshape(shape)
        w = torch.from_numpy(w_codes.astype(np.float64) - zp)
        if node.op_type == "Conv":
            acc = _conv(node, x, w, None).numpy()
            if bias is not None:
                acc = acc + bias.reshape(1, -1, *([1] * (acc.ndim - 2)))
            axis = 1
        else:
            if node.op_type == "Gemm":
                if float(op.attr(node, "alpha")) != 1.0 or (bias is not None and float(op.attr(node, "beta")) != 1.0):
                    raise NotImplementedError(f"Gemm {node.name!r}: integer kernel needs alpha == beta == 1")
                a = x.t() if op.attr(node, "transA") else x
                bw = w.t() if op.attr(node, "transB") else w
                acc = (a @ bw).numpy()
            else:
                acc = torch.matmul(x, w).numpy()
            if bias is not None:
                acc = acc + bias
            axis = -1
        mult = qmath.requant_multiplier(xq, wq, yq)
        y = qmath.requantize(acc.astype(np.int64).astype(np.int32), mult, yq, axis if np.ndim(mult) else None)
        return clamp_codes_to_activation(node, y, yq)

    # ---- results -----------------------------------------------------------------------------------
    def learned_ranges(self) -> RangeTable:
        """The plan's ranges with every learned (min, max) in place (keys: float graph tensor names)."""
        table: RangeTable = dict(self._base_ranges)
        lo = self.act_min.detach().cpu().numpy()
        hi = self.act_max.detach().cpu().numpy()
        for k, names in enumerate(self._owner_names):
            l, h = float(lo[k]), float(hi[k])
            if l > h:
                l = h = (l + h) / 2
            for n in names:
                table[n] = Range(l, h)
        return table

    def fixed_params(self) -> dict[str, qmath.QuantParams]:
        """The module's exact activation parameters, keyed by float tensor name (for ``fixed_params``)."""
        qps, _ = self._act_params()
        out = dict(self.opts.fixed_params)
        for qname, spec in self._spec.items():
            if spec[0] == "learn":
                for n in self._owner_names[spec[1]]:
                    out[n] = qps[qname]
            elif spec[0] == "union":
                out[spec[2]] = qps[qname]
        return out

    def to_float_graph(self) -> Graph:
        """The float graph with the fine-tuned weights."""
        fg = self.float_graph.copy()
        for name, i in self._weight_index.items():
            fg.tensors[name].data = self.weights[i].detach().cpu().numpy().astype(np.float32).copy()
        return fg

    def quantized_graph(self) -> Graph:
        """``quantize_graph(to_float_graph(), learned_ranges(), opts)`` with the module's exact params."""
        o = self.opts
        opts = QuantizeOptions(schema=o.schema, change_concat_ranges=o.change_concat_ranges,
                               input_ranges=dict(o.input_ranges), fixed_params=self.fixed_params())
        return quantize_graph(self.to_float_graph(), self.learned_ranges(), opts).graph


def prepare(float_graph: Graph, ranges: RangeTable, opts: QuantizeOptions | None = None,
            range_mode: str = "lsq") -> QATModule:
    """A torch module simulating the quantized model of ``float_graph`` with ``ranges`` under ``opts``.

    ``range_mode``: ``"lsq"`` (default) learns each activation's (min, max) by gradient (LSQ-style, through
    the scale); ``"ema"`` tracks running min/max of the float values in training mode instead.

    Args:
        float_graph: the float model (equalized/folded as for PTQ).
        ranges: the starting activation ranges (e.g. PTQ's calibration).
        opts: quantization options (schema, input ranges, fixed parameters); default options when None.
        range_mode: ``"lsq"`` or ``"ema"``.

    Returns:
        The :class:`QATModule`.
    """
    return QATModule(float_graph, ranges, opts or QuantizeOptions(), range_mode)


def export_qat(module: QATModule, onnx_path: str | Path, range_path: str | Path) -> tuple[Path, Path]:
    """Write the fine-tuned FLOAT model as ONNX and the learned ranges as a MACE range file (full precision).

    A YAML with ``quantize: 1``, ``quantize_range_file: <range_path>`` and the module's ``input_ranges``
    converts them into ``module.quantized_graph()`` through the normal ``qmace convert``.

    Args:
        module: the trained module.
        onnx_path: where to write the float ONNX model (written atomically).
        range_path: where to write the range file.

    Returns:
        ``(onnx_path, range_path)`` as paths.
    """
    from qmace.fileio import atomic_write
    from qmace.quantize.ranges import write_range_file
    from qmace.runtime.lower import to_onnx

    onnx_path, range_path = Path(onnx_path), Path(range_path)
    model = to_onnx(module.to_float_graph())
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(onnx_path, "wb") as f:
        f.write(model.SerializeToString())
    range_path.parent.mkdir(parents=True, exist_ok=True)
    write_range_file(range_path, module.learned_ranges())
    return onnx_path, range_path
