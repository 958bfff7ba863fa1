"""QDQ import keeps the source model's numerics: ONNX Runtime's ``quantize_static`` (QDQ format, not
pre-processed) writes a float op between its own Q/DQ pairs, e.g. a BatchNormalization after a convolution.
qmace must not fold such an op into its producer (that would skip a rounding the source model does and
re-derive the weight parameters); it keeps it as a float op with those parameters around it. Checked
against ORT running the same QDQ file (with exact int8 kernels on every CPU: qmace.runtime.session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from qmace.api import convert
from qmace.runtime import Session
from qmace.runtime.session import ort_session
from tests.test_qdq_import import _Reader, _yaml

SHAPE = (1, 3, 16, 16)


def _mobile_block_model(path: Path) -> None:
    """Conv -> BatchNormalization (unfolded) -> HardSwish -> depthwise Conv -> BN -> Relu -> squeeze-excite
    (GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Resize (nearest, x2) -> Conv."""
    rng = np.random.default_rng(0)
    inits = []

    def init(name, shape, scale=0.3, offset=0.0):
        inits.append(numpy_helper.from_array((rng.normal(0, scale, shape) + offset).astype(np.float32), name))
        return name

    def bn(x, c, out, tag):
        return helper.make_node("BatchNormalization", [x, init(f"{tag}_g", (c,), 0.2, 1.0), init(f"{tag}_b", (c,), 0.2),
                                                       init(f"{tag}_m", (c,), 0.2), init(f"{tag}_v", (c,), 0.1, 1.0)],
                                [out], name=tag)

    nodes = [helper.make_node("Conv", ["input", init("w1", (8, 3, 3, 3))], ["c1"], pads=[1] * 4, name="conv1"),
             bn("c1", 8, "b1", "bn1"),
             helper.make_node("HardSwish", ["b1"], ["h1"], name="hswish"),
             helper.make_node("Conv", ["h1", init("w2", (8, 1, 3, 3))], ["c2"], pads=[1] * 4, group=8, name="dw"),
             bn("c2", 8, "b2", "bn2"),
             helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["se_p"], name="se_pool"),
             helper.make_node("Conv", ["se_p", init("w3", (4, 8, 1, 1)), init("b3", (4,), 0.1)], ["se_c1"], name="se_fc1"),
             helper.make_node("Relu", ["se_c1"], ["se_r"], name="se_relu"),
             helper.make_node("Conv", ["se_r", init("w4", (8, 4, 1, 1)), init("b4", (8,), 0.1)], ["se_c2"], name="se_fc2"),
             helper.make_node("HardSigmoid", ["se_c2"], ["se_s"], alpha=1 / 6, beta=0.5, name="se_hsig"),
             helper.make_node("Mul", ["r2", "se_s"], ["se_out"], name="se_mul"),
             helper.make_node("Resize", ["se_out", "", "up_scales"], ["up"], mode="nearest", name="resize"),
             helper.make_node("Conv", ["up", init("w5", (4, 8, 1, 1)), init("b5", (4,), 0.1)], ["output"], name="head")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales")
    g = helper.make_graph(nodes, "mobile", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 32, 32])], inits + [scales])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ort_qdq_model_with_unfolded_bn_hardswish_se_resize(tmp_path, per_channel):
    fpath, qpath = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    _mobile_block_model(fpath)
    quantize_static(str(fpath), str(qpath), _Reader(SHAPE, seed=1), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    types = [n.op_type for n in onnx.load(qpath).graph.node]
    assert "BatchNormalization" in types  # ORT kept the BNs between Q/DQ pairs: the case under test
    graph = convert(_yaml(tmp_path, qpath, input_shape="1,3,16,16", output_shape="1,4,32,32"), build_dir=tmp_path / "build").graph
    oracle = ort_session(qpath.read_bytes())
    out_q = graph.tensors["output"].quant or graph.tensors["output__quant"].quant
    step = float(out_q.scale)
    rng = np.random.default_rng(5)  # evaluation inputs: not the calibration ones
    for backend in ("reference", "onnxruntime"):
        sess = Session(graph, backend)
        worst, share = 0.0, []
        for _ in range(4):
            x = rng.uniform(-1, 1, SHAPE).astype(np.float32)
            want = oracle.run(["output"], {"input": x})[0]
            got = sess.run({"input": x})["output"]
            steps = np.abs(got.astype(np.float64) - want) / step
            worst = max(worst, float(steps.max()))
            share.append(float(np.mean(steps > 0.5)))
        # float ops between Q/DQ run float32 kernels like ORT: at most 1 step on <= 1% (measured: 0 steps)
        assert worst <= 1.0 + 1e-3 and max(share) <= 0.01, (backend, worst, max(share))
