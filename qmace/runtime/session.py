"""One session API over both backends.

``Session(graph, backend="onnxruntime" | "reference", num_threads=N)``; ``run(feeds)`` returns the graph
outputs by name. The reference backend can also return (or stream to a callback) every intermediate
tensor; the ONNX Runtime backend can expose chosen intermediates as extra outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qmace.errors import ModelError, first_line
from qmace.ir import Graph
from qmace.runtime import reference

BACKENDS = ("onnxruntime", "reference")


def ort_session(model_bytes: bytes | str, num_threads: int | None = None):
    """An ONNX Runtime CPU session on serialized model bytes or a model file path (a path lets ORT find
    external data beside the file). ModelError with ORT's first message line when it cannot load it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types; keep the message, one line
        raise ModelError(f"ONNX Runtime could not load the model: {first_line(e)}") from e


class Session:
    def __init__(
        self,
        graph: Graph,
        backend: str = "onnxruntime",
        num_threads: int | None = None,
        extra_outputs: list[str] | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        self.graph = graph
        self.backend = backend
        self.num_threads = num_threads
        self.extra_outputs = list(extra_outputs or [])
        self._ort = None
        if backend == "onnxruntime":
            from qmace.runtime.lower import to_onnx

            model = to_onnx(graph, extra_outputs=self.extra_outputs)
            self._ort = ort_session(model.SerializeToString(), num_threads)

    @property
    def input_names(self) -> list[str]:
        return list(self.graph.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.outputs)

    def run(
        self,
        feeds: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        on_tensor: Callable[[str, np.ndarray], None] | None = None,
        op_times: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once. ``on_tensor``/``op_times`` need the reference backend (every node is visible there)."""
        wanted = outputs or self.output_names
        if self._ort is not None:
            if on_tensor is not None or op_times is not None:
                raise ValueError("per-tensor callbacks and per-op times need the reference backend")
            try:
                res = self._ort.run(wanted, {k: np.asarray(v, order="C") for k, v in feeds.items()})
            except Exception as e:  # ORT's own exception types: one line naming the runtime
                raise ModelError(f"graph {self.graph.name!r}: ONNX Runtime failed: "
                                 f"{first_line(e, 300)}") from e
            return dict(zip(wanted, res))
        return reference.execute(self.graph, feeds, outputs=wanted, on_tensor=on_tensor, op_times=op_times)
