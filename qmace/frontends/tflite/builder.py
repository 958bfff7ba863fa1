"""The IR under construction for one ``.tflite`` model, with TFLite's NHWC layout mapped to qmace's NCHW.

Layout rule: every rank-4 TFLite tensor (N, H, W, C) is held in the IR as (N, C, H, W); tensors of other
ranks keep TFLite's layout. So a YAML ``input_data_formats: NHWC`` (the default) feeds the model exactly as
for ONNX models, and axis arguments of rank-4 ops are mapped with ``NHWC_TO_NCHW_AXIS``. Ops that change
the rank of a rank-4 tensor (Reshape, Squeeze, FULLY_CONNECTED, MEAN without keep_dims, ...) first go
back to NHWC (:meth:`Builder.nhwc`), which is a Reshape when the Transpose keeps the element order
(e.g. H = W = 1), so MobileNet's classifier costs nothing.

Names: an IR tensor takes its TFLite tensor's name (made unique with ``__<index>`` when TFLite repeats a
name); tensors the converter adds are ``<name>__<what>``.
"""

from __future__ import annotations

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.reader import TflModel, TflOp, TflTensor
from qmace.ir import Graph, Node, Tensor
from qmace.qmath import QuantParams

NCHW_FROM_NHWC = (0, 3, 1, 2)  # perm: NHWC tensor -> NCHW tensor
NHWC_FROM_NCHW = (0, 2, 3, 1)
NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)  # NHWC axis a is NCHW axis NHWC_TO_NCHW_AXIS[a]

# fused_activation_function enum -> (op, clip bounds)
FUSED = {0: None, 1: ("Relu", None), 2: ("Clip", (-1.0, 1.0)), 3: ("Clip", (0.0, 6.0)), 4: ("Tanh", None)}


def ir_names(model: TflModel) -> list[str]:
    """The IR name of every TFLite tensor, by index (deterministic: the oracle uses it too).

    Args:
        model: the read model.

    Returns:
        One unique IR name per tensor index.
    """
    seen: dict[str, int] = {}
    for t in model.tensors:
        seen[t.name] = seen.get(t.name, 0) + 1
    return [t.name if seen[t.name] == 1 else f"{t.name}__{t.index}" for t in model.tensors]


def nchw_shape(shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """An NHWC rank-4 shape in NCHW order; other ranks unchanged.

    Args:
        shape: the TFLite shape.

    Returns:
        The IR shape.
    """
    return tuple(shape[p] for p in NCHW_FROM_NHWC) if len(shape) == 4 else tuple(shape)


def keeps_order(shape: tuple[int | None, ...], perm: tuple[int, ...]) -> bool:
    """True when transposing ``shape`` by ``perm`` keeps the flat element order (only size-1 axes move).

    Args:
        shape: the shape before the transpose.
        perm: the permutation.

    Returns:
        Whether the transpose is a mere reshape.
    """
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


class Builder:
    """Graph + name bookkeeping for the op converters (``qmace.frontends.tflite.ops``)."""

    def __init__(self, model: TflModel):
        self.model = model
        self.graph = Graph(name=model.path.stem, metadata={"source": str(model.path), "source_format": "tflite"})
        self.names = ir_names(model)
        self.alias: dict[int, str] = {}  # tensor index -> IR name it shares (QUANTIZE of a float tensor)
        self.source: dict[int, int] = {}  # DEQUANTIZE/DENSIFY output of a constant -> the constant's index
        self.params: dict[str, dict] = {}  # IR tensor name -> QuantParams.to_json() (fixed by the model)
        self._nhwc: dict[str, str] = {}
        self._written: set[str] = set()  # IR names some node already writes

    # ---- tensors --------------------------------------------------------------------------------
    def t(self, index: int) -> TflTensor:
        """The TFLite tensor at ``index``.

        Args:
            index: the tensor index.

        Returns:
            The TflTensor.
        """
        return self.model.tensors[index]

    def where(self, op: TflOp) -> str:
        """``<file>: operator <i> (<OP>)``, the prefix of this operator's error messages.

        Args:
            op: the operator.

        Returns:
            The prefix.
        """
        return f"{self.model.path}: operator {op.index} ({op.label})"

    def resolve(self, index: int) -> int:
        """The constant behind a DEQUANTIZE/DENSIFY of a constant (else ``index`` itself).

        Args:
            index: a tensor index.

        Returns:
            The index of the constant it stands for, or ``index``.
        """
        while index in self.source:
            index = self.source[index]
        return index

    def data(self, index: int) -> np.ndarray | None:
        """The stored value of a constant TFLite tensor (NHWC, codes for quantized constants), or None when
        it is computed at run time.

        Args:
            index: a tensor index (-1: omitted).

        Returns:
            The array, or None.
        """
        return None if index < 0 else self.t(self.resolve(index)).data

    def float_data(self, index: int) -> np.ndarray | None:
        """float32 value of a constant: float16/64 widened; codes with scales dequantized as TFLite does,
        ``(q - zero_point) · scale`` (per axis along ``quantized_dimension``); plain integers unchanged.

        Args:
            index: a tensor index.

        Returns:
            The float32 array, or None when the tensor is computed at run time.
        """
        value = self.data(index)
        if value is None:
            return None
        t = self.t(self.resolve(index))
        value = np.asarray(value)
        if value.dtype.kind == "f":
            return value.astype(np.float32)
        if t.quant is None:
            return value
        q = t.quant
        shape = [1] * value.ndim
        if q.per_axis:
            shape[q.axis] = q.scale.size
        centered = (value.astype(np.int64) - q.zero_point.reshape(shape)).astype(np.float32)
        return centered * q.scale.reshape(shape)

    def require(self, op: TflOp, slot: int, what: str) -> np.ndarray:
        """Operator input ``slot`` as a constant array (for shapes, axes, sizes ...).

        Args:
            op: the operator.
            slot: the input position.
            what: what the input is, for the message.

        Returns:
            The stored value (NHWC, codes for quantized constants).

        Raises:
            ModelError: naming the operator when the input is missing or not a constant.
        """
        value = self.data(op.inputs[slot]) if slot < len(op.inputs) else None
        if value is None:
            name = self.t(op.inputs[slot]).name if slot < len(op.inputs) and op.inputs[slot] >= 0 else "(none)"
            raise ModelError(f"{self.where(op)}: {what} {name!r} must be a constant")
        return value

    def rank(self, index: int) -> int:
        """The rank of TFLite tensor ``index``.

        Args:
            index: the tensor index.

        Returns:
            Its rank.
        """
        return len(self.t(index).shape)

    def value(self, index: int) -> str:
        """IR name of TFLite tensor ``index`` as an op input (constants are added on first use, rank-4
        ones transposed to NCHW, float types widened to float32).

        Args:
            index: the tensor index.

        Returns:
            The IR tensor name.

        Raises:
            ModelError: the tensor is read before any operator writes it.
        """
        if index in self.alias:
            return self.alias[index]
        name = self.names[index]
        if name in self.graph.tensors:
            return name
        arr = self.float_data(index)
        if arr is None:
            raise ModelError(f"{self.model.path}: tensor {name!r} is read before any operator writes it")
        if arr.ndim == 4:
            arr = np.ascontiguousarray(arr.transpose(NCHW_FROM_NHWC))
        self.graph.add_tensor(Tensor(name, str(arr.dtype), tuple(arr.shape), arr))
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        """A new constant tensor named after ``hint``.

        Args:
            hint: the wanted name (made unique).
            value: the data.

        Returns:
            The IR tensor name.
        """
        arr = np.asarray(value)
        arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray would make 0-d arrays 1-d)
        name = self.graph.unique_name(hint)
        self.graph.add_tensor(Tensor(name, str(arr.dtype), tuple(arr.shape), arr))
        return name

    def ints(self, hint: str, values) -> str:
        """A new int64 constant (a shape, axes, pads ...).

        Args:
            hint: the wanted name.
            values: the integers.

        Returns:
            The IR tensor name.
        """
        return self.const(hint, np.asarray(list(values), np.int64))

    def output(self, index: int) -> str:
        """IR name for TFLite output tensor ``index`` (registered float32, NCHW shape for rank 4).

        Args:
            index: the TFLite tensor index.

        Returns:
            The IR tensor name.

        Raises:
            ModelError: the tensor is written by two operators.
        """
        t = self.t(index)
        name = self.names[index]
        if name in self._written:
            raise ModelError(f"{self.model.path}: tensor {name!r} is written by two operators")
        dtype = "float32" if t.dtype in ("float32", "float16", "int8", "uint8", "int16") else t.dtype
        shape = nchw_shape(_shape_of(t))
        self.graph.add_tensor(Tensor(name, dtype, shape))
        qp = activation_params(t)
        if qp is not None:
            self.params[name] = qp.to_json()
        return name

    def temp(self, hint: str, shape=None, dtype: str = "float32") -> str:
        """A new intermediate IR tensor named after ``hint``.

        Args:
            hint: the wanted name.
            shape: its shape, if known.
            dtype: its dtype.

        Returns:
            The IR tensor name.
        """
        name = self.graph.unique_name(hint)
        self.graph.add_tensor(Tensor(name, dtype, None if shape is None else tuple(shape)))
        return name

    # ---- nodes ----------------------------------------------------------------------------------
    def node(self, op_type: str, inputs: list[str], outputs: list[str], hint: str = "", **attrs) -> Node:
        """Append an IR node (attributes that are None are left out).

        Args:
            op_type: the IR (ONNX) op.
            inputs: input tensor names.
            outputs: output tensor names.
            hint: the node's name (default ``<output>__<op>``), made unique.
            **attrs: its attributes.

        Returns:
            The node.
        """
        n = Node(self.graph.unique_name(hint or f"{outputs[0]}__{op_type}"), op_type, list(inputs), list(outputs),
                 {k: v for k, v in attrs.items() if v is not None})
        self.graph.nodes.append(n)
        self._written.update(outputs)
        return n

    def activation(self, op: TflOp, fused: int, out_index: int) -> tuple[str, str]:
        """(name the op itself writes, final output name) for a fused activation; emits the activation
        node after the caller emitted the op. Call ``finish_activation`` with the pair.

        Args:
            op: the operator.
            fused: TFLite's ``fused_activation_function`` code.
            out_index: the operator's output tensor index.

        Returns:
            ``(pre, out)``; equal when there is no fused activation.

        Raises:
            ModelError: an unsupported fused activation.
        """
        out = self.output(out_index)
        if not fused:
            return out, out
        if fused not in FUSED:
            raise ModelError(f"{self.where(op)}: fused activation {fused} is not supported")
        return self.temp(f"{out}__pre_act", self.graph.tensors[out].shape), out

    def finish_activation(self, fused: int, pre: str, out: str) -> None:
        """Emit the fused activation node ``out = act(pre)`` (Relu, or Clip with its bounds); nothing when
        ``pre == out``. In a quantized model ``pre`` gets ``out``'s parameters.

        Args:
            fused: TFLite's fused activation code.
            pre: the tensor the operator itself wrote.
            out: the final output.
        """
        if pre == out:
            return
        op_type, bounds = FUSED[fused]
        ins = [pre]
        if bounds is not None:
            ins += [self.const(f"{out}__lo", np.float32(bounds[0])), self.const(f"{out}__hi", np.float32(bounds[1]))]
        self.node(op_type, ins, [out])
        if out in self.params:  # quantized: the op before the activation writes the same grid
            self.params[pre] = self.params[out]

    # ---- layout ---------------------------------------------------------------------------------
    def nhwc(self, name: str, shape_nchw: tuple) -> str:
        """The NHWC view of an IR rank-4 tensor (cached): a Transpose, or a Reshape when order is kept.

        Args:
            name: the IR (NCHW) tensor.
            shape_nchw: its shape.

        Returns:
            The name of its NHWC view.
        """
        if name in self._nhwc:
            return self._nhwc[name]
        out = self.temp(f"{name}__nhwc", tuple(shape_nchw[p] for p in NHWC_FROM_NCHW))
        self._permute(name, out, shape_nchw, NHWC_FROM_NCHW)
        self._nhwc[name] = out
        return out

    def to_nchw(self, src_nhwc: str, shape_nhwc: tuple, out: str) -> None:
        """Write NHWC tensor ``src_nhwc`` into the IR rank-4 tensor ``out`` (NCHW).

        Args:
            src_nhwc: the NHWC tensor.
            shape_nhwc: its shape.
            out: the NCHW IR tensor to write.
        """
        self._permute(src_nhwc, out, shape_nhwc, NCHW_FROM_NHWC)

    def _permute(self, src: str, out: str, shape: tuple, perm: tuple[int, ...]) -> None:
        if all(d is not None for d in shape) and keeps_order(shape, perm):
            self.node("Reshape", [src, self.ints(f"{out}__shape", [shape[p] for p in perm])], [out])
        else:
            self.node("Transpose", [src], [out], perm=list(perm))

    def broadcast_operand(self, index: int, out_rank: int) -> str:
        """Operand ``index`` of an element-wise op whose output has rank ``out_rank``, in the IR layout.

        NumPy broadcasting aligns trailing axes in NHWC; a lower-rank operand of a rank-4 result is
        first given leading 1s (rank 4, NHWC) and then laid out NCHW (constants: folded here).

        Args:
            index: the operand's TFLite tensor index.
            out_rank: the output's rank.

        Returns:
            The IR tensor name to feed the op.
        """
        r = self.rank(index)
        if out_rank != 4 or r == 4:
            return self.value(index)
        arr = self.float_data(index)
        shape4 = (1,) * (4 - r) + tuple(self.t(index).shape)
        if arr is not None:
            return self.const(f"{self.names[index]}__nchw", arr.reshape(shape4).transpose(NCHW_FROM_NHWC))
        src = self.value(index)
        mid = self.temp(f"{src}__4d", shape4)
        self.node("Reshape", [src, self.ints(f"{src}__4d_shape", shape4)], [mid])
        out = self.temp(f"{src}__nchw", nchw_shape(shape4))
        self.to_nchw(mid, shape4, out)
        return out


def activation_params(t: TflTensor) -> QuantParams | None:
    """Per-tensor parameters of an 8-bit quantized activation (None for float tensors).

    Args:
        t: the TFLite tensor.

    Returns:
        The QuantParams, or None.
    """
    if t.quant is None or t.dtype not in ("int8", "uint8") or t.quant.per_axis:
        return None
    return QuantParams(t.quant.scale.reshape(()), t.quant.zero_point.reshape(()).astype(np.int32), t.dtype)


def _shape_of(t: TflTensor) -> tuple[int | None, ...]:
    """Static shape with None where the signature marks a dynamic dimension."""
    if len(t.signature) == len(t.shape):
        return tuple(None if s < 0 else d for d, s in zip(t.shape, t.signature))
    return tuple(t.shape)
