"""evals/elo.py: games from PM scores, the Elo fit and the paper's 174·ΔPM relation."""

import json

import numpy as np
import pytest

from hh_jax.evals import datasets, elo, stats


def test_games_by_hand():
    s = np.array([[1.0, 0.0], [0.5, 0.0], [2.0, -1.0]])  # 3 policies × 2 prompts
    i, j, o, q = elo.games(s)
    got = sorted(zip(i.tolist(), j.tolist(), q.tolist(), o.tolist(), strict=True))
    assert got == [(0, 1, 0, 1.0), (0, 1, 1, 0.5), (0, 2, 0, 0.0), (0, 2, 1, 1.0),
                   (1, 2, 0, 0.0), (1, 2, 1, 1.0)]
    _, _, so, _ = elo.games(s, soft=True)
    assert so[0] == pytest.approx(1 / (1 + np.exp(-0.5)))


def test_elo_recovers_174_per_pm_unit():
    # PM scores μ_p + Gumbel noise: s_a − s_b is logistic, so P(a beats b) = σ(μ_a − μ_b),
    # exactly the paper's relation ΔElo = (400/ln 10)·ΔPM ≈ 174·ΔPM
    rng = np.random.default_rng(0)
    mu = np.array([0.0, 0.5, 1.0, -0.7])
    scores = mu[:, None] + rng.gumbel(size=(4, 3000))
    t = elo.elo_table(scores, ["a", "b", "c", "d"], n_boot=30)
    np.testing.assert_allclose(t["elo"], stats.ELO_PER_NAT * mu, atol=25)
    assert t["elo_per_pm_unit"] == pytest.approx(stats.ELO_PER_NAT, rel=0.1)
    assert np.all(t["lo"] <= t["elo"]) and np.all(t["elo"] <= t["hi"])
    np.testing.assert_allclose(t["pm_elo"], stats.ELO_PER_NAT * (scores.mean(1) - scores[0].mean()))
    assert t["win_rate_vs_anchor"][2] == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.03)


def test_parse_policy():
    assert elo.parse_policy("pi0=smollm2-135m") == elo.Policy("pi0", "smollm2-135m", 1)
    assert elo.parse_policy("bon16=runs/x/params@bon:16") == elo.Policy("bon16", "runs/x/params",
                                                                        16)
    assert elo.parse_policy("runs/ppo/params/").name == "params"


def test_best_of_picks_the_selector_top():
    samples = [["a", "bb", "c"], ["dd", "e", "f"]]
    selector = lambda texts: np.array([float(len(t.split("Assistant:")[-1])) for t in texts])  # noqa
    assert elo.best_of(samples, 3, ["p", "q"], selector) == ["bb", "dd"]
    assert elo.best_of(samples, 1, ["p", "q"], selector) == ["a", "dd"]


def test_responses_file_roundtrip_and_errors(tmp_path):
    p = str(tmp_path / "r.jsonl")
    elo.write_responses(p, ["q1", "q2"], {"x": ["a", "b"], "y": ["c", "d"]})
    prompts, replies = elo.read_responses(p, ["x", "y"])
    assert prompts == ["q1", "q2"] and replies == {"x": ["a", "b"], "y": ["c", "d"]}
    with open(p, "a") as f:
        f.write(json.dumps({"policy": "z", "prompt": "q1"}) + "\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:5: bad_row"):
        elo.read_responses(p, ["x", "y"])
