"""Shape / data-movement ops and reductions against ONNX Runtime, and their kernels on 8-bit codes.

Copy ops ("copy" kernel) on uint8 codes must equal quantize(float op(dequantize(codes))) exactly; Concat with
inputs of other parameters requantizes them into the output's.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from qmace.ir import Node
from qmace.ops import get_op
from qmace.qmath import QuantParams, dequantize, quantize
from tests.opcheck import check_op, ref_run_node

RNG = np.random.default_rng(99)


def randf(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*v):
    return np.array(v, np.int64)


# ---------------------------------------------------------------------------------------------------------
# Float kernels against ORT


@pytest.mark.parametrize(
    "in_shape,shape,allowzero",
    [
        ((2, 3, 4), (4, -1), 0),
        ((2, 3, 4), (0, -1), 0),  # 0 copies dim 0
        ((2, 3, 4), (0, 0, 2, 2), 0),
        ((2, 3, 4), (-1,), 0),
        ((0, 3), (3, 0), 1),  # allowzero: a real zero-size dim
        ((2, 3, 4), (2, 12), 1),
        ((1,), (), 0),  # to scalar
    ],
    ids=str,
)
def test_reshape(in_shape, shape, allowzero):
    check_op("Reshape", [randf(*in_shape), np.array(shape, np.int64)], {"allowzero": allowzero}, const_inputs=(1,))


@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3, -1, -4])
def test_flatten(axis):
    check_op("Flatten", [randf(2, 3, 4, 5)], {} if axis is None else {"axis": axis})


@pytest.mark.parametrize("perm", [None, (0, 2, 3, 1), (3, 1, 0, 2)], ids=str)
def test_transpose(perm):
    check_op("Transpose", [randf(2, 3, 4, 5)], {} if perm is None else {"perm": list(perm)})


@pytest.mark.parametrize("axes", [None, (2,), (-1, 0), (3,)], ids=str)
def test_squeeze(axes):
    # ORT rejects an omitted ("") trailing axes input, so "no axes" is a one-input node there
    inputs = [randf(1, 3, 1, 1)] + ([] if axes is None else [np.array(axes, np.int64)])
    check_op("Squeeze", inputs, const_inputs=(1,))
    if axes is None:
        assert ref_run_node("Squeeze", [inputs[0], None])[0].shape == (3,)


def test_squeeze_non_unit_raises():
    with pytest.raises(ValueError, match="not 1"):
        ref_run_node("Squeeze", [randf(2, 3), i64(0)])


@pytest.mark.parametrize("axes", [(0,), (-1,), (1, 3), (-1, 0), (4, 0)], ids=str)
def test_unsqueeze(axes):
    check_op("Unsqueeze", [randf(2, 3, 4), np.array(axes, np.int64)], const_inputs=(1,))
    check_op("Unsqueeze", [np.array(1.5, np.float32), i64(0)], const_inputs=(1,))


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_concat(axis):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for k, s in enumerate(shapes):
        s[axis] = k + 1
    check_op("Concat", [randf(*s) for s in shapes], {"axis": axis})
    check_op("Concat", [np.arange(3, dtype=np.int64), np.arange(2, dtype=np.int64)], {"axis": 0})


@pytest.mark.parametrize(
    "shape,axis,split,num_outputs,n",
    [
        ((2, 7), 1, (2, 4, 1), None, 3),  # uneven sizes
        ((2, 7), -1, (0, 7), None, 2),  # zero-size part
        ((7, 3), 0, None, 3, 3),  # num_outputs, last part smaller
        ((8, 2), 0, None, 4, 4),
    ],
    ids=str,
)
def test_split(shape, axis, split, num_outputs, n):
    attrs = {"axis": axis}
    if num_outputs is not None:
        attrs["num_outputs"] = num_outputs
    inputs = [randf(*shape)] + ([np.array(split, np.int64)] if split is not None else [])
    check_op("Split", inputs, attrs, n_outputs=n, const_inputs=(1,))


def test_split_without_sizes_splits_equally():
    # opset 18+ requires split or num_outputs; older models converted to opset 21 may carry neither
    x = randf(6, 4)
    outs = ref_run_node("Split", [x], {"axis": 0}, n_outputs=3)
    for got, want in zip(outs, np.split(x, 3)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="equal parts"):
        ref_run_node("Split", [x], {"axis": 1}, n_outputs=3)


BIG = np.iinfo(np.int64).max
SLICES = [
    ((1,), (3,), None, None),
    ((0, 1), (2, 4), (0, 2), None),
    ((-3,), (-1,), (1,), None),
    ((-1,), (-BIG,), (2,), (-1,)),  # full reverse
    ((10,), (-10,), (1,), (-1,)),  # out-of-range, negative step
    ((-100,), (100,), (-1,), (2,)),  # out-of-range, clamped
    ((4, 2), (0, 0), (0, 1), (-2, -1)),
    ((3,), (1,), (0,), (1,)),  # empty
    ((5,), (BIG,), (2,), (1,)),  # start past the end
    ((1, 0), (BIG, BIG), (-1, -3), (2, 3)),
    ((0,), (-1,), (-2,), (-1,)),  # negative step, end before start: empty
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICES, ids=str)
def test_slice(starts, ends, axes, steps):
    inputs = [randf(5, 3, 6), np.array(starts, np.int64), np.array(ends, np.int64),
              None if axes is None else np.array(axes, np.int64), None if steps is None else np.array(steps, np.int64)]
    if axes is None and steps is not None:
        inputs[3] = np.arange(len(starts), dtype=np.int64)
    check_op("Slice", inputs, const_inputs=(1, 2, 3, 4))


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
@pytest.mark.parametrize("indices", [i64(0, 2, -1), i64(-2), i64([1, -1], [0, 0]), np.array([1, -3], np.int32)], ids=str)
def test_gather(axis, indices):
    check_op("Gather", [randf(3, 4, 5), indices], {"axis": axis})


def test_gather_out_of_range_raises():
    with pytest.raises(IndexError):
        ref_run_node("Gather", [randf(3, 4), i64(3)])


def test_gather_int_data():
    check_op("Gather", [np.array([2, 3, 5, 7], np.int64), i64(-1)])  # Shape chain: a scalar dimension


def test_identity():
    check_op("Identity", [randf(2, 3)])
    check_op("Identity", [i64(1, 2)])


def test_dropout_inference():
    x = randf(2, 3)
    check_op("Dropout", [x])
    check_op("Dropout", [x, np.array(0.3, np.float32)], n_outputs=2, const_inputs=(1,))
    check_op("Dropout", [x, np.array(0.3, np.float32), np.array(False)], n_outputs=2, const_inputs=(1, 2))
    with pytest.raises(NotImplementedError, match="training_mode"):
        ref_run_node("Dropout", [x, np.array(0.3, np.float32), np.array(True)])


@pytest.mark.parametrize(
    "x,to",
    [
        (np.array([-2.7, -0.5, 0.0, 0.5, 2.7, 100.9], np.float32), TensorProto.INT64),
        (np.array([-2.7, -0.5, 0.0, 0.5, 2.7, 100.9], np.float32), TensorProto.INT32),
        (np.array([-2.7, 0.0, 2.7], np.float32), TensorProto.BOOL),
        (np.array([-2.7, 0.1, 2.7], np.float32), TensorProto.DOUBLE),
        (np.array([-2.7, 0.1, 2.7], np.float32), TensorProto.FLOAT16),
        (i64(3, -4, 0), TensorProto.FLOAT),
        (i64(3, -4, 200), TensorProto.INT32),
        (np.array([True, False]), TensorProto.FLOAT),
        (np.array([0, 128, 255], np.uint8), TensorProto.FLOAT),
    ],
    ids=str,
)
def test_cast(x, to):
    check_op("Cast", [x], {"to": to})


@pytest.mark.parametrize("attrs", [{}, {"start": 1}, {"end": -1}, {"start": -2, "end": 10}, {"start": 3, "end": 1}], ids=str)
def test_shape(attrs):
    check_op("Shape", [randf(2, 3, 4)], attrs)


@pytest.mark.parametrize(
    "shape,value",
    [(i64(2, 3), None), (i64(4), np.array([7], np.int64)), (i64(2, 0), np.array([1.5], np.float32)),
     (np.zeros(0, np.int64), np.array([3.0], np.float32))],
    ids=str,
)
def test_constant_of_shape(shape, value):
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    check_op("ConstantOfShape", [shape], attrs, const_inputs=(0,))
    if value is not None:  # the IR may also hold the attribute as a numpy array
        got = ref_run_node("ConstantOfShape", [shape], {"value": value})[0]
        assert got.dtype == value.dtype and got.shape == tuple(shape)


@pytest.mark.parametrize("in_shape,shape", [((3, 1), (2, 1, 6)), ((1, 4), (3, 1)), ((2, 3), (3,)), ((), (2, 2))], ids=str)
def test_expand(in_shape, shape):
    check_op("Expand", [randf(*in_shape), np.array(shape, np.int64)], const_inputs=(1,))


@pytest.mark.parametrize("repeats", [(1, 1, 1), (2, 1, 3), (1, 0, 2)], ids=str)
def test_tile(repeats):
    check_op("Tile", [randf(2, 3, 4), np.array(repeats, np.int64)], const_inputs=(1,))


@pytest.mark.parametrize(
    "start,limit,delta",
    [(0, 10, 3), (10, 0, -2), (5, 5, 1), (3, 1, 1), (-7, 8, 4),
     (0.0, 1.0, 0.1), (1.5, -2.25, -0.3), (0.1, 100.0, 0.7), (2.0, 1.0, 0.5)],
    ids=str,
)
def test_range(start, limit, delta):
    dt = np.int64 if isinstance(start, int) else np.float32
    check_op("Range", [np.array(start, dt), np.array(limit, dt), np.array(delta, dt)], rtol=0, atol=0)
    if dt is np.int64:
        check_op("Range", [np.array(start, np.int32), np.array(limit, np.int32), np.array(delta, np.int32)])


def test_equal_where():
    a, b = i64([1, 2, 3], [4, 5, 6]), i64(2)
    check_op("Equal", [a, b])
    check_op("Equal", [np.array([1.0, 2.0], np.float32), np.array([[1.0], [2.0]], np.float32)])
    cond = np.array([[True], [False]])
    check_op("Where", [cond, randf(2, 3), randf(3)])
    check_op("Where", [np.array(True), i64(1, 2), i64(7)])


# ---------------------------------------------------------------------------------------------------------
# Reductions


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"])
@pytest.mark.parametrize(
    "axes,keepdims,noop",
    [((1,), 1, 0), ((-1, 0), 0, 0), (None, 1, 0), (None, 0, 0), (None, 1, 1), ((), 0, 1), ((2, 1), 1, 1)],
    ids=str,
)
def test_reduce_float(op, axes, keepdims, noop):
    axes_in = None if axes is None else np.array(axes, np.int64)
    check_op(op, [randf(3, 4, 5), axes_in], {"keepdims": keepdims, "noop_with_empty_axes": noop}, const_inputs=(1,))


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"])
def test_reduce_int64(op):
    x = RNG.integers(-50, 50, (3, 4, 5)).astype(np.int64)
    check_op(op, [x, i64(1)], const_inputs=(1,))
    check_op(op, [x, None], {"keepdims": 0})


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_reduce_extreme_over_an_empty_axis(op, dtype):
    check_op(op, [np.zeros((2, 0, 4), dtype), i64(1)], {"keepdims": 1}, const_inputs=(1,))


def test_reduce_defaults():
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        assert get_op(op).defaults == {"keepdims": 1, "noop_with_empty_axes": 0}


# ---------------------------------------------------------------------------------------------------------
# Traits and quantized (code) kernels

COPY_OPS = ["Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Identity",
            "Dropout", "Expand", "Tile", "ReduceMax", "ReduceMin"]


def test_traits():
    for op in COPY_OPS:
        assert get_op(op).quant_kernel == "copy", op
        assert get_op(op).range_rule == "input", op
    assert get_op("Concat").quant_kernel == "copy" and get_op("Concat").range_rule == "union"
    for op in ("Shape", "Cast", "ConstantOfShape", "ReduceSum", "Range", "Equal", "Where"):
        assert get_op(op).quant_kernel == "none", op
    assert get_op("ReduceMean").quant_kernel == "float" and get_op("ReduceMean").range_rule == "stat"


QP = QuantParams(np.float32(0.043), np.int32(117), "uint8")
CODES = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
COPY_CASES = [
    ("Reshape", [i64(4, -1)], {}, 1),
    ("Flatten", [], {"axis": 2}, 1),
    ("Transpose", [], {"perm": [2, 0, 1]}, 1),
    ("Squeeze", [i64(0)], {}, 1),  # on an unsqueezed input, see below
    ("Unsqueeze", [i64(-1, 0)], {}, 1),
    ("Slice", [i64(-1, 0), i64(-BIG, 3), i64(2, 1), i64(-2, 2)], {}, 1),
    ("Gather", [i64(-1, 0, 1)], {"axis": 1}, 1),
    ("Split", [i64(1, 3)], {"axis": -1}, 2),
    ("Identity", [], {}, 1),
    ("Dropout", [], {}, 2),
    ("Expand", [i64(2, 2, 3, 4)], {}, 1),
    ("Tile", [i64(1, 2, 2)], {}, 1),
    ("ReduceMax", [i64(1)], {"keepdims": 0}, 1),
    ("ReduceMin", [], {}, 1),
]


@pytest.mark.parametrize("op,extra,attrs,n_out", COPY_CASES, ids=[c[0] for c in COPY_CASES])
def test_copy_kernel_on_codes_is_exact(op, extra, attrs, n_out):
    codes = CODES[None] if op == "Squeeze" else CODES
    node = Node("n", op, [f"i{k}" for k in range(1 + len(extra))], [f"o{k}" for k in range(n_out)], attrs)
    in_qp = [QP] + [None] * len(extra)
    out_qp = [QP] + ([None] if op == "Dropout" else [QP] * (n_out - 1))
    got = get_op(op).run_quantized(node, [codes, *extra], in_qp, out_qp)
    ref = get_op(op).run(node, [dequantize(codes, QP), *extra])
    assert len(got) == len(ref) == n_out
    np.testing.assert_array_equal(got[0], quantize(ref[0], QP))
    assert got[0].dtype == np.uint8
    if op == "Split":
        np.testing.assert_array_equal(got[1], quantize(ref[1], QP))


def test_concat_equal_params_copies_codes():
    a, b = CODES, RNG.integers(0, 256, (2, 1, 4)).astype(np.uint8)
    node = Node("c", "Concat", ["a", "b"], ["y"], {"axis": 1})
    same = QuantParams(np.float32(0.043), np.int32(117), "uint8")  # equal but not the same object
    got = get_op("Concat").run_quantized(node, [a, b], [QP, same], [QP])[0]
    np.testing.assert_array_equal(got, np.concatenate([a, b], axis=1))


def test_concat_unequal_params_requantizes():
    qa = QuantParams(np.float32(0.02), np.int32(100), "uint8")
    qb = QuantParams(np.float32(0.08), np.int32(30), "uint8")
    qy = QuantParams(np.float32(0.05), np.int32(60), "uint8")
    a = RNG.integers(0, 256, (2, 3)).astype(np.uint8)
    b = RNG.integers(0, 256, (2, 5)).astype(np.uint8)
    c = randf(2, 2)  # a float input is quantized into the output's params
    node = Node("c", "Concat", ["a", "b", "c"], ["y"], {"axis": -1})
    got = get_op("Concat").run_quantized(node, [a, b, c], [qa, qb, None], [qy])[0]
    expected = quantize(np.concatenate([dequantize(a, qa), dequantize(b, qb), c], axis=-1), qy)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[:, 3:8], quantize(dequantize(b, qb), qy))
    assert not np.array_equal(got[:, :3], a)


def test_concat_mixed_params_only_requantizes_differing_inputs():
    qb = QuantParams(np.float32(0.1), np.int32(0), "uint8")
    b = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    node = Node("c", "Concat", ["a", "b"], ["y"], {"axis": 0})
    got = get_op("Concat").run_quantized(node, [CODES, b], [QP, qb], [QP])[0]
    np.testing.assert_array_equal(got[:2], CODES)
    np.testing.assert_array_equal(got[2:], quantize(dequantize(b, qb), QP))


def test_shape_on_codes():
    node = Node("s", "Shape", ["x"], ["y"])
    np.testing.assert_array_equal(get_op("Shape").run_quantized(node, [CODES], [QP], [None])[0], i64(2, 3, 4))


def test_reduce_mean_quantized_is_float_kernel():
    node = Node("r", "ReduceMean", ["x", "a"], ["y"], {"keepdims": 1})
    qy = QuantParams(np.float32(0.01), np.int32(128), "uint8")
    got = get_op("ReduceMean").run_quantized(node, [CODES, i64(-1)], [QP, None], [qy])[0]
    expected = quantize(get_op("ReduceMean").run(node, [dequantize(CODES, QP), i64(-1)])[0], qy)
    np.testing.assert_array_equal(got, expected)


def test_reference_executor_runs_qdq_and_copy_ops_on_codes():
    from qmace.ir import Graph, Tensor
    from qmace.runtime.reference import execute

    qx = QuantParams(np.float32(0.02), np.int32(128), "uint8")
    qy = QuantParams(np.float32(0.03), np.int32(100), "uint8")
    g = Graph(
        nodes=[
            Node("q", "QuantizeLinear", ["x"], ["xq"]),
            Node("r", "Reshape", ["xq", "shape"], ["rq"]),
            Node("c", "Concat", ["rq", "rq"], ["cq"], {"axis": 0}),
            Node("dq", "DequantizeLinear", ["cq"], ["y"]),
        ],
        tensors={
            "x": Tensor("x", "float32", (2, 3)),
            "xq": Tensor("xq", "uint8", (2, 3), quant=qx),
            "shape": Tensor("shape", "int64", (1,), data=i64(-1)),
            "rq": Tensor("rq", "uint8", (6,), quant=qx),
            "cq": Tensor("cq", "uint8", (12,), quant=qy),
            "y": Tensor("y", "float32", (12,)),
        },
        inputs=["x"],
        outputs=["y"],
    )
    x = randf(2, 3)
    y = execute(g, {"x": x})["y"]
    codes = quantize(dequantize(quantize(x, qx), qx).reshape(-1), qy)
    np.testing.assert_array_equal(y, dequantize(np.concatenate([codes, codes]), qy))


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.FLOAT4E2M1])
def test_cast_to_narrow_types_is_refused_by_name(to):
    node = Node("c", "Cast", ["x"], ["y"], {"to": to})
    with pytest.raises(NotImplementedError, match="Cast node 'c': casting to .* is not supported"):
        get_op("Cast").run(node, [randf(3)])


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize("block", [2, 3])
def test_depth_to_space(mode, block):
    check_op("DepthToSpace", [randf(2, 2 * block * block, 3, 4)], {"blocksize": block, "mode": mode})


@pytest.mark.parametrize("block", [2, 3])
def test_space_to_depth_inverts_dcr(block):
    x = randf(2, 5, 3 * block, 2 * block)
    (y,) = check_op("SpaceToDepth", [x], {"blocksize": block})
    (back,) = ref_run_node("DepthToSpace", [y], {"blocksize": block, "mode": "DCR"})
    np.testing.assert_array_equal(back, x)


def test_depth_to_space_moves_codes():
    """On 8-bit codes DepthToSpace copies codes; the output shares the input's parameters."""
    op = get_op("DepthToSpace")
    assert op.quant_kernel == "copy" and op.range_rule == "input"
    q = np.arange(16, dtype=np.uint8).reshape(1, 4, 2, 2)
    (y,) = op.run_quantized(Node("d", "DepthToSpace", ["x"], ["y"], {"blocksize": 2}), [q], [None], [None])
    assert sorted(y.ravel().tolist()) == list(range(16)) and y.dtype == np.uint8
