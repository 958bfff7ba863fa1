"""Test helpers: run one op through ONNX Runtime and through qmace's reference kernel, and compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qmace.ir import Node
from qmace.ops import get_op

_ELEM = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float64"): TensorProto.DOUBLE,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("int8"): TensorProto.INT8,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("bool"): TensorProto.BOOL,
}


def ort_run_node(
    op_type: str,
    inputs: list[np.ndarray | None],
    attrs: dict | None = None,
    n_outputs: int = 1,
    const_inputs: tuple[int, ...] = (),
    opset: int = 21,
    domain: str = "",
) -> list[np.ndarray]:
    """Run a single-node ONNX model in ONNX Runtime (optimizations off). None inputs are omitted (""),
    inputs whose index is in ``const_inputs`` become initializers."""
    names, vis, inits, feeds = [], [], [], {}
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        x = np.asarray(x)
        if i in const_inputs:
            inits.append(numpy_helper.from_array(x, name))
        else:
            vis.append(helper.make_tensor_value_info(name, _ELEM[x.dtype], list(x.shape)))
            feeds[name] = x
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], "g", vis, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    # Output types come from ONNX shape inference, so tests need not state them.
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inferred.update({v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output})
    for o in model.graph.output:
        o.type.CopyFrom(inferred[o.name].type)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outs, feeds)


def ref_run_node(op_type: str, inputs: list[np.ndarray | None], attrs: dict | None = None, n_outputs: int = 1):
    node = Node("n", op_type, [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)],
                [f"out{i}" for i in range(n_outputs)], dict(attrs or {}))
    return get_op(op_type).run(node, list(inputs))


def check_op(
    op_type: str,
    inputs: list[np.ndarray | None],
    attrs: dict | None = None,
    n_outputs: int = 1,
    const_inputs: tuple[int, ...] = (),
    rtol: float = 1e-5,
    atol: float = 1e-5,
    opset: int = 21,
) -> list[np.ndarray]:
    """Assert qmace's reference kernel equals ONNX Runtime's on these inputs (dtype and shape too)."""
    expected = ort_run_node(op_type, inputs, attrs, n_outputs, const_inputs, opset=opset)
    got = ref_run_node(op_type, inputs, attrs, n_outputs)
    assert len(got) == len(expected), f"{op_type}: {len(got)} outputs, ORT gives {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        g = np.asarray(g)
        assert g.shape == e.shape, f"{op_type} output {k}: shape {g.shape}, ORT {e.shape}"
        assert g.dtype == e.dtype, f"{op_type} output {k}: dtype {g.dtype}, ORT {e.dtype}"
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"{op_type} output {k}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{op_type} output {k}")
    return got


def ort_exact(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as qmace hands it to ONNX Runtime on this host: where ORT's u8 x s8 kernels saturate (x86
    without VNNI), int8 weights become uint8 + 128 (``qmace.runtime.session.int8_weights_as_uint8``), so the
    tests compare qmace's integer maths with ORT's exact kernels on every CPU."""
    from qmace.runtime.session import int8_weights_as_uint8, ort_u8s8_exact

    if not ort_u8s8_exact():
        int8_weights_as_uint8(model)
    return model

