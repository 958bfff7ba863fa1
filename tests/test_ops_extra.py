"""Max, Min, ArgMax, ArgMin, GatherElements, Trilu, Einsum, RMSNormalization, GridSample, DepthToSpace,
SpaceToDepth:
reference kernels against ONNX Runtime, and the data-movement ones on 8-bit codes."""

from __future__ import annotations

import numpy as np
import pytest

from qmace.ir import Node
from qmace.ops import get_op
from qmace.qmath import QuantParams, dequantize, quantize
from tests.opcheck import check_op

RNG = np.random.default_rng(17)


def randf(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 4), (3, 4)], [(2, 1, 4), (3, 1), (4,)]], ids=str)
def test_max_min(op, shapes):
    check_op(op, [randf(*s) for s in shapes])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_integers_and_nan(op):
    check_op(op, [RNG.integers(-9, 9, (5,)).astype(np.int32), RNG.integers(-9, 9, (5,)).astype(np.int32)])
    a, b = randf(4), randf(4)
    a[1] = np.nan
    check_op(op, [a, b])


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis,keepdims,last", [(0, 1, 0), (-1, 0, 0), (1, 1, 1), (2, 0, 1)])
def test_argmax_argmin(op, axis, keepdims, last):
    x = np.round(randf(3, 4, 5))  # ties
    check_op(op, [x], {"axis": axis, "keepdims": keepdims, "select_last_index": last})


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    x = randf(3, 4, 5)
    d = x.shape[axis]
    idx = RNG.integers(-d, d, (3, 4, 5)[:axis % 3] + (6,) + (3, 4, 5)[axis % 3 + 1:]).astype(np.int64)
    check_op("GatherElements", [x, idx], {"axis": axis})


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, 0, 2, -1, -7])
def test_trilu(upper, k):
    inputs = [randf(2, 4, 5)] + ([] if k is None else [np.array(k, np.int64)])
    check_op("Trilu", inputs, {"upper": upper}, const_inputs=(1,))


@pytest.mark.parametrize("eq,shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ii->i", [(4, 4)]),
    ("...ij->...ji", [(2, 3, 4)]),
    ("ij->", [(3, 4)]),
    ("i,i", [(6,), (6,)]),
], ids=lambda v: str(v))
def test_einsum(eq, shapes):
    check_op("Einsum", [randf(*s) for s in shapes], {"equation": eq})


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_rms_normalization(axis):
    x = randf(2, 3, 4)
    scale = randf(*x.shape[axis % 3:])
    check_op("RMSNormalization", [x, scale], {"axis": axis, "epsilon": 1e-3}, opset=23)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(mode):
    check_op("DepthToSpace", [randf(2, 8, 3, 4)], {"blocksize": 2, "mode": mode})


def test_space_to_depth():
    check_op("SpaceToDepth", [randf(2, 3, 6, 4)], {"blocksize": 2})


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample(mode, padding, align):
    x = randf(2, 3, 5, 6)
    grid = RNG.uniform(-1.4, 1.4, (2, 4, 7, 2)).astype(np.float32)  # some points outside [-1, 1]
    check_op("GridSample", [x, grid], {"mode": mode, "padding_mode": padding, "align_corners": align},
             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_grid_sample_volumetric(mode):
    grid = RNG.uniform(-1.2, 1.2, (1, 2, 3, 4, 3)).astype(np.float32)
    check_op("GridSample", [randf(1, 2, 3, 4, 5), grid], {"mode": mode, "padding_mode": "border"})


QP = QuantParams(np.float32(0.05), np.int32(120), "uint8")


@pytest.mark.parametrize("op,attrs,extra", [
    ("DepthToSpace", {"blocksize": 2}, []),
    ("SpaceToDepth", {"blocksize": 2}, []),
    ("GatherElements", {"axis": 1}, [np.array(RNG.integers(0, 4, (1, 4, 4, 4)), np.int64)]),
])
def test_data_movement_on_codes_is_exact(op, attrs, extra):
    codes = RNG.integers(0, 256, (1, 4, 4, 4)).astype(np.uint8)
    node = Node("n", op, ["x"] + [f"i{k}" for k in range(len(extra))], ["y"], attrs)
    cls = get_op(op)
    assert (cls.quant_kernel, cls.range_rule) == ("copy", "input")
    got = cls.run_quantized(node, [codes, *extra], [QP] + [None] * len(extra), [QP])[0]
    want = quantize(cls.run(node, [dequantize(codes, QP), *extra])[0], QP)
    np.testing.assert_array_equal(got, want)


def test_rms_normalization_model_runs_on_both_backends():
    """An opset-23 op: the ONNX Runtime lowering writes the model at opset 23 (Op.onnx_opset)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qmace.frontends import onnx_to_graph
    from qmace.passes import optimize
    from qmace.runtime import Session

    scale = numpy_helper.from_array(randf(4), "scale")
    nodes = [helper.make_node("RMSNormalization", ["x", "scale"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    x = randf(2, 3, 4)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = optimize(onnx_to_graph(model, "rms.onnx"))
    for backend in ("reference", "onnxruntime"):
        np.testing.assert_allclose(Session(g, backend=backend).run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)
