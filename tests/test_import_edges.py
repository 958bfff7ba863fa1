"""Import-path edge cases found by the ONNX node tests: element types, tensor attributes in the lowering,
graph outputs that are constants, string tensors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace.api import bind_io
from qmace.config import SubgraphConfig
from qmace.errors import ModelError
from qmace.frontends import onnx_to_graph
from qmace.passes import optimize
from qmace.runtime import Session


def _model(nodes, inputs, outputs, inits=()):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _both(model, feeds):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    g = optimize(onnx_to_graph(model, "m.onnx"))
    for backend in ("reference", "onnxruntime"):
        got = Session(g, backend=backend).run(feeds)
        for name, w in zip(g.outputs, want):
            assert got[name].dtype == w.dtype
            np.testing.assert_array_equal(got[name], w)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.uint16])
def test_unsigned_arithmetic_runs_on_both_backends(dtype):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    a = np.array([1, 7, 2**15], dtype)
    b = np.array([3, 2, 5], dtype)
    nodes = [helper.make_node("Mul", ["a", "b"], ["m"]), helper.make_node("Div", ["m", "b"], ["y"])]
    _both(_model(nodes, [helper.make_tensor_value_info(n, elem, [3]) for n in "ab"],
                 [helper.make_tensor_value_info("y", elem, [3])]), {"a": a, "b": b})


def test_constant_of_shape_with_a_run_time_shape_lowers_its_value_tensor():
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["y"],
                              value=numpy_helper.from_array(np.array([7], np.int32)))]
    _both(_model(nodes, [helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                 [helper.make_tensor_value_info("y", TensorProto.INT32, None)]), {"s": np.array([2, 3], np.int64)})


def test_a_constant_graph_output_can_be_named_as_an_output():
    value = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    model = _model([helper.make_node("Constant", [], ["values"], value=value),
                    helper.make_node("Relu", ["x"], ["r"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("values", TensorProto.FLOAT, [2, 3]),
                    helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    sub = SubgraphConfig(("x",), ((2,),), ("values", "r"), input_data_formats=("NCHW",))
    g = optimize(bind_io(onnx_to_graph(model, "m.onnx"), SimpleNamespace(subgraph=sub, yaml_path="d.yml")))
    for backend in ("reference", "onnxruntime"):
        got = Session(g, backend=backend).run({"x": np.array([-1, 2], np.float32)})
        np.testing.assert_array_equal(got["values"], np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ModelError, match=r"output_tensors: 'nope' not in the model; the model's outputs are: "):
        bind_io(onnx_to_graph(model, "m.onnx"),
                SimpleNamespace(subgraph=SubgraphConfig(("x",), ((2,),), ("nope",)), yaml_path="d.yml"))


def test_string_tensors_are_refused_by_name():
    model = _model([helper.make_node("Equal", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info(n, TensorProto.STRING, [2]) for n in "ab"],
                   [helper.make_tensor_value_info("y", TensorProto.BOOL, [2])])
    with pytest.raises(ModelError, match=r"m.onnx: tensor\(s\) 'a', 'b' hold strings"):
        onnx_to_graph(model, "m.onnx")
