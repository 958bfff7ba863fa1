"""``prepare``: a converted float graph + ranges -> a torch module simulating qmace's quantized model.

The module is built FROM the quantized graph ``quantize_graph(float_graph, ranges, opts)`` produces, so it
follows the post-training plan exactly (same quantized tensors, schema, fallbacks, range rules: fixed ranges
of Sigmoid/Softmax/Tanh, copy ops sharing their input's parameters, Concat taking the union of its inputs,
``input_ranges`` of graph inputs; ``qmace.qat.ranges``). It holds the float weights and biases of the
accumulate ops (Conv, Gemm, MatMul) as ``nn.Parameter`` and, per range-owning activation tensor, a learnable
``(min, max)`` pair.

Two forward modes (docs/qat.md; ``qmace.qat.forward``):
- training (default): each op's float32 torch kernel (``run_torch``, defined next to its numpy kernel in
  ``qmace.ops``) on fake-quantized values, straight-through gradients;
- ``exact=True``: each op's integer kernel (accumulate ops on torch tensors of codes, every other op its
  numpy ``run_quantized``): the output equals ``reference.execute(module.quantized_graph(), ...)`` bit for
  bit.
An op without a torch kernel on the gradient path is refused by ``prepare``, naming the node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qmace import qmath
from qmace.errors import QuantizationError
from qmace.ir import Graph, Node
from qmace.ops import get_op
from qmace.qat.forward import forward_exact, forward_train
from qmace.qat.kernels import check_trainable
from qmace.qat.ranges import ActivationRanges, exact_params, learned_table
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import RangeTable

RANGE_MODES = ("lsq", "ema")


class QATModule(nn.Module):
    """See the module docstring and docs/qat.md. Build with :func:`prepare`."""

    def __init__(
        self,
        float_graph: Graph,
        ranges: RangeTable,
        opts: QuantizeOptions,
        range_mode: str = "lsq",
        ema_momentum: float = 0.01,
    ):
        super().__init__()
        if range_mode not in RANGE_MODES:
            raise QuantizationError(
                f"unknown range_mode {range_mode!r} (choose from {', '.join(RANGE_MODES)})"
            )
        self.range_mode = range_mode
        self.ema_momentum = ema_momentum
        # QDrop (Wei et al., ICLR 2022): in training mode each activation element skips its fake quantization
        # with this probability (0: off, the default). Exact mode and the quantized graph never drop.
        self.act_drop = 0.0
        # Tensors of the quantized graph the training-mode forward returns instead of the graph outputs (e.g.
        # the logits before a final Softmax, to distil on them); None: the graph outputs. Exact mode and
        # quantized_graph() are not affected.
        self.train_outputs: list[str] | None = None
        # EMA mode under data parallelism: (batch_min, batch_max) -> the global batch's (min, max); set by
        # qmace.qat.distributed so every rank moves its ranges identically. None: this process's batch.
        self.batch_range_reduce = None
        self.opts = opts
        self.float_graph = float_graph
        res = quantize_graph(float_graph, ranges, opts)
        self.qgraph = res.graph
        self.fallbacks = res.fallbacks
        self._collect_weights()
        check_trainable(self.qgraph, {n.inputs[i] for n in self.qgraph.nodes for i in self.weight_names(n)})
        self._acts = ActivationRanges.build(self.qgraph, float_graph, opts, dict(ranges) | dict(res.ranges), res.plan)
        # float64, as RangeTable values: calibrated ranges need not be float32 numbers (histogram quantiles),
        # and rounding them would change the scales, so the QAT start would not be the PTQ model
        lo = torch.tensor([r.min for r in self._acts.initial], dtype=torch.float64)
        hi = torch.tensor([r.max for r in self._acts.initial], dtype=torch.float64)
        if range_mode == "lsq":
            self.act_min, self.act_max = nn.Parameter(lo), nn.Parameter(hi)
        else:
            self.register_buffer("act_min", lo)
            self.register_buffer("act_max", hi)

    def _collect_weights(self) -> None:
        """Float constants feeding accumulate ops (quantized or fallback) become trainable parameters."""
        self._weight_index: dict[str, int] = {}
        self._node_weights: dict[str, dict[int, str]] = {}  # qgraph node -> input index -> float tensor name
        self._kernels: set[str] = set()  # the trainable tensors read as a weight (not only as a bias)
        params = []
        fnodes = {n.name: n for n in self.float_graph.nodes}
        for node in self.qgraph.nodes:
            fn = fnodes.get(node.name)
            op = get_op(node.op_type)
            if fn is None or op.quant_kernel != "accumulate":
                continue
            idx = {}
            for i, name in enumerate(fn.inputs):
                if not name or not (op.is_weight(node, i) or i == op.bias_input):
                    continue
                t = self.float_graph.tensors[name]
                if t.data is None or t.dtype != "float32":
                    continue
                if name not in self._weight_index:
                    self._weight_index[name] = len(params)
                    params.append(nn.Parameter(torch.from_numpy(np.array(t.data, np.float32))))
                idx[i] = name
                if op.is_weight(node, i):
                    self._kernels.add(name)
            self._node_weights[node.name] = idx
        self.weights = nn.ParameterList(params)

    # ---- parameters of the current state --------------------------------------------------------------
    def act_params(self) -> tuple[dict[str, qmath.QuantParams], dict[str, torch.Tensor]]:
        """QuantParams (qmath, exact) and differentiable float32 torch scales of every quantized activation.

        Returns:
            ``(params, scales)`` keyed by the quantized graph's tensor names.
        """
        return self._acts.params(self.act_min, self.act_max)

    def weight_qp(self, node: Node, index: int, w: np.ndarray) -> qmath.QuantParams:
        """The parameters the plan gives weight input ``index`` of ``node`` with values ``w``: the user's
        fixed parameters, else the op's ``weight_params`` under the schema.

        Args:
            node: an accumulate node.
            index: the weight's input position.
            w: the weight's current float values.

        Returns:
            The weight's QuantParams.
        """
        name = self.weight_names(node).get(index)
        if name in self.opts.fixed_params:
            return self.opts.fixed_params[name]
        return get_op(node.op_type).weight_params(node, index, w, self.opts.schema)

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

    def kernel_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weight tensors that are not biases, by float-graph tensor name.

        Returns:
            ``{name: parameter}`` in parameter order.
        """
        return {n: self.weights[i] for n, i in self._weight_index.items() if n in self._kernels}

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
            The output tensor, or a tuple of them for several outputs (in training mode: of
            ``self.train_outputs`` when set).

        Raises:
            ValueError: a bare tensor for a model with several inputs.
        """
        feeds = self._feeds(x)
        outs = forward_exact(self, feeds) if exact else forward_train(self, feeds)
        names = self.train_outputs if self.train_outputs and not exact else self.qgraph.outputs
        vals = [outs[o] for o in names]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def ema_update(self, name: str, value: torch.Tensor) -> None:
        """EMA range mode, training: move the owner of activation ``name`` towards ``value``'s (min, max)
        (the global batch's under data parallelism); a no-op otherwise.

        Args:
            name: the quantized activation.
            value: its float values in this batch.
        """
        spec = self._acts.specs.get(name)
        if self.range_mode != "ema" or spec is None or spec.kind != "learn" or not self.training:
            return
        k, m = spec.owner, self.ema_momentum
        v = value.detach()
        lo, hi = v.min(), v.max()
        if self.batch_range_reduce is not None:  # data-parallel: the global batch's min/max on every rank
            lo, hi = self.batch_range_reduce(lo, hi)
        with torch.no_grad():
            self.act_min[k] = (1 - m) * self.act_min[k] + m * lo
            self.act_max[k] = (1 - m) * self.act_max[k] + m * hi

    # ---- results -----------------------------------------------------------------------------------
    def learned_ranges(self) -> RangeTable:
        """The plan's ranges with every learned (min, max) in place (keys: float graph tensor names)."""
        return learned_table(self._acts, self.act_min, self.act_max)

    def fixed_params(self) -> dict[str, qmath.QuantParams]:
        """The module's exact activation parameters, keyed by float tensor name (for ``fixed_params``)."""
        qps, _ = self.act_params()
        return exact_params(self._acts, qps)

    def to_float_graph(self) -> Graph:
        """The float graph with the fine-tuned weights."""
        fg = self.float_graph.copy()
        for name, i in self._weight_index.items():
            fg.tensors[name].data = self.weights[i].detach().cpu().numpy().astype(np.float32).copy()
        return fg

    def quantized_graph(self) -> Graph:
        """``quantize_graph(to_float_graph(), learned_ranges(), opts)`` with the module's exact params."""
        o = self.opts
        opts = QuantizeOptions(
            schema=o.schema,
            change_concat_ranges=o.change_concat_ranges,
            input_ranges=dict(o.input_ranges),
            fixed_params=self.fixed_params(),
            wide_activations=o.wide_activations,
            wide_extra=dict(o.wide_extra),
            float_nodes=set(o.float_nodes),
            float_layers=dict(o.float_layers),
        )
        return quantize_graph(self.to_float_graph(), self.learned_ranges(), opts).graph


def prepare(
    float_graph: Graph, ranges: RangeTable, opts: QuantizeOptions | None = None, range_mode: str = "lsq"
) -> QATModule:
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
    from qmace.onnx_bridge import to_onnx
    from qmace.quantize.ranges import write_range_file

    onnx_path, range_path = Path(onnx_path), Path(range_path)
    model = to_onnx(module.to_float_graph())
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(onnx_path, "wb") as f:
        f.write(model.SerializeToString())
    range_path.parent.mkdir(parents=True, exist_ok=True)
    write_range_file(range_path, module.learned_ranges())
    return onnx_path, range_path
