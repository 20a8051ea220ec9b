"""The simulated labeler (hh_jax/label/simulated.py): it recovers a planted preference at
the rate Bradley–Terry predicts, T → 0 is deterministic, its noise rate is honoured, and a
seed reproduces every label whatever the order."""

import math

import numpy as np
import pytest

from hh_jax.label.simulated import SimulatedLabeler

N = 4000


def within(count: int, n: int, p: float, z: float = 4.5) -> bool:
    """`count` of `n` is within z binomial standard deviations of n·p (a false alarm
    about once in 150,000 runs at z = 4.5)."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def planted_scorer(response: str) -> float:
    """A fake gold PM with a known preference: polite responses score 1 higher."""
    return 1.0 if "please" in response else 0.0


def planted_pairs(n: int, seed: int = 0):
    """Pairs where exactly one side is polite, the polite side random: (ids, r_a, r_b,
    whether a is the planted winner)."""
    a_polite = np.random.default_rng(seed).random(n) < 0.5
    texts = [("Sure, please do." if p else "No.", "No." if p else "Sure, please do.")
             for p in a_polite]
    r_a = np.asarray([planted_scorer(a) for a, _ in texts])
    r_b = np.asarray([planted_scorer(b) for _, b in texts])
    return [f"pair-{i}" for i in range(n)], r_a, r_b, a_polite


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_recovers_the_planted_preference_at_the_bradley_terry_rate(temperature):
    ids, r_a, r_b, a_wins = planted_pairs(N)
    lab = SimulatedLabeler(temperature=temperature, seed=1).label(ids, r_a, r_b)
    agree = int(sum((c == "a") == w for c, w in zip(lab["choice"], a_wins, strict=True)))
    p = 1 / (1 + math.exp(-1.0 / temperature))  # σ(Δ/T), Δ = 1
    assert within(agree, N, p), (agree / N, p)
    np.testing.assert_allclose(lab["p_a_P"], np.where(a_wins, p, 1 - p))
    assert agree / N > 0.5  # the preference is recovered, not inverted


def test_zero_temperature_is_deterministic_and_ties_are_coin_flips():
    ids, r_a, r_b, a_wins = planted_pairs(500)
    lab = SimulatedLabeler(temperature=0.0, seed=3).label(ids, r_a, r_b)
    assert [c == "a" for c in lab["choice"]] == list(a_wins)
    ties = SimulatedLabeler(temperature=0.0, seed=3).label(ids, np.zeros(500), np.zeros(500))
    assert within(ties["choice"].count("a"), 500, 0.5)


@pytest.mark.parametrize("noise", [0.05, 0.2, 0.5])
def test_noise_rate_is_honoured(noise):
    ids, r_a, r_b, a_wins = planted_pairs(N, seed=2)
    lab = SimulatedLabeler(temperature=0.0, noise=noise, seed=4).label(ids, r_a, r_b)
    flips = int(sum((c == "a") != w for c, w in zip(lab["choice"], a_wins, strict=True)))
    assert within(flips, N, noise), (flips / N, noise)
    assert flips == int(lab["flipped_P"].sum())  # at T = 0 every disagreement is a flip


def test_noise_and_temperature_combine():
    """P(label = planted) = (1 − ε)·σ(Δ/T) + ε·(1 − σ(Δ/T))."""
    ids, r_a, r_b, a_wins = planted_pairs(N, seed=5)
    lab = SimulatedLabeler(temperature=1.0, noise=0.1, seed=6).label(ids, r_a, r_b)
    agree = int(sum((c == "a") == w for c, w in zip(lab["choice"], a_wins, strict=True)))
    s = 1 / (1 + math.exp(-1.0))
    assert within(agree, N, 0.9 * s + 0.1 * (1 - s))


def test_seed_reproduces_labels_in_any_order():
    ids, r_a, r_b, _ = planted_pairs(300)
    lab = SimulatedLabeler(temperature=1.0, noise=0.1, seed=7)
    first = lab.label(ids, r_a, r_b)["choice"]
    assert lab.label(ids, r_a, r_b)["choice"] == first
    order = np.random.default_rng(0).permutation(300)
    shuffled = lab.label([ids[i] for i in order], r_a[order], r_b[order])["choice"]
    assert [shuffled[list(order).index(i)] for i in range(300)] == first  # keyed by pair id
    other = SimulatedLabeler(temperature=1.0, noise=0.1, seed=8).label(ids, r_a, r_b)["choice"]
    assert other != first


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SimulatedLabeler(temperature=-1.0)
    with pytest.raises(ValueError, match="noise"):
        SimulatedLabeler(noise=1.5)
    with pytest.raises(ValueError, match="ids"):
        SimulatedLabeler().label(["a"], np.zeros(2), np.zeros(2))
    assert SimulatedLabeler(0.5, 0.1, 2).name == "simulated:T=0.5,noise=0.1,seed=2"
