"""The LiteRT interpreter running the original ``.tflite`` file: the oracle of ``run --validate``.

Feeds and results use the IR's layout (rank-4 tensors NCHW, see ``builder``): feeds are transposed to
NHWC before LiteRT sees them and rank-4 results back to NCHW. For a model with 8-bit inputs/outputs the
float feed is quantized with TFLite's rule ``clip(round_half_away(x / scale) + zero_point)`` and the
codes it returns are dequantized, ``(q - zero_point) · scale``. Tensors inside the graph can be
compared too (``experimental_preserve_all_tensors``). ``litert_oracle`` returns None when
``ai-edge-litert`` is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qmace.errors import ModelError
from qmace.frontends.tflite.builder import NCHW_FROM_NHWC, NHWC_FROM_NCHW, ir_names
from qmace.frontends.tflite.reader import read_tflite

if TYPE_CHECKING:
    from qmace.config import ModelConfig

log = logging.getLogger(__name__)

LITERT_HINT = "pip install 'qmace[tflite]' (the LiteRT interpreter, ai-edge-litert)"


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    return Interpreter


def _builtin_only_resolver():
    from ai_edge_litert.interpreter import OpResolverType

    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


class LiteRTOracle:
    """The source ``.tflite`` model run by the LiteRT interpreter (the validation oracle for platform tflite).

    Takes and returns tensors in the IR's layout (NCHW for rank 4) and float; quantized model inputs and
    outputs are quantized/dequantized with the model's own parameters.

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (None: 1).
        outputs: IR tensor names that will be fetched (internal ones need the interpreter to keep them).
        delegates: LiteRT's default op resolver, which hands the ops it can take to the XNNPACK delegate (what
            users run, and what qmace's ``qm_arith="litert"`` Adds reproduce); False: TFLite's builtin
            kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), for comparisons.

    Raises:
        ModelError: the interpreter is not installed, or cannot load the model.
    """
    label = "the LiteRT interpreter on the source file"

    def __init__(self, path: str | Path, num_threads: int | None = None, outputs: Sequence[str] = (),
                 delegates: bool = True):
        cls = _interpreter_class()
        if cls is None:
            raise ModelError(f"{path}: the LiteRT interpreter is not installed ({LITERT_HINT})")
        model = read_tflite(path)
        self.index = {name: i for i, name in enumerate(ir_names(model))}
        internal = [o for o in outputs if o in self.index and self.index[o] not in model.outputs]
        try:
            resolver = {} if delegates else {"experimental_op_resolver_type": _builtin_only_resolver()}
            self.interp = cls(model_path=str(path), num_threads=num_threads or 1,
                              experimental_preserve_all_tensors=bool(internal), **resolver)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{path}: LiteRT cannot load the model: {str(e).splitlines()[0]}") from e
        self.path = Path(path)
        self.details = {d["index"]: d for d in self.interp.get_tensor_details()}

    def _detail(self, name: str) -> dict:
        if name not in self.index:
            raise ModelError(f"{self.path}: tensor {name!r} is not in the TFLite model")
        return self.details[self.index[name]]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Args:
            outputs: IR tensor names to return.
            feeds: input name -> array (IR layout).

        Returns:
            One float array per name in ``outputs`` (IR layout).

        Raises:
            ModelError: a tensor that is not in the model.
        """
        resized = False
        for name, x in feeds.items():
            d = self._detail(name)
            x = np.asarray(x, np.float32)
            if x.ndim == 4:
                x = x.transpose(NHWC_FROM_NCHW)
            if tuple(d["shape"]) != x.shape:
                self.interp.resize_tensor_input(d["index"], list(x.shape))
                resized = True
        if resized:
            self.interp.allocate_tensors()
        for name, x in feeds.items():
            d = self._detail(name)
            x = np.asarray(x, np.float32)
            if x.ndim == 4:
                x = x.transpose(NHWC_FROM_NCHW)
            self.interp.set_tensor(d["index"], _to_tensor(np.ascontiguousarray(x), d))
        self.interp.invoke()
        results = []
        for name in outputs:
            d = self._detail(name)
            y = _from_tensor(self.interp.get_tensor(d["index"]), d)
            results.append(np.ascontiguousarray(y.transpose(NCHW_FROM_NHWC)) if y.ndim == 4 else y)
        return results


def _to_tensor(x: np.ndarray, d: dict) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zp = d["quantization"]
    if not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    v = x.astype(np.float64) / scale
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + zp  # TFLite's std::round: half away from zero
    return np.clip(q, info.min, info.max).astype(dtype)


def _from_tensor(y: np.ndarray, d: dict) -> np.ndarray:
    if y.dtype.kind == "f":
        return y.astype(np.float32)
    scale, zp = d["quantization"]
    if not scale:
        return y
    return (y.astype(np.int64) - zp).astype(np.float32) * np.float32(scale)


def litert_oracle(m: ModelConfig, num_threads: int | None = None) -> LiteRTOracle | None:
    """The LiteRT oracle of a YAML model entry, or None (logged by the caller) without ai-edge-litert.

    Args:
        m: the YAML model entry.
        num_threads: interpreter threads, or None.

    Returns:
        A LiteRTOracle, or None.

    Raises:
        ModelError: LiteRT cannot load the model.
    """
    if _interpreter_class() is None:
        return None
    return LiteRTOracle(m.model_file_path, num_threads, m.subgraph.output_tensors)
