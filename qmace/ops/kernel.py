"""Running a node's kernel: the one place where a kernel's own exception becomes a qmace error naming the node.

Every caller of a reference kernel (the reference executor, constant folding, a frontend folding constants)
goes through ``run_kernel``, so that ``ValueError``/``NotImplementedError``/``TypeError``/``IndexError``
(and arithmetic errors) raised inside an op's ``run`` / ``run_quantized`` reach the user as a ``KernelError``
with the node's name, op type and input shapes, never as an internal error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qmace.errors import KernelError, first_line
from qmace.ir import Node
from qmace.ops.base import get_op

#: What a kernel raises for inputs it cannot compute (the kernels' contract; anything else is a bug).
KERNEL_ERRORS = (ValueError, IndexError, TypeError, NotImplementedError, ZeroDivisionError, OverflowError)


def _describe(node: Node, values: Sequence[np.ndarray | None]) -> str:
    parts = []
    for name, v in zip(node.inputs, values):
        if name:
            parts.append(f"{name}{tuple(np.shape(v))}" if v is not None else name)
    return ", ".join(parts) or "no inputs"


def run_kernel(node: Node, values: Sequence[np.ndarray | None], in_qp: Sequence | None = None,
               out_qp: Sequence | None = None, *, where: str = "") -> list[np.ndarray]:
    """Run ``node``'s reference kernel: ``Op.run``, or ``Op.run_quantized`` on codes when ``in_qp`` is given.

    Args:
        node: the node.
        values: its input arrays, None for omitted optional inputs.
        in_qp: the inputs' QuantParams (None per float input) to run the integer kernel; None: float kernel.
        out_qp: the outputs' QuantParams, with ``in_qp``.
        where: a prefix for the message, e.g. the model file.

    Returns:
        The node's output arrays.

    Raises:
        KernelError: the kernel rejected the inputs (naming the node, op type, input shapes and reason).
    """
    op = get_op(node.op_type)
    try:
        if in_qp is not None:
            return op.run_quantized(node, values, in_qp, out_qp)
        return op.run(node, values)
    except KERNEL_ERRORS as e:
        raise KernelError(f"{where}{node.op_type} node {node.name!r} failed on inputs {_describe(node, values)}: "
                          f"{first_line(e, 300)}") from e
