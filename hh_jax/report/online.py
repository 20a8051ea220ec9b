"""The report's section of an `online` stage (iterated online RLHF, PAPER.md §4.5): read
from its summary.json and online.png (hh_jax/stages/online.py writes them)."""

from __future__ import annotations

import os

from hh_jax.report.page import Page, fmt


def headline(summary: dict) -> str:
    rows = summary.get("rounds") or []
    if not rows:
        return "no rounds"
    last = rows[-1]
    return (f"{len(rows)} rounds, {last['comparisons']} comparisons; last round: proxy PM "
            f"{last['proxy_accuracy_fresh']:.3f} on fresh pairs, gold gain "
            f"{last['gold_gain_std']:+.3f} vs proxy {last['proxy_gain_std']:+.3f} std")


def section(page: Page, summary: dict, stage_dir: str) -> None:
    rows = summary.get("rounds") or []
    page.para("Per round: the comparisons the round's proxy PM trained on (the store's rounds "
              "≤ k), its accuracy on fresh on-policy pairs from held-out prompts labeled by "
              "the gold PM (the previous round's proxy PM on the same pairs beside it), the "
              "labels' agreement with the gold PM's preference, and the PPO policy's held-out "
              "scores under the proxy and the gold PM. Gains are from π0: raw, in each PM's "
              "own units, and in std, each PM's score std on the same samples (the round's "
              "fresh on-policy pairs); gap = proxy gain − gold gain in std (over-optimisation "
              "when > 0, Gao et al. 2022).")
    page.table(["round", "comparisons", "labels = gold", "proxy acc (fresh)", "95% CI",
                "prev proxy acc", "KL", "gold π0 → π", "proxy π0 → π", "gold gain (raw)",
                "proxy gain (raw)", "gold std", "proxy std", "gold gain", "proxy gain",
                "gap"],
               [[r["round"], r["comparisons"], r["label_gold_agreement"],
                 r["proxy_accuracy_fresh"],
                 f"[{r['proxy_accuracy_ci95'][0]:.3f}, {r['proxy_accuracy_ci95'][1]:.3f}]",
                 r["prev_pm_accuracy"], r["kl"],
                 f"{fmt(r['gold_score_pi0'])} → {fmt(r['gold_score'])}",
                 f"{fmt(r['proxy_score_pi0'])} → {fmt(r['proxy_score'])}",
                 r.get("gold_gain"), r.get("proxy_gain"), r.get("gold_std_fresh"),
                 r.get("proxy_std_fresh"), r["gold_gain_std"], r["proxy_gain_std"],
                 r["overopt_gap_std"]] for r in rows])
    png = os.path.join(stage_dir, "online.png")
    if os.path.exists(png):
        page.image(png, "Left: the PPO policy's score gain over π0 per round under the proxy "
                   "PM it was trained against and under the gold PM, in each PM's score std on the "
                   "round's fresh pairs (labels: raw gains). Right: proxy-PM accuracy "
                   "on fresh on-policy pairs (95% CI; dashed: chance).")
