"""Graph passes keep outputs equal (reference and ONNX Runtime backends) and do what they say (op counts,
MACE's fusion naming); the ONNX Runtime backend equals the reference backend on a model with many ops."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from qmace.errors import ModelError
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.ir import Graph
from qmace.passes import (
    fold_batchnorm,
    fold_constants,
    fuse_activations,
    infer_shapes,
    optimize,
    remove_identities,
)
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

RTOL, ATOL = 1e-4, 1e-5


def _feeds(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, size=g.tensors[i].shape).astype(np.float32) for i in g.inputs}


def _run(g: Graph, feeds, backend: str) -> dict[str, np.ndarray]:
    return Session(g, backend=backend).run(feeds)


def _check_pass(model, apply, seeds=(0, 1, 2)) -> tuple[Graph, Graph]:
    """Apply a pass to the graph of ``model``; outputs on random inputs must stay equal on both backends,
    and equal plain ONNX Runtime on the source model. Returns (before, after)."""
    before = onnx_to_graph(model)
    infer_shapes(before)
    after = before.copy()
    apply(after)
    src = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in seeds:
        feeds = _feeds(before, seed)
        want = dict(zip(before.outputs, src.run(list(before.outputs), feeds)))
        for backend in ("reference", "onnxruntime"):
            got_before = _run(before, feeds, backend)
            got_after = _run(after, feeds, backend)
            assert list(after.outputs) == list(before.outputs)
            for k in before.outputs:
                np.testing.assert_allclose(got_after[k], got_before[k], rtol=RTOL, atol=ATOL, err_msg=f"{backend} {k}")
                np.testing.assert_allclose(got_after[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{backend} {k}")
    return before, after


def _bn(rng, c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": (1 + 0.3 * rng.standard_normal(c)).astype(np.float32),
        f"{prefix}_b": rand(rng, c, scale=0.2),
        f"{prefix}_m": rand(rng, c, scale=0.2),
        f"{prefix}_v": (0.3 + rng.random(c)).astype(np.float32),
    }


def _bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-3):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=eps)


# ---- BatchNorm folding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_bn_fold_conv(bias):
    rng = np.random.default_rng(0)
    inits = {"w": rand(rng, 6, 4, 3, 3), **_bn(rng, 6)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rand(rng, 6)
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", pads=[1, 1, 1, 1]), _bn_node("c", "y")]
    before, after = _check_pass(make_onnx(nodes, {"x": (2, 4, 5, 5)}, ["y"], inits), fold_batchnorm)
    assert before.op_counts() == {"Conv": 1, "BatchNormalization": 1}
    assert after.op_counts() == {"Conv": 1}
    assert after.nodes[0].outputs == ["y"]  # the conv takes over the BN's output name
    assert "c" not in after.tensors


def test_bn_fold_depthwise_conv():
    rng = np.random.default_rng(1)
    inits = {"w": rand(rng, 6, 1, 3, 3), "b": rand(rng, 6), **_bn(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="dw", group=6, pads=[1, 1, 1, 1], strides=[2, 2]),
             _bn_node("c", "y")]
    _before, after = _check_pass(make_onnx(nodes, {"x": (1, 6, 7, 7)}, ["y"], inits), fold_batchnorm)
    assert after.op_counts() == {"Conv": 1}


@pytest.mark.parametrize("group", [1, 2])
def test_bn_fold_conv_transpose(group):
    rng = np.random.default_rng(2)
    cin, cout = 4, 6
    inits = {"w": rand(rng, cin, cout // group, 3, 3), "b": rand(rng, cout), **_bn(rng, cout)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", group=group, strides=[2, 2],
                              pads=[1, 1, 1, 1], output_padding=[1, 1]),
             _bn_node("c", "y")]
    _before, after = _check_pass(make_onnx(nodes, {"x": (1, cin, 4, 4)}, ["y"], inits), fold_batchnorm)
    assert after.op_counts() == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_bn_fold_gemm(trans_b, beta):
    rng = np.random.default_rng(3)
    w = rand(rng, 7, 5) if trans_b else rand(rng, 5, 7)
    inits = {"w": w, "c": rand(rng, 7), **_bn(rng, 7)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc", transB=trans_b, beta=beta, alpha=0.75),
             _bn_node("g", "y")]
    _before, after = _check_pass(make_onnx(nodes, {"x": (3, 5)}, ["y"], inits), fold_batchnorm)
    assert after.op_counts() == {"Gemm": 1}
    assert after.nodes[0].outputs == ["y"]


def test_bn_not_folded_when_conv_output_is_shared():
    rng = np.random.default_rng(4)
    inits = {"w": rand(rng, 4, 4, 1, 1), **_bn(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn_node("c", "y"),
             helper.make_node("Add", ["c", "y"], ["z"], name="add")]
    before, after = _check_pass(make_onnx(nodes, {"x": (1, 4, 3, 3)}, ["z"], inits), fold_batchnorm)
    assert after.op_counts() == before.op_counts()


# ---- activation fusion ---------------------------------------------------------------------------------


def _act_nodes(kind: str, x: str, y: str):
    if kind == "Relu":
        return [helper.make_node("Relu", [x], [y], name="act")]
    return [helper.make_node("Clip", [x, "lo", "hi"], [y], name="act")]


@pytest.mark.parametrize("kind", ["Relu", "Clip"])
@pytest.mark.parametrize("producer", ["Conv", "Gemm", "ConvTranspose", "MatMul"])
def test_activation_fusion_mace_naming(kind, producer):
    rng = np.random.default_rng(5)
    inits = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    if producer == "Conv":
        inits |= {"w": rand(rng, 4, 3, 3, 3, scale=3.0), "b": rand(rng, 4)}
        shape, prod = (1, 3, 6, 6), helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="p")
    elif producer == "ConvTranspose":
        inits |= {"w": rand(rng, 3, 4, 2, 2, scale=3.0), "b": rand(rng, 4)}
        shape, prod = (1, 3, 3, 3), helper.make_node("ConvTranspose", ["x", "w", "b"], ["conv_out"], name="p")
    elif producer == "Gemm":
        inits |= {"w": rand(rng, 6, 4, scale=3.0), "b": rand(rng, 4)}
        shape, prod = (2, 6), helper.make_node("Gemm", ["x", "w", "b"], ["conv_out"], name="p")
    else:
        inits |= {"w": rand(rng, 6, 4, scale=3.0)}
        shape, prod = (2, 6), helper.make_node("MatMul", ["x", "w"], ["conv_out"], name="p")
    nodes = [prod, *_act_nodes(kind, "conv_out", "act_out"),
             helper.make_node("Neg", ["act_out"], ["y"], name="neg")]
    _before, after = _check_pass(make_onnx(nodes, {"x": shape}, ["y"], inits), fuse_activations)
    assert after.op_counts() == {producer: 1, "Neg": 1}
    fused = next(n for n in after.nodes if n.op_type == producer)
    assert fused.outputs == ["act_out"]  # MACE: the fused op takes over the activation's name
    assert fused.attrs["qm_activation"] == kind
    if kind == "Clip":
        assert fused.attrs["qm_clip"] == [0.0, 6.0]
    assert "conv_out" not in after.tensors


def test_activation_not_fused_when_conv_output_is_read_twice_or_is_a_graph_output():
    rng = np.random.default_rng(6)
    inits = {"w": rand(rng, 4, 3, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu")]
    _, after = _check_pass(make_onnx(nodes, {"x": (1, 3, 4, 4)}, ["r", "c"], inits), fuse_activations)
    assert after.op_counts() == {"Conv": 1, "Relu": 1}


def test_clip_with_runtime_bounds_is_not_fused():
    rng = np.random.default_rng(7)
    inits = {"w": rand(rng, 4, 3, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("ReduceMin", ["x"], ["lo"], name="rmin", keepdims=0),
             helper.make_node("Clip", ["c", "lo"], ["y"], name="clip")]
    _, after = _check_pass(make_onnx(nodes, {"x": (1, 3, 4, 4)}, ["y"], inits), fuse_activations)
    assert after.op_counts()["Clip"] == 1


# ---- identity / dropout removal ------------------------------------------------------------------------


def test_identity_and_dropout_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"], name="id1"),
        helper.make_node("Relu", ["i1"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("Dropout", ["d"], ["d2", "mask"], name="drop_mask_unused"),
        helper.make_node("Neg", ["d2"], ["y"], name="neg"),
    ]
    _before, after = _check_pass(make_onnx(nodes, {"x": (2, 3)}, ["y"]), remove_identities)
    assert after.op_counts() == {"Relu": 1, "Neg": 1}
    relu = next(n for n in after.nodes if n.op_type == "Relu")
    assert relu.inputs == ["x"]


def test_identity_output_is_a_graph_output():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
    ]
    _before, after = _check_pass(make_onnx(nodes, {"x": (2, 3)}, ["y"]), remove_identities)
    assert after.op_counts() == {"Relu": 1}
    assert after.outputs == ["y"] and after.nodes[0].outputs == ["y"]


def test_identity_of_graph_input_to_graph_output_is_kept():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    _, after = _check_pass(make_onnx(nodes, {"x": (2, 3)}, ["y"]), remove_identities)
    assert after.outputs == ["y"] and after.inputs == ["x"]


def test_identity_whose_input_is_also_an_output():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Identity", ["r"], ["y"], name="id")]
    _, after = _check_pass(make_onnx(nodes, {"x": (2, 3)}, ["r", "y"]), remove_identities)
    assert after.outputs == ["r", "y"]


# ---- constant folding ----------------------------------------------------------------------------------


def _pytorch_flatten_model():
    """x.view(x.size(0), -1) as PyTorch exports it: Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape."""
    rng = np.random.default_rng(8)
    inits = {"w": rand(rng, 4, 3, 3, 3), "idx0": np.array(0, np.int64), "axes0": np.array([0], np.int64),
             "minus1": np.array([-1], np.int64), "fc": rand(rng, 4 * 4 * 4, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "idx0"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "newshape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "fc"], ["y"], name="matmul"),
    ]
    return make_onnx(nodes, {"x": (2, 3, 4, 4)}, ["y"], inits)


def _fold_to_fixed_point(g: Graph) -> None:
    for _ in range(8):
        infer_shapes(g)
        if fold_constants(g) == 0:
            break
    g.remove_unused()


def test_constant_folding_pytorch_flatten_chain():
    before, after = _check_pass(_pytorch_flatten_model(), _fold_to_fixed_point)
    assert before.op_counts() == {"Conv": 1, "Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1,
                                  "MatMul": 1}
    assert after.op_counts() == {"Conv": 1, "Reshape": 1, "MatMul": 1}
    reshape = next(n for n in after.nodes if n.op_type == "Reshape")
    np.testing.assert_array_equal(after.constant(reshape.inputs[1]), [2, -1])


def test_constant_folding_leaves_dynamic_shapes():
    model = _pytorch_flatten_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # batch unknown
    g = onnx_to_graph(model)
    _fold_to_fixed_point(g)
    assert g.op_counts()["Shape"] == 1  # cannot fold: the batch size is only known at run time


def test_constant_folding_of_constant_subgraph():
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
             helper.make_node("Add", ["x", "ab"], ["y"], name="add")]
    inits = {"a": np.full((3,), 2.0, np.float32), "b": np.arange(3, dtype=np.float32)}
    _, after = _check_pass(make_onnx(nodes, {"x": (2, 3)}, ["y"], inits), _fold_to_fixed_point)
    assert after.op_counts() == {"Add": 1}
    np.testing.assert_array_equal(after.constant(after.nodes[0].inputs[1]), [0, 2, 4])


# ---- shape inference / full pipeline -------------------------------------------------------------------


def test_shape_inference_fills_shapes():
    g = onnx_to_graph(_pytorch_flatten_model())
    for name in g.activations():
        g.tensors[name].shape = None
    assert infer_shapes(g) > 0
    assert g.tensors["c"].shape == (2, 4, 4, 4)
    assert g.tensors["shape"].shape == (4,)
    assert g.tensors["y"].shape == (2, 5)
    assert g.tensors["c"].dtype == "float32" and g.tensors["shape"].dtype == "int64"


def test_optimize_pipeline_preserves_outputs():
    from tests.conftest import tiny_cnn

    _before, after = _check_pass(tiny_cnn(), lambda g: g.__dict__.update(optimize(g).__dict__))
    assert "BatchNormalization" not in after.op_counts()
    assert "Relu" not in after.op_counts() and "Clip" not in after.op_counts()
    assert after.metadata["passes"]["batchnorms"] == 1 and after.metadata["passes"]["activations"] == 2
    # MACE naming: the stat run sees the activations' names
    assert {"relu1", "relu6"} <= set(after.activations())


# ---- the ONNX Runtime backend equals the reference backend ---------------------------------------------


def _many_ops_model():
    rng = np.random.default_rng(9)
    inits = {
        "w1": rand(rng, 8, 3, 3, 3), "b1": rand(rng, 8), "w2": rand(rng, 8, 1, 3, 3), "mulc": rand(rng, 1, 1, 8, 1),  # per row: a per-channel Mul would fold into the conv
        "scales": np.array([1, 1, 2, 2], np.float32), "shape": np.array([1, -1], np.int64),
        "fc": rand(rng, 10, 8 * 4 * 4 * 2 // 4), "fcb": rand(rng, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2"], ["dw"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["dw", "mulc"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "r1"], ["a"], name="add"),
        helper.make_node("Sigmoid", ["a"], ["sg"], name="sig"),
        helper.make_node("MaxPool", ["a"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["sg"], ["ap"], name="ap", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("Concat", ["mp", "ap"], ["cat"], name="cat", axis=1),
        helper.make_node("Resize", ["cat", "", "scales"], ["up"], name="up", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("MaxPool", ["up"], ["down"], name="down", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Transpose", ["down"], ["t"], name="t", perm=[0, 2, 3, 1]),
        helper.make_node("Tanh", ["t"], ["tm"], name="tanh"),
        helper.make_node("Reshape", ["tm", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
    ]
    return make_onnx(nodes, {"x": (1, 3, 8, 8)}, ["prob", "gap"], inits)


def test_onnxruntime_backend_equals_reference_on_many_ops():
    model = _many_ops_model()
    g = optimize(onnx_to_graph(model))
    ref, fast = Session(g, backend="reference"), Session(g, backend="onnxruntime", num_threads=1)
    src = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(4):
        feeds = _feeds(g, seed)
        r, f = ref.run(feeds), fast.run(feeds)
        s = dict(zip(g.outputs, src.run(list(g.outputs), feeds)))
        for k in g.outputs:
            np.testing.assert_allclose(f[k], r[k], rtol=1e-5, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(r[k], s[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert {"Conv", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "Resize", "Softmax", "Gemm", "Transpose",
            "Reshape"} <= set(g.op_counts())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_backend_observes_every_intermediate_the_same_way(backend):
    """``Session.run(feeds, observe=names)``: the same call and the same names back on every backend."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    g = optimize(onnx_to_graph(_many_ops_model()))
    feeds = _feeds(g)
    names = list(g.activations())
    ref = Session(g, backend="reference").run(feeds, observe=names)
    fast_session = Session(g, backend=backend)
    fast = fast_session.run(feeds, observe=names)
    assert set(ref) == set(fast) == set(names) | set(g.outputs)
    for k in names:  # float graph: both compute in float32 (OpenVINO with INFERENCE_PRECISION_HINT f32)
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    plain = fast_session.run(feeds)  # the session without observed tensors still returns the outputs only
    assert set(plain) == set(g.outputs)
    with pytest.raises(ModelError, match="no_such_tensor"):
        fast_session.run(feeds, observe=["no_such_tensor"])


def test_transpose_sinking_and_pad_folding_keep_outputs():
    """x -> T(NHWC) -> Relu -> Mul(c[C]) -> ReduceMean(H,W keepdims) ... and a T pair, a zero Pad before a
    Conv: after optimize no Transpose or Pad is left and the outputs are unchanged."""
    from qmace.ir import Graph, Node, Tensor
    from qmace.passes import optimize
    from qmace.runtime import Session

    rng = np.random.default_rng(0)
    g = Graph()
    g.add_tensor(Tensor("x", "float32", (1, 3, 6, 6)))
    g.inputs = ["x"]

    def const(name, v):
        v = np.asarray(v)
        g.add_tensor(Tensor(name, str(v.dtype), v.shape, v))

    const("c", rng.normal(size=3).astype(np.float32))
    const("pads", np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64))  # NHWC pads on H, W
    const("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    const("axes", np.array([1, 2], np.int64))
    nodes = [
        Node("t1", "Transpose", ["x"], ["a"], {"perm": [0, 2, 3, 1]}),
        Node("r", "Relu", ["a"], ["b"]),
        Node("m", "Mul", ["b", "c"], ["d"]),
        Node("p", "Pad", ["d", "pads"], ["e"]),
        Node("t2", "Transpose", ["e"], ["f"], {"perm": [0, 3, 1, 2]}),
        Node("conv", "Conv", ["f", "w"], ["y"], {"strides": [1, 1]}),
        Node("mean", "ReduceMean", ["d", "axes"], ["z"], {"keepdims": 0}),
    ]
    for n in nodes:
        g.nodes.append(n)
        for o in n.outputs:
            g.add_tensor(Tensor(o))
    g.outputs = ["y", "z"]
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    before = Session(g, backend="reference").run({"x": x})
    opt = optimize(g)
    after = Session(opt, backend="reference").run({"x": x})
    for k in ("y", "z"):
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-5)
    assert "Transpose" not in opt.op_counts() and "Pad" not in opt.op_counts(), opt.op_counts()
