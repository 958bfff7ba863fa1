"""QAT runs the ops' own kernels: every ``run_torch`` agrees with its op's numpy ``run``, the integer
accumulation is one function for numpy and torch, the torch bias quantization is ``qmath.quantize_bias``'s,
and an op QAT cannot train through is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from qmace import qmath
from qmace.errors import UnsupportedOpsError
from qmace.ir import Graph, Node, Tensor
from qmace.ops import get_op
from qmace.ops.base import supported_ops
from qmace.qat.fakequant import fake_quant_bias
from qmace.qat.kernels import untrainable_nodes

RNG = np.random.default_rng(0)


def _f(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def _i(*values):
    return np.array(values, np.int64)


# op type -> list of (attrs, inputs, number of outputs). Float inputs are the data; int64 arrays are
# constant shape/axes/index inputs (QAT hands constants over as tensors too).
CASES: dict[str, list[tuple[dict, list, int]]] = {
    "Add": [({}, [_f(2, 3, 4), _f(3, 1)], 1)],
    "Sub": [({}, [_f(2, 3, 4), _f(4)], 1)],
    "Mul": [({}, [_f(2, 3, 4), _f(1, 3, 1)], 1)],
    "Div": [({}, [_f(2, 3), _f(2, 3, lo=0.5, hi=2.0)], 1)],
    "Pow": [({}, [_f(2, 3, lo=0.1, hi=2.0), _f(2, 3)], 1)],
    "Sqrt": [({}, [_f(2, 5, lo=0.0, hi=4.0)], 1)],
    "Neg": [({}, [_f(7)], 1)],
    "Abs": [({}, [_f(7)], 1)],
    "Exp": [({}, [_f(3, 4)], 1)],
    "Log": [({}, [_f(3, 4, lo=0.01, hi=5.0)], 1)],
    "Erf": [({}, [_f(3, 4, lo=-4, hi=4)], 1)],
    "Tanh": [({}, [_f(3, 4, lo=-4, hi=4)], 1)],
    "Sigmoid": [({}, [_f(3, 4, lo=-6, hi=6)], 1)],
    "Gelu": [({}, [_f(3, 4, lo=-4, hi=4)], 1), ({"approximate": "tanh"}, [_f(3, 4, lo=-4, hi=4)], 1)],
    "Swish": [({}, [_f(3, 4, lo=-6, hi=6)], 1), ({"alpha": 1.702}, [_f(3, 4, lo=-6, hi=6)], 1)],
    "LayerNormalization": [({}, [_f(2, 3, 8), _f(8), _f(8)], 1), ({"axis": 1}, [_f(2, 3, 4), _f(3, 4), None], 1)],
    "Relu": [({}, [_f(3, 4)], 1)],
    "LeakyRelu": [({}, [_f(3, 4)], 1), ({"alpha": 0.3}, [_f(3, 4)], 1)],
    "HardSigmoid": [
        ({}, [_f(3, 8, lo=-5, hi=5)], 1),
        ({"alpha": 0.1, "beta": 0.4}, [_f(3, 8, lo=-9, hi=9)], 1),
    ],
    "HardSwish": [({}, [_f(3, 8, lo=-5, hi=5)], 1)],
    "PRelu": [({}, [_f(2, 3, 4), _f(3, 1, lo=0, hi=0.5)], 1)],
    "Clip": [({}, [_f(3, 4), np.float32(-0.5), np.float32(0.7)], 1), ({}, [_f(3, 4), np.float32(0.0)], 1)],
    "Max": [({}, [_f(2, 3), _f(3), _f(2, 1)], 1)],
    "Min": [({}, [_f(2, 3), _f(3)], 1)],
    "Softmax": [({}, [_f(2, 5)], 1), ({"axis": 1}, [_f(2, 3, 4)], 1)],
    "LogSoftmax": [({}, [_f(2, 5)], 1), ({"axis": 0}, [_f(2, 3)], 1)],
    "ReduceMax": [({}, [_f(2, 3, 4), _i(1)], 1), ({"keepdims": 0}, [_f(2, 3, 4), _i(-1, 0)], 1)],
    "ReduceMin": [({}, [_f(2, 3, 4), _i(2)], 1)],
    "ReduceSum": [({"keepdims": 0}, [_f(2, 3, 4), _i(0, 2)], 1)],
    "ReduceMean": [({}, [_f(2, 3, 4, 4), _i(2, 3)], 1), ({}, [_f(2, 3)], 1)],
    "MaxPool": [
        ({"kernel_shape": [2, 2], "strides": [2, 2]}, [_f(2, 3, 6, 6)], 1),
        (
            {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1], "ceil_mode": 1, "strides": [2, 2]},
            [_f(1, 2, 7, 8)],
            1,
        ),
        ({"kernel_shape": [3], "dilations": [2], "auto_pad": "SAME_UPPER"}, [_f(1, 2, 9)], 1),
    ],
    "AveragePool": [
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, [_f(2, 3, 6, 6)], 1),
        (
            {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0], "count_include_pad": 1, "strides": [2, 1]},
            [_f(1, 2, 5, 6)],
            1,
        ),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, [_f(1, 1, 6, 6)], 1),
        # squeeze-excite's whole-map window (torch's window sum), 1-d, and dilation (tap by tap)
        ({"kernel_shape": [16, 16], "strides": [16, 16]}, [_f(2, 3, 32, 32)], 1),
        ({"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, [_f(2, 3, 9)], 1),
        ({"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 0, 1, 1]}, [_f(1, 2, 6, 6)], 1),
    ],
    "GlobalAveragePool": [({}, [_f(2, 3, 5, 4)], 1)],
    "GlobalMaxPool": [({}, [_f(2, 3, 5, 4)], 1)],
    "Reshape": [({}, [_f(2, 3, 4), _i(2, -1)], 1), ({}, [_f(2, 3, 4), _i(0, 4, 3)], 1),
                # a Softmax-on-axis lowering's way back: (1 * 2 * 3, 4) -> (1, 2, 3, 4)
                ({}, [_f(6, 4), _i(1, 2, 3, 4)], 1)],
    "Flatten": [({}, [_f(2, 3, 4)], 1), ({"axis": 2}, [_f(2, 3, 4)], 1), ({"axis": 0}, [_f(2, 3)], 1)],
    "Transpose": [({}, [_f(2, 3, 4)], 1), ({"perm": [0, 2, 1]}, [_f(2, 3, 4)], 1)],
    "Squeeze": [({}, [_f(1, 3, 1, 4)], 1), ({}, [_f(1, 3, 1, 4), _i(-2)], 1)],
    "Unsqueeze": [({}, [_f(3, 4), _i(0, -1)], 1)],
    "Concat": [({"axis": 1}, [_f(2, 3, 4), _f(2, 1, 4)], 1), ({"axis": -1}, [_f(2, 3), _f(2, 2)], 1)],
    "Split": [({"axis": 1}, [_f(2, 6), _i(2, 4)], 2), ({"num_outputs": 3}, [_f(7, 2)], 3)],
    "Slice": [
        ({}, [_f(5, 6), _i(1, 0), _i(4, 6), _i(0, 1), _i(1, 2)], 1),
        ({}, [_f(5, 6), _i(-1), _i(-10), _i(1), _i(-2)], 1),
    ],
    "Gather": [
        ({"axis": 1}, [_f(2, 5, 3), _i(0, -1, 2)], 1),
        ({}, [_f(4, 3), np.array([[0, 3], [-1, 1]])], 1),
    ],
    "Identity": [({}, [_f(3)], 1)],
    "Dropout": [({}, [_f(3, 4)], 1)],
    "Expand": [({}, [_f(3, 1), _i(2, 3, 4)], 1)],
    "Tile": [({}, [_f(2, 3), _i(2, 1)], 1)],
    "DepthToSpace": [
        ({"blocksize": 2}, [_f(1, 8, 2, 3)], 1),
        ({"blocksize": 2, "mode": "CRD"}, [_f(1, 8, 2, 3)], 1),
    ],
    "SpaceToDepth": [({"blocksize": 2}, [_f(1, 2, 4, 6)], 1)],
    "GatherElements": [({"axis": 1}, [_f(2, 4), np.array([[0, -1, 2], [3, 3, 0]])], 1)],
    "Conv": [
        ({"pads": [1, 0, 2, 1], "strides": [2, 1]}, [_f(2, 4, 7, 6), _f(6, 4, 3, 3), _f(6)], 1),
        ({"group": 3, "dilations": [2, 1], "auto_pad": "SAME_UPPER"}, [_f(1, 6, 8, 5), _f(6, 2, 3, 2)], 1),
        ({"qm_activation": "Clip", "qm_clip": [0.0, 1.5]}, [_f(1, 3, 9), _f(4, 3, 2), _f(4)], 1),
    ],
    "ConvTranspose": [
        (
            {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
            [_f(2, 4, 3, 4), _f(4, 3, 3, 3), _f(3)],
            1,
        ),
        (
            {"group": 2, "dilations": [2], "auto_pad": "SAME_UPPER", "strides": [3]},
            [_f(1, 4, 5), _f(4, 2, 2)],
            1,
        ),
        (
            {"output_shape": [9, 10], "strides": [2, 2], "qm_activation": "Relu"},
            [_f(1, 2, 4, 4), _f(2, 2, 3, 3)],
            1,
        ),
    ],
    "Resize": [  # inputs X, roi, scales, sizes: every mode family the numpy kernel has
        ({"mode": "nearest"}, [_f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)], 1),
        ({"mode": "linear"}, [_f(1, 2, 3, 4), None, np.array([1, 1, 2.5, 1.5], np.float32)], 1),
        ({"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         [_f(2, 3, 4, 5), None, None, _i(2, 3, 7, 3)], 1),
        ({"mode": "cubic"}, [_f(1, 1, 4, 4), None, np.array([1, 1, 1.5, 2], np.float32)], 1),
        ({"mode": "linear", "antialias": 1}, [_f(1, 2, 8, 8), None, np.array([1, 1, 0.5, 0.375], np.float32)], 1),
        ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 0.25},
         [_f(1, 1, 4, 4), np.array([0, 0, -0.2, 0.1, 1, 1, 1.3, 0.8], np.float32), None, _i(1, 1, 5, 3)], 1),
    ],
    "Pad": [
        ({}, [_f(2, 3, 4), _i(0, 1, 2, 0, -1, 1)], 1),
        ({}, [_f(2, 3, 4), _i(1, 2), np.float32(0.75), _i(-1)], 1),
        ({"mode": "reflect"}, [_f(1, 2, 5, 4), _i(0, 0, 2, 1, 0, 0, 1, 3)], 1),
        ({"mode": "edge"}, [_f(1, 2, 5, 4), _i(3, 0, 1, 2), None, _i(2, 3)], 1),
        ({"mode": "wrap"}, [_f(2, 6), _i(0, 4, 0, -2)], 1),
    ],
    "Gemm": [
        ({"transB": 1}, [_f(3, 5), _f(4, 5), _f(4)], 1),
        (
            {"transA": 1, "alpha": 0.5, "beta": 2.0, "qm_activation": "Relu"},
            [_f(5, 3), _f(5, 4), _f(3, 4)],
            1,
        ),
    ],
    "MatMul": [({}, [_f(2, 3, 5), _f(5, 4)], 1), ({"qm_activation": "Relu"}, [_f(8, 5), _f(5, 6)], 1)],
}

#: |run_torch - run| <= ATOL + RTOL * |run|: float32 kernels with other summation orders (BLAS, torch's
#: convolutions) and transcendental functions evaluated in float32 by torch but in float64 then rounded
#: by qmace (both within a few float32 ulps of the exact value).
ATOL, RTOL = 1e-5, 1e-5


def _torch_ops() -> list[str]:
    return [t for t in supported_ops() if get_op(t).has_torch_kernel()]


def test_every_torch_kernel_has_a_case():
    assert set(CASES) == set(_torch_ops())


@pytest.mark.parametrize("op_type", sorted(CASES))
def test_run_torch_equals_run(op_type):
    op = get_op(op_type)
    for k, (attrs, inputs, n_out) in enumerate(CASES[op_type]):
        node = Node(
            f"{op_type.lower()}{k}",
            op_type,
            [f"i{j}" for j in range(len(inputs))],
            [f"o{j}" for j in range(n_out)],
            dict(attrs),
        )
        want = op.run(node, [None if x is None else np.asarray(x) for x in inputs])
        got = op.run_torch(node, [None if x is None else torch.from_numpy(np.array(x)) for x in inputs])
        assert len(got) == len(want) == n_out
        for w, g in zip(want, got):
            assert tuple(g.shape) == w.shape, (op_type, k)
            np.testing.assert_allclose(
                g.detach().numpy(), w, rtol=RTOL, atol=ATOL, err_msg=f"{op_type} case {k}"
            )


def test_resize_keeps_a_training_batch_through_batch_one_sizes():
    """QAT trains a batch-1 graph on batches: ``sizes`` written for batch 1 resize each sample as alone (a
    batch-8 input once came out as one sample, and the segmentation model's QAT trained on garbage)."""
    op = get_op("Resize")
    x = _f(3, 2, 4, 5)
    for attrs, rest in (({"mode": "nearest"}, [None, None, _i(1, 2, 8, 10)]),
                        ({"mode": "linear"}, [None, None, _i(1, 2, 7, 3)])):
        node = Node("r", "Resize", ["x", "roi", "scales", "sizes"], ["y"], attrs)
        got = op.run_torch(node, [torch.from_numpy(x)] + [None if v is None else torch.from_numpy(v) for v in rest])[0]
        want = np.concatenate([op.run(node, [x[i:i + 1]] + rest)[0] for i in range(3)])
        np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)


def test_run_torch_passes_gradients():
    """The float kernels QAT trains through are differentiable in their data input."""
    for op_type in (
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MaxPool",
        "AveragePool",
        "Pad",
        "Slice",
        "Gather",
        "DepthToSpace",
        "Resize",
    ):
        attrs, inputs, _ = CASES[op_type][0]
        x = torch.from_numpy(np.array(inputs[0])).requires_grad_()
        node = Node("n", op_type, [f"i{j}" for j in range(len(inputs))], ["o"], dict(attrs))
        rest = [None if v is None else torch.from_numpy(np.array(v)) for v in inputs[1:]]
        y = get_op(op_type).run_torch(node, [x, *rest])[0]
        (y * y).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, op_type


def _codes(shape, qp):
    return RNG.integers(qp.qmin, qp.qmax + 1, shape).astype(qp.dtype)


@pytest.mark.parametrize("schema", ["uint8", "int8"])
@pytest.mark.parametrize("op_type", ["Conv", "Gemm", "MatMul"])
def test_integer_accumulation_is_one_function_for_numpy_and_torch(op_type, schema):
    """``run_quantized`` on torch tensors of codes (QAT's exact mode) equals it on numpy codes (reference)."""
    op = get_op(op_type)
    distinct = 0
    for k, (attrs, inputs, _) in enumerate(CASES[op_type]):
        if op_type == "Gemm" and attrs.get("alpha", 1.0) != 1.0:
            continue
        node = Node("n", op_type, [f"i{j}" for j in range(len(inputs))], ["o"], dict(attrs))
        x_qp = qmath.params_asymmetric(-1.5, 2.0, "uint8")
        w_axis = op.weight_axis(node, 1) if inputs[1].ndim == 2 or op_type == "Conv" else None
        w_qp = qmath.weight_params(inputs[1], w_axis, schema)
        codes = [_codes(inputs[0].shape, x_qp), qmath.quantize(inputs[1], w_qp)]
        in_qp = [x_qp, w_qp]
        if len(inputs) > 2 and op.bias_input == 2:
            codes.append(qmath.quantize_bias(inputs[2], x_qp, w_qp))
            in_qp.append(qmath.bias_params(x_qp, w_qp))
        y = op.run(node, [qmath.dequantize(c, qp) for c, qp in zip(codes, in_qp)])[0]
        y_qp = qmath.params_asymmetric(float(y.min()), float(y.max()), "uint8")  # the output's own range
        want = op.run_quantized(node, codes, in_qp, [y_qp])[0]
        got = op.run_quantized(node, [torch.from_numpy(c) for c in codes], in_qp, [y_qp])[0]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"{op_type} case {k}")
        distinct = max(distinct, np.unique(want).size)
    assert distinct > 10, "every case saturated: the comparison would not test the accumulation"


def test_torch_bias_quantization_divides_in_float64_as_qmath():
    x_qp = qmath.params_asymmetric(-1.0, 3.0, "uint8")
    w = RNG.normal(0, 0.2, (64, 8)).astype(np.float32)
    w_qp = qmath.weight_params(w, 0, "int8")
    bias_qp = qmath.bias_params(x_qp, w_qp)
    s = bias_qp.scale.astype(np.float64)
    # biases near the midpoints between codes, where a float32 division rounds the other way
    b = ((RNG.integers(-5000, 5000, (400, 64)) + 0.5) * s * (1 + RNG.uniform(-3e-8, 3e-8, (400, 64)))).astype(
        np.float32
    )
    f32_codes = np.rint(b / bias_qp.scale.astype(np.float32))
    f64_codes = np.rint(b.astype(np.float64) / s)
    assert (f32_codes != f64_codes).sum() > 0, "the sample must contain values where the two divisions differ"
    want = np.stack([qmath.dequantize(qmath.quantize_bias(row, x_qp, w_qp), bias_qp) for row in b])
    got = fake_quant_bias(torch.from_numpy(b), torch.from_numpy(bias_qp.scale.copy())).numpy()
    np.testing.assert_array_equal(got, want)


# ---- ops QAT cannot train through ----------------------------------------------------------------------


def _qdq_graph(op_type: str) -> Graph:
    """x -> QuantizeLinear -> DequantizeLinear -> <op_type>(x, <int64 constants>) -> y: the op on the path
    the gradients take (its data input is a fake-quantized activation)."""
    qp = qmath.params_asymmetric(-1.0, 1.0, "uint8")
    g = Graph("g", inputs=["x"], outputs=["y"])
    g.add_tensor(Tensor("x", "float32", (1, 2, 4, 4)))
    g.add_tensor(Tensor("xq", "uint8", (1, 2, 4, 4), quant=qp))
    g.add_tensor(Tensor("xd", "float32", (1, 2, 4, 4)))
    g.add_tensor(Tensor("y", "float32", None))
    g.add_tensor(Tensor("c", "int64", (8,), np.zeros(8, np.int64)))
    g.nodes += [
        Node("q", "QuantizeLinear", ["x"], ["xq"]),
        Node("dq", "DequantizeLinear", ["xq"], ["xd"]),
        Node(f"my_{op_type}", op_type, ["xd", "c"], ["y"]),
    ]
    return g


@pytest.mark.parametrize("op_type", [t for t in supported_ops() if get_op(t).quant_kernel != "none"])
def test_every_integer_kernel_op_trains_or_is_refused_by_name(op_type):
    bad = untrainable_nodes(_qdq_graph(op_type), set())
    if get_op(op_type).has_torch_kernel():
        assert bad == []
    else:
        assert [n.name for n in bad] == [f"my_{op_type}"]


def test_prepare_refuses_an_op_without_torch_kernel_naming_the_node():
    from qmace.frontends.onnx_frontend import onnx_to_graph
    from qmace.qat import prepare
    from qmace.quantize.quantizer import QuantizeOptions
    from qmace.quantize.ranges import Range

    w = numpy_helper.from_array(RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mish", ["c"], ["up"], name="softplus_tanh"),
        helper.make_node("Relu", ["up"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    g = onnx_to_graph(model)
    ranges = {n: Range(-3.0, 3.0) for n in ("x", "c", "up", "y")}
    with pytest.raises(UnsupportedOpsError, match=r"'softplus_tanh' \(Mish\)"):
        prepare(g, ranges, QuantizeOptions(input_ranges={"x": (-1.0, 1.0)}))


def test_qat_train_stays_the_function_after_its_module_is_imported():
    """The trainer module is not named ``train``, so importing it cannot replace ``qmace.qat.train``."""
    import importlib

    import qmace.qat
    import qmace.qat.trainer

    importlib.import_module("qmace.qat.trainer")
    assert qmace.qat.train is qmace.qat.trainer.train and callable(qmace.qat.train)
    from qmace.qat import fit, train

    assert (train, fit) == (qmace.qat.trainer.train, qmace.qat.trainer.fit)


def test_reshape_keeps_a_batch_merged_by_flatten():
    """A batch-1 graph's Flatten -> Softmax -> Reshape([1, ...]) (the Softmax-on-axis lowering) on a batch of 5:
    the batch went into Flatten's first dimension and comes back as the leading dimension."""
    x = np.random.default_rng(0).normal(size=(5, 2, 3, 4)).astype(np.float32)
    flat = torch.from_numpy(x.reshape(5 * 2 * 3, 4))
    node = Node("r", "Reshape", ["x", "s"], ["y"], {})
    (y,) = get_op("Reshape").run_torch(node, [flat, torch.tensor([1, 2, 3, 4])])
    np.testing.assert_array_equal(y.numpy(), x)
    (y,) = get_op("Reshape").run_torch(node, [torch.from_numpy(x.reshape(5, 2, 12)), torch.tensor([1, 2, -1])])
    assert tuple(y.shape) == (5, 2, 12)  # with a -1: the input's first dimension
