"""The ONNX frontend reads every opset from 7 to MAX_OPSET: newer ones are translated to opset-21
attributes, and anything beyond is refused with the supported range in the message."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qmace.errors import ModelError
from qmace.frontends.onnx_frontend import _NEWER_ATTRS, MAX_OPSET, TARGET_OPSET, onnx_to_graph
from qmace.ops import get_op, supported_ops
from qmace.passes import optimize
from qmace.runtime import Session


def _defined(op: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return False
    return True


def test_every_attribute_added_after_opset_21_is_translated():
    """Each supported op's schema at opsets 22..MAX_OPSET adds no attribute that _to_opset21 does not know."""
    untranslated = []
    for op in supported_ops():
        first = max(TARGET_OPSET, get_op(op).onnx_opset)  # RMSNormalization: 23, the opset that defines it
        while first < MAX_OPSET and not _defined(op, first):  # Swish: 24 (lowered to Sigmoid + Mul at 21)
            first += 1
        base = set(onnx.defs.get_schema(op, first).attributes)
        for v in range(first + 1, MAX_OPSET + 1):
            for a in set(onnx.defs.get_schema(op, v).attributes) - base:
                if op not in _NEWER_ATTRS.get(a, ((), ()))[0]:
                    untranslated.append(f"{op}.{a} (opset {v})")
    assert not untranslated, f"review these before reading their opset: {untranslated}"


def test_max_opset_covers_the_installed_onnx():
    """Every opset the installed onnx defines is read; a newer onnx needs its new schemas reviewed first."""
    newest = onnx.defs.onnx_opset_version()
    assert newest <= MAX_OPSET, (f"onnx {onnx.__version__} defines opset {newest}: review the schemas of the "
                                 f"supported ops in opsets {MAX_OPSET + 1}-{newest}, then raise MAX_OPSET")


def _model(opset: int, nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _conv_model(opset: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c"], ["h"]),
             helper.make_node("Flatten", ["h"], ["y"])]
    return _model(opset, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])


@pytest.mark.parametrize("opset", [22, 24, MAX_OPSET])
def test_newer_opset_runs_like_onnxruntime(opset):
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)
    model = _conv_model(opset)
    graph = optimize(onnx_to_graph(model, f"conv{opset}.onnx"))
    assert graph.metadata["source_opset"] == opset
    want = ort.InferenceSession(_conv_model(min(opset, 22)).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for backend in ("reference", "onnxruntime"):
        got = Session(graph, backend=backend).run({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_opset_beyond_the_newest_is_refused_with_the_range():
    with pytest.raises(ModelError, match=rf"opset {MAX_OPSET + 1} is outside the supported range 7-{MAX_OPSET}"):
        onnx_to_graph(_conv_model(MAX_OPSET + 1), "new.onnx")


def test_newer_attribute_with_an_opset21_meaning_is_dropped_else_refused():
    def dq_model(output_dtype):
        nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], output_dtype=output_dtype)]
        inits = [numpy_helper.from_array(np.array(0.5, np.float32), "s"),
                 numpy_helper.from_array(np.array(3, np.uint8), "z")]
        return _model(23, nodes, [helper.make_tensor_value_info("q", TensorProto.UINT8, [4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)

    graph = onnx_to_graph(dq_model(TensorProto.FLOAT), "dq.onnx")
    assert all("output_dtype" not in n.attrs for n in graph.nodes)
    with pytest.raises(ModelError, match=r"dq.onnx: DequantizeLinear node .*output_dtype=16 \(opset 23\)"):
        onnx_to_graph(dq_model(TensorProto.BFLOAT16), "dq.onnx")
