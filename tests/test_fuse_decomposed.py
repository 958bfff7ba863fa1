"""The decomposed LayerNorm / GELU / Swish fusion (qmace.passes.decomposed): each spelling exporters write is
fused into one op with outputs equal to ONNX Runtime on the source model, and near-miss spellings are left
alone (outputs still equal)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import fuse_decomposed, infer_shapes
from qmace.runtime import Session
from tests.conftest import make_onnx, rand

SHAPE = (2, 5, 16)


def _c(name: str, value) -> dict:
    return {name: np.asarray(value, np.float32)}


def _ln_nodes(*, square: str = "pow", affine: bool = True, axes=(-1,), exp: float = 2.0,
              eps_first: bool = False) -> tuple[list, dict]:
    """x -> decomposed LayerNorm -> y (the spellings of the pass's docstring)."""
    inits = {"axes": np.array(axes, np.int64), "two": np.float32(exp), "eps": np.float32(1e-5)}
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"]), helper.make_node("Sub", ["x", "m"], ["d"])]
    if square == "pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["p"]))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["p"]))
    nodes += [helper.make_node("ReduceMean", ["p", "axes"], ["v"]),
              helper.make_node("Add", ["eps", "v"] if eps_first else ["v", "eps"], ["ve"]),
              helper.make_node("Sqrt", ["ve"], ["s"])]
    last = "y" if not affine else "n"
    nodes.append(helper.make_node("Div", ["d", "s"], [last]))
    if affine:
        rng = np.random.default_rng(1)
        inits |= {"gamma": 1 + rand(rng, SHAPE[-1], scale=0.2), "beta": rand(rng, SHAPE[-1], scale=0.2)}
        nodes += [helper.make_node("Mul", ["gamma", "n"], ["ng"]), helper.make_node("Add", ["ng", "beta"], ["y"])]
    return nodes, inits


def _gelu_erf_nodes(*, order: str = "x_first", div: bool = True) -> tuple[list, dict]:
    inits = _c("sqrt2", math.sqrt(2.0)) | _c("inv_sqrt2", math.sqrt(0.5)) | _c("one", 1.0) | _c("half", 0.5)
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["u"]) if div else helper.make_node("Mul", ["inv_sqrt2", "x"], ["u"]),
             helper.make_node("Erf", ["u"], ["e"]), helper.make_node("Add", ["one", "e"], ["a"])]
    if order == "x_first":  # torch: (x * (1 + erf)) * 0.5
        nodes += [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Mul", ["xa", "half"], ["y"])]
    elif order == "half_first":  # (1 + erf) * 0.5, then * x
        nodes += [helper.make_node("Mul", ["a", "half"], ["ha"]), helper.make_node("Mul", ["x", "ha"], ["y"])]
    else:  # (x * 0.5) * (1 + erf)
        nodes += [helper.make_node("Mul", ["x", "half"], ["xh"]), helper.make_node("Mul", ["a", "xh"], ["y"])]
    return nodes, inits


def _gelu_tanh_nodes(*, cube: str = "mul") -> tuple[list, dict]:
    inits = (_c("k", 0.044715) | _c("c", math.sqrt(2 / math.pi)) | _c("one", 1.0) | _c("half", 0.5)
             | _c("three", 3.0))
    if cube == "mul":  # torch's export
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"])]
    else:
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    nodes += [helper.make_node("Mul", ["k", "x3"], ["kx3"]), helper.make_node("Add", ["x", "kx3"], ["inner"]),
              helper.make_node("Mul", ["c", "inner"], ["t_in"]), helper.make_node("Tanh", ["t_in"], ["t"]),
              helper.make_node("Add", ["one", "t"], ["a"]), helper.make_node("Mul", ["x", "a"], ["xa"]),
              helper.make_node("Mul", ["half", "xa"], ["y"])]
    return nodes, inits


def _swish_nodes(*, same_input: bool = True) -> tuple[list, dict]:
    return [helper.make_node("Sigmoid", ["x"], ["s"]),
            helper.make_node("Mul", ["x" if same_input else "x2", "s"], ["y"])] + (
        [] if same_input else [helper.make_node("Neg", ["x"], ["x2"])]), {}


def _fused(nodes: list, inits: dict, extra_outputs: tuple[str, ...] = (),
           backends: tuple[str, ...] = ("reference", "onnxruntime")) -> tuple[dict, list[str]]:
    """Fuse the model ``x -> nodes -> y``; check outputs against ORT on the source (its graph optimizations
    off: they have their own LayerNorm/GELU fusions); return counts and op types."""
    model = make_onnx(nodes, {"x": SHAPE}, ["y", *extra_outputs], inits)
    g = onnx_to_graph(model)
    infer_shapes(g)
    counts = fuse_decomposed(g)
    infer_shapes(g)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE) * 2 + 0.5).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = src.run(["y"], {"x": x})[0]
    for backend in backends:
        got = Session(g, backend=backend).run({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=backend)
    return counts, [n.op_type for n in g.nodes]


@pytest.mark.parametrize("kw", [{}, {"square": "mul"}, {"affine": False},
                                {"eps_first": True}, {"axes": (2,)}, {"axes": (1, 2)}])
def test_layer_norm_spellings_fuse(kw):
    counts, ops = _fused(*_ln_nodes(**kw))
    assert counts["LayerNormalization"] == 1
    assert ops == ["LayerNormalization"]


@pytest.mark.parametrize("kw", [{"axes": (1,)}, {"exp": 4.0}])
def test_layer_norm_near_misses_stay(kw):
    """Normalizing a non-trailing axis, or a fourth power instead of a square, is not a LayerNorm.

    (ONNX Runtime 1.32's own LayerNormFusion does fuse the Pow(d, 4) spelling, giving a wrong result, so
    qmace's onnxruntime backend is not compared on it.)"""
    counts, ops = _fused(*_ln_nodes(**kw), backends=("reference",) if "exp" in kw else ("reference", "onnxruntime"))
    assert counts["LayerNormalization"] == 0 and "ReduceMean" in ops


def test_layer_norm_with_shared_intermediate_stays():
    """The mean is also a graph output: fusing would lose it."""
    nodes, inits = _ln_nodes()
    counts, ops = _fused(nodes, inits, extra_outputs=("m",))
    assert counts["LayerNormalization"] == 0 and ops.count("ReduceMean") == 2


@pytest.mark.parametrize("kw", [{}, {"order": "half_first"}, {"order": "x_half"}, {"div": False}])
def test_gelu_erf_spellings_fuse(kw):
    counts, ops = _fused(*_gelu_erf_nodes(**kw))
    assert counts["Gelu"] == 1 and ops == ["Gelu"]


@pytest.mark.parametrize("cube", ["mul", "pow"])
def test_gelu_tanh_spellings_fuse(cube):
    counts, ops = _fused(*_gelu_tanh_nodes(cube=cube))
    assert counts["Gelu"] == 1 and ops == ["Gelu"]


def test_gelu_with_wrong_constant_stays():
    nodes, inits = _gelu_erf_nodes()
    inits["half"] = np.float32(0.25)
    counts, ops = _fused(nodes, inits)
    assert counts["Gelu"] == 0 and "Erf" in ops


def test_swish_fuses_and_other_products_stay():
    counts, ops = _fused(*_swish_nodes())
    assert counts["Swish"] == 1 and ops == ["Swish"]
    counts, ops = _fused(*_swish_nodes(same_input=False))  # (-x) * sigmoid(x) is not Swish
    assert counts["Swish"] == 0 and "Sigmoid" in ops


def test_fused_ops_keep_the_output_name_and_lower_to_ort_opset_21():
    from qmace.onnx_bridge import to_onnx

    nodes, inits = _swish_nodes()
    g = onnx_to_graph(make_onnx(nodes, {"x": SHAPE}, ["y"], inits))
    infer_shapes(g)
    fuse_decomposed(g)
    model = to_onnx(g)
    assert g.outputs == ["y"] and g.nodes[0].outputs == ["y"]
    assert model.opset_import[0].version == 21
    assert sorted(n.op_type for n in model.graph.node) == ["Mul", "Sigmoid"]
