"""The paper's fits, in numpy: score against √KL for RL (PAPER.md §4.3) and PM accuracy
against size and data (PAPER.md §4, eq. A.1), and the parameter count P they use."""

from __future__ import annotations

import math

import numpy as np

# PAPER.md §4, eq. A.1 (helpful-only PMs): acc ≈ 0.72 + 0.007·log(P/1e11) + 0.015·log(D/8e4)
PAPER_FIT = {"a": 0.72, "b": 0.007, "c": 0.015}
P_REF, D_REF = 1e11, 8e4


def sqrt_kl_fit(kl, score) -> dict:
    """Least-squares score ≈ a + b·√KL (PAPER.md §4.3) with its R²."""
    x, y = np.sqrt(np.maximum(np.asarray(kl, np.float64), 0)), np.asarray(score, np.float64)
    if len(x) < 2 or np.ptp(x) < 1e-6:  # the policy has not moved: nothing to fit
        return {"a": float("nan"), "b": float("nan"), "r2": float("nan"), "n": len(x)}
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    r2 = 1 - resid.var() / y.var() if y.var() > 0 else float("nan")
    return {"a": float(a), "b": float(b), "r2": float(r2), "n": len(x)}


def early_sqrt_kl_fit(points: list[dict], key: str = "eval/test_score") -> dict:
    """`sqrt_kl_fit` over the early phase of a PPO run's evaluations ({"eval/kl", key}):
    the first ⅔ of the points, at least 3."""
    pts = [p for p in points if key in p]
    early = pts[: max(3, -(-2 * len(pts) // 3))]
    if len(early) < 3:
        return {"n": len(early)}
    fit = sqrt_kl_fit([p["eval/kl"] for p in early], [p[key] for p in early])
    if math.isnan(fit["b"]):
        return {"n": len(early), "degenerate": True}
    return {"intercept": fit["a"], "slope": fit["b"], "r2": fit["r2"], "n": len(early),
            "score_key": key}


def non_embedding_params(model: dict) -> int:
    """Transformer parameters without token embeddings / LM head (the paper's P), from a
    ModelConfig's fields."""
    d, k = model["d_model"], model.get("head_dim") or model["d_model"] // model["n_heads"]
    attn = d * k * (2 * model["n_heads"] + 2 * model["n_kv_heads"])
    per_layer = attn + 3 * d * model["d_ff"] + 2 * d
    return model["n_layers"] * per_layer + d


def fit_scaling(p, d, acc) -> dict:
    """Least squares acc ≈ a + b·ln(P/1e11) + c·ln(D/8e4); a term whose variable takes one
    value only is not identifiable and comes back NaN (its effect folds into a)."""
    p, d, acc = (np.asarray(x, np.float64) for x in (p, d, acc))
    cols = {"b": np.log(p / P_REF), "c": np.log(d / D_REF)}
    use = [name for name, x in cols.items() if len(x) and np.ptp(x) > 0]
    design = np.stack([np.ones_like(acc)] + [cols[n] for n in use], axis=1)
    out = {"a": float("nan"), "b": float("nan"), "c": float("nan"), "r2": float("nan"),
           "n": int(len(acc))}
    if len(acc) < design.shape[1]:
        return out
    coef, *_ = np.linalg.lstsq(design, acc, rcond=None)
    out.update({"a": float(coef[0]), **{n: float(c) for n, c in zip(use, coef[1:], strict=True)}})
    resid = acc - design @ coef
    if len(acc) > design.shape[1] and acc.var() > 0:
        out["r2"] = float(1 - resid.var() / acc.var())
    return out


def predict_scaling(fit: dict, p, d):
    """A `fit_scaling` result at (P, D); a NaN coefficient counts as 0."""
    b = 0.0 if math.isnan(fit["b"]) else fit["b"]
    c = 0.0 if math.isnan(fit["c"]) else fit["c"]
    return fit["a"] + b * np.log(np.asarray(p) / P_REF) + c * np.log(np.asarray(d) / D_REF)
