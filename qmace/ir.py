"""The graph IR: typed tensors, nodes with ONNX-named ops, and per-tensor quantization parameters.

Design:
- Op types and attribute names follow ONNX (opset 21 semantics), so a frontend maps ONNX nodes one to one
  and the ONNX Runtime backend lowers nodes back without translation. Attributes the converter adds itself
  start with ``qm_`` (e.g. ``qm_activation`` for a fused ReLU/Clip) and are never emitted as ONNX attributes.
- A ``Tensor`` is either a constant (``data`` set: weights, biases, folded shapes) or a value computed at
  run time. Its ``dtype`` says how it is stored. A tensor with ``quant`` set and an 8-bit or int32 dtype
  holds integer codes whose real value is ``(code - zero_point) * scale`` (see docs/quantization.md).
- The quantized graph is the float graph with quantized tensors: an op whose inputs and outputs are
  quantized runs its integer kernel; explicit ``QuantizeLinear``/``DequantizeLinear`` nodes mark where
  values leave or enter the integer domain (graph inputs/outputs and float fallbacks).
- ``Graph.nodes`` is kept in topological order; every pass that edits it keeps it so.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qmace.errors import ModelError

if TYPE_CHECKING:
    from qmace.qmath import QuantParams

Shape = tuple[int | None, ...]


@dataclass
class Tensor:
    """A named value. ``shape`` entries are ints, or None where unknown (a dynamic batch)."""

    name: str
    dtype: str = "float32"
    shape: Shape | None = None
    data: np.ndarray | None = None
    quant: QuantParams | None = None

    @property
    def is_constant(self) -> bool:
        """True when the tensor holds data (an initializer/weight)."""
        return self.data is not None

    @property
    def is_quantized(self) -> bool:
        """True when the tensor is stored as integer codes (uint8/int8, uint16/int16, int32) with quantization
        parameters."""
        return self.quant is not None and self.dtype in ("uint8", "int8", "uint16", "int16", "int32")


@dataclass
class Node:
    """One op application. ``inputs`` may hold "" for an omitted optional input (ONNX convention)."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        """Attribute ``key`` as set on this node, else ``default`` (no op defaults: see ``Op.attr`` for those).

        Args:
            key: the attribute name.
            default: returned when the node does not set it.

        Returns:
            The attribute's value or ``default``.
        """
        return self.attrs.get(key, default)


@dataclass
class Graph:
    """A model: nodes in execution order over named tensors (ONNX op names at opset-21 semantics, NCHW).

    ``tensors`` maps every tensor name (inputs, constants, intermediates, outputs) to its ``Tensor``;
    ``inputs``/``outputs`` name the graph's I/O; ``fixed_params`` holds quantization parameters fixed by the
    source model (imported Q/DQ pairs, FakeQuant nodes, TFLite tensors: tensor name -> QuantParams), which
    passes carry through renames (``rename_tensor``) and drop with their tensors (``remove_unused``);
    ``metadata`` is free-form provenance (source file, sha256, quantization schema, fallbacks, ...).
    """
    name: str = "graph"
    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # Free-form provenance: source file, sha256, quantization schema, fallbacks, ...
    metadata: dict[str, Any] = field(default_factory=dict)
    # Quantization parameters fixed by the source model, by tensor name (class docstring).
    fixed_params: dict[str, QuantParams] = field(default_factory=dict)

    # ---- lookup ---------------------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``.

        Args:
            name: the tensor name.

        Returns:
            The Tensor.

        Raises:
            KeyError: no such tensor in the graph.
        """
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in graph {self.name!r}") from None

    def add_tensor(self, tensor: Tensor) -> Tensor:
        """Add (or replace) ``tensor`` under its name.

        Args:
            tensor: the tensor to add.

        Returns:
            ``tensor``.
        """
        self.tensors[tensor.name] = tensor
        return tensor

    def constant(self, name: str) -> np.ndarray | None:
        """The data of tensor ``name``.

        Args:
            name: the tensor name.

        Returns:
            Its array when it is a constant, None when it is computed or unknown.
        """
        t = self.tensors.get(name)
        return None if t is None else t.data

    def has_fixed_params(self, name: str) -> bool:
        """Whether the source model fixed tensor ``name``'s quantization (an imported Q/DQ pair).

        Passes must not fuse across such a tensor: the rounding there is part of the model's numerics.

        Args:
            name: the tensor name.

        Returns:
            True when ``fixed_params`` holds parameters for it.
        """
        return name in self.fixed_params

    @property
    def is_quantized(self) -> bool:
        """Whether the graph holds integer codes (a quantized or weight-only model): some tensor has
        QuantParams."""
        return any(t.is_quantized for t in self.tensors.values())

    def producers(self) -> dict[str, Node]:
        """Tensor name -> the node that produces it."""
        return {out: n for n in self.nodes for out in n.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> the nodes that read it (in node order)."""
        result: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    result.setdefault(i, []).append(n)
        return result

    def activations(self) -> Iterator[str]:
        """Names of run-time values produced by nodes, in topological order."""
        for n in self.nodes:
            for o in n.outputs:
                if o and not self.tensors[o].is_constant:
                    yield o

    def unique_name(self, base: str) -> str:
        """A tensor/node name not used in the graph yet.

        Args:
            base: the wanted name.

        Returns:
            ``base`` if free, else ``base_1``, ``base_2``, ...
        """
        names = set(self.tensors) | {n.name for n in self.nodes}
        if base not in names:
            return base
        i = 1
        while f"{base}_{i}" in names:
            i += 1
        return f"{base}_{i}"

    # ---- editing --------------------------------------------------------------------------------
    def remove_unused(self) -> None:
        """Drop nodes whose outputs nobody reads (and that are not graph outputs), then dead tensors."""
        changed = True
        while changed:
            used = {i for n in self.nodes for i in n.inputs if i} | set(self.outputs)
            keep = [n for n in self.nodes if any(o in used for o in n.outputs if o)]
            changed = len(keep) != len(self.nodes)
            self.nodes = keep
        live = {i for n in self.nodes for i in n.inputs} | {o for n in self.nodes for o in n.outputs}
        live |= set(self.inputs) | set(self.outputs)
        self.tensors = {k: v for k, v in self.tensors.items() if k in live}
        self.fixed_params = {k: v for k, v in self.fixed_params.items() if k in self.tensors}

    def rename_tensor(self, old: str, new: str) -> None:
        """Rename a tensor everywhere it is produced, read, or listed as a graph output.

        Args:
            old: the current name.
            new: the new name (must be free).
        """
        t = self.tensors.pop(old)
        t.name = new
        self.tensors[new] = t
        if old in self.fixed_params:
            self.fixed_params[new] = self.fixed_params.pop(old)
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
            n.outputs = [new if o == old else o for o in n.outputs]
        self.inputs = [new if i == old else i for i in self.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of ``old`` read ``new`` instead (graph outputs included).

        Args:
            old: the tensor whose readers move.
            new: the tensor they read from now on.
        """
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def toposort(self) -> None:
        """Put the nodes in topological order (depth-first over the nodes in their current order, producers first).

        Raises:
            ValueError: the graph has a cycle (naming a node on it).
        """
        produced_by = self.producers()
        available = set(self.inputs) | {k for k, t in self.tensors.items() if t.is_constant} | {""}
        order: list[Node] = []
        visited: set[int] = set()

        def visit(n: Node, stack: set[int]) -> None:
            if id(n) in visited:
                return
            if id(n) in stack:
                raise ValueError(f"graph {self.name!r} has a cycle through node {n.name!r}")
            stack.add(id(n))
            for i in n.inputs:
                if i not in available and i in produced_by:
                    visit(produced_by[i], stack)
            stack.discard(id(n))
            visited.add(id(n))
            order.append(n)

        for n in self.nodes:
            visit(n, set())
        self.nodes = order

    def copy(self) -> Graph:
        """A structural copy; constant arrays are shared (passes replace them, never mutate in place)."""
        return Graph(
            name=self.name,
            nodes=[Node(n.name, n.op_type, list(n.inputs), list(n.outputs), dict(n.attrs)) for n in self.nodes],
            tensors={k: dataclasses.replace(v) for k, v in self.tensors.items()},
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            metadata=dict(self.metadata),
            fixed_params=dict(self.fixed_params),
        )

    def op_counts(self) -> dict[str, int]:
        """Op type -> number of nodes, most frequent first."""
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def num_parameters(self) -> int:
        """The number of elements of all constants that some node reads."""
        used = {i for n in self.nodes for i in n.inputs}
        return int(sum(t.data.size for k, t in self.tensors.items() if t.is_constant and k in used))


def constants_of(graph: Graph, names: Iterable[str]) -> list[np.ndarray | None]:
    """The constant data of each named tensor.

    Args:
        graph: the graph.
        names: tensor names; ``""`` is an omitted optional input.

    Returns:
        One entry per name: its array, or None for computed tensors and omitted inputs.
    """
    return [graph.constant(n) if n else None for n in names]


def check_structure(graph: Graph, path: object) -> None:
    """Validate a loaded graph's wiring and put its nodes in topological order.

    Every tensor produced once, every node input defined, no cycle (Kahn's algorithm, iterative: no
    recursion limit on deep graphs).

    Args:
        graph: the graph; its ``nodes`` are reordered in place.
        path: the file it came from, for messages.

    Raises:
        ModelError: naming the file and the node at fault.
    """
    constants = {k for k, t in graph.tensors.items() if t.data is not None}
    producer: dict[str, int] = {}
    for idx, n in enumerate(graph.nodes):
        for o in n.outputs:
            if not o:
                continue
            if o in producer or o in constants or o in graph.inputs:
                raise ModelError(f"{path}: node {n.name!r} ({n.op_type}) writes tensor {o!r}, which is already "
                                 "an input, an initializer or another node's output")
            producer[o] = idx
    for o in graph.outputs:
        if o not in producer and o not in constants and o not in graph.inputs:
            raise ModelError(f"{path}: graph output {o!r} is produced by no node")
    readers: dict[int, list[int]] = {}
    pending = [0] * len(graph.nodes)
    for idx, n in enumerate(graph.nodes):
        for i in dict.fromkeys(n.inputs):
            if not i or i in constants or i in graph.inputs:
                continue
            if i not in producer:
                raise ModelError(f"{path}: node {n.name!r} ({n.op_type}) reads {i!r}, which is no graph input, "
                                 "initializer or node output")
            pending[idx] += 1
            readers.setdefault(producer[i], []).append(idx)
    if all(src < dst for src, dsts in readers.items() for dst in dsts):
        return  # already in topological order (as ONNX requires), hence acyclic
    ready = [idx for idx, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        idx = heapq.heappop(ready)  # lowest index first: keeps the file's order where it can
        order.append(idx)
        for r in readers.get(idx, ()):
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(graph.nodes):
        stuck = next(graph.nodes[i] for i, c in enumerate(pending) if c > 0)
        raise ModelError(f"{path}: the graph has a cycle through node {stuck.name!r} ({stuck.op_type}); "
                         "a graph must be acyclic")
    graph.nodes = [graph.nodes[i] for i in order]
