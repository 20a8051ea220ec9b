"""The sweep report (`hh-jax report ROOT` on a sweep root): per member the PM's held-out
accuracy against size P and data D with the paper's scaling fit acc ≈ a + b·log(P) +
c·log(D) (PAPER.md §4, eq. A.1), the RL section of sweep_rl.py, and links to each
member's own report. Reads what the sweep runner (hh_jax/sweep.py) and the stages leave on
disk: sweep.json, each member's config.json, summary.json and params/meta.json.
"""

from __future__ import annotations

import math
import os

import numpy as np

from hh_jax.evals import fits
from hh_jax.metrics import pyplot
from hh_jax.report import sweep_rl
from hh_jax.report.page import COLORS
from hh_jax.report.run import error_bars, read_json, stages_of_kind


def _pm_stage(config: dict) -> str | None:
    pms = stages_of_kind(config, "pm")
    return "pm" if "pm" in pms else (pms[-1] if pms else None)


def member_dirs(root: str) -> list[str]:
    """Members from sweep.json, else every subdirectory holding a config.json (a sweep run
    member by member by a cluster launcher, which writes no sweep.json)."""
    info = read_json(os.path.join(root, "sweep.json"))
    if info:
        return [m["name"] for m in info["members"]]
    return sorted(d for d in os.listdir(root)
                  if os.path.exists(os.path.join(root, d, "config.json")))


def is_sweep_root(root: str) -> bool:
    return os.path.exists(os.path.join(root, "sweep.json")) or (
        not os.path.exists(os.path.join(root, "config.json")) and bool(member_dirs(root)))


def collect(root: str) -> list[dict]:
    """One row per member with a finished PM stage: size, P, D, accuracy, CI."""
    rows = []
    for name in member_dirs(root):
        member_dir = os.path.join(root, name)
        config = read_json(os.path.join(member_dir, "config.json"), {})
        stage = _pm_stage(config)
        summary = read_json(os.path.join(member_dir, str(stage), "summary.json"))
        meta = read_json(os.path.join(member_dir, str(stage), "params", "meta.json"))
        row = {"member": name, "stage": stage, "complete": bool(summary and meta)}
        if row["complete"]:
            overall = summary["report"]["overall"]
            row.update(size=(config.get("lm") or {}).get("model", "?"),
                       P=fits.non_embedding_params(meta["model"]), D=summary["data"]["used"],
                       acc=overall["accuracy"], ci=overall["ci95"],
                       longer=overall["longer_wins"])
        rows.append(row)
    return rows


def sweep_report(page, root: str) -> None:
    info = read_json(os.path.join(root, "sweep.json"), {})
    rows = collect(root)
    page.para(f"Sweep of {info.get('experiment', 'an experiment')} ({len(rows)} members) under "
              f"{root}. "
              "P = non-embedding parameters, D = training comparisons, accuracy on the held-out "
              "HH pairs with a 95% Wilson interval.")
    if any(r["stage"] for r in rows):
        _pm_part(page, rows)
    sweep_rl.section(page, root, member_dirs(root))
    page.links([(f"{r['member']} report", f"{r['member']}/report.html") for r in rows
                if os.path.exists(os.path.join(root, r["member"], "report.html"))])


def _pm_part(page, rows: list[dict]) -> None:
    done = [r for r in rows if r["complete"]]
    page.table(["member", "PM stage", "size", "P", "D", "accuracy", "95% CI", "longer wins"],
               [[r["member"], r["stage"], r.get("size"), r.get("P"), r.get("D"), r.get("acc"),
                 f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if "ci" in r else "not complete",
                 r.get("longer")] for r in rows])
    table = []
    for stage in sorted({r["stage"] for r in done}):
        group = [r for r in done if r["stage"] == stage]
        fit = fits.fit_scaling([r["P"] for r in group], [r["D"] for r in group],
                          [r["acc"] for r in group])
        table.append([f"{stage} (ours, {fit['n']} runs)", fit["a"], fit["b"], fit["c"], fit["r2"]])
        _scaling_plot(page, stage, group, fit)
    table.append(["paper eq. A.1 (helpful only, 13M–52B)", *fits.PAPER_FIT.values(), float("nan")])
    page.heading("Fit: acc ≈ a + b·ln(P/1e11) + c·ln(D/8e4)", 3)
    page.table(["fit", "a", "b", "c", "R²"], table)


def _scaling_plot(page, stage: str, group: list[dict], fit: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (x_key, line_key, xlabel) in zip(axes, [("D", "P", "D (training comparisons)"),
                                                    ("P", "D", "P (non-embedding params)")],
                                             strict=True):
        for color, value in zip(COLORS * 4, sorted({r[line_key] for r in group}),
                                strict=False):
            pts = sorted((r for r in group if r[line_key] == value), key=lambda r: r[x_key])
            x = np.asarray([r[x_key] for r in pts], np.float64)
            acc = np.asarray([r["acc"] for r in pts])
            ci = np.asarray([r["ci"] for r in pts]).reshape(-1, 2)
            label = f"{line_key}={value:,}" + (f" ({pts[0]['size']})" if line_key == "P" else "")
            ax.errorbar(x, acc, yerr=error_bars(acc, ci), fmt="o-", color=color,
                        capsize=3, label=label)
            if math.isfinite(fit["a"]):
                xs = np.geomspace(x.min(), x.max(), 20) if len(x) > 1 else x
                pred = fits.predict_scaling(fit, xs if x_key == "P" else value,
                                            xs if x_key == "D" else value)
                ax.plot(xs, pred * np.ones_like(xs), "--", color=color, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.axhline(0.5, color="gray", ls=":", lw=1)
        ax.legend(fontsize=7)
    page.figure(fig, f"scaling_{stage}", f"{stage}: accuracy against data (left) and PM size "
                "(right); dashed: the fit")

