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
  ``bias_input`` the int32 bias input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmace.ir import Node

_REGISTRY: dict[str, type[Op]] = {}


class Op:
    op_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    quant_kernel: ClassVar[str | None] = None
    output_range: ClassVar[Any] = "stat"
    bias_input: ClassVar[int | None] = None
    # Ops that a producing Conv/Gemm can absorb as its fused activation (MACE's fusion rule).
    fusable_activation: ClassVar[bool] = False
    # The ONNX opset the ONNX Runtime lowering needs for this op: 21 (the IR's), or the newer opset that
    # first defines it (RMSNormalization: 23).
    onnx_opset: ClassVar[int] = 21

    @classmethod
    def attr(cls, node: Node, key: str) -> Any:
        if key in node.attrs:
            return node.attrs[key]
        if key not in cls.defaults:
            raise KeyError(f"{cls.op_type} node {node.name!r}: no attribute {key!r} and no default")
        return cls.defaults[key]

    @classmethod
    def run(cls, node: Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
        raise NotImplementedError(f"{cls.op_type} has no reference kernel")

    @classmethod
    def run_quantized(cls, node: Node, inputs: list[np.ndarray | None], in_qp: list, out_qp: list) -> list[np.ndarray]:
        """Run on integer codes. ``in_qp``/``out_qp`` hold QuantParams (None for float/int64 tensors)."""
        from qmace.quantize import qmath

        if cls.quant_kernel == "copy":
            return cls.run(node, inputs)
        if cls.quant_kernel == "float":
            floats = [qmath.dequantize(x, qp) if (qp is not None and x is not None) else x for x, qp in zip(inputs, in_qp)]
            outs = cls.run(node, floats)
            return [qmath.quantize(y, qp) if qp is not None else y for y, qp in zip(outs, out_qp)]
        raise NotImplementedError(f"{cls.op_type} has no integer kernel")

    @classmethod
    def weight_axis(cls, node: Node, index: int) -> int | None:
        """Per-channel axis if input ``index`` is a quantizable weight, else None. Weights are constants."""
        return None

    @classmethod
    def is_weight(cls, node: Node, index: int) -> bool:
        return cls.weight_axis(node, index) is not None


def register(cls: type[Op]) -> type[Op]:
    if not cls.op_type:
        raise ValueError(f"{cls.__name__} has no op_type")
    if cls.op_type in _REGISTRY:
        raise ValueError(f"op {cls.op_type} registered twice ({_REGISTRY[cls.op_type].__module__}, {cls.__module__})")
    _REGISTRY[cls.op_type] = cls
    return cls


def get_op(op_type: str) -> type[Op]:
    _load_all()
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise KeyError(f"no op {op_type!r} in qmace's registry") from None


def supported_ops() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def is_supported(op_type: str) -> bool:
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
