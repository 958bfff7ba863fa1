"""The same network written by TensorFlow and by ONNX gives the same int8 model.

One tiny convnet (3x3 conv + ReLU6, 1x1 conv + ReLU6, global average pooling, dense) is built twice with the
same float32 weights: as a frozen GraphDef in TensorFlow's spelling (NHWC ``Conv2D`` + ``BiasAdd`` +
``Relu6``, ``Mean`` over axes [1, 2], ``MatMul`` + ``BiasAdd``) and as an ONNX model in PyTorch's export
spelling (``Conv`` + ``Clip``, ``GlobalAveragePool`` + ``Flatten`` + ``Gemm``). ``qmace quantize`` (int8,
equalization + bias correction, the same calibration samples) must give identical integer outputs.
Before ``spatial_means_to_global_pool`` TensorFlow's ``Mean`` stayed a ``ReduceMean`` with its own range
and blocked equalization across it, so the two int8 models differed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qmace.api import quantize_one_shot
from qmace.config import input_name_format
from qmace.frontends.tensorflow.graphdef import message_classes
from qmace.ir import Graph, Node, Tensor
from qmace.passes import optimize, spatial_means_to_global_pool
from qmace.qmath import QuantParams
from qmace.quantize.recipe import PTQRecipe
from qmace.runtime import Session

H = W = 8


def _weights():
    rng = np.random.default_rng(7)
    return {"w1": rng.normal(0, 0.4, (3, 3, 3, 8)).astype(np.float32),  # HWIO
            "b1": rng.normal(0, 0.1, 8).astype(np.float32),
            "w2": (rng.normal(0, 0.3, (1, 1, 8, 16)) * rng.uniform(0.1, 3, 16)).astype(np.float32),
            "b2": rng.normal(0, 0.1, 16).astype(np.float32),
            "w3": rng.normal(0, 0.3, (16, 5)).astype(np.float32),
            "b3": rng.normal(0, 0.1, 5).astype(np.float32)}


def _tf_graph(w) -> bytes:
    c = message_classes()
    g = c["GraphDef"]()

    def node(name, op, inputs=(), **attrs):
        n = g.node.add(name=name, op=op)
        n.input.extend(inputs)
        for k, fill in attrs.items():
            fill(n.attr[k])

    def const(name, value):
        def fill(a):
            v = np.asarray(value)
            a.tensor.dtype = 3 if v.dtype == np.int32 else 1
            for d in v.shape:
                a.tensor.tensor_shape.dim.add(size=d)
            a.tensor.tensor_content = v.tobytes()
        node(name, "Const", value=fill)

    def ints(*v):
        return lambda a: a.list.i.extend(v)

    def text(s):
        return lambda a: setattr(a, "s", s.encode())

    def shape(a):
        for d in (1, H, W, 3):
            a.shape.dim.add(size=d)

    node("input", "Placeholder", shape=shape)
    for k in ("w1", "b1", "w2", "b2", "w3", "b3"):
        const(k, w[k])
    node("c1", "Conv2D", ["input", "w1"], strides=ints(1, 1, 1, 1), padding=text("SAME"), data_format=text("NHWC"))
    node("c1b", "BiasAdd", ["c1", "b1"])
    node("r1", "Relu6", ["c1b"])
    node("c2", "Conv2D", ["r1", "w2"], strides=ints(1, 1, 1, 1), padding=text("VALID"), data_format=text("NHWC"))
    node("c2b", "BiasAdd", ["c2", "b2"])
    node("r2", "Relu6", ["c2b"])
    const("axes", np.array([1, 2], np.int32))
    node("mean", "Mean", ["r2", "axes"])
    node("mm", "MatMul", ["mean", "w3"])
    node("output", "BiasAdd", ["mm", "b3"])
    return g.SerializeToString()


def _onnx_model(w) -> bytes:
    inits = [numpy_helper.from_array(w["w1"].transpose(3, 2, 0, 1).copy(), "w1"),
             numpy_helper.from_array(w["b1"], "b1"),
             numpy_helper.from_array(w["w2"].transpose(3, 2, 0, 1).copy(), "w2"),
             numpy_helper.from_array(w["b2"], "b2"), numpy_helper.from_array(w["w3"], "w3"),
             numpy_helper.from_array(w["b3"], "b3"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["output"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _yaml(root: Path, platform: str, data: bytes, nhwc: bool) -> Path:
    model = root / f"net.{'pb' if platform == 'tensorflow' else 'onnx'}"
    model.write_bytes(data)
    shape = f"1,{H},{W},3" if nhwc else f"1,3,{H},{W}"
    yml = root / "net.yml"
    yml.write_text(
        "library_name: parity\ntarget_abis: [host]\nmodels:\n  net:\n"
        f"    platform: {platform}\n    model_file_path: {model}\n"
        f"    model_sha256_checksum: {hashlib.sha256(data).hexdigest()}\n    runtime: cpu\n"
        f"    quantize_schema: int8\n    subgraphs:\n      - input_tensors: input\n        input_shapes: {shape}\n"
        f"        input_data_formats: {'NHWC' if nhwc else 'NCHW'}\n        input_ranges: -1,1\n"
        "        output_tensors: output\n        output_shapes: 1,5\n        output_data_formats: NONE\n")
    return yml


def _int8_outputs(root: Path, platform: str, data: bytes, x_nchw: np.ndarray, calib_nchw: np.ndarray):
    nhwc = platform == "tensorflow"
    root.mkdir()
    calib = root / "calib"
    calib.mkdir()
    for i, x in enumerate(calib_nchw):
        (x.transpose(1, 2, 0) if nhwc else x)[None].astype(np.float32).tofile(calib / f"{input_name_format('input')}_{i:03d}")
    res = quantize_one_shot(_yaml(root, platform, data, nhwc), input_dir=calib, build_dir=root / "build",
                            recipe=PTQRecipe(schema="int8"), num_threads=1)
    g = res.convert.graph
    sess = Session(g, backend="reference")
    y = np.concatenate([sess.run({"input": x_nchw[i:i + 1]})["output"] for i in range(len(x_nchw))])
    return g, y


def test_tensorflow_and_onnx_spellings_give_the_same_int8_model(tmp_path):
    w = _weights()
    rng = np.random.default_rng(3)
    calib = rng.uniform(-1, 1, (12, 3, H, W)).astype(np.float32)
    x = rng.uniform(-1, 1, (6, 3, H, W)).astype(np.float32)  # disjoint from the calibration samples
    g_tf, y_tf = _int8_outputs(tmp_path / "tf", "tensorflow", _tf_graph(w), x, calib)
    g_onnx, y_onnx = _int8_outputs(tmp_path / "onnx", "onnx", _onnx_model(w), x, calib)
    assert g_tf.op_counts() == g_onnx.op_counts()
    assert g_tf.metadata["quantization"]["equalized_tensors"] == g_onnx.metadata["quantization"]["equalized_tensors"] > 0
    np.testing.assert_array_equal(y_tf, y_onnx)


def _mean_graph(axes: list[int], keepdims: int, fixed: bool = False) -> Graph:
    g = Graph(name="m")
    g.add_tensor(Tensor("x", "float32", (2, 3, 4, 5)))
    g.add_tensor(Tensor("axes", "int64", (len(axes),), np.array(axes, np.int64)))
    out_shape = tuple(1 if i in {a % 4 for a in axes} else d for i, d in enumerate((2, 3, 4, 5)) if keepdims or i not in {a % 4 for a in axes})
    g.add_tensor(Tensor("y", "float32", out_shape))
    g.nodes.append(Node("mean", "ReduceMean", ["x", "axes"], ["y"], {"keepdims": keepdims}))
    g.inputs, g.outputs = ["x"], ["y"]
    if fixed:
        g.fixed_params = {"y": QuantParams(np.array(0.1, np.float32), np.array(0, np.int32), "uint8")}
    return g


def _run(g: Graph, x: np.ndarray) -> np.ndarray:
    return Session(g, backend="reference").run({"x": x})["y"]


def test_spatial_mean_becomes_global_average_pool_with_the_same_values():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    for axes, keep, ops in (([2, 3], 1, {"GlobalAveragePool": 1}), ([-1, -2], 0, {"GlobalAveragePool": 1, "Flatten": 1})):
        g = _mean_graph(axes, keep)
        before = _run(g, x)
        opt = optimize(g)
        assert opt.op_counts() == ops and opt.metadata["passes"]["pools"] == 1
        after = _run(opt, x)
        assert after.shape == before.shape
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)


def test_other_means_are_left_alone():
    for axes, fixed in (([1, 2, 3], False), ([2], False), ([2, 3], True)):
        g = _mean_graph(axes, 1, fixed)
        assert spatial_means_to_global_pool(g) == 0 and g.op_counts() == {"ReduceMean": 1}
