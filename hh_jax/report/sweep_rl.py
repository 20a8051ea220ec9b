"""The RL part of a sweep report: PPO against √KL for every member (policy size × λ_KL).

One row per member with a finished `ppo` stage: the policy's size and non-embedding
parameters, λ_KL, the held-out judge score (the test PM's when there is one) of π0 and of
the final policy, the final KL, the √KL fit of that run (PAPER.md §4.3) and, from the
member's `bon` stage, the best-of-n judge score at the n whose analytic KL is nearest the
final PPO KL. The figure puts every member's evaluations on one score-vs-√KL plot, with
best-of-n of each size dashed: the paper's comparison of policy sizes and of RL with BoN.
"""

from __future__ import annotations

import os

import numpy as np

from hh_jax.evals import fits
from hh_jax.metrics import pyplot
from hh_jax.report.page import COLORS, fmt
from hh_jax.report.run import ppo_points, read_json, read_metrics, stages_of_kind


def _stage(config: dict, kind: str) -> str | None:
    return next(iter(stages_of_kind(config, kind)), None)


def collect(root: str, members: list[str]) -> list[dict]:
    rows = []
    for name in members:
        member_dir = os.path.join(root, name)
        config = read_json(os.path.join(member_dir, "config.json"), {})
        stage = _stage(config, "ppo")
        if stage is None:
            continue
        summary = read_json(os.path.join(member_dir, stage, "summary.json"))
        meta = read_json(os.path.join(member_dir, stage, "params", "meta.json"))
        row = {"member": name, "complete": bool(summary and meta)}
        rows.append(row)
        if not row["complete"]:
            continue
        kl, score, key = ppo_points(summary, read_metrics(
            os.path.join(member_dir, stage)))
        fit = summary.get("sqrt_kl_fit") or {}
        row.update(size=(config.get("lm") or {}).get("model", "?"),
                   P=fits.non_embedding_params(meta["model"]),
                   kl_coef=(config[stage].get("ppo") or {}).get("kl_coef"), judge=key,
                   kl=kl, score=score, slope=fit.get("slope"), r2=fit.get("r2"))
        bon = _stage(config, "bon")
        bon_rows = (read_json(os.path.join(member_dir, str(bon), "summary.json"), {})
                    .get("rows") or []) if bon else []
        if bon_rows and len(kl):
            near = min(bon_rows, key=lambda r: abs(r["kl"] - kl[-1]))
            row.update(bon_n=near["n"], bon_kl=near["kl"], bon_score=near.get("test_score"),
                       bon_curve=[(r["kl"], r.get("test_score")) for r in bon_rows])
    return rows


def section(page, root: str, members: list[str]) -> None:
    rows = collect(root, members)
    if not rows:
        return
    page.heading("RLHF: PPO against √KL (policy size × λ_KL)", 3)
    page.para("Judge = the held-out test PM's score on held-out prompts (the train PM's when a "
              "member has no test PM). Best-of-n: the n whose analytic KL = log n − (n−1)/n is "
              "nearest the final PPO KL, judged by the same PM.")
    done = [r for r in rows if r["complete"] and len(r["kl"])]
    page.table(["member", "size", "P", "λ_KL", "judge: π0", "judge: final", "final KL",
                "√KL slope", "R²", "best-of-n (n, KL): judge"],
               [[r["member"], r.get("size"), r.get("P"), r.get("kl_coef"),
                 *(_ends(r.get("score", ())) if r in done else (None, None)),
                 r["kl"][-1] if r in done else "not complete", r.get("slope"), r.get("r2"),
                 f"n={r['bon_n']}, KL {r['bon_kl']:.2f}: {fmt(r['bon_score'])}"
                 if "bon_n" in r else None] for r in rows])
    if done:
        _plot(page, done)


def _ends(score) -> tuple:
    """(first, last) of a member's evaluation scores."""
    return (score[0], score[-1]) if len(score) else (None, None)


def _plot(page, rows: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes = sorted({r["size"] for r in rows}, key=lambda s: min(x["P"] for x in rows
                                                                if x["size"] == s))
    color = dict(zip(sizes, COLORS * 4, strict=False))
    markers = "osD^v<>"
    coefs = sorted({r["kl_coef"] for r in rows})
    for r in rows:
        m = markers[coefs.index(r["kl_coef"]) % len(markers)]
        ax.plot(np.sqrt(np.maximum(r["kl"], 0)), r["score"], m + "-", ms=4, lw=1,
                color=color[r["size"]], label=f"PPO {r['size']}, λ_KL {r['kl_coef']:g}")
    for size in sizes:  # best-of-n from π0 depends on the size only: one curve each
        curve = next((r["bon_curve"] for r in rows if r["size"] == size and "bon_curve" in r),
                     None)
        if curve and all(isinstance(y, int | float) for _, y in curve):
            x, y = np.sqrt([k for k, _ in curve]), [y for _, y in curve]
            ax.plot(x, y, "x--", color=color[size], alpha=0.7, label=f"best of n, {size}")
    ax.set_xlabel("√KL(π‖π0) (nats)")
    ax.set_ylabel(f"judge score ({rows[0]['judge']})")
    ax.legend(fontsize=7)
    page.figure(fig, "sweep_sqrt_kl", "Held-out judge score against √KL for every member: "
                "PPO evaluations (solid; marker = λ_KL) and best-of-n (dashed), colour = size")
