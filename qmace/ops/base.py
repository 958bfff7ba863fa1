"""The op registry: each op lives in one module as one ``Op`` subclass registered by ``@register``.

An op class holds everything about the op, so passes, the planner and the quantization tools ask an op's
traits instead of keeping lists of op names:
- ``defaults``: its attributes with the ONNX spec's defaults (opset 21 semantics), read through ``attr``;
- ``run``: the numpy reference kernel on float (or integer-typed, for Shape/Gather/...) values;
- its quantization traits (the planner in ``qmace.quantize.quantizer`` reads them):
  ``quant_kernel`` (:class:`Kernel`) says how it runs on 8-bit codes —
    ``ACCUMULATE``  exact int32 accumulation + requantization (Conv, Gemm, MatMul; ``run_quantized``),
    ``COPY``        moves codes unchanged; output shares the input's parameters (Reshape, MaxPool, ...),
    ``FLOAT``       defined as dequantize -> float32 ``run`` -> quantize, and executed by ONNX Runtime with
                    its own integer kernel (QLinearAdd, QLinearAveragePool, ...; see docs/quantization.md),
    ``NONE``        no integer kernel: the quantizer surrounds it with DequantizeLinear/QuantizeLinear and
                    it runs in float (a *fallback*, reported by ``convert``);
  ``kernel_for(node)`` is the per-node kind (Resize: ``COPY`` for nearest, ``FLOAT`` for linear/cubic) and
  ``quantizable(node)`` rules out attributes the integer kernel does not handle (Gemm's alpha/beta);
  ``range_rule`` (:class:`RangeRule`) says where its output range comes from — ``STAT`` (calibration
  statistics), ``INPUT`` (input 0's parameters: data movement), ``UNION`` (Concat), ``FIXED``
  (``fixed_range``, a Range: Sigmoid, Softmax, Tanh); ``range_without_stats`` is the fallback when a ``STAT``
  output has no statistics (``INTERVAL``: Add/Sub, computed by ``interval``);
  ``const_data_inputs``: float constant inputs are data quantized with their own range (Add, Concat, ...),
  not parameters; ``weight_axis(node, index)`` names the inputs that are weights (quantized per channel
  along that axis; ``weight_params`` gives their parameters for a schema) and ``bias_input`` the int32 bias;
  ``weight_rows``/``weight_from_rows``/``input_rows`` give a linear layer's weight as per-output-channel rows
  and its input as matching rows (bias correction, AdaRound, equalization); ``activation_weights``
  (accumulate ops) says the weight input may be an activation instead (MatMul's Q·Kᵀ): it is then quantized
  per tensor from calibration like input 0;
- its graph traits, read by passes: ``fusable_activation`` (a producer with ``fuses_activation`` absorbs
  it: ``fusion_attrs``), ``channelwise`` (acts on each channel alone and commutes with a positive
  per-channel scale: equalization; per node ``is_channelwise``), ``elementwise`` (transpose sinking), ``sign`` (:class:`Sign`, per node
  ``output_nonneg``: the QDQ importer's test for a dropped Relu).
- ``run_torch`` (optional, ``has_torch_kernel``): the float32 torch kernel QAT trains through; accumulate ops
  (``qmace.ops.accumulate.AccumulateOp``) write their integer kernel once for numpy and torch.
- its ONNX Runtime lowering when it is not one ONNX node: ``onnx_nodes`` (float) and ``onnx_integer_nodes``
  (codes in, codes out).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

from qmace import qmath
from qmace.ir import Node
from qmace.qmath import QuantParams, Range

#: The node attribute naming an op's arithmetic variant on codes (``Op.integer_arith``; ``qmace.ops.litert_add``).
ARITH = "qm_arith"


class Kernel(StrEnum):
    """How an op runs on 8-bit codes (module docstring). String-valued: ``Kernel.COPY == "copy"``."""
    ACCUMULATE = "accumulate"
    COPY = "copy"
    FLOAT = "float"
    NONE = "none"


class RangeRule(StrEnum):
    """Where a quantized op's output range comes from (module docstring)."""
    STAT = "stat"
    INPUT = "input"
    UNION = "union"
    INTERVAL = "interval"
    FIXED = "fixed"


class Sign(StrEnum):
    """What an op's output sign follows: ``ANY`` (nothing known), ``NONNEG`` (always >= 0), ``FIRST`` (>= 0
    when input 0 is), ``ALL`` (>= 0 when every input is)."""
    ANY = "any"
    NONNEG = "nonneg"
    FIRST = "first"
    ALL = "all"

_REGISTRY: dict[str, type[Op]] = {}


class Op:
    """One ONNX op: its attribute defaults, numpy reference kernel and quantization traits (module docstring).

    Subclasses are never instantiated: every member is a class attribute or classmethod, and ``@register``
    makes the class the op's implementation. A subclass's docstring states the op's formula/semantics; its
    ``run``/``run_quantized`` overrides implement the interface documented here.
    """
    op_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel: ClassVar[Kernel] = Kernel.NONE
    # Kernel per attribute value where ``kernel_for`` depends on it ("mode=linear" -> FLOAT), for the docs
    # and the registry test; empty when every node has ``quant_kernel``.
    kernel_variants: ClassVar[dict[str, Kernel]] = {}
    range_rule: ClassVar[RangeRule] = RangeRule.STAT
    # The output range of a FIXED range rule, None otherwise.
    fixed_range: ClassVar[Range | None] = None
    # The rule a STAT output falls back to when it has no statistics (only INTERVAL exists), or None.
    range_without_stats: ClassVar[RangeRule | None] = None
    bias_input: ClassVar[int | None] = None
    # Float constant inputs are data, quantized with their own range (Add's constant operand, Concat's
    # constant part), not parameters left in float.
    const_data_inputs: ClassVar[bool] = False
    # An activation a producing op with ``fuses_activation`` can absorb (MACE's fusion rule; ``fusion_attrs``).
    fusable_activation: ClassVar[bool] = False
    # A producer that can take a fused activation (``qm_activation``/``qm_clip``) as its last step.
    fuses_activation: ClassVar[bool] = False
    # Acts on each channel (axis 1) alone and commutes with a positive per-channel scale: f(s x) = s f(x).
    channelwise: ClassVar[bool] = False
    # Output element i depends only on the input elements at i (numpy broadcasting), so the op commutes with
    # a transpose of all its inputs (transpose sinking). Declared where that pass handles the op's constant
    # inputs: as data to permute with the activations (``const_data_inputs``) or as scalar parameters.
    elementwise: ClassVar[bool] = False
    sign: ClassVar[Sign] = Sign.ANY
    # For a layer with ``weight_rows``: the channel axis of its input 0 and output 0 (Conv: 1; Gemm/MatMul:
    # -1, the last), so tools pairing per-channel statistics with weight rows know where channels are.
    channel_axis: ClassVar[int | None] = None
    # Accumulate ops whose weight input may be a run-time activation (MatMul of two activations).
    activation_weights: ClassVar[bool] = False
    # The ONNX opset the ONNX Runtime lowering needs for this op: 21 (the IR's), or the newer opset that
    # first defines it (RMSNormalization: 23).
    onnx_opset: ClassVar[int] = 21
    # How ONNX Runtime runs a FLOAT-kernel op on codes when it has no QLinear kernel for it (a float island
    # between DequantizeLinear/QuantizeLinear); None: ORT's integer kernel (docs/supported-ops.md shows it).
    ort_kernel: ClassVar[str | None] = None
    # The arithmetic variant (node attribute ``ARITH``) the quantizer gives a node of this op unless a source
    # model's Q/DQ fixed one of its tensors (``Graph.has_fixed_params``: the import reproduces that float island):
    # e.g. HardSwish's two integer steps (``qmace.ops.activation``); None: the op has no such variant.
    integer_arith: ClassVar[str | None] = None

    @classmethod
    def attr(cls, node: Node, key: str) -> Any:
        """Attribute ``key`` of ``node``, else the op's default (ONNX spec, opset 21).

        Args:
            node: a node of this op type.
            key: the attribute name.

        Returns:
            The attribute's value.

        Raises:
            KeyError: the node does not set it and the op has no default (a required attribute).
        """
        if key in node.attrs:
            return node.attrs[key]
        if key not in cls.defaults:
            raise KeyError(f"{cls.op_type} node {node.name!r}: no attribute {key!r} and no default")
        return cls.defaults[key]

    @classmethod
    def run(cls, node: Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
        """The numpy reference kernel on float (or integer-typed, for Shape/Gather/...) values.

        Args:
            node: the node (attributes; its name for messages).
            inputs: the input arrays in node order, None for omitted optional inputs.

        Returns:
            The output arrays in node order.

        Raises:
            NotImplementedError: the op has no reference kernel.
            ValueError, TypeError, IndexError: inputs or attributes the op's spec does not allow; the reference
                executor turns them into ModelError naming the node.
        """
        raise NotImplementedError(f"{cls.op_type} has no reference kernel")

    @classmethod
    def run_quantized(cls, node: Node, inputs: list[np.ndarray | None], in_qp: list, out_qp: list) -> list[np.ndarray]:
        """Run on integer codes with the tensors' quantization parameters.

        ``"copy"`` ops move codes unchanged (``run`` on the codes); ``"float"`` ops compute
        ``quantize(run(dequantize(x)))``; ``"accumulate"`` ops override this with their exact int32 kernel.

        Args:
            node: the node.
            inputs: the input codes (or float/int64 values where a tensor is not quantized), None for omitted ones.
            in_qp: QuantParams per input (None for float/int64 tensors).
            out_qp: QuantParams per output (None for float/int64 tensors).

        Returns:
            The output codes (or values) in node order.

        Raises:
            NotImplementedError: the op has no integer kernel.
        """
        kind = cls.kernel_for(node)
        if kind is Kernel.COPY:
            return cls.run(node, inputs)
        if kind is Kernel.FLOAT:
            return cls.run_float_defined(node, inputs, in_qp, out_qp)
        raise NotImplementedError(f"{cls.op_type} has no integer kernel")

    @classmethod
    def run_torch(cls, node: Node, inputs: list) -> list:
        """The float32 torch kernel (QAT's training mode): ``run``'s formula on torch tensors, differentiable.

        Optional: ops that QAT can train through override it (``has_torch_kernel``). Attributes are read
        through :meth:`attr`, as ``run`` does. Constant inputs (shapes, axes) may arrive as numpy arrays.

        Args:
            node: the node.
            inputs: torch tensors (or numpy arrays for constants), None for omitted optional inputs.

        Returns:
            The output tensors in node order.

        Raises:
            NotImplementedError: the op has no torch kernel.
        """
        raise NotImplementedError(f"{cls.op_type} has no torch kernel")

    @classmethod
    def has_torch_kernel(cls) -> bool:
        """Whether the op overrides :meth:`run_torch`.

        Returns:
            True when QAT can run the op on torch tensors with gradients.
        """
        return cls.run_torch.__func__ is not Op.run_torch.__func__

    @classmethod
    def run_float_defined(cls, node: Node, inputs: list[np.ndarray | None], in_qp: list, out_qp: list) -> list[np.ndarray]:
        """``quantize(run(dequantize(inputs)))``: the definition of ``"float"`` kernels, and of ``accumulate``
        kernels on tensors their integer kernel does not cover (``integer_kernel_applies``).

        Args:
            node: the node.
            inputs: the input codes (float/int64 values where a tensor is not quantized), None for omitted ones.
            in_qp: QuantParams per input (None for unquantized tensors); int32 biases dequantize too.
            out_qp: QuantParams per output.

        Returns:
            The output codes (or values) in node order.
        """
        from qmace import qmath

        floats = [qmath.dequantize(x, qp) if (qp is not None and x is not None) else x for x, qp in zip(inputs, in_qp)]
        outs = cls.run(node, floats)
        return [qmath.quantize(y, qp) if qp is not None else y for y, qp in zip(outs, out_qp)]

    @classmethod
    def integer_kernel_applies(cls, node: Node, in_qp: list, out_qp: list) -> bool:
        """Whether the ``accumulate`` integer kernel (exact int32 accumulation + requantization) computes this
        node: every quantized activation 8-bit (the ONNX Runtime lowering is then fused into QLinearConv /
        QLinearMatMul with the same arithmetic). Otherwise (16-bit activations) the node is defined by
        ``run_float_defined``, as ONNX Runtime computes its unfused DQ -> op -> Q form.

        Args:
            node: the node.
            in_qp: QuantParams per input (None for unquantized ones).
            out_qp: QuantParams per output.

        Returns:
            True when the integer kernel applies.
        """
        return all(qp is None or qp.dtype in ("uint8", "int8", "int32") for qp in (*in_qp, *out_qp))

    @classmethod
    def onnx_nodes(cls, node: Node, inputs: list[str], outputs: list[str]) -> tuple[list, list] | None:
        """The ONNX nodes that compute this node when it is not one ONNX node (or ONNX Runtime has no kernel
        for it at the lowering's opset), e.g. Swish as ``Mul(X, Sigmoid(X))``; None lowers it one to one.

        Args:
            node: the node.
            inputs: the ONNX names read for its inputs (float values for quantized tensors).
            outputs: the ONNX names its outputs must be written to.

        Returns:
            ``(onnx NodeProtos, onnx TensorProto initializers)``, or None.
        """
        return None

    @classmethod
    def onnx_integer_nodes(cls, node: Node, in_tensors: list, out_tensors: list, qparams) -> tuple[list, list] | None:
        """ONNX nodes computing the node's *output codes* from its *input codes* when the QDQ form would not
        be fused by ONNX Runtime into an integer kernel with the reference's arithmetic (e.g. a MatMul with a
        16-bit output: ``MatMulInteger`` + requantization); None keeps the QDQ form.

        Args:
            node: a quantized node.
            in_tensors: its input ``ir.Tensor``s (None for omitted ones); the ONNX name of a quantized
                tensor's codes is the tensor's name.
            out_tensors: its output ``ir.Tensor``s; the nodes write their codes under the tensors' names.
            qparams: ``qparams(tensor) -> (scale_name, zero_point_name)`` initializers of a quantized tensor.

        Returns:
            ``(onnx NodeProtos, onnx TensorProto initializers)``, or None.
        """
        return None

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        """Per-channel axis if input ``index`` is a quantizable weight, else None. Weights are constants.

        Args:
            node: the node.
            index: the input's position.

        Returns:
            The output-channel axis of the weight (e.g. 0 for Conv's W), or None when the input is not a weight.
        """
        return None

    @classmethod
    def is_weight(cls, node: Node, index: int) -> bool:
        """Whether input ``index`` of ``node`` is a quantizable weight (``weight_axis`` is not None).

        Args:
            node: the node.
            index: the input's position.

        Returns:
            True for a weight input.
        """
        return cls.weight_axis(node, index) is not None

    @classmethod
    def kernel_for(cls, node: Node) -> Kernel:
        """The kernel kind of this node (``quant_kernel`` unless the op's attributes change it: Resize).

        Args:
            node: a node of this op type.

        Returns:
            The node's Kernel.
        """
        return cls.quant_kernel

    @classmethod
    def quantizable(cls, node: Node) -> bool:
        """Whether the integer kernel handles this node's attributes (else it falls back to float).

        Args:
            node: a node of this op type.

        Returns:
            True unless the op rules the attributes out.
        """
        return True

    @classmethod
    def interval(cls, node: Node, inputs: list[Range]) -> Range | None:
        """The ``INTERVAL`` output range from the input ranges (``range_without_stats``), else None.

        Args:
            node: a node of this op type.
            inputs: the ranges of its first inputs.

        Returns:
            The interval the output stays in, or None when the op has no such rule.
        """
        return None

    @classmethod
    def weight_params(cls, node: Node, index: int, w: np.ndarray, schema: str) -> QuantParams:
        """The parameters ``schema`` gives weight input ``index`` (per channel along ``weight_axis``); the one
        place the quantizer, bias correction, AdaRound and QAT take them from (``qmath.weight_params``).

        Args:
            node: a node of this op type.
            index: the weight's input position.
            w: the float32 weight.
            schema: the quantization schema (``qmath.Schema`` value).

        Returns:
            The weight's QuantParams.

        Raises:
            QuantizationError: an unknown schema.
        """
        return qmath.weight_params(w, cls.weight_axis(node, index), schema)

    @classmethod
    def weight_rows(cls, node: Node, w: np.ndarray) -> np.ndarray | None:
        """Input 1 of a linear layer ``y[m] = sum_{c, t} W[m, c, t] x[c, t]`` as float64 rows (G, Mg, Cg, T):
        G groups, Mg output channels per group, Cg input channels per group, T taps per input channel.

        Args:
            node: a node of this op type.
            w: its constant weight in the op's own layout.

        Returns:
            The rows, or None when the op (or this node's attributes) is no such layer.
        """
        return None

    @classmethod
    def weight_from_rows(cls, node: Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of ``weight_rows``: rows (G, Mg, Cg, T) back to the weight layout ``shape``.

        Args:
            node: a node of this op type.
            rows: the rows.
            shape: the weight's shape.

        Returns:
            The weight array (rows' dtype).

        Raises:
            NotImplementedError: the op has no ``weight_rows``.
        """
        raise NotImplementedError(f"{cls.op_type} has no weight rows")

    @classmethod
    def input_rows(cls, node: Node, x: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """Input 0 of a ``weight_rows`` layer as float64 rows (G, R, Cg*T), one row per output position, so
        that output ``y[g, r, m] = rows[g, r] . weight_rows[g, m]`` (flattened).

        Args:
            node: a node of this op type.
            x: one sample of input 0.
            w_shape: the weight's shape.

        Returns:
            The (G, R, Cg*T) rows.

        Raises:
            NotImplementedError: the op has no ``weight_rows``.
        """
        raise NotImplementedError(f"{cls.op_type} has no input rows")

    @classmethod
    def fold_bias_scale(cls, node: Node) -> float:
        """The factor the op applies to its bias input (Gemm's beta); the node is changed to apply 1.

        Args:
            node: a node of this op type, changed in place.

        Returns:
            The factor the caller must multiply the bias by.
        """
        return 1.0

    @classmethod
    def fusion_attrs(cls, node: Node, constant: Callable[[str], np.ndarray | None]) -> dict[str, Any] | None:
        """For a ``fusable_activation``: the ``qm_activation``/``qm_clip`` attributes that make a producer
        apply it (``apply_fused_activation``), or None when this node cannot be fused.

        Args:
            node: a node of this op type.
            constant: tensor name -> its constant value, or None.

        Returns:
            The attributes, or None.
        """
        return None

    @classmethod
    def is_channelwise(cls, node: Node, shape_of: Callable[[str], tuple | None]) -> bool:
        """Whether this node acts on each channel alone (``channelwise``, checked against its attributes and
        shapes): its float inputs and output may share one per-channel scale vector.

        Args:
            node: a node of this op type.
            shape_of: tensor name -> its shape, or None when unknown.

        Returns:
            True for a channel-wise node.
        """
        return cls.channelwise

    @classmethod
    def saturating_input(cls, node: Node) -> tuple[float, float] | None:
        """For a saturating op with a fixed output range (Sigmoid, Tanh, HardSigmoid, Softmax): the input
        interval outside which its 8-bit output no longer changes (dense-output calibration keeps its input's
        observed extremes within it, ``qmace.quantize.dense``); ``(-inf, inf)`` when there is no such bound.

        Args:
            node: a node of this op type.

        Returns:
            The interval, or None for any other op.
        """
        return None

    @classmethod
    def output_nonneg(cls, node: Node, constant: Callable[[str], np.ndarray | None],
                      nonneg: Callable[[str], bool]) -> bool:
        """Whether output 0 is known to be >= 0 (the ``sign`` trait; Clip also looks at its lower bound).

        Args:
            node: a node of this op type.
            constant: tensor name -> its constant value, or None.
            nonneg: tensor name -> whether it is known non-negative.

        Returns:
            True when every value of output 0 is >= 0.
        """
        if cls.sign is Sign.NONNEG:
            return True
        if cls.sign is Sign.FIRST:
            return bool(node.inputs) and nonneg(node.inputs[0])
        if cls.sign is Sign.ALL:
            return all(nonneg(i) for i in node.inputs if i)
        return False


def trait_errors(cls: type[Op]) -> list[str]:
    """The ways ``cls``'s traits break the rules of the module docstring (empty when they are legal).

    Args:
        cls: an Op subclass.

    Returns:
        One message per problem.
    """
    errors = []
    for name, kind in (("quant_kernel", Kernel), ("range_rule", RangeRule), ("sign", Sign)):
        if not isinstance(getattr(cls, name), kind):
            errors.append(f"{name} {getattr(cls, name)!r} is not a {kind.__name__}")
    for name in ("const_data_inputs", "fusable_activation", "fuses_activation", "channelwise", "elementwise"):
        if not isinstance(getattr(cls, name), bool):
            errors.append(f"{name} is not a bool")
    fixed = cls.fixed_range
    if (cls.range_rule is RangeRule.FIXED) != (fixed is not None):
        errors.append("fixed_range is set exactly when range_rule is FIXED")
    elif fixed is not None and not (isinstance(fixed, Range) and fixed.min < fixed.max):
        errors.append(f"fixed_range {fixed!r} is not a Range with lo < hi")
    if cls.range_without_stats not in (None, RangeRule.INTERVAL):
        errors.append(f"range_without_stats {cls.range_without_stats!r} is not None or INTERVAL")
    if cls.range_without_stats is not None and (cls.range_rule is not RangeRule.STAT
                                                or cls.interval.__func__ is Op.interval.__func__):
        errors.append("range_without_stats needs range_rule STAT and an interval() override")
    if cls.fusable_activation and cls.fusion_attrs.__func__ is Op.fusion_attrs.__func__:
        errors.append("fusable_activation needs a fusion_attrs() override")
    if cls.quant_kernel is Kernel.COPY and cls.range_rule not in (RangeRule.INPUT, RangeRule.UNION):
        errors.append("a COPY kernel moves codes, so its output range is its input's (INPUT or UNION)")
    for key, kind in cls.kernel_variants.items():
        attr, _, value = key.partition("=")
        if not value or not isinstance(kind, Kernel):
            errors.append(f"kernel_variants entry {key!r}: {kind!r} is not 'attribute=value' -> Kernel")
        elif cls.kernel_for(Node("probe", cls.op_type, [], [], {attr: value})) is not kind:
            errors.append(f"kernel_variants entry {key!r} disagrees with kernel_for()")
    has_rows = cls.weight_rows.__func__ is not Op.weight_rows.__func__
    if has_rows != (cls.channel_axis is not None):
        errors.append("channel_axis is set exactly when the op has weight_rows()")
    if cls.bias_input is not None and not isinstance(cls.bias_input, int):
        errors.append("bias_input is not an int or None")
    if not isinstance(cls.onnx_opset, int) or cls.onnx_opset < 21:
        errors.append(f"onnx_opset {cls.onnx_opset!r} is below the IR's 21")
    return errors


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: make ``cls`` the implementation of its ``op_type``.

    Args:
        cls: an Op subclass with ``op_type`` set.

    Returns:
        ``cls``.

    Raises:
        ValueError: no ``op_type``, illegal trait values (``trait_errors``), or the op type is already
            registered.
    """
    if not cls.op_type:
        raise ValueError(f"{cls.__name__} has no op_type")
    problems = trait_errors(cls)
    if problems:
        raise ValueError(f"op {cls.op_type}: " + "; ".join(problems))
    if cls.op_type in _REGISTRY:
        raise ValueError(f"op {cls.op_type} registered twice ({_REGISTRY[cls.op_type].__module__}, {cls.__module__})")
    _REGISTRY[cls.op_type] = cls
    return cls


def get_op(op_type: str) -> type[Op]:
    """The Op class of an op type (importing every op module first).

    Args:
        op_type: the ONNX op name, e.g. ``"Conv"``.

    Returns:
        The registered Op subclass.

    Raises:
        KeyError: qmace has no such op.
    """
    _load_all()
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise KeyError(f"no op {op_type!r} in qmace's registry") from None


def supported_ops() -> list[str]:
    """Every registered op type, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def is_supported(op_type: str) -> bool:
    """Whether qmace has a kernel for ``op_type``.

    Args:
        op_type: the ONNX op name.

    Returns:
        True when it is registered.
    """
    _load_all()
    return op_type in _REGISTRY


_loaded = False


def _load_all() -> None:
    """Import every module of qmace.ops so their @register decorators run."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil
    from pathlib import Path

    # the op modules by file (not through ``import qmace.ops``, which imports this module: no cycle)
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in ("base", "util"):
            importlib.import_module(f"qmace.ops.{mod.name}")
    _loaded = True
