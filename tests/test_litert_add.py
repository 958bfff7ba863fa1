"""LiteRT's integer ADD / SUB (``qm_arith="litert"``, qmace/ops/litert_add.py): the numpy kernel against the
arithmetic computed by hand and against the LiteRT interpreter on every code pair, the exact int64 ONNX
lowering against the kernel, and the variant travelling from a ``.tflite`` through the model file and the
ONNX export. Tiny models are written in the test with the ``tflite`` package's flatbuffer builders."""

from __future__ import annotations

import math

import flatbuffers
import numpy as np
import onnxruntime as ort
import pytest
import tflite

from qmace.frontends.tflite import load_tflite
from qmace.ir import Graph, Node, Tensor
from qmace.modelfile import load_graph, save_graph
from qmace.onnx_bridge import to_onnx
from qmace.ops.litert_add import LITERT, litert_add, tflite_params, uses_xnnpack, xnnpack_params
from qmace.qmath import QuantParams, dequantize
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.runtime import Session
from qmace.runtime.session import int8_activations_as_uint8
from tests.tflite_util import fb_ints, finish_model

# (scale, zero point) of A, B and the output; the last two have a ratio below 2^-10 (TFLite's builtin kernel)
TRIPLES = {
    "int8": [((0.0920, 12), (0.0646, 18), (0.0589, 9)), ((0.0370, -1), (0.0125, -4), (0.0212, -20)),
             ((0.5, 0), (0.5, 0), (1.0, 0)), ((0.0004, 3), (0.5, -7), (1.0, 1))],
    "uint8": [((0.0921, 140), (0.0646, 18), (0.0589, 137)), ((2.0 ** -12, 128), (1.0, 128), (2.0, 128))],
}
CASES = [(op, dtype, t) for dtype, ts in TRIPLES.items() for t in ts for op in ("ADD", "SUB")]


def _params(triple, dtype: str) -> list[QuantParams]:
    return [QuantParams(np.float32(s), np.int32(z), dtype) for s, z in triple]


def _all_pairs(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    info = np.iinfo(dtype)
    a, b = np.meshgrid(np.arange(info.min, info.max + 1), np.arange(info.min, info.max + 1), indexing="ij")
    return a.reshape(1, -1).astype(dtype), b.reshape(1, -1).astype(dtype)


# ---- the arithmetic, computed by hand ----------------------------------------------------------------------

def _hand_xnnpack(ca: int, cb: int, s: list[float], sub: bool) -> int:
    """XNNPACK's qs8/qu8 add, one element, Python integers (xnn_init_qs8_add_minmax_scalar_params)."""
    r = [float(np.float32(np.float32(x) / np.float32(s[2]))) for x in s[:2]]
    shift = 20 - (math.frexp(max(r))[1] - 1)
    m = [round(x * 2 ** shift) for x in r]  # Python's round: half to even, as lrintf
    acc = ca * m[0] + cb * (-m[1] if sub else m[1]) + 2 ** (shift - 1)
    return acc >> shift  # arithmetic shift: floor


def _hand_tflite(ca: int, cb: int, s: list[float], sub: bool) -> int:
    """TFLite's builtin 8-bit ADD, one element, Python integers (add.cc Prepare, AddFunc, gemmlowp)."""
    def qmul(m):
        q, e = math.frexp(m)
        fixed = math.floor(q * 2 ** 31 + 0.5)
        return (fixed // 2, e + 1) if fixed == 2 ** 31 else (fixed, e)

    def srdhm(x, mult):
        p = x * mult
        p += 2 ** 30 if p >= 0 else 1 - 2 ** 30
        return abs(p) // 2 ** 31 * (1 if p >= 0 else -1)  # truncation toward zero

    def rdbpot(x, k):
        return x if k <= 0 else (abs(x) + 2 ** (k - 1)) // 2 ** k * (1 if x >= 0 else -1)

    twice = 2 * max(s[0], s[1])
    (ma, ea), (mb, eb), (my, ey) = qmul(s[0] / twice), qmul(s[1] / twice), qmul(twice / (2 ** 20 * s[2]))
    va, vb = rdbpot(srdhm(ca * 2 ** 20, ma), -ea), rdbpot(srdhm(cb * 2 ** 20, mb), -eb)
    return rdbpot(srdhm(va - vb if sub else va + vb, my), -ey)


@pytest.mark.parametrize("op, dtype, triple", CASES)
def test_kernel_equals_hand_computed_arithmetic(op, dtype, triple):
    """Both branches against a one-element Python-integer transcription of the sources, on 3000 random code
    pairs plus every pair whose centred codes lie in [-3, 3] (the negative and positive ties)."""
    pa, pb, py = _params(triple, dtype)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    a = rng.integers(info.min, info.max + 1, 3000)
    b = rng.integers(info.min, info.max + 1, 3000)
    small = np.arange(-3, 4)
    a = np.concatenate([a, np.repeat(small, 7) + int(pa.zero_point)])
    b = np.concatenate([b, np.tile(small, 7) + int(pb.zero_point)])
    got = litert_add(a.astype(dtype), b.astype(dtype), pa, pb, py, subtract=op == "SUB")
    s = [float(p.scale) for p in (pa, pb, py)]
    hand = _hand_xnnpack if uses_xnnpack(*s) else _hand_tflite
    want = [min(max(hand(int(x) - int(pa.zero_point), int(y) - int(pb.zero_point), s, op == "SUB")
                    + int(py.zero_point), info.min), info.max) for x, y in zip(a, b)]
    assert got.dtype == dtype and np.array_equal(got, np.array(want)), int(np.sum(got != np.array(want)))


def test_ties_round_as_litert_not_as_qmace():
    """(a + b) / 2 in the XNNPACK branch rounds half up; in the builtin branch (a ratio below 2^-10) half away
    from zero; qmace's float definition rounds half to even. Scales are powers of two, so every odd sum
    is a tie."""
    ca = np.arange(-5, 6)
    half = _params(((0.5, 0), (0.5, 0), (1.0, 0)), "int8")  # r_a = r_b = 1/2: XNNPACK
    assert uses_xnnpack(0.5, 0.5, 1.0) and xnnpack_params(0.5, 0.5, 1.0).shift == 21
    got = litert_add(ca.astype(np.int8), np.zeros_like(ca).astype(np.int8) + 1, *half)  # (c + 1) / 2
    assert got.tolist() == [-2, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3]  # -4/2=-2, -3/2->-1 (up), -1/2->0, 1/2->1
    builtin = _params(((2.0 ** -12, 0), (1.0, 0), (2.0, 0)), "int8")  # r_a = 2^-13: TFLite's builtin kernel
    assert not uses_xnnpack(2.0 ** -12, 1.0, 2.0)
    assert tflite_params(2.0 ** -12, 1.0, 2.0).y == (2 ** 30, -19)
    got = litert_add(np.zeros_like(ca).astype(np.int8), ca.astype(np.int8), *builtin)  # cb / 2
    assert got.tolist() == [-3, -2, -2, -1, -1, 0, 1, 1, 2, 2, 3]  # -5/2->-3, -3/2->-2, -1/2->-1 (away)
    qmace = np.rint(ca / 2.0).astype(int).tolist()
    assert qmace == [-2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2] and qmace != got.tolist()  # half to even


# ---- against LiteRT --------------------------------------------------------------------------------------

_CODES = {"ADD": 0, "SUB": 41}
_TYPES = {"int8": 9, "uint8": 3}


def _binary_tflite(op: str, triple, dtype: str, shape: tuple[int, ...]) -> bytes:
    """A .tflite with one quantized ADD/SUB of the two (8-bit) graph inputs, written with flatbuffers."""
    b = flatbuffers.Builder(1024)
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddBuiltinCode(b, _CODES[op])
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, _CODES[op])
    tflite.OperatorCodeAddVersion(b, 2)
    opcode = tflite.OperatorCodeEnd(b)
    tensors = []
    for name, (scale, zp) in zip("aby", triple):
        name_off = b.CreateString(name)
        tflite.QuantizationParametersStartScaleVector(b, 1)
        b.PrependFloat32(scale)
        scales = b.EndVector()
        tflite.QuantizationParametersStartZeroPointVector(b, 1)
        b.PrependInt64(zp)
        zps = b.EndVector()
        tflite.QuantizationParametersStart(b)
        tflite.QuantizationParametersAddScale(b, scales)
        tflite.QuantizationParametersAddZeroPoint(b, zps)
        quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStartShapeVector(b, len(shape))
        for d in reversed(shape):
            b.PrependInt32(d)
        dims = b.EndVector()
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, dims)
        tflite.TensorAddType(b, _TYPES[dtype])
        tflite.TensorAddName(b, name_off)
        tflite.TensorAddQuantization(b, quant)
        tensors.append(tflite.TensorEnd(b))
    if op == "ADD":
        tflite.AddOptionsStart(b)
        opts, opts_type = tflite.AddOptionsEnd(b), tflite.BuiltinOptions.AddOptions
    else:
        tflite.SubOptionsStart(b)
        opts, opts_type = tflite.SubOptionsEnd(b), tflite.BuiltinOptions.SubOptions

    ins, outs = fb_ints(b, tflite.OperatorStartInputsVector, [0, 1]), fb_ints(b, tflite.OperatorStartOutputsVector, [2])
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, ins)
    tflite.OperatorAddOutputs(b, outs)
    tflite.OperatorAddBuiltinOptionsType(b, opts_type)
    tflite.OperatorAddBuiltinOptions(b, opts)
    operator = tflite.OperatorEnd(b)
    return finish_model(b, [opcode], tensors, [operator], [0, 1], [2])


@pytest.mark.parametrize("op, dtype, triple", CASES)
def test_kernel_equals_litert_on_every_code_pair(op, dtype, triple):
    """The LiteRT 2.3 interpreter as users run it (default op resolver: the XNNPACK delegate takes the node
    when it can) on all 65536 code pairs: identical codes, in both branches."""
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    a, b = _all_pairs(dtype)
    it = interpreter.Interpreter(model_content=_binary_tflite(op, triple, dtype, a.shape), num_threads=1)
    it.allocate_tensors()
    ins = it.get_input_details()
    it.set_tensor(ins[0]["index"], a)
    it.set_tensor(ins[1]["index"], b)
    it.invoke()
    want = it.get_tensor(it.get_output_details()[0]["index"])
    got = litert_add(a, b, *_params(triple, dtype), subtract=op == "SUB")
    assert np.array_equal(got, want), int(np.sum(got != want))


# ---- the ONNX lowering ----------------------------------------------------------------------------------

def _quantized_graph(op: str, triple, dtype: str, n: int, litert: bool = True) -> Graph:
    """``y = a (+|-) b`` on (1, n) with the triple's parameters fixed, quantized (int8 schema)."""
    g = Graph(name="addsub")
    for name in "aby":
        g.add_tensor(Tensor(name, "float32", (1, n)))
    g.inputs, g.outputs = ["a", "b"], ["y"]
    g.nodes.append(Node("node", "Add" if op == "ADD" else "Sub", ["a", "b"], ["y"], {"qm_arith": LITERT} if litert else {}))
    fixed = dict(zip("aby", _params(triple, dtype)))
    return quantize_graph(g, {}, QuantizeOptions(schema="int8", fixed_params=fixed)).graph


def _feeds(triple, dtype: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    a, b = _all_pairs(dtype)
    pa, pb, _ = _params(triple, dtype)
    return {"a": dequantize(a, pa), "b": dequantize(b, pb)}, a, b


@pytest.mark.parametrize("op, dtype, triple", CASES)
def test_onnx_lowering_is_bit_exact_with_the_kernel(op, dtype, triple):
    """Reference backend (the numpy kernel) and ONNX Runtime (the int64 lowering) on all 65536 pairs: the same
    codes, also with int8 activations handed to ORT as uint8 (``int8_activations_as_uint8``, as on CPUs
    without VNNI), which needs every code tensor to be read by DequantizeLinear alone."""
    g = _quantized_graph(op, triple, dtype, 65536)
    feeds, a, b = _feeds(triple, dtype)
    want = litert_add(a, b, *_params(triple, dtype), subtract=op == "SUB")
    codes = next(n.inputs[0] for n in g.nodes if n.op_type == "DequantizeLinear" and n.outputs[0] == "y")
    ref = Session(g, "reference").run(feeds, observe=[codes])[codes]
    assert np.array_equal(ref, want)
    model = to_onnx(g, extra_outputs=[codes])
    types = [n.op_type for n in model.graph.node]
    xnnpack = uses_xnnpack(*(s for s, _ in triple))
    assert ("Floor" if xnnpack else "Div") in types and types.count("QuantizeLinear") == 3  # a, b and y's codes
    for shift in (False, True):
        if shift:
            assert int8_activations_as_uint8(model) is (dtype == "int8")
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run([codes], feeds)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want), int(np.sum(got != want))


def test_without_the_variant_add_keeps_qmaces_definition():
    """An Add without ``qm_arith`` (ONNX, TensorFlow, Caffe imports) still computes
    ``quantize(dequantize(a) + dequantize(b))`` and lowers to QDQ around a float Add (ORT's QLinearAdd); a Sub
    without it has no integer kernel (a float fallback)."""
    triple = TRIPLES["int8"][2]  # all ties: the two definitions differ
    feeds, a, b = _feeds(triple, "int8")
    plain = _quantized_graph("ADD", triple, "int8", 65536, litert=False)
    y = Session(plain, "reference").run(feeds)["y"]
    pa, pb, py = _params(triple, "int8")
    qmace = np.clip(np.rint((dequantize(a, pa) + dequantize(b, pb)) / np.float32(1.0)), -128, 127)
    assert np.array_equal(y, qmace * np.float32(1.0))
    litert = Session(_quantized_graph("ADD", triple, "int8", 65536), "reference").run(feeds)["y"]
    assert np.sum(litert != y) > 1000  # every odd sum is a tie
    assert "Div" not in [n.op_type for n in to_onnx(plain).graph.node]
    res = quantize_graph(*_float_sub(), QuantizeOptions(schema="int8", fixed_params=dict(zip("aby", _params(triple, "int8")))))
    assert len(res.fallbacks) == 1 and "Sub" in res.fallbacks[0]


def _float_sub() -> tuple[Graph, dict]:
    g = Graph(name="sub")
    for name in "aby":
        g.add_tensor(Tensor(name, "float32", (1, 4)))
    g.inputs, g.outputs = ["a", "b"], ["y"]
    g.nodes.append(Node("node", "Sub", ["a", "b"], ["y"]))
    return g, {}


def test_tflite_import_marks_add_and_the_variant_survives_file_and_export(tmp_path):
    """A quantized ADD read from a .tflite carries ``qm_arith="litert"``; the quantized model written to a
    ``.qmace`` file and read back keeps it and computes the same codes; its ONNX export (plain ONNX Runtime)
    too."""
    triple = TRIPLES["int8"][0]
    path = tmp_path / "add.tflite"
    path.write_bytes(_binary_tflite("ADD", triple, "int8", (1, 65536)))
    g = load_tflite(path)
    add = next(n for n in g.nodes if n.op_type == "Add")
    assert add.attrs == {"qm_arith": LITERT}
    q = quantize_graph(g, {}, QuantizeOptions(schema="int8", fixed_params=g.fixed_params)).graph
    back = load_graph(save_graph(q, tmp_path / "add.qmace"))
    assert next(n for n in back.nodes if n.op_type == "Add").attrs == {"qm_arith": LITERT}
    feeds, a, b = _feeds(triple, "int8")
    want = dequantize(litert_add(a, b, *_params(triple, "int8")), _params(triple, "int8")[2])
    for graph in (q, back):
        assert np.array_equal(Session(graph, "reference").run(feeds)["y"], want)
    exported = ort.InferenceSession(to_onnx(back).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(exported.run(["y"], feeds)[0], want)


def test_qat_exact_mode_runs_the_litert_kernel_training_mode_the_float_form():
    """QAT on a graph with a ``litert`` Add: the exact simulation gives the quantized graph's codes (the LiteRT
    kernel); training runs the differentiable float form ``fake_quant(a + b)``, which rounds ties half to
    even, where LiteRT rounds them up: on this grid (y = (c_a + c_b) / 2) every pair with an odd sum is a tie,
    and the two roundings differ on those with ``k + 1/2``, ``k`` even: a quarter of all pairs."""
    torch = pytest.importorskip("torch")
    from qmace.qat.module import QATModule

    triple = TRIPLES["int8"][2]
    g = Graph(name="add")
    for name in "aby":
        g.add_tensor(Tensor(name, "float32", (1, 65536)))
    g.inputs, g.outputs = ["a", "b"], ["y"]
    g.nodes.append(Node("node", "Add", ["a", "b"], ["y"], {"qm_arith": LITERT}))
    m = QATModule(g, {}, QuantizeOptions(schema="int8", fixed_params=dict(zip("aby", _params(triple, "int8")))))
    feeds, _, _ = _feeds(triple, "int8")
    ref = Session(m.quantized_graph(), "reference").run(feeds)["y"]

    def run(exact: bool) -> np.ndarray:
        y = m({k: torch.from_numpy(v) for k, v in feeds.items()}, exact=exact)
        return (y["y"] if isinstance(y, dict) else y).detach().numpy()

    assert np.array_equal(run(True), ref)
    assert int(np.sum(run(False) != ref)) == 65536 // 4
