"""PM evaluation: accuracy with intervals, baselines, calibration, plots, and `hh-jax eval pm`.

The statistics are numpy on per-pair arrays gathered on the host after scoring:
r_chosen_P, r_rejected_P (P pairs), the subset name, the number of Human turns and the
response lengths.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics, reward, sharding
from hh_jax.data import hh
from hh_jax.policy import Frozen
from hh_jax.tokenizer import load_tokenizer


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def _acc(correct_P: np.ndarray) -> dict:
    n = int(len(correct_P))
    k = float(correct_P.sum())
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "ci95": [lo, hi], "n": n}


def longer_wins(len_chosen_P: np.ndarray, len_rejected_P: np.ndarray) -> np.ndarray:
    """The "longer response wins" baseline per pair: 1, 0, or 0.5 on ties."""
    return np.where(len_chosen_P == len_rejected_P, 0.5,
                    (len_chosen_P > len_rejected_P).astype(np.float64))


def calibration(delta_P: np.ndarray, bins: int = 10) -> dict:
    """Reliability of P(chosen ≻ rejected) = σ(Δ), Δ = r_chosen − r_rejected.

    Each pair enters in both orders, (σ(Δ), 1) and (σ(−Δ), 0), so predictions span [0, 1]
    and the diagram is symmetric; ECE = Σ_b (n_b / N)·|observed_b − predicted_b|.
    """
    p = 1.0 / (1.0 + np.exp(-np.asarray(delta_P, np.float64)))
    pred = np.concatenate([p, 1 - p])
    obs = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(pred, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        if n == 0:
            table.append({"lo": edges[b], "hi": edges[b + 1], "n": 0})
            continue
        predicted, observed = float(pred[sel].mean()), float(obs[sel].mean())
        ece += n / len(pred) * abs(observed - predicted)
        table.append({"lo": edges[b], "hi": edges[b + 1], "n": n, "predicted": predicted,
                      "observed": observed})
    return {"ece": ece, "bins": table}


def pm_report(r_chosen_P, r_rejected_P, subsets: Sequence[str], turns_P, len_chosen_P,
              len_rejected_P) -> dict:
    """Accuracy overall / per subset / per turn with 95% intervals, length baselines,
    calibration and score statistics (mean/std: the normalisation PPO uses)."""
    rc, rr = np.asarray(r_chosen_P, np.float64), np.asarray(r_rejected_P, np.float64)
    correct = (rc > rr).astype(np.float64) + 0.5 * (rc == rr)
    base = longer_wins(np.asarray(len_chosen_P), np.asarray(len_rejected_P))
    subsets = np.asarray(subsets, dtype=object)
    turns = np.asarray(turns_P)
    out = {"overall": {**_acc(correct), "longer_wins": float(base.mean())}}
    out["per_subset"] = {s: {**_acc(correct[subsets == s]),
                             "longer_wins": float(base[subsets == s].mean())}
                         for s in sorted(set(subsets))}
    out["per_turn"] = {int(t): _acc(correct[turns == t]) for t in sorted(set(turns.tolist()))}
    out["calibration"] = calibration(rc - rr)
    scores = np.concatenate([rc, rr])
    out["scores"] = {"mean": float(scores.mean()), "std": float(scores.std()),
                     "mean_margin": float((rc - rr).mean())}
    return out


def comparisons_report(comps: Sequence, r_chosen_P, r_rejected_P) -> dict:
    """`pm_report` of scored comparisons (hh.Comparison: subset, context, chosen, rejected)."""
    return pm_report(r_chosen_P, r_rejected_P, [c.subset for c in comps],
                     [c.context.count("\n\nHuman:") for c in comps],
                     [len(c.chosen) for c in comps], [len(c.rejected) for c in comps])


def format_table(report: dict, title: str) -> str:
    lines = [title, f"{'subset':<28}{'n':>6}  {'accuracy':>8}  {'95% CI':>15}  {'longer':>6}"]
    rows = list(report["per_subset"].items()) + [("ALL", report["overall"])]
    for name, r in rows:
        lo, hi = r["ci95"]
        lines.append(f"{name:<28}{r['n']:>6}  {r['accuracy']:>8.3f}  [{lo:.3f}, {hi:.3f}]  "
                     f"{r['longer_wins']:>6.3f}")
    turns = ", ".join(f"{t}: {r['accuracy']:.3f} (n={r['n']})"
                      for t, r in report["per_turn"].items())
    lines.append(f"accuracy by Human turns: {turns}")
    lines.append(f"ECE {report['calibration']['ece']:.4f}; scores mean "
                 f"{report['scores']['mean']:.3f} std {report['scores']['std']:.3f}")
    return "\n".join(lines)


def reliability_plot(report: dict, path: str, title: str) -> str:
    plt = metrics.pyplot()
    bins = [b for b in report["calibration"]["bins"] if b["n"] > 0]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-",
            label=f"PM (ECE {report['calibration']['ece']:.3f})")
    ax.set_xlabel("predicted P(A preferred) = σ(r_A − r_B)")
    ax.set_ylabel("observed frequency A preferred")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_metrics(report: dict) -> dict:
    """The scalars of a `pm_report` logged as metrics and in summary.json."""
    out = {"eval/accuracy": report["overall"]["accuracy"],
           "eval/ece": report["calibration"]["ece"],
           "eval/longer_wins": report["overall"]["longer_wins"]}
    out.update({f"eval/accuracy/{s}": r["accuracy"] for s, r in report["per_subset"].items()})
    return out


def evaluate_pairs(score_fn, params, comps, tok, cfg: ConfigDict, mesh) -> dict:
    """The `pm_report` of a PM on comparisons (`reward.score_pairs` with a jitted
    `reward.score_step`; cfg: max_len, eval_batch_size, pair_layout, buckets)."""
    return comparisons_report(comps, *reward.score_pairs(score_fn, params, comps, tok, cfg, mesh))


def eval_export(params_dir: str, files: list[str], out_dir: str, *, skip_invalid: bool = False,
                batch_size: int = 32, max_len: int | None = None, mesh_shape=(-1, 1, 1)) -> dict:
    """`hh-jax eval pm`: scores any HH-format jsonl(.gz) files with a PM export."""
    meta = checkpoint.read_meta(params_dir)
    if meta.get("stage") not in ("pm", "pmp"):
        raise ValueError(f"{params_dir}: a {meta.get('stage')!r} export, not a PM")
    tok = load_tokenizer(checkpoint.tokenizer_spec(params_dir))
    comps, report = hh.load_hh_comparisons(files, skip_invalid=skip_invalid)
    mesh = sharding.make_mesh(mesh_shape)
    pm = Frozen(params_dir, mesh, "pm")
    cfg = ConfigDict({"max_len": max_len or meta.get("max_len", 512),
                      "eval_batch_size": batch_size,
                      "pair_layout": meta.get("pair_layout", "shared")})
    with sharding.activate(mesh):
        rep = evaluate_pairs(jax.jit(functools.partial(reward.score_step, model=pm.model)),
                             pm.params, comps, tok, cfg, mesh)
    print(format_table(rep, f"PM {params_dir} on {len(comps)} pairs"), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    reliability_plot(rep, os.path.join(out_dir, "calibration.png"), params_dir)
    summary = {**eval_metrics(rep), "report": rep, "files": [str(f) for f in files],
               "data": report.total.to_json()}
    metrics.write_summary(out_dir, summary)
    return summary
