"""ONNX Runtime's u8 x s8 kernels saturate on x86 CPUs without VNNI; qmace hands int8 weights to ORT as
uint8 + 128 there (qmace.runtime.session). These tests check the probe against a direct measurement and
that the rewrite keeps every integer product exact, on whatever CPU runs them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace.runtime.session import _raw_ort_session, int8_weights_as_uint8, ort_session, ort_u8s8_exact


def _model(nodes, inputs, outputs, inits):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _matmul_integer(a: np.ndarray, b: np.ndarray, b_zp: int | None) -> onnx.ModelProto:
    ins = ["a", "b"] + (["", "bz"] if b_zp is not None else [])
    inits = [numpy_helper.from_array(b, "b")]
    if b_zp is not None:
        inits.append(numpy_helper.from_array(np.array(b_zp, np.int8), "bz"))
    return _model([helper.make_node("MatMulInteger", ins, ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)


def test_probe_agrees_with_a_direct_measurement():
    """Full-range random u8 x s8 through plain ORT: exact iff the probe says so (fails if the probe lies)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 256)).astype(np.uint8)
    b = rng.integers(-127, 128, (256, 48)).astype(np.int8)
    got = _raw_ort_session(_matmul_integer(a, b, None).SerializeToString()).run(["y"], {"a": a})[0]
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert bool(np.array_equal(got, exact)) == ort_u8s8_exact()


@pytest.mark.parametrize("b_zp", [None, -3])
def test_rewrite_is_exact_for_matmul_integer(b_zp):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (16, 200)).astype(np.uint8)
    b = rng.choice(np.array([-128, -127, 127], np.int8), (200, 24))  # products that saturate int16 pairs
    model = _matmul_integer(a, b, b_zp)
    got = ort_session(model.SerializeToString()).run(["y"], {"a": a})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ (b.astype(np.int64) - (b_zp or 0)))
    assert int8_weights_as_uint8(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    node = model.graph.node[0]
    assert types[node.input[1]] == TensorProto.UINT8 and types[node.input[3]] == TensorProto.UINT8


def test_rewrite_keeps_qdq_conv_exact_and_folds_weight_quantize():
    """u8 activations x per-channel int8 weights, written both as an int8 initializer and as PyTorch's
    QuantizeLinear(float weight): ORT (fused to QLinearConv) equals the float evaluation of the same QDQ
    graph with optimizations off, which has no integer kernel to saturate."""
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    w_codes = rng.choice(np.array([-127, -100, 100, 127], np.int8), (8, 16, 3, 3))
    w_scale = rng.uniform(0.01, 0.02, 8).astype(np.float32)
    inits = [numpy_helper.from_array(w_codes, "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
             numpy_helper.from_array((w_codes * w_scale[:, None, None, None]).astype(np.float32), "wf"),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.5, np.float32), "ys"), numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["wf", "ws", "wz"], ["wq2"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["wq2", "ws", "wz"], ["w2"], axis=0),
             helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    for i, w in enumerate(["w", "w2"]):
        nodes += [helper.make_node("Conv", ["xd", w], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("QuantizeLinear", [f"c{i}", "ys", "yz"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", "ys", "yz"], [f"y{i}"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 9])],
                   [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)], inits)
    x = rng.uniform(3.0, 5.1, (1, 16, 9, 9)).astype(np.float32)  # codes near 255: large products
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort_session(model.SerializeToString()).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert 0.1 < np.mean((want[0] > -64) & (want[0] < 63.5))  # not all saturated at the output


def _qdq_add(qa, qb, qc, shape, shape_b=None, op: str = "Add") -> onnx.ModelProto:
    """DQ(a), DQ(b) -> ``op`` -> Q: ONNX Runtime fuses it into QLinearAdd (QLinearMul for ``Mul``); ``b`` has
    ``shape_b`` (default ``shape``)."""
    inits = []
    for n, qp in (("a", qa), ("b", qb), ("c", qc)):
        inits += [numpy_helper.from_array(np.array(qp.scale, np.float32), f"{n}s"),
                  numpy_helper.from_array(np.array(qp.zero_point, np.uint8), f"{n}z")]
    nodes = [helper.make_node("DequantizeLinear", ["a", "as", "az"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"]),
             helper.make_node(op, ["af", "bf"], ["cf"]),
             helper.make_node("QuantizeLinear", ["cf", "cs", "cz"], ["c"])]
    shapes = {"a": shape, "b": shape if shape_b is None else shape_b}
    return _model(nodes, [helper.make_tensor_value_info(n, TensorProto.UINT8, list(shapes[n])) for n in "ab"],
                  [helper.make_tensor_value_info("c", TensorProto.UINT8, None)], inits)


# The scales of MobileNetV2's /features/features.10/Add (int8 recipe of benchmarks/bench_host_int8.py), where
# the onnxruntime backend first departs from the reference on the photos, then 20 random scale triples.
_ADD_SCALES = [((0.021084647625684738, 132), (0.02066449075937271, 142), (0.027230985462665558, 138))] + [
    tuple((float(s), int(z)) for s, z in zip(np.random.default_rng(i).uniform(0.005, 0.05, 3),
                                              np.random.default_rng(i + 100).integers(0, 256, 3)))
    for i in range(20)]


def _mlas_avx2_fma() -> bool:
    """ONNX Runtime's x86-64 QLinearAdd kernel is the AVX2/FMA one (the arithmetic qmace.ops.qlinear_add states)."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    info = Path("/proc/cpuinfo")
    flags = info.read_text().split() if info.is_file() else []
    return "avx2" in flags and "fma" in flags


@pytest.mark.parametrize("scales", _ADD_SCALES)
def test_fused_qlinear_add_equals_reference(scales):
    """ONNX Runtime's QLinearAdd on x86-64 (MLAS's AVX2/FMA kernel) computes ``fma(a, r_a, fma(b, r_b, f))`` in
    float32, not ``quantize(dequantize(a) + dequantize(b))``; the reference computes the same
    (``qmace.ops.qlinear_add``): every one of the 65536 code pairs is identical (the float definition differed by
    one step on 1 pair of 65536 for 3 of these 21 triples, e.g. MobileNetV2's features.10 Add, which changed
    the logits of 11 of its 233 evaluation photos between the backends). Elsewhere (NEON fixed point, portable
    C++) at most 1 step on at most 0.01% of pairs."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    qa, qb, qc = (QuantParams(np.float32(s), np.int32(z), "uint8") for s, z in scales)
    a, b = (m.astype(np.uint8).reshape(1, 256, 256) for m in np.meshgrid(np.arange(256), np.arange(256)))
    ref = get_op("Add").run_quantized(Node("add", "Add", ["a", "b"], ["c"]), [a, b], [qa, qb], [qc])[0]
    got = _raw_ort_session(_qdq_add(qa, qb, qc, a.shape).SerializeToString(), 1).run(["c"], {"a": a, "b": b})[0]
    steps = np.abs(ref.astype(np.int32) - got.astype(np.int32))
    if _mlas_avx2_fma():
        assert steps.max() == 0, int(np.count_nonzero(steps))
    assert steps.max() <= 1
    assert np.mean(steps > 0) <= 1e-4


@pytest.mark.parametrize("sa, sb", [((2, 8, 5, 7), (2, 8, 5, 7)), ((2, 8, 5, 7), ()), ((), (2, 8, 5, 7)),
                                    ((2, 8, 5, 7), (1, 8, 1, 1)), ((1, 8, 1, 1), (2, 8, 5, 7)),
                                    ((2, 8, 5, 7), (1, 1, 5, 7)), ((2, 8, 5, 7), (8, 5, 1))])
def test_broadcast_qlinear_add_equals_reference(sa, sb):
    """Every broadcast form ORT's QLinearAdd loops over (both full, a scalar or per-channel operand on either
    side, an operand broadcast over the outer axes), 40 random scale triples: identical codes on AVX2/FMA hosts."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    rng = np.random.default_rng(17)
    worst = 0
    for _ in range(40):
        s, z = rng.uniform(0.003, 0.2, 3), rng.integers(0, 256, 3)
        qa, qb, qc = (QuantParams(np.float32(s[i]), np.int32(z[i]), "uint8") for i in range(3))
        a, b = rng.integers(0, 256, sa).astype(np.uint8), rng.integers(0, 256, sb).astype(np.uint8)
        ref = get_op("Add").run_quantized(Node("add", "Add", ["a", "b"], ["c"]), [a, b], [qa, qb], [qc])[0]
        got = _raw_ort_session(_qdq_add(qa, qb, qc, sa, sb).SerializeToString(), 1).run(["c"], {"a": a, "b": b})[0]
        assert got.shape == ref.shape
        worst = max(worst, int(np.abs(ref.astype(np.int32) - got.astype(np.int32)).max()))
    assert worst == 0 if _mlas_avx2_fma() else worst <= 1


def test_seven_bit_weights_stay_int8_and_are_exact_on_the_fast_kernels():
    """Weights of ``quantize_schema: int8_w7`` (codes in [-63, 63]; AdaRound may reach 64) are left int8 by
    the rewrite, and plain ORT's u8 x s8 kernels multiply them exactly on every CPU (255 * 64 * 2 < 2^15),
    with activations at the extreme codes."""
    from qmace.qmath import quantize, weight_params

    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 40)).astype(np.float32)
    qp = weight_params(w, 1, "int8_w7")
    b = quantize(w, qp)
    assert np.abs(b.astype(np.int32)).max(axis=0).tolist() == [63] * 40
    b = b.copy()
    b[:2, :] = 64  # the bound itself
    a = rng.choice(np.array([0, 255], np.uint8), (16, 256))
    model = _matmul_integer(a, b, None)
    got = _raw_ort_session(model.SerializeToString()).run(["y"], {"a": a})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))
    assert not int8_weights_as_uint8(model)
    assert model.graph.initializer[0].data_type == TensorProto.INT8


def _qdq_pool(op: str, shape, qx, qy, **attrs) -> onnx.ModelProto:
    """DQ(x) -> op -> Q: ONNX Runtime fuses it into QLinear(Global)AveragePool."""
    inits = [numpy_helper.from_array(np.array(qx.scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(qx.zero_point, np.uint8), "xz"),
             numpy_helper.from_array(np.array(qy.scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(qy.zero_point, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node(op, ["xf"], ["yf"], **attrs),
             helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "AveragePool"])
def test_global_mean_on_codes_is_onnx_runtimes_arithmetic(op):
    """uint8 GlobalAveragePool, and AveragePool whose window covers the whole unpadded input (squeeze-excite
    blocks: ONNX Runtime runs it as QLinearGlobalAveragePool): the reference computes ORT's integer sum and
    float32 multiplier, so every code is identical, exact ties included (before: the mean of dequantized floats
    broke ties its own way, one step on a few channels of the selfie segmentation's SE pools, which its SE
    blocks grew into 180 steps of the output map). Smaller windows keep the float definition."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    rng = np.random.default_rng(3)
    for trial, spatial in enumerate([(16, 16), (8, 8), (32, 32), (1, 1), (5, 3), (64, 64), (16, 16), (8, 8)]):
        qx = QuantParams(np.float32(rng.uniform(0.005, 0.2)), np.int32(rng.integers(0, 80)), "uint8")
        # the model's case: the output shares the input's parameters (RangeRule.INPUT); else other ones
        qy = qx if trial % 2 == 0 else QuantParams(np.float32(float(qx.scale) * rng.uniform(0.2, 1.5)),
                                                   np.int32(rng.integers(0, 80)), "uint8")
        shape = (2, 24, *spatial)
        x = rng.integers(0, 250, shape).astype(np.uint8)
        n = int(np.prod(spatial))
        if n % 2 == 0:  # half the channels' means exactly halfway between two codes: the ties ORT rounds to even
            flat = x.reshape(2, 24, n)
            off = (n // 2 - (flat[:, :12].astype(np.int64).sum(-1) - int(qx.zero_point) * n)) % n
            for i, j in zip(*np.nonzero(off)):
                need = int(off[i, j])
                for k in range(n):  # add the remainder spread over elements below 250
                    add = min(need, 255 - int(flat[i, j, k]))
                    flat[i, j, k] += add
                    need -= add
                    if not need:
                        break
        attrs = {"kernel_shape": list(spatial)} if op == "AveragePool" else {}
        node = Node("pool", op, ["x"], ["y"], attrs)
        ref = get_op(op).run_quantized(node, [x], [qx], [qy])[0]
        got = _raw_ort_session(_qdq_pool(op, shape, qx, qy, **attrs).SerializeToString(), 1).run(["y"], {"x": x})[0]
        np.testing.assert_array_equal(ref, got, err_msg=f"{op} {spatial}")


def _qdq_resize(shape, sizes, qx, qy, ctm: str) -> onnx.ModelProto:
    """DQ(x) -> Resize(linear) -> Q: ONNX Runtime runs the Resize in float32 between them."""
    inits = [numpy_helper.from_array(np.array(qx.scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(qx.zero_point, np.uint8), "xz"),
             numpy_helper.from_array(np.array(qy.scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(qy.zero_point, np.uint8), "yz"),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([], np.float32), "scales"),
             numpy_helper.from_array(np.array(sizes, np.int64), "sizes")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("Resize", ["xf", "roi", "scales", "sizes"], ["yf"], mode="linear",
                              coordinate_transformation_mode=ctm),
             helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)


@pytest.mark.parametrize("shape, out_hw, ctm", [((1, 16, 16, 16), (32, 32), "half_pixel"),
                                                ((2, 8, 15, 9), (31, 20), "half_pixel"),
                                                ((1, 4, 10, 10), (25, 17), "align_corners"),
                                                ((1, 4, 12, 12), (6, 5), "asymmetric")])
def test_bilinear_resize_on_codes_is_onnx_runtimes_arithmetic(shape, out_hw, ctm):
    """Linear Resize of the two spatial axes on uint8 codes: the reference sums the four taps with product weights
    in ORT's order (``qmace.ops.resize._bilinear``), so every code is identical; the separable form differed by
    one step on ~1% of codes (186 of 16384 for the first case), which the selfie segmentation model's decoder grew
    into up to 180 steps of its map between the onnxruntime backend and the reference."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    rng = np.random.default_rng(11)
    sizes = [*shape[:2], *out_hw]
    for qx, qy in [(QuantParams(np.float32(0.03), np.int32(20), "uint8"),) * 2,
                   (QuantParams(np.float32(0.03), np.int32(20), "uint8"),
                    QuantParams(np.float32(0.025), np.int32(30), "uint8"))]:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        node = Node("rs", "Resize", ["x", "roi", "scales", "sizes"], ["y"],
                    {"mode": "linear", "coordinate_transformation_mode": ctm})
        empty = np.array([], np.float32)
        ref = get_op("Resize").run_quantized(node, [x, empty, empty, np.array(sizes, np.int64)],
                                             [qx, None, None, None], [qy])[0]
        got = _raw_ort_session(_qdq_resize(shape, sizes, qx, qy, ctm).SerializeToString(), 1).run(["y"], {"x": x})[0]
        np.testing.assert_array_equal(ref, got)


@pytest.mark.parametrize("sa, sb", [((1, 256, 256), (1, 256, 256)), ((2, 8, 5, 7), (1, 8, 1, 1)),
                                    ((2, 8, 5, 7), ()), ((1, 8, 1, 1), (2, 8, 5, 7))])
def test_qlinear_mul_equals_reference(sa, sb):
    """uint8 Mul is QLinearMul's arithmetic (``qmace.ops.qlinear.qlinear_mul``): the integer product times one
    float32 ratio, the output zero point added before rounding. PP-OCRv4 det's squeeze-excite Mul puts
    (148 - 128) * 199 on exactly 26.5 steps + 87: ORT gives 114, rounding 26.5 first would give 113. Every code
    pair (first case) or 40 random scale triples of every broadcast form: identical codes on AVX2/FMA hosts."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    def both(qa, qb, qc, a, b):
        ref = get_op("Mul").run_quantized(Node("mul", "Mul", ["a", "b"], ["c"]), [a, b], [qa, qb], [qc])[0]
        got = _raw_ort_session(_qdq_add(qa, qb, qc, a.shape, b.shape, "Mul").SerializeToString(), 1).run(
            ["c"], {"a": a, "b": b})[0]
        return ref.astype(np.int32), got.astype(np.int32)

    rng = np.random.default_rng(23)
    worst = 0
    for _ in range(40):
        s, z = rng.uniform(0.003, 0.2, 3), rng.integers(0, 256, 3)
        qa, qb, qc = (QuantParams(np.float32(s[i]), np.int32(z[i]), "uint8") for i in range(3))
        if sa == (1, 256, 256):
            a, b = (m.astype(np.uint8).reshape(sa) for m in np.meshgrid(np.arange(256), np.arange(256)))
        else:
            a, b = rng.integers(0, 256, sa).astype(np.uint8), rng.integers(0, 256, sb).astype(np.uint8)
        ref, got = both(qa, qb, qc, a, b)
        worst = max(worst, int(np.abs(ref - got).max()))
    tie = both(QuantParams(np.float32(7.7162223), np.int32(128), "uint8"),
               QuantParams(np.float32(1 / 255), np.int32(0), "uint8"),
               QuantParams(np.float32(4.5446644), np.int32(87), "uint8"),
               np.full((1, 1, 2, 2), 148, np.uint8), np.full((1, 1, 1, 1), 199, np.uint8))
    if _mlas_avx2_fma():
        assert worst == 0 and tie[0].ravel().tolist() == tie[1].ravel().tolist() == [114] * 4
    assert worst <= 1


@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                                   {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
                                   {"kernel_shape": [2, 2], "strides": [2, 2]}, {"kernel_shape": [5, 5]}])
def test_windowed_average_pool_on_codes_is_onnx_runtimes_arithmetic(attrs):
    """A uint8 AveragePool with a smaller window is QLinearAveragePool: the float32 mean of the dequantized taps,
    then ``rint(y / s_y + z_y)``. Quantizing with the zero point added after rounding differed on up to 3.5% of
    codes (2x2, stride 2: 548 of 15680 over these 20 cases); now every code is identical."""
    from qmace.ir import Node
    from qmace.ops import get_op
    from qmace.qmath import QuantParams

    rng = np.random.default_rng(5)
    for trial in range(20):
        qx = QuantParams(np.float32(rng.uniform(0.01, 0.1)), np.int32(rng.integers(0, 60)), "uint8")
        qy = qx if trial % 2 == 0 else QuantParams(np.float32(float(qx.scale) * rng.uniform(0.5, 1.2)),
                                                   np.int32(rng.integers(0, 60)), "uint8")
        x = rng.integers(0, 256, (1, 16, 14, 14)).astype(np.uint8)
        ref = get_op("AveragePool").run_quantized(Node("pool", "AveragePool", ["x"], ["y"], attrs), [x], [qx], [qy])[0]
        got = _raw_ort_session(_qdq_pool("AveragePool", x.shape, qx, qy, **attrs).SerializeToString(), 1).run(
            ["y"], {"x": x})[0]
        np.testing.assert_array_equal(ref, got)
