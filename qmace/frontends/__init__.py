"""Model frontends: each turns a source model file into an ``ir.Graph``."""

from qmace.frontends.onnx_frontend import load_onnx, onnx_to_graph

__all__ = ["load_onnx", "onnx_to_graph"]
