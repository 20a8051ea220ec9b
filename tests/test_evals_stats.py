"""evals/stats.py against hand computations and brute-force numpy references."""

import itertools

import numpy as np
import pytest

from hh_jax.evals import stats


def test_wilson_hand_computed():
    # 8/10 at z = 1.96: centre (0.8 + z²/20)/(1 + z²/10), half-width as in Wilson (1927)
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert stats.wilson_interval(0, 5)[0] == 0.0 and stats.wilson_interval(5, 5)[1] == 1.0


def test_bootstrap_interval_coverage():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(100):
        x = rng.normal(size=60)
        lo, hi = stats.mean_interval(x, n_boot=200, level=0.9, seed=rep)
        hits += lo <= 0.0 <= hi
    assert 78 <= hits <= 98  # nominal 90 (percentile bootstrap runs slightly narrow)


def test_auroc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        neg, pos = rng.integers(0, 6, 40), rng.integers(1, 8, 25)  # many ties
        pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for n, p in itertools.product(neg, pos)]
        assert stats.auroc(neg, pos) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert stats.auroc([0, 1], [2, 3]) == 1.0 and stats.auroc([2, 3], [0, 1]) == 0.0
    assert stats.auroc([1, 1], [1]) == 0.5


def test_mahalanobis_and_relative_against_direct_formula():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 4))
    train = rng.normal(size=(200, 4)) @ a + 3.0
    test = rng.normal(size=(7, 4)) * 2
    ridge = 1e-2
    g = stats.fit_gaussian(train, ridge=ridge)
    mu = train.mean(0)
    cov = np.cov(train, rowvar=False, bias=True)  # 1/N normalisation (PAPER.md §6)
    cov += ridge * np.trace(cov) / 4 * np.eye(4)
    for x, md, rmd in zip(test, stats.mahalanobis(g, test), stats.relative_mahalanobis(g, test),
                          strict=True):
        d = x - mu
        full = d @ np.linalg.solve(cov, d)
        diag = sum(d[k] ** 2 / cov[k, k] for k in range(4))
        assert md == pytest.approx(full, rel=1e-9)
        assert rmd == pytest.approx(full - diag, rel=1e-9, abs=1e-9)


def test_relative_mahalanobis_is_zero_for_independent_features():
    # with a diagonal Σ the two terms coincide: the relative distance vanishes
    g = stats.Gaussian(np.zeros(3), np.diag(1 / np.array([1.0, 4.0, 9.0])),
                       np.array([1.0, 4.0, 9.0]))
    x = np.array([[1.0, 2.0, 3.0], [-2.0, 0.0, 6.0]])
    np.testing.assert_allclose(stats.mahalanobis(g, x), [3.0, 8.0])
    np.testing.assert_allclose(stats.relative_mahalanobis(g, x), [0.0, 0.0], atol=1e-12)


def _games(elo, per_pair, rng):
    i, j, o = [], [], []
    for a, b in itertools.combinations(range(len(elo)), 2):
        p = 1 / (1 + 10 ** ((elo[b] - elo[a]) / 400))
        wins = rng.random(per_pair) < p
        i += [a] * per_pair
        j += [b] * per_pair
        o += list(wins.astype(float))
    return np.array(i), np.array(j), np.array(o)


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(3)
    true = np.array([0.0, 120.0, -200.0, 310.0, 40.0])
    i, j, o = _games(true, 3000, rng)
    w = stats.win_matrix(i, j, o, 5)
    elo = stats.bradley_terry(w, anchor=0)
    assert elo[0] == 0.0
    np.testing.assert_allclose(elo, true, atol=25)
    # MLE score equations: each player's wins equal its expected wins
    r = elo / stats.ELO_PER_NAT
    expected = ((w + w.T) / (1 + np.exp(-(r[:, None] - r[None, :])))).sum(1)
    np.testing.assert_allclose(w.sum(1), expected, rtol=1e-6)
    # the fit beats any perturbation
    assert stats.bt_loglik(w, elo) > stats.bt_loglik(w, elo + np.array([0, 5, 0, 0, 0]))


def test_bradley_terry_two_players_closed_form_and_undefeated():
    w = np.array([[0, 30], [10, 0]], float)  # 30 wins of 0 over 1: P = 0.75
    assert stats.bradley_terry(w, anchor=1)[0] == pytest.approx(400 * np.log10(3), abs=1e-3)
    elo = stats.bradley_terry(np.array([[0, 5], [0, 0]], float), l2=1e-3)
    assert np.all(np.isfinite(elo)) and elo[1] < -500


def test_bradley_terry_bootstrap_covers_truth():
    rng = np.random.default_rng(4)
    true = np.array([0.0, 100.0, -150.0])
    i, j, o = _games(true, 400, rng)
    out = stats.bradley_terry_bootstrap(i, j, o, 3, n_boot=100, seed=0)
    assert np.all(out["lo"] <= out["elo"]) and np.all(out["elo"] <= out["hi"])
    assert np.all(out["lo"] - 20 <= true) and np.all(true <= out["hi"] + 20)
    assert np.all(out["hi"][1:] - out["lo"][1:] < 150) and out["hi"][0] == out["lo"][0] == 0


def test_logistic_probe_recovers_probabilities():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4000, 3))
    p_true = 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 1] + 0.5)))
    y = rng.random(4000) < p_true
    predict = stats.logistic_fit(x, y, l2=1e-3)
    assert np.abs(predict(x) - p_true).mean() < 0.03
