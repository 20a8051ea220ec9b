"""Linear preference probes per layer: how much of the PM's signal each layer already holds.

For a frozen model, the residual stream after layer l at the end-of-context token of each
response (pm_cache's `reads`) gives a Bradley–Terry probe r = w·h: P(chosen ≻ rejected) =
σ(w·(h_chosen − h_rejected)), fitted as an L2-regularised logistic regression on the
differences (each pair in both orders, so the fit has no side bias). Trained on the train
pairs, scored on the held-out pairs: accuracy with its 95% interval per layer, beside the
longer-response baseline. The regulariser is picked once, on a 10% validation split of the
train pairs at the middle probed layer.

`select_head` turns a probe into a PM's reward head: the layer and the regulariser picked
by k-fold cross-validation on the train pairs alone, then w fitted on all of them (the
exact L2-regularised Bradley–Terry MLE of a linear reward, by Newton's method).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hh_jax.evals import common, stats


def _diffs(reads_Px2xNxD, rows: np.ndarray, layer: int) -> np.ndarray:
    r = np.asarray(reads_Px2xNxD[rows, :, layer], np.float64)
    return r[:, 0] - r[:, 1]


def _fit(d_PxD: np.ndarray, l2: float, weight_P: np.ndarray | None = None):
    x = np.concatenate([d_PxD, -d_PxD])
    y = np.r_[np.ones(len(d_PxD)), np.zeros(len(d_PxD))]
    w = None if weight_P is None else np.r_[weight_P, weight_P]
    return stats.logistic_fit(x, y, l2=l2, weight_N=w, iters=25)


def _accuracy(predict, d_PxD: np.ndarray) -> np.ndarray:
    return predict(d_PxD) > 0.5  # an exact tie (p = ½) has probability 0 here


def layer_probes(train_reads, train_rows, held_reads, held_rows, layers: Sequence[int],
                 l2_grid=(0.01, 0.1, 1.0), seed: int = 0) -> dict:
    """{"l2": chosen, "layers": [{"layer": l (1-based: after block l), accuracy, lo, hi, n}]}."""
    train_rows, held_rows = np.asarray(train_rows), np.asarray(held_rows)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train_rows))
    n_val = max(1, len(perm) // 10)
    val, fit_rows = train_rows[perm[:n_val]], train_rows[perm[n_val:]]
    mid = layers[len(layers) // 2]
    d_fit, d_val = _diffs(train_reads, fit_rows, mid), _diffs(train_reads, val, mid)
    scores = {s: _accuracy(_fit(d_fit, s * len(d_fit)), d_val).mean() for s in l2_grid}
    scale = max(scores, key=scores.get)
    out = []
    for layer in layers:
        d_train = _diffs(train_reads, train_rows, layer)
        correct = _accuracy(_fit(d_train, scale * len(d_train)),
                            _diffs(held_reads, held_rows, layer))
        out.append({"layer": layer + 1, **common.accuracy(correct)})
    return {"l2_per_pair": scale, "validation": {str(k): float(v) for k, v in scores.items()},
            "layers": out}


def select_head(diffs, layers: Sequence[int], n_pairs: int, *, l2_grid=(0.01, 0.03, 0.1),
                folds: int = 5, weight_P: np.ndarray | None = None, seed: int = 0) -> dict:
    """The linear BT reward r = w·f with the best k-fold cross-validated accuracy on the
    train pairs. `diffs(layer)` gives d_PxD = f(chosen) − f(rejected) of every train pair
    for a candidate layer; `weight_P` weights pairs in the fit (PAPER.md §5.1's λ), never
    in the accuracy. Returns {"layer", "l2_per_pair", "cv": [{layer, l2_per_pair,
    accuracy}], "w_D"}; ties go to the earlier layer and the smaller regulariser."""
    split = np.array_split(np.random.default_rng(seed).permutation(n_pairs), folds)
    w_P = np.ones(n_pairs) if weight_P is None else np.asarray(weight_P, np.float64)
    cv, best = [], None
    for layer in layers:
        d_PxD = diffs(layer)
        for l2 in l2_grid:
            correct = np.zeros(n_pairs, bool)
            for k, held in enumerate(split):
                fit = np.concatenate(split[:k] + split[k + 1:])
                predict = _fit(d_PxD[fit], l2 * len(fit), w_P[fit])
                correct[held] = _accuracy(predict, d_PxD[held])
            cv.append({"layer": layer, "l2_per_pair": l2, "accuracy": float(correct.mean())})
            if best is None or cv[-1]["accuracy"] > best["accuracy"]:
                best = cv[-1]
    d_PxD = diffs(best["layer"])
    predict = _fit(d_PxD, best["l2_per_pair"] * n_pairs, w_P)
    return {"layer": best["layer"], "l2_per_pair": best["l2_per_pair"], "cv": cv,
            "w_D": predict.coef_D}


def plot(probe: dict, path: str, title: str, baseline: float | None = None,
         finetuned: float | None = None) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [r["layer"] for r in probe["layers"]]
    ax.errorbar(xs, [r["accuracy"] for r in probe["layers"]],
                yerr=[[r["accuracy"] - r["lo"] for r in probe["layers"]],
                      [r["hi"] - r["accuracy"] for r in probe["layers"]]],
                fmt="o-", ms=3, label="linear probe (frozen model)")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls=":", label="longer response wins")
    if finetuned is not None:
        ax.axhline(finetuned, color="C3", ls="--", label="finetuned PM")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xlabel("layer (residual stream after it, at the EOC token)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
