"""The IR under construction while a GraphDef is converted: tensor aliases, node emission with eager
constant folding, and the fixed quantization parameters that FakeQuant nodes record.

TF tensor references are ``node`` or ``node:k`` (output k); IR tensor names are ``node:k`` with ``:0``
kept, as in MACE's range logs. Ops that only forward their input (Identity, StopGradient, ...) emit no node:
their output is an *alias* of the input's IR tensor.

``emit`` adds one IR node (ONNX op names, opset-21 semantics). When every input is a constant, the node is
evaluated at once with qmace's reference kernel and its outputs become constants: shape arithmetic,
weight layout changes and batch-norm constants (``Rsqrt``/``Mul``/``Sub`` of Keras 3) fold while the graph
is read, so emitters can read the values they need (axes, perms, slice bounds) with ``const``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qmace.errors import ModelError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.ops.kernel import KERNEL_ERRORS
from qmace.qmath import QuantParams


def tensor_ref(ref: str) -> str:
    """``node`` -> ``node:0``; ``node:k`` stays; TF's ``^node`` control inputs are filtered out before.

    Args:
        ref: a TF tensor reference, ``node`` or ``node:k``.

    Returns:
        The reference with its output index, ``node:k``.
    """
    name, _, index = ref.rpartition(":")
    if name and index.isdigit():
        return ref
    return f"{ref}:0"


class Builder:
    """Graph plus the map from TF tensor references to IR tensor names."""

    def __init__(self, graph: Graph, path: str):
        self.graph = graph
        self.path = path
        self.names: dict[str, str] = {}  # TF "node:k" -> IR tensor name
        self.params: dict[str, QuantParams] = {}  # IR tensor name -> fixed quantization parameters
        self.node_name = ""  # the TF node being converted (for messages and IR node names)
        # transposed-back output -> the channels-first op output it wraps (that one takes TF's name)
        self.core: dict[str, str] = {}
        self.keep_weight_grid = True  # record FakeQuant weight parameters (int8 schema)
        self.warned_weight_grid = False
        self._count = 0

    # ---- names -----------------------------------------------------------------------------------
    def error(self, message: str) -> ModelError:
        """A ModelError naming the model file and the TF node being converted (returned, not raised).

        Args:
            message: what is wrong with the node.

        Returns:
            ``ModelError("<path>: node '<name>': <message>")``, for the caller to raise.
        """
        return ModelError(f"{self.path}: node {self.node_name!r}: {message}")

    def ir(self, ref: str) -> str:
        """IR tensor name of a TF tensor reference.

        Args:
            ref: a TF tensor reference, ``node`` or ``node:k``.

        Returns:
            The IR tensor name it stands for.

        Raises:
            ModelError: no converted node produces ``ref``.
        """
        ref = tensor_ref(ref)
        try:
            return self.names[ref]
        except KeyError:
            raise self.error(f"input {ref!r} is produced by no node of the graph") from None

    def alias(self, tf_ref: str, ir_name: str) -> None:
        """Make the TF tensor reference stand for an IR tensor (later ``ir(tf_ref)`` returns ``ir_name``).

        Args:
            tf_ref: a TF tensor reference, ``node`` or ``node:k``.
            ir_name: the IR tensor it stands for.
        """
        self.names[tensor_ref(tf_ref)] = ir_name

    def name_outputs(self, outputs: list[str], created: set[str]) -> list[str]:
        """Give the tensors this TF node created TF's names ``node:k`` (the channels-first op inside a
        Transpose wrapper takes the name, the wrapper's output is ``node:k/nhwc``); returns the IR names.

        Args:
            outputs: the IR names of the node's outputs, in TF's output order.
            created: the IR tensors added while converting this node (only those are renamed).

        Returns:
            The IR names of the outputs after renaming, in the same order.
        """
        named = []
        for k, o in enumerate(outputs):
            want = f"{self.node_name}:{k}"
            if o not in created or o == want or want in self.graph.tensors:
                named.append(o)
                continue
            inner = self.core.get(o)
            if inner is not None and inner in created:
                self.graph.rename_tensor(inner, want)
                self.graph.rename_tensor(o, f"{want}/nhwc")
                named.append(f"{want}/nhwc")
            else:
                self.graph.rename_tensor(o, want)
                named.append(want)
        return named

    def fresh(self, suffix: str) -> str:
        """A new, unused IR tensor name ``<node>/<suffix>`` (made unique) for an intermediate value.

        Args:
            suffix: what the value is (an op type, ``const``).

        Returns:
            The name (not yet added to the graph).
        """
        self._count += 1
        return self.graph.unique_name(f"{self.node_name}/{suffix}")

    # ---- constants -------------------------------------------------------------------------------
    def const(self, ir_name: str, what: str = "input") -> np.ndarray:
        """The value of a constant IR tensor; ModelError naming the node if it is computed at run time.

        Args:
            ir_name: the IR tensor.
            what: how the message calls it (``"axis"``, ``"min"``, ...).

        Returns:
            Its value.

        Raises:
            ModelError: the tensor is not a constant.
        """
        v = self.graph.constant(ir_name)
        if v is None:
            raise self.error(f"{what} {ir_name!r} must be a constant (computed at run time here)")
        return v

    def is_const(self, ir_name: str) -> bool:
        """Whether the IR tensor holds a constant value (False for ``""``, an omitted optional input).

        Args:
            ir_name: the IR tensor name.

        Returns:
            True when the tensor is a constant.
        """
        return bool(ir_name) and self.graph.constant(ir_name) is not None

    def add_const(self, value: np.ndarray, name: str | None = None) -> str:
        """Add a constant tensor to the graph.

        Args:
            value: its value (copied, C order; dtype and shape kept, 0-d stays 0-d).
            name: a name to use (made unique), or None for a fresh ``<node>/const`` name.

        Returns:
            The IR name of the new constant.
        """
        value = np.array(value, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        name = self.graph.unique_name(name) if name else self.fresh("const")
        self.graph.add_tensor(Tensor(name, str(value.dtype), tuple(value.shape), value))
        return name

    # ---- nodes -----------------------------------------------------------------------------------
    def emit(self, op_type: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             outputs: list[str] | int = 1, name: str | None = None) -> list[str]:
        """Add one IR node (or fold it to constants); returns its output tensor names.

        When every non-empty input is a constant, the node is evaluated with qmace's reference kernel and its
        outputs are added as constants instead of the node.

        Args:
            op_type: the IR (ONNX) op type.
            inputs: IR names of its inputs (``""`` for an omitted optional input).
            attrs: its attributes (ONNX names and values), None for none.
            outputs: the output names, or how many fresh output names to make.
            name: the node's name, or None for ``<node>/<op_type>`` made unique.

        Returns:
            The IR names of its outputs.

        Raises:
            ModelError: the kernel rejects the constant inputs when folding them.
        """
        if isinstance(outputs, int):
            outputs = [self.fresh(op_type) for _ in range(outputs)] if outputs > 1 else [
                self.fresh(op_type.lower())]
        node = Node(name or self.graph.unique_name(f"{self.node_name}/{op_type}"), op_type, list(inputs),
                    list(outputs), dict(attrs or {}))
        values = [self.graph.constant(i) if i else None for i in inputs]
        if inputs and all(v is not None for v, i in zip(values, inputs) if i):
            try:
                results = get_op(op_type).run(node, values)
            except KERNEL_ERRORS as e:
                raise self.error(f"cannot evaluate {op_type} on its constant inputs: {e}") from e
            for o, r in zip(outputs, results):
                r = np.asarray(r)
                self.graph.add_tensor(Tensor(o, str(r.dtype), tuple(r.shape), r))
            return outputs
        for o in outputs:
            if o not in self.graph.tensors:
                self.graph.add_tensor(Tensor(o))
        self.graph.nodes.append(node)
        return outputs

    def emit1(self, op_type: str, inputs: list[str], attrs: dict[str, Any] | None = None,
              out: str | None = None) -> str:
        """:meth:`emit` for an op with one output.

        Args:
            op_type, inputs, attrs: as for :meth:`emit`.
            out: the output's name, or None for a fresh one.

        Returns:
            The IR name of the output.
        """
        return self.emit(op_type, inputs, attrs, [out] if out else 1)[0]

    def int64(self, ir_name: str) -> str:
        """The tensor as int64 (ONNX wants int64 shapes, axes, pads; TF graphs often hold int32).

        Args:
            ir_name: the IR tensor (a constant is converted at once, a run-time value gets a ``Cast``).

        Returns:
            The IR name of the int64 tensor (``ir_name`` itself if it already is one).
        """
        t = self.graph.tensors[ir_name]
        if t.data is not None:
            return ir_name if t.data.dtype == np.int64 else self.add_const(t.data.astype(np.int64))
        return self.emit1("Cast", [ir_name], {"to": 7})

    def transpose(self, ir_name: str, perm: tuple[int, ...]) -> str:
        """Emit ``Transpose(ir_name, perm)``: output axis i is input axis ``perm[i]``.

        Args:
            ir_name: the IR tensor to transpose.
            perm: the permutation (e.g. ``TO_NCHW``).

        Returns:
            The IR name of the transposed tensor.
        """
        return self.emit1("Transpose", [ir_name], {"perm": list(perm)})
