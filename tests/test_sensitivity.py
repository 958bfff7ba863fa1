"""The calibration-sensitivity 16-bit rule (qmace.quantize.sensitivity, ``--sensitivity_16bit``): the fake-quant
runner computes the quantized model's numbers, the ranking finds the tensor whose 8-bit rounding hurts, and the
rule's choice reaches the plan, the metadata and the recipe."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qmace.data import Sample
from qmace.errors import QuantizationError
from qmace.frontends.onnx_frontend import onnx_to_graph
from qmace.passes import optimize
from qmace.quantize.mixed import wide_activations
from qmace.quantize.plan import plan_quantization
from qmace.quantize.quantizer import QuantizeOptions, quantize_graph
from qmace.quantize.ranges import Range
from qmace.quantize.recipe import PTQRecipe, run_ptq
from qmace.quantize.sensitivity import (
    LAYER_REASON,
    REASON,
    FakeQuantRunner,
    activation_sensitivity,
    candidates,
    output_sqnr,
    sensitive_activations,
    sensitive_layers,
    weight_sensitivity,
)
from qmace.runtime.reference import execute
from tests.conftest import make_onnx, rand


def _model(seed: int = 0):
    """x (1,4,6,6) -> Conv a -> Conv o (channel 0 amplified x40: an outlier channel that sets the tensor's
    per-tensor range) -> Conv c (ignores channel 0: only the other channels' few steps matter) -> Reshape ->
    y (1, 144)."""
    rng = np.random.default_rng(seed)
    wa, wo, wc = rand(rng, 4, 4, 3, 3), rand(rng, 4, 4, 1, 1), rand(rng, 4, 4, 1, 1)
    wo[0] *= 40.0
    wc[:, 0] = 0.0
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "wo"], ["o"]),
             helper.make_node("Conv", ["o", "wc"], ["c"]),
             helper.make_node("Reshape", ["c", "shape"], ["y"])]
    model = make_onnx(nodes, {"x": (1, 4, 6, 6)}, ["y"],
                      {"wa": wa, "wo": wo, "wc": wc, "shape": np.array([1, 144], np.int64)})
    return optimize(onnx_to_graph(model))


def _samples(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rand(rng, 1, 4, 6, 6, scale=1.0)} for _ in range(n)]


def _table(g, samples) -> dict[str, Range]:
    table: dict[str, Range] = {}
    for feeds in samples:
        for k, v in execute(g, feeds, keep_all=True).items():
            if v.dtype == np.float32 and v.size:
                r = table.get(k)
                lo, hi = float(v.min()), float(v.max())
                table[k] = Range(min(lo, r.min), max(hi, r.max)) if r else Range(lo, hi)
    return table


def _opts(samples, **kw) -> QuantizeOptions:
    lo = float(min(s["x"].min() for s in samples))
    hi = float(max(s["x"].max() for s in samples))
    return QuantizeOptions(schema="int8", input_ranges={"x": (lo, hi)}, **kw)


def test_runner_float_is_exact_and_quantized_matches_the_integer_model():
    g, cal = _model(), _samples(8)
    table, opts = _table(g, cal), _opts(cal)
    plan = plan_quantization(g, table, opts)
    runner = FakeQuantRunner(g, plan, num_threads=1)
    assert set(runner.tensors) == {"x", "a", "o", "c"}  # y shares c's parameters (Reshape)
    q = quantize_graph(g, table, opts).graph
    for feeds in _samples(3, seed=7):
        ref = execute(g, feeds)["y"]
        np.testing.assert_allclose(runner.run(feeds, runner.control())[0], ref, rtol=1e-5, atol=1e-5)
        fq = runner.run(feeds, runner.control(runner.planned_bits(), "all"))[0]
        integer = execute(q, feeds)["y"]
        step = plan.params("c").scale
        # the integer kernels round intermediate sums once more than the float simulation: <= 1 step
        assert np.max(np.abs(fq - integer)) <= 1.01 * step
        assert np.max(np.abs(fq - ref)) > 0.5 * step  # and quantization did change the output


def test_ranking_finds_the_outlier_tensor_and_the_rule_widens_it():
    g, cal = _model(), _samples(8)
    table, opts = _table(g, cal), _opts(cal)
    plan = plan_quantization(g, table, opts)
    assert candidates(g, plan) == ["x", "a", "o", "c"]
    runner = FakeQuantRunner(g, plan, num_threads=1)
    ranking = activation_sensitivity(runner, cal)
    assert ranking[0].tensor == "o"  # channels 1-3 of o get ~1/40 of its 256 steps
    assert ranking[0].sqnr_db < ranking[1].sqnr_db - 10
    assert [r.sqnr_db for r in ranking] == sorted(r.sqnr_db for r in ranking)
    chosen, _ = sensitive_activations(g, plan, cal, 1, num_threads=1)
    assert chosen == {"o": REASON}
    assert sensitive_activations(g, plan, cal, 0) == ({}, [])
    # the choice reaches the plan and the model: o is uint16, and the output error drops
    wide = quantize_graph(g, table, _opts(cal, wide_extra=chosen)).graph
    base = quantize_graph(g, table, opts).graph
    assert wide.metadata["quantization"]["wide_activations"] == {"o": REASON}
    assert wide.tensors["o"].dtype == "uint16" and base.tensors["o"].dtype == "uint8"
    ev = _samples(6, seed=3)
    ref = [[execute(g, f)["y"]] for f in ev]
    assert output_sqnr(ref, [[execute(wide, f)["y"]] for f in ev]) > output_sqnr(ref, [[execute(base, f)["y"]] for f in ev]) + 10


def test_extra_wide_tensors_share_parameters_through_copies():
    g = _model()
    assert wide_activations(g, "none", {"y": REASON}) == {"y": REASON, "c": "shares parameters with y"}
    assert wide_activations(g, "rule", {"nope": REASON}) == {}  # not a tensor of the graph
    assert set(wide_activations(g, "all", {"y": REASON})) == {"x", "a", "o", "c", "y"}


def test_recipe_runs_the_rule_and_records_it():
    g, cal = _model(), _samples(8)
    samples = [Sample(str(i), f) for i, f in enumerate(cal)]
    opts = _opts(cal)
    res = run_ptq(g, samples, PTQRecipe(method="mace", equalize=False, sensitivity_16bit=1, sensitivity_samples=4),
                  opts, num_threads=1)
    meta = res.graph.metadata["quantization"]
    assert meta["wide_activations"] == {"o": REASON} and meta["sensitivity_16bit"] == 1
    plain = run_ptq(g, samples, PTQRecipe(method="mace", equalize=False), opts, num_threads=1)
    assert plain.graph.metadata["quantization"]["wide_activations"] == {}
    with pytest.raises(QuantizationError, match="sensitivity_16bit"):
        PTQRecipe(sensitivity_16bit=-1)


def _weight_model(seed: int = 0):
    """x (1,4,6,6) -> Conv a (channel 0 ~0: its weights x1e-3) -> Conv b (column 0 = 30: a large weight on the
    near-silent channel sets every per-channel int8 scale, so b's useful weights get ~1 step each) -> Conv c
    -> Reshape -> y (1, 144). Layer b's weights are the ones whose rounding matters."""
    rng = np.random.default_rng(seed)
    wa, wb, wc = rand(rng, 4, 4, 3, 3), rand(rng, 4, 4, 1, 1), rand(rng, 4, 4, 1, 1)
    wa[0] *= 1e-3
    wb[:, 0] = 30.0
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "wb"], ["b"], name="conv_b"),
             helper.make_node("Conv", ["b", "wc"], ["c"]),
             helper.make_node("Reshape", ["c", "shape"], ["y"])]
    model = make_onnx(nodes, {"x": (1, 4, 6, 6)}, ["y"],
                      {"wa": wa, "wb": wb, "wc": wc, "shape": np.array([1, 144], np.int64)})
    return optimize(onnx_to_graph(model))


def test_weight_ranking_finds_the_layer_whose_rounding_matters():
    g, cal = _weight_model(), _samples(8)
    table, opts = _table(g, cal), _opts(cal)
    plan = plan_quantization(g, table, opts)
    runner = FakeQuantRunner(g, plan, num_threads=1, tensors=[])
    ranking = weight_sensitivity(runner, cal)
    assert len(ranking) == 3 and [r.sqnr_db for r in ranking] == sorted(r.sqnr_db for r in ranking)
    layer_b = next(n.name for n in g.nodes if "wb" in n.inputs[1])
    assert ranking[0].tensor == "wb" and ranking[0].sqnr_db < ranking[1].sqnr_db - 10
    chosen, full = sensitive_layers(g, plan, cal, 1, num_threads=1)
    assert list(chosen) == [layer_b] and chosen[layer_b].startswith(LAYER_REASON)
    assert [r.tensor for r in full] == [r.tensor for r in ranking]
    assert sensitive_layers(g, plan, cal, 0) == ({}, [])
    # the choice reaches the plan: b is a fallback with the rule's reason, and the output error drops
    kept = quantize_graph(g, table, _opts(cal, float_layers=chosen))
    base = quantize_graph(g, table, opts)
    assert [f"{f.node}: {f.reason}" for f in kept.plan.fallbacks] == [f"{layer_b}: {chosen[layer_b]}"]
    assert not base.plan.fallbacks
    ev = _samples(6, seed=3)
    ref = [[execute(g, f)["y"]] for f in ev]
    assert (output_sqnr(ref, [[execute(kept.graph, f)["y"]] for f in ev])
            > output_sqnr(ref, [[execute(base.graph, f)["y"]] for f in ev]) + 10)
    # the float island on ONNX Runtime (DQ -> float Conv -> Q) vs the reference: float sums in another order,
    # so a requantized code may differ by one step, never more
    from qmace.runtime import Session

    sess = Session(kept.graph, backend="onnxruntime", num_threads=1)
    step = float(kept.plan.params("c").scale)
    for f in ev:
        assert np.max(np.abs(sess.run(f)["y"] - execute(kept.graph, f)["y"])) <= 1.01 * step


def test_recipe_keeps_the_sensitive_layer_float_without_correcting_its_bias(tmp_path):
    g, cal = _weight_model(), _samples(8)
    samples = [Sample(str(i), f) for i, f in enumerate(cal)]
    opts = _opts(cal)
    res = run_ptq(g, samples, PTQRecipe(method="mace", equalize=False, sensitivity_float_layers=1,
                                        sensitivity_samples=4), opts, num_threads=1)
    plain = run_ptq(g, samples, PTQRecipe(method="mace", equalize=False), opts, num_threads=1)
    layer_b = next(n.name for n in g.nodes if "wb" in n.inputs[1])
    meta = res.graph.metadata["quantization"]
    assert meta["sensitivity_float_layers"] == [layer_b]
    assert [f.split(":")[0] for f in res.fallbacks] == [f"{layer_b} (Conv)"] and LAYER_REASON in res.fallbacks[0]
    assert plain.corrected_layers == 3 and res.corrected_layers == 2  # no rounding in b to correct
    # b has no bias: correction would have added one (as it did in the plain recipe)
    assert len(next(n for n in plain.float_graph.nodes if n.name == layer_b).inputs) == 3
    assert len(next(n for n in res.float_graph.nodes if n.name == layer_b).inputs) == 2
    # the float layer survives the model file: same outputs after a save / load round trip
    from qmace.modelfile import load_graph, save_graph

    back = load_graph(save_graph(res.graph, tmp_path / "m.qmace"))
    assert next(n for n in back.nodes if n.name == layer_b).op_type == "Conv"
    for f in _samples(2, seed=5):
        np.testing.assert_array_equal(execute(back, f)["y"], execute(res.graph, f)["y"])
    with pytest.raises(QuantizationError, match="sensitivity_float_layers"):
        PTQRecipe(sensitivity_float_layers=-1)


def test_adaround_leaves_the_float_layer_unrounded():
    g, cal = _weight_model(), _samples(8)
    samples = [Sample(str(i), f) for i, f in enumerate(cal)]
    res = run_ptq(g, samples, PTQRecipe(method="mace", equalize=False, adaround=True, adaround_iters=5,
                                        sensitivity_float_layers=1, sensitivity_samples=4), _opts(cal), num_threads=1)
    assert set(res.fixed_params) == {"wa__rounded", "wc__rounded"}  # b is not rounded
    layer_b = next(n for n in res.float_graph.nodes if n.name.startswith("conv_b") or "wb" in n.inputs[1])
    np.testing.assert_array_equal(res.float_graph.tensors[layer_b.inputs[1]].data, g.tensors["wb"].data)
