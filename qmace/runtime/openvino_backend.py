"""The OpenVINO backend: OpenVINO's CPU plugin runs the same lowered ONNX (QDQ) model as ONNX Runtime.

Optional: ``pip install qmace[openvino]``. OpenVINO reads the QDQ ONNX and fuses each DequantizeLinear ->
Conv/MatMul -> QuantizeLinear pattern into its own int8 kernels (oneDNN). Its arithmetic is not qmace's
definition: it folds scales into the weights and requantizes in float with its own rounding, and on CPUs
without VNNI (AVX2 only) oneDNN may halve the activation or weight codes to avoid the ``vpmaddubsw`` int16
saturation. So it is checked against the reference backend with a measured bound (docs/quantization.md,
tests/test_openvino_backend.py), not bit for bit.
"""

from __future__ import annotations

import io

import numpy as np

from qmace.errors import ModelError


def available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOSession:
    """A compiled OpenVINO CPU model with ONNX Runtime's ``run(output_names, feeds)`` interface.

    Args:
        model_bytes: a serialized ONNX model.
        num_threads: inference threads, or None for OpenVINO's default.

    Raises:
        ModelError: openvino is not installed, or it cannot read/compile the model.
    """

    def __init__(self, model_bytes: bytes, num_threads: int | None = None):
        try:
            import openvino as ov
        except ImportError as e:
            raise ModelError("the openvino backend needs the openvino package: pip install 'qmace[openvino]'") from e
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        try:
            model = core.read_model(io.BytesIO(model_bytes))
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line text; keep the first line
            raise ModelError(f"OpenVINO could not load the model: {str(e).strip().splitlines()[0]}") from e
        self._request = self._compiled.create_infer_request()
        self._outputs = {name: i for i, o in enumerate(self._compiled.outputs) for name in o.get_names()}

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Args:
            output_names: the outputs wanted, in order.
            feeds: input name -> array.

        Returns:
            One array per name in ``output_names``.
        """
        res = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.array(res[self._compiled.outputs[self._outputs[n]]]) for n in output_names]
