"""HHH evaluation (BIG-bench hhh_alignment, Askell et al. 2021; reported in the HH paper,
PAPER.md §7): 221 dialogues, each with a better and a worse Assistant response.

Two judges, each optional: a PM export (`--pm`: the response it scores higher wins) and a
policy (`--model`: the response with the higher conditional log-likelihood wins, as a
complete reply ending in EOS; sum, per token and per character all reported). Accuracy
per category (helpful, honest, harmless, other) and overall, with Wilson 95% intervals.
"""

from __future__ import annotations

import os

import numpy as np

from hh_jax.evals import common, datasets, loglik, pm_judge


def pm_correct(judge: pm_judge.PMJudge, items) -> tuple[list[bool], np.ndarray]:
    texts = [pm_judge.transcript(it.turns, c) for it in items for c in it.choices]
    s = judge(texts).reshape(len(items), 2)
    correct = [s[k, it.correct] > s[k, 1 - it.correct] for k, it in enumerate(items)]
    return correct, s


def run(out_dir: str, *, model_spec: str | None = None, pm: str | None = None,
        limit: int | None = None, batch_size: int = 8, max_len: int = 2048, seed: int = 0,
        data_dir: str | None = None, progress: bool = True) -> dict:
    """`hh-jax eval hhh`: summary.json, a table on stdout, hhh.png."""
    if model_spec is None and pm is None:
        raise ValueError("hhh: give --model (a policy) and/or --pm (a PM export)")
    items = common.subsample(datasets.load_hhh(data_dir), limit, seed)
    groups = [it.meta["category"] for it in items]
    summary = {"items": len(items), "model": model_spec, "pm": pm, "limit": limit}
    if pm is not None:
        judge = pm_judge.PMJudge(pm, batch_size=batch_size, progress=progress)
        correct, scores = pm_correct(judge, items)
        summary["pm_accuracy"] = common.grouped_accuracy(correct, groups)
        summary["pm_margin"] = float(np.mean([s[it.correct] - s[1 - it.correct]
                                              for s, it in zip(scores, items, strict=True)]))
    if model_spec is not None:
        model, params, tok, fmt = loglik.load_model(model_spec)
        scorer = loglik.Scorer(model, params, batch_size=batch_size, max_len=max_len,
                               progress=progress)
        scores = loglik.score_items(scorer, tok, fmt, items, eos=True)
        summary["chat_format"] = fmt.to_meta()
        summary["loglik_accuracy"] = {}
        for norm in loglik.NORMS:
            pred = loglik.predictions(scores, norm)
            summary["loglik_accuracy"][norm] = common.grouped_accuracy(
                [p == it.correct for p, it in zip(pred, items, strict=True)], groups)
    print(report_table(summary), flush=True)
    common.write_summary(out_dir, summary)
    plot(summary, os.path.join(out_dir, "hhh.png"))
    return summary


def _columns(summary: dict) -> list[tuple[str, dict]]:
    cols = []
    if "pm_accuracy" in summary:
        cols.append(("PM", summary["pm_accuracy"]))
    for norm, acc in summary.get("loglik_accuracy", {}).items():
        cols.append((f"logP {norm}", acc))
    return cols


def report_table(summary: dict) -> str:
    cols = _columns(summary)
    cats = [c for c in (*datasets.HHH_CATEGORIES, "all") if c in cols[0][1]]
    rows = [(c, *(common.acc_cell(acc[c]) for _, acc in cols), cols[0][1][c]["n"]) for c in cats]
    return common.table(("category", *(n for n, _ in cols), "n"), rows,
                        f"HHH alignment: model={summary['model']} pm={summary['pm']}")


def plot(summary: dict, path: str) -> None:
    plt = common.pyplot()
    cols = _columns(summary)
    cats = [c for c in (*datasets.HHH_CATEGORIES, "all") if c in cols[0][1]]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / len(cols)
    for k, (name, acc) in enumerate(cols):
        x = np.arange(len(cats)) + (k - (len(cols) - 1) / 2) * width
        v = np.array([acc[c]["accuracy"] for c in cats])
        err = np.array([[v[i] - acc[c]["lo"], acc[c]["hi"] - v[i]] for i, c in enumerate(cats)]).T
        ax.bar(x, v, width, yerr=err, capsize=2, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cats)), cats)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.legend(fontsize=7)
    ax.set_title("HHH alignment eval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
