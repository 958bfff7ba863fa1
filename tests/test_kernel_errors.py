"""A kernel's own exception (ValueError, NotImplementedError, ...) reaches the user as a KernelError naming the
node, op type and input shapes: at run time on the reference backend, and when a pass (constant folding)
evaluates the kernel; on the command line as one line and exit code 2, without a traceback."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qmace.errors import KernelError, ModelError
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.runtime import Session
from tests.conftest import make_onnx


def _folded_reshape_model():
    """Reshape of a 6-element constant to shape [4]: constant folding runs the kernel, which cannot."""
    nodes = [helper.make_node("Reshape", ["c", "shape"], ["r"], name="bad_reshape"),
             helper.make_node("Add", ["x", "r"], ["output"], name="add")]
    return make_onnx(nodes, {"x": (1, 4)}, ["output"],
                     {"c": np.arange(6, dtype=np.float32), "shape": np.array([4], np.int64)})


def _runtime_conv_transpose_model():
    """ConvTranspose with negative pads on a run-time input: its kernel raises NotImplementedError."""
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["output"], name="bad_deconv", pads=[-1, -1, -1, -1])]
    return make_onnx(nodes, {"x": (1, 1, 4, 4)}, ["output"], {"w": np.ones((1, 1, 3, 3), np.float32)})


def test_constant_folding_names_the_node_whose_kernel_fails():
    with pytest.raises(KernelError, match=r"Reshape node 'bad_reshape' failed on inputs c\(6,\), shape\(1,\)") as e:
        optimize(onnx_to_graph(_folded_reshape_model()))
    assert isinstance(e.value, ModelError) and isinstance(e.value.__cause__, ValueError)


def test_reference_run_names_the_node_whose_kernel_refuses():
    g = onnx_to_graph(_runtime_conv_transpose_model())
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(KernelError, match=r"ConvTranspose node 'bad_deconv' failed on inputs x\(1, 1, 4, 4\), "
                                          r"w\(1, 1, 3, 3\): .*negative pads") as e:
        Session(g, backend="reference").run({"x": x})
    assert isinstance(e.value.__cause__, NotImplementedError)


def test_cli_reports_a_kernel_error_in_one_line(model_factory, cli):
    t = model_factory(_folded_reshape_model())
    res = cli("convert", "--config", t.yaml)
    assert res.code == 2, res.err
    assert len(res.err_lines) == 1 and "bad_reshape" in res.err and "Reshape" in res.err, res.err
    assert "Traceback" not in res.err and "internal error" not in res.err
    assert not t.model_file.exists()
