"""--validate's comparison: MACE's cosine where it means something, relative error with a floor where the
reference is about zero (issue 10: a probability map of ~3e-6 matched to 1e-7 used to FAIL at cosine
0.9987 and print SQNR -118 dB)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qmace.metrics import ABS_FLOOR, compare, sqnr_db, sqnr_from_energies


def test_near_zero_dense_output_matched_to_1e7_passes_by_relative_error():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1e-6, 1e-6, (1, 1, 32, 32)).astype(np.float32)
    got = ref + rng.uniform(-9e-8, 9e-8, ref.shape).astype(np.float32)
    c = compare(ref, got)
    assert c.cosine < 0.999  # MACE's criterion alone would fail it
    assert c.reference_near_zero and c.criterion == "rel-error"
    assert c.sqnr_db is None  # "reference ~ 0", not an absurd number of dB
    assert c.passes(0.999)
    assert math.isnan(c.argmax_agreement)  # a (N, C, H, W) map has no meaningful argmax


def test_near_zero_reference_with_a_real_error_fails():
    ref = np.full((1, 1, 8, 8), 1e-7, np.float32)
    got = ref.copy()
    got[0, 0, 3, 3] = 0.5  # one pixel lit where the reference has none
    c = compare(ref, got)
    assert c.reference_near_zero and not c.passes(0.98)


def test_ordinary_output_decided_by_cosine():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 10)).astype(np.float32)
    c = compare(ref, ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32))
    assert not c.reference_near_zero and c.criterion == "cosine"
    assert c.passes(0.999) and not c.passes(1.0)
    assert c.sqnr_db is not None and 30 < c.sqnr_db < 50
    assert c.argmax_agreement == 1.0
    assert compare(ref, -ref).passes(0.5) is False
    assert np.sqrt(np.mean(ref**2)) > ABS_FLOOR


def _yaml_with(tiny, *lines: str):
    from tests.conftest import yaml_text

    tiny.yaml.write_text(yaml_text(tiny) + "".join(f"        {line}\n" for line in lines))


@pytest.mark.parametrize("threshold, code", [(60, 0), (400, 1)])
def test_yaml_chooses_metric_and_threshold_per_output(tiny, cli, threshold, code):
    """validation_outputs_metric / validation_outputs_threshold: the float model on the reference backend
    vs ONNX Runtime (float32 rounding: SQNR far above 60 dB, never 400 dB unless identical)."""
    _yaml_with(tiny, "validation_outputs_metric: sqnr", f"validation_outputs_threshold: {threshold}")
    assert cli("convert", "--config", tiny.yaml).code == 0
    res = cli("run", "--config", tiny.yaml, "--validate", "--backend", "reference")
    row = next(ln for ln in res.out.splitlines() if f"sqnr>={threshold}" in ln)
    cmp_sqnr = float(row.split()[3]) if row.split()[3] != "inf" else math.inf
    assert res.code == (0 if cmp_sqnr >= threshold else 1) == code, res.out


@pytest.mark.parametrize("lines, needle", [
    (["validation_outputs_metric: psnr"], "validation_outputs_metric"),
    (["validation_outputs_metric: max_abs_error"], "needs a threshold"),
    (["validation_outputs_threshold: [0.9, 0.8]"], "2 thresholds for 1 output tensor"),
])
def test_bad_validation_metric_keys(tiny, cli, lines, needle):
    _yaml_with(tiny, *lines)
    res = cli("convert", "--config", tiny.yaml)
    assert res.code == 2 and needle in res.err and "Traceback" not in res.err, res.err


def test_sqnr_one_formula_and_its_edges():
    ref, x = np.array([1.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32)
    assert sqnr_db(ref, x) == pytest.approx(10 * np.log10(2.0))  # signal 2, noise 1
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")  # no warning, no absurd finite number
    assert sqnr_from_energies(0.0, 0.0) == float("inf")
    # compare() reports the same figure where the reference is not ~ 0
    assert compare(ref, x).sqnr_db == pytest.approx(sqnr_db(ref, x))
