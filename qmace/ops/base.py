"""The op registry: each op lives in one module as one ``Op`` subclass registered by ``@register``.

An op class holds everything about the op:
- ``defaults``: its attributes with the ONNX spec's defaults (opset 21 semantics);
- ``run``: the numpy reference kernel on float (or integer-typed, for Shape/Gather/...) values;
- its quantization traits, read by the quantizer and the reference runtime:
  ``quant_kernel`` says how it runs on 8-bit codes —
    ``"accumulate"``  exact int32 accumulation + requantization (Conv, Gemm, MatMul, ...; ``run_quantized``),
    ``"copy"``        moves codes unchanged; output shares the input's parameters (Reshape, MaxPool, ...),
    ``"float"``       defined as dequantize -> float32 ``run`` -> quantize, and executed by ONNX Runtime with
                      its own integer kernel (QLinearAdd, QLinearAveragePool, ...; see docs/quantization.md),
    ``None``          no integer kernel: the quantizer surrounds it with DequantizeLinear/QuantizeLinear and
                      it runs in float (a *fallback*, reported by ``convert``);
  ``output_range`` says where its output range comes from — ``"stat"`` (calibration statistics),
  ``"input"`` (same as input 0: data movement), ``"union"`` (Concat), ``"interval"`` (Add/Sub without
  statistics) or a fixed ``(lo, hi)`` (Sigmoid, Softmax, Tanh);
  ``weight_axis(node, index)`` names the inputs that are weights (quantized with per-channel axis ...) and
  ``bias_input`` the int32 bias input; ``activation_weights`` (accumulate ops) says the weight input may be an
  activation instead (MatMul's Q·Kᵀ): it is then quantized per tensor from calibration like input 0;
- its ONNX Runtime lowering when it is not one ONNX node: ``onnx_nodes`` (float) and ``onnx_integer_nodes``
  (codes in, codes out).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node

_REGISTRY: dict[str, type[Op]] = {}


class Op:
    """One ONNX op: its attribute defaults, numpy reference kernel and quantization traits (module docstring).

    Subclasses are never instantiated: every member is a class attribute or classmethod, and ``@register``
    makes the class the op's implementation. A subclass's docstring states the op's formula/semantics; its
    ``run``/``run_quantized`` overrides implement the interface documented here.
    """
    op_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel: ClassVar[str | None] = None
    output_range: ClassVar[Any] = "stat"
    bias_input: ClassVar[int | None] = None
    # Ops that a producing Conv/Gemm can absorb as its fused activation (MACE's fusion rule).
    fusable_activation: ClassVar[bool] = False
    # Accumulate ops whose weight input may be a run-time activation (MatMul of two activations).
    activation_weights: ClassVar[bool] = False
    # The ONNX opset the ONNX Runtime lowering needs for this op: 21 (the IR's), or the newer opset that
    # first defines it (RMSNormalization: 23).
    onnx_opset: ClassVar[int] = 21

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
        if cls.quant_kernel == "copy":
            return cls.run(node, inputs)
        if cls.quant_kernel == "float":
            return cls.run_float_defined(node, inputs, in_qp, out_qp)
        raise NotImplementedError(f"{cls.op_type} has no integer kernel")

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


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: make ``cls`` the implementation of its ``op_type``.

    Args:
        cls: an Op subclass with ``op_type`` set.

    Returns:
        ``cls``.

    Raises:
        ValueError: no ``op_type``, or the op type is already registered.
    """
    if not cls.op_type:
        raise ValueError(f"{cls.__name__} has no op_type")
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

    import qmace.ops as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "util"):
            importlib.import_module(f"qmace.ops.{mod.name}")
    _loaded = True
