"""Statistics for the evaluators, pure numpy: intervals, AUROC, Mahalanobis distances,
a logistic probe, and Bradley–Terry / Elo fits.

Shapes in names: N rows, D features, P players, G games.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)  # PAPER.md §5 [P §2.4]: Elo = (400/ln 10)·r ≈ 174·r


# ----------------------------------------------------------------------------- intervals


def wilson_interval(k: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(stat: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap: `stat(idx_N)` on `n_boot` resamples of range(n) with
    replacement (idx indexes the caller's data, so paired data stay paired)."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return (float(lo), float(hi))


def mean_interval(x_N: Sequence[float], **kw) -> tuple[float, float]:
    """Bootstrap interval of a mean (keywords as `bootstrap_interval`)."""
    x = np.asarray(x_N, np.float64)
    return bootstrap_interval(lambda idx: float(x[idx].mean()), len(x), **kw)


# ----------------------------------------------------------------------------- AUROC


def average_ranks(x_N: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    x = np.asarray(x_N)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auroc(scores_neg: Sequence[float], scores_pos: Sequence[float]) -> float:
    """P(score_pos > score_neg) + ½·P(tie): the Mann–Whitney U statistic / (n_pos·n_neg).
    For OOD detection the positives are the OOD rows and the score says "more OOD"."""
    neg, pos = np.asarray(scores_neg, np.float64), np.asarray(scores_pos, np.float64)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("auroc needs at least one score on each side")
    ranks = average_ranks(np.concatenate([neg, pos]))
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------- Mahalanobis


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """μ and the regularised covariance Σ + ridge·(tr Σ / D)·I of in-distribution rows."""

    mean_D: np.ndarray
    precision_DxD: np.ndarray  # (Σ + ridge)⁻¹
    var_D: np.ndarray  # diagonal of the regularised Σ (Σ_diag)


def fit_gaussian(x_NxD: np.ndarray, ridge: float = 1e-3) -> Gaussian:
    """PAPER.md §6 [P §5.4]: μ and full covariance with 1/N normalisation, fitted on the
    in-distribution rows. `ridge` (relative to the mean variance) keeps Σ invertible when
    N ≤ D or features are collinear; it is added to Σ_diag too, so the two terms of the
    relative distance see the same Σ."""
    x = np.asarray(x_NxD, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_gaussian needs an N×D array with N ≥ 2, got shape {x.shape}")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / len(x)
    cov[np.diag_indices_from(cov)] += ridge * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    return Gaussian(mean, np.linalg.inv(cov), np.diag(cov).copy())


def mahalanobis(g: Gaussian, x_NxD: np.ndarray) -> np.ndarray:
    """(x − μ)ᵀ Σ⁻¹ (x − μ) per row (squared, as PAPER.md §6 writes it)."""
    xc = np.asarray(x_NxD, np.float64) - g.mean_D
    return np.einsum("nd,de,ne->n", xc, g.precision_DxD, xc)


def relative_mahalanobis(g: Gaussian, x_NxD: np.ndarray) -> np.ndarray:
    """Simplified relative Mahalanobis distance, PAPER.md §6 [P §5.4, App. B.9]:
    (x−μ)ᵀΣ⁻¹(x−μ) − (x−μ)ᵀΣ_diag⁻¹(x−μ), Σ_diag the diagonal of the same Σ (the
    background model is the diagonal Gaussian with the same mean, not a second fit)."""
    xc = np.asarray(x_NxD, np.float64) - g.mean_D
    return mahalanobis(g, x_NxD) - np.einsum("nd,d->n", xc * xc, 1.0 / g.var_D)


# ----------------------------------------------------------------------------- logistic probe


def logistic_fit(x_NxD: np.ndarray, y_N: np.ndarray, *, l2: float = 1e-2,
                 weight_N: np.ndarray | None = None, iters: int = 50):
    """L2-regularised logistic regression by Newton's method on standardised features.
    Returns `predict(x_MxD) -> P(y = 1)`. Used for few-shot outlier exposure (PAPER.md §6,
    [P App. B.9]: a linear classifier on frozen activations)."""
    x = np.asarray(x_NxD, np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    y = np.asarray(y_N, np.float64)
    w_n = np.ones(len(x)) if weight_N is None else np.asarray(weight_N, np.float64)
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # no penalty on the bias
    w = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(z @ w)))
        grad = z.T @ (w_n * (p - y)) + reg * w
        hess = (z * (w_n * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break

    def predict(x_MxD: np.ndarray) -> np.ndarray:
        zm = np.c_[(np.asarray(x_MxD, np.float64) - mu) / sd, np.ones(len(x_MxD))]
        return 1 / (1 + np.exp(-(zm @ w)))

    # the fit in the raw features' units: P(y = 1) = σ(x·coef_D + intercept)
    predict.coef_D = w[:-1] / sd
    predict.intercept = float(w[-1] - predict.coef_D @ mu)
    return predict


# ----------------------------------------------------------------------------- Bradley–Terry


def win_matrix(i_G: Sequence[int], j_G: Sequence[int], outcome_G: Sequence[float],
               n_players: int) -> np.ndarray:
    """W[a, b] = wins of a over b; outcome 1 = i won, 0 = j won, ½ = tie (half each)."""
    w = np.zeros((n_players, n_players))
    o = np.asarray(outcome_G, np.float64)
    np.add.at(w, (np.asarray(i_G), np.asarray(j_G)), o)
    np.add.at(w, (np.asarray(j_G), np.asarray(i_G)), 1 - o)
    return w


def bradley_terry(wins_PxP: np.ndarray, *, anchor: int = 0, l2: float = 1e-6,
                  iters: int = 100) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths in Elo (PAPER.md §5 [P §2.4, B.5]):
    maximises Σ_ab W_ab log σ(r_a − r_b) (− ½·l2·|r|², a faint prior that keeps an
    undefeated player finite) by Newton's method, with r_anchor = 0. Returns
    Elo_P = (400/ln 10)·r, so P(a beats b) = 1/(1 + 10^((E_b − E_a)/400))."""
    w = np.asarray(wins_PxP, np.float64)
    p = w.shape[0]
    n = w + w.T
    free = np.array([a for a in range(p) if a != anchor])
    r = np.zeros(p)
    for _ in range(iters):
        s = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))  # P(a beats b)
        grad = (w * (1 - s)).sum(1) - (w.T * s).sum(1) - l2 * r
        c = n * s * (1 - s)
        hess = c - np.diag(c.sum(1) + l2)  # negative definite on the free coordinates
        step = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        step *= min(1.0, 3.0 / max(np.max(np.abs(step)), 1e-300))  # damped: no overshoot
        r[free] -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return r * ELO_PER_NAT


def bt_loglik(wins_PxP: np.ndarray, elo_P: np.ndarray) -> float:
    r = np.asarray(elo_P, np.float64) / ELO_PER_NAT
    d = r[:, None] - r[None, :]
    return float(-(np.asarray(wins_PxP) * np.logaddexp(0.0, -d)).sum())


def bradley_terry_bootstrap(i_G, j_G, outcome_G, n_players: int, *, groups_G=None,
                            n_boot: int = 200, level: float = 0.95, seed: int = 0,
                            anchor: int = 0, l2: float = 1e-3) -> dict[str, np.ndarray]:
    """Elo and percentile intervals from resampling games (or whole groups of games, e.g.
    every comparison made on one prompt, when `groups_G` is given: the unit sampled is
    then the prompt). Returns {"elo", "lo", "hi", "samples"}."""
    i, j, o = np.asarray(i_G), np.asarray(j_G), np.asarray(outcome_G, np.float64)
    elo = bradley_terry(win_matrix(i, j, o, n_players), anchor=anchor, l2=l2)
    g = np.arange(len(i)) if groups_G is None else np.asarray(groups_G)
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    samples = np.empty((n_boot, n_players))
    for b in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
        samples[b] = bradley_terry(win_matrix(i[idx], j[idx], o[idx], n_players),
                                   anchor=anchor, l2=l2)
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a], axis=0)
    return {"elo": elo, "lo": lo, "hi": hi, "samples": samples}
