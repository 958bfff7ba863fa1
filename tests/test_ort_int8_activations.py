"""int8 activations (imported int8 .tflite / QDQ models) on ONNX Runtime's exact path.

On CPUs without VNNI qmace hands int8 weights to ORT as uint8 + 128 (``int8_weights_as_uint8``). ORT's QDQ
fusion then left some int8-activation x uint8-weight convolutions as float convolutions between
DequantizeLinear and QuantizeLinear (15 of MobileNetV2's 52 from TensorFlow's int8 .tflite, and the residual
Adds as float Adds): float32 sums, codes one step off near ties, compounding to 54% of the logits off LiteRT's.
``int8_activations_as_uint8`` shifts the activations too; ORT then fuses u8 x u8 QLinearConv, whose codes are
exact. These tests apply both rewrites directly, so they check the same thing on any CPU (the real .tflite
fixture is checked in tests/test_tflite.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qmace.qmath import QuantParams, quantize, requant_multiplier, requantize
from qmace.runtime.session import _raw_ort_session, int8_activations_as_uint8, int8_weights_as_uint8

C_IN, C_OUT, HW = 64, 8, 5
SX, ZX, SY, ZY = np.float32(0.02), -128, np.float32(0.37), 5


def _model(extra_codes: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.choice(np.array([-127, -120, 0, 119, 127], np.int8), (C_OUT, C_IN, 1, 1))  # saturating pairs
    sw = rng.uniform(0.001, 0.01, C_OUT).astype(np.float32)
    bias = rng.integers(-2000, 2000, C_OUT).astype(np.int32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(C_OUT, np.int8), "zw"),
             numpy_helper.from_array(bias, "b"), numpy_helper.from_array((SX * sw).astype(np.float32), "sb"),
             numpy_helper.from_array(np.zeros(C_OUT, np.int32), "zb"),
             numpy_helper.from_array(np.array(SX, np.float32), "sx"),
             numpy_helper.from_array(np.array(ZX, np.int8), "zx"),
             numpy_helper.from_array(np.array(SY, np.float32), "sy"),
             numpy_helper.from_array(np.array(ZY, np.int8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wdq"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bdq"], axis=0),
             helper.make_node("Conv", ["xdq", "wdq", "bdq"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_codes:
        outputs.append(helper.make_tensor_value_info("xq", TensorProto.INT8, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, HW, HW])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w, sw, bias


def _expected(x, w, sw, bias):
    """The exact integer result: codes of x, int64 accumulation, qmace's (= ORT's) requantization."""
    qx = quantize(x, QuantParams(SX, np.int32(ZX), "int8"))
    acc = np.einsum("nchw,oc->nohw", qx.astype(np.int64) - ZX, w[:, :, 0, 0].astype(np.int64)) + bias[None, :, None, None]
    y_qp = QuantParams(SY, np.int32(ZY), "int8")
    mult = requant_multiplier(QuantParams(SX, np.int32(ZX), "int8"), QuantParams(sw, np.zeros(C_OUT, np.int32), "int8", 0), y_qp)
    codes = requantize(acc, mult, y_qp, 1)
    return qx, (codes.astype(np.float32) - ZY) * SY


def _fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


def test_int8_activations_fuse_into_exact_u8_kernels(tmp_path):
    model, w, sw, bias = _model(extra_codes=False)
    assert int8_weights_as_uint8(model)
    assert int8_activations_as_uint8(model)
    assert "QLinearConv" in _fused_ops(model, tmp_path)
    x = np.random.default_rng(1).uniform(-2.6, 2.6, (1, C_IN, HW, HW)).astype(np.float32)
    got = _raw_ort_session(model.SerializeToString(), 1).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, _expected(x, w, sw, bias)[1])


def test_int8_codes_asked_for_as_outputs_stay_int8(tmp_path):
    model, w, sw, bias = _model(extra_codes=True)
    int8_weights_as_uint8(model)
    assert int8_activations_as_uint8(model)
    x = np.random.default_rng(2).uniform(-2.6, 2.6, (1, C_IN, HW, HW)).astype(np.float32)
    y, xq = _raw_ort_session(model.SerializeToString(), 1).run(["y", "xq"], {"x": x})
    qx, y_ref = _expected(x, w, sw, bias)
    assert xq.dtype == np.int8 and qx.min() == -128  # the input saturates: the full code range is covered
    np.testing.assert_array_equal(xq, qx)
    np.testing.assert_array_equal(y, y_ref)


def test_codes_read_by_other_ops_leave_the_model_alone():
    model, *_ = _model(extra_codes=False)
    model.graph.node.append(helper.make_node("Cast", ["xq"], ["xq32"], to=TensorProto.INT32))
    model.graph.output.append(helper.make_tensor_value_info("xq32", TensorProto.INT32, None))
    before = model.SerializeToString()
    assert not int8_activations_as_uint8(model)
    assert model.SerializeToString() == before


def test_zero_point_shared_with_a_weight_is_shifted_once():
    """Imported QDQ models may use one zero-point constant for weights and activations alike: both rewrites
    give it the same uint8 twin, once."""
    model, *_ = _model(extra_codes=False)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array(0.005, np.float32), "sw0"))
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == "w":  # per-tensor, zero point shared with y
            node.input[1], node.input[2] = "sw0", "zy"
            del node.attribute[:]
    assert int8_weights_as_uint8(model) and int8_activations_as_uint8(model)
    names = [t.name for t in g.initializer]
    assert len(names) == len(set(names)) and "zy__u8" in names
    x = np.random.default_rng(4).uniform(-2.6, 2.6, (1, C_IN, HW, HW)).astype(np.float32)
    assert np.isfinite(_raw_ort_session(model.SerializeToString(), 1).run(["y"], {"x": x})[0]).all()
