"""Cross-layer equalization for per-tensor weights: the float function is unchanged, each channel's weight
range becomes the same fraction of its producer's and its consumer's per-tensor range (Nagel et al. 2019),
saturating ReLU6 channels keep their scale, and per-tensor (uint8) quantization gets more accurate."""

import numpy as np
from onnx import helper

from qmace.quantize.cle import cross_layer_equalize, equalize_per_tensor_weights, scaled_maxima
from tests.test_equalize import C, _graph, _maxima, _outlier_model, _run, _samples, _uint8_sqnr, _x_samples


def _weight(g, tensor):
    return g.constant(g.producers()[tensor].inputs[1]).astype(np.float64)


def _rows(w):
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def _chain(relu6: bool = False, gain: float = 0.2):
    """x -> Conv -> Relu (or ReLU6) -> depthwise Conv -> Relu -> Conv -> y, without biases (so no activation
    bound binds), producer rows spread over 64x and the consumers' columns spread the other way."""
    rng = np.random.default_rng(5)
    up = (2.0 ** -np.arange(C)).astype(np.float32)
    down = up[::-1].copy()
    inits = {"w1": (rng.standard_normal((C, 3, 1, 1)) * up[:, None, None, None] * gain).astype(np.float32),
             "wd": (rng.standard_normal((C, 1, 3, 3)) * down[:, None, None, None]).astype(np.float32),
             "w3": (rng.standard_normal((4, C, 1, 1)) * up[None, :, None, None]).astype(np.float32)}
    act = []
    if relu6:
        inits.update(lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32))
        act = [helper.make_node("Clip", ["a", "lo", "hi"], ["a6"])]
    else:
        act = [helper.make_node("Relu", ["a"], ["a6"])]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), *act,
             helper.make_node("Conv", ["a6", "wd"], ["d"], pads=[1, 1, 1, 1], group=C),
             helper.make_node("Relu", ["d"], ["d6"]),
             helper.make_node("Conv", ["d6", "w3"], ["y"])]
    return _graph(nodes, inits, [1, 3, 12, 12])


def test_float_function_unchanged_and_weight_ranges_levelled():
    g, cal = _chain(), _x_samples((1, 3, 12, 12))
    mx = _maxima(g, cal)
    ge, groups = cross_layer_equalize(g, mx)
    assert {t for gr in groups for t in gr.tensors} == {"a6", "d6"}
    for data in (cal, _x_samples((1, 3, 12, 12), n=4)):
        np.testing.assert_allclose(_run(ge, data), _run(g, data), rtol=1e-4, atol=1e-5)
    wd = _weight(g, "d6")
    e1, ed, e3 = _weight(ge, "a6"), _weight(ge, "d6"), _weight(ge, "y")
    col3 = lambda w: np.abs(w).max(axis=(0, 2, 3))
    before = _rows(wd) / _rows(wd).max()
    assert before.min() < 0.05, "the test model must have uneven depthwise rows"
    # at the fixed point each channel's range is the same fraction of both layers' widest (the sqrt rule),
    # for both groups the depthwise layer sits in, except channels held by the activation-resolution bound
    # (their share of the activation range is unchanged)
    after = _maxima(ge, cal)
    share = lambda mx, t: mx.maxima[t] / mx.maxima[t].max()
    for t, (p, c) in {"a6": (_rows(e1), _rows(ed)), "d6": (_rows(ed), col3(e3))}.items():
        held = np.isclose(share(after, t), share(mx, t), rtol=1e-4)
        assert (~held).sum() >= 3, f"{t}: the sqrt rule must decide most channels of the test model"
        np.testing.assert_allclose((p / p.max())[~held], (c / c.max())[~held], rtol=1e-3)
    assert (_rows(ed) / _rows(ed).max()).min() > 4 * before.min()
    # no activation range grew
    for t in ("a6", "d6"):
        assert after.maxima[t].max() <= mx.maxima[t].max() * (1 + 1e-5)


def test_scaled_maxima_match_a_calibration_pass():
    g, cal = _chain(), _x_samples((1, 3, 12, 12))
    mx = _maxima(g, cal)
    ge, groups = cross_layer_equalize(g, mx)
    predicted, measured = scaled_maxima(mx, groups), _maxima(ge, cal)
    for t in ("a6", "d6", "y"):
        np.testing.assert_allclose(predicted.maxima[t], measured.maxima[t], rtol=1e-4, atol=1e-7)


def test_uint8_rule_levels_weights_then_activations():
    """``equalize_per_tensor_weights`` (what ``run_ptq`` does for ``uint8``): one report per group whose scales
    are both steps' product, as a calibration pass of the result confirms; the function is unchanged."""
    g, cal = _chain(relu6=True), _x_samples((1, 3, 12, 12))
    mx = _maxima(g, cal)
    leveled, cle = cross_layer_equalize(g, mx)
    ge, groups = equalize_per_tensor_weights(g, mx)
    assert sorted(gr.tensors for gr in groups) == [["a6"], ["d6"]]
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)
    measured = _maxima(ge, cal)
    for gr in groups:
        np.testing.assert_allclose(measured.maxima[gr.tensors[0]], mx.maxima[gr.tensors[0]] * gr.scales,
                                   rtol=1e-4, atol=1e-7)
    assert any(not np.allclose(gr.scales, c.scales) for gr, c in zip(sorted(groups, key=lambda x: x.tensors),
                                                                    sorted(cle, key=lambda x: x.tensors)))


def test_saturating_relu6_channels_keep_their_scale():
    g, cal = _chain(relu6=True, gain=12.0), _x_samples((1, 3, 12, 12))
    mx = _maxima(g, cal)
    sat = mx.maxima["a6"] >= 6.0 * (1 - 1e-6)
    assert sat.any() and not sat.all(), "the test model must saturate some ReLU6 channels"
    ge, groups = cross_layer_equalize(g, mx)
    gr = next(gr for gr in groups if gr.tensors == ["a6"])
    np.testing.assert_allclose(gr.scales[sat], 1.0)
    assert not np.allclose(gr.scales[~sat], 1.0)
    np.testing.assert_allclose(_rows(_weight(ge, "a6"))[sat], _rows(_weight(g, "a6"))[sat], rtol=1e-6)
    # a clip point never moved: the function is the same, and no rescaled calibration value passes 6
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)
    assert _maxima(ge, cal).maxima["a6"].max() <= 6.0 + 1e-5


def test_outlier_row_is_leveled_not_grown():
    """The benchmark C collapse: a BatchNorm-folded outlier depthwise row sets the layer's per-tensor range.
    Cross-layer equalization levels it: the other rows take a 4x larger share of the range (they grow within
    their activations' headroom, the outlier does not), and the layer's range does not grow."""
    g, cal = _outlier_model(), _samples()
    mx = _maxima(g, cal)
    ge, _ = cross_layer_equalize(g, mx)
    before, after = _rows(_weight(g, "d6")), _rows(_weight(ge, "d6"))
    assert before[0] > 20 * np.median(before[1:])
    assert after.max() <= before.max() * (1 + 1e-6)
    assert after[0] / np.median(after[1:]) < before[0] / np.median(before[1:]) / 4
    np.testing.assert_allclose(_run(ge, cal), _run(g, cal), rtol=1e-4, atol=1e-5)


def test_uint8_recipe_gets_more_accurate():
    g, cal, ev = _chain(relu6=True), _x_samples((1, 3, 12, 12)), _x_samples((1, 3, 12, 12), n=8)
    plain, equalized = _uint8_sqnr(g, cal, ev, False), _uint8_sqnr(g, cal, ev, True)
    assert equalized > plain + 3.0, (plain, equalized)


def test_no_activation_channel_loses_resolution():
    """A channel shrinks only as far as its tensor's range shrinks: on the per-tensor activation grid every
    channel keeps at least its share of the range (the sqrt rule alone shrank the chain's d6 channels to 0.15x
    of their share)."""
    for g, cal in ((_chain(), _x_samples((1, 3, 12, 12))), (_outlier_model(), _samples())):
        mx = _maxima(g, cal)
        ge, groups = cross_layer_equalize(g, mx)
        after = _maxima(ge, cal)
        assert any(gr.min_scale < 0.5 for gr in groups), "the test model must shrink some channels"
        for gr in groups:
            for t in gr.tensors:
                before, now = mx.maxima[t] / mx.maxima[t].max(), after.maxima[t] / after.maxima[t].max()
                live = before > 1e-6
                assert np.all(now[live] >= before[live] * (1 - 1e-4)), (t, np.min(now[live] / before[live]))
