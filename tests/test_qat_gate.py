"""The significance gate of QAT (qmace.qat.gate, fit's ``gate_alpha``): the sign test itself, and fit keeping
the PTQ start when the validation gain is noise, taking the trained state when it is clearly better, keeping
a float-returning ``validate`` ungated, and resuming with the gate's inputs."""

from __future__ import annotations

import numpy as np
import pytest

from qmace.qat.gate import decide, sign_test

torch = pytest.importorskip("torch")

from tests.test_qat import _converted, _inputs, _model, _prepare


@pytest.fixture(scope="module")
def setup():
    """The QAT test model (tests/test_qat.py) converted, with MACE ranges from 8 samples."""
    return _converted(_model())


N = 400  # validation samples of the scripted scores


def _binomial_tail(m: int, w: int) -> float:
    """P(Binomial(m, 1/2) >= w) by the pmf recursion (independent of the module's exact-integer sum)."""
    pmf, tail = 0.5**m, 0.0
    for i in range(m + 1):
        if i >= w:
            tail += pmf
        pmf *= (m - i) / (i + 1)
    return tail


def _flip(start: np.ndarray, wins: int, losses: int, seed: int) -> np.ndarray:
    """``start`` (0/100 per sample) with ``wins`` wrong samples made right and ``losses`` right ones wrong."""
    rng = np.random.default_rng(seed)
    out = start.copy()
    out[rng.choice(np.flatnonzero(start == 0), wins, replace=False)] = 100
    out[rng.choice(np.flatnonzero(start == 100), losses, replace=False)] = 0
    return out


@pytest.fixture(scope="module")
def start_scores():
    return (np.random.default_rng(3).random(N) < 0.7).astype(np.float64) * 100


def test_sign_test_is_exact_mcnemar_on_the_discordant_samples(start_scores):
    trained = _flip(start_scores, 14, 6, 0)
    w, losses, p = sign_test(start_scores, trained)
    assert (w, losses) == (14, 6)
    assert p == pytest.approx(_binomial_tail(20, 14), rel=1e-12)
    assert sign_test(start_scores / 100, trained / 100) == (w, losses, p)  # 0/1 or 0/100: the same test
    assert sign_test(start_scores, start_scores) == (0, 0, 1.0)
    cont = np.linspace(0, 1, 30)  # continuous scores: the signs count, ties dropped
    bumped = cont + np.r_[np.full(20, 0.1), np.full(4, -5.0), np.zeros(6)]
    assert sign_test(cont, bumped)[:2] == (20, 4)
    assert sign_test(cont, bumped)[2] == pytest.approx(_binomial_tail(24, 20), rel=1e-12)
    with pytest.raises(ValueError):
        sign_test(cont, cont[:-1])


def test_decide_adjusts_for_the_epochs_it_chose_from(start_scores):
    trained = _flip(start_scores, 28, 14, 1)
    p = _binomial_tail(42, 28)
    assert 0.01 < p < 0.05  # significant alone, not after choosing the best of 5
    one = decide(start_scores, trained, alpha=0.05, candidate_epoch=2, candidate_metric=1.0, candidates=1)
    five = decide(start_scores, trained, alpha=0.05, candidate_epoch=2, candidate_metric=1.0, candidates=5)
    assert not one.kept_start and one.p_value == pytest.approx(p)
    assert five.kept_start and five.p_value == pytest.approx(5 * p)
    assert "did not beat the start significantly" in five.message() and "+14 of 400" in five.message()


def _batches():
    xs = [torch.from_numpy(x) for x in _inputs(4, 3)]
    return [(torch.cat(xs[:2]), torch.tensor([0, 1])), (torch.cat(xs[2:]), torch.tensor([2, 3]))]


def _scripted(scores: list, states: list):
    it = iter(scores)

    def validate(module):
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(it)

    return validate


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_gate_keeps_the_start_when_the_gain_is_noise(setup, start_scores):
    """Epoch 2 is best on the validation mean (+6 samples of 400: 16 better, 10 worse): with the gate the
    module ends in the start's state; without it (the same scores) in epoch 2's."""
    from qmace.qat.trainer import fit

    graph, ranges = setup
    scores = [start_scores, _flip(start_scores, 5, 4, 1), _flip(start_scores, 16, 10, 2),
              _flip(start_scores, 3, 9, 3)]
    kept = {}
    for alpha in (0.05, None):
        states: list = []
        m = _prepare(graph, ranges, "int8")
        res = fit(m, _batches(), epochs=3, lr=1e-3, range_lr=1e-2, validate=_scripted(scores, states),
                  gate_alpha=alpha)
        assert res.metrics == pytest.approx([s.mean() for s in scores[1:]])
        kept[alpha] = (res, m.state_dict(), states)
    res, final, states = kept[0.05]
    assert res.gate.kept_start and res.best_epoch == 0 and res.best_metric == res.start_metric
    assert (res.gate.candidate_epoch, res.gate.wins, res.gate.losses) == (2, 16, 10)
    assert res.gate.p_value == pytest.approx(min(1.0, 3 * _binomial_tail(26, 16)))
    assert _same(final, states[0]) and not _same(final, states[2])
    res, final, states = kept[None]
    assert res.gate is None and res.best_epoch == 2 and _same(final, states[2])


def test_gate_takes_the_trained_state_when_clearly_better(setup, start_scores):
    from qmace.qat.trainer import fit

    graph, ranges = setup
    scores = [start_scores, _flip(start_scores, 40, 20, 1), _flip(start_scores, 70, 8, 2),
              _flip(start_scores, 50, 10, 3)]
    states: list = []
    m = _prepare(graph, ranges, "int8")
    res = fit(m, _batches(), epochs=3, lr=1e-3, range_lr=1e-2, validate=_scripted(scores, states))
    assert not res.gate.kept_start and res.best_epoch == 2 and res.gate.p_value < 1e-10
    assert "beat the start significantly" in res.gate.message()
    assert _same(m.state_dict(), states[2])


def test_float_returning_validate_is_not_gated(setup):
    """One float per validation: no per-sample results, so no gate (the default alpha included); a gain of
    0.001 is kept as before."""
    from qmace.qat.trainer import fit

    graph, ranges = setup
    states: list = []
    m = _prepare(graph, ranges, "int8")
    res = fit(m, _batches(), epochs=2, lr=1e-3, range_lr=1e-2, validate=_scripted([0.5, 0.501, 0.4], states))
    assert res.gate is None and res.best_epoch == 1 and res.best_metric == 0.501
    assert _same(m.state_dict(), states[1])
    with pytest.raises(ValueError, match="alpha"):
        fit(m, _batches(), epochs=1, lr=1e-3, validate=_scripted([0.5, 0.5], []), gate_alpha=1.0)


class _Killed(Exception):
    pass


def test_resume_keeps_the_gate_inputs(setup, start_scores, tmp_path):
    """Killed after epoch 2 (epoch 1 the noisy best), resumed for epoch 3: the gate still tests epoch 1
    against the start's per-sample scores from the checkpoint and restores the start's state from it."""
    from qmace.qat.trainer import fit

    graph, ranges = setup
    scores = [start_scores, _flip(start_scores, 12, 7, 1), _flip(start_scores, 4, 9, 2),
              _flip(start_scores, 5, 8, 3)]
    straight_states: list = []
    m = _prepare(graph, ranges, "int8")
    straight = fit(m, _batches(), epochs=3, lr=1e-3, range_lr=1e-2,
                   validate=_scripted(scores, straight_states))
    assert straight.gate.kept_start and straight.gate.candidate_epoch == 1

    def die(rep):
        if rep.epoch == 2:
            raise _Killed

    ck = tmp_path / "run.ckpt"
    m = _prepare(graph, ranges, "int8")
    with pytest.raises(_Killed):
        fit(m, _batches(), epochs=3, lr=1e-3, range_lr=1e-2, validate=_scripted(scores, []), checkpoint=ck,
            on_epoch=die)
    m = _prepare(graph, ranges, "int8")
    with torch.no_grad():  # a fresh module whose weights differ from the start: resume must bring both back
        next(m.parameters()).add_(1.0)
    res = fit(m, _batches(), epochs=3, lr=1e-3, range_lr=1e-2, validate=_scripted(scores[3:], []), checkpoint=ck,
              resume=ck)
    assert res.gate == straight.gate and res.best_epoch == 0
    assert _same(m.state_dict(), straight_states[0])
