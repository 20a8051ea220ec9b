"""The report of one run (`hh-jax report WORKDIR`; hh_jax.report.write_report writes it).

Reads only what the stages leave on disk: `config.json`, `<stage>/metrics.jsonl` (rows
with "step"), `<stage>/summary.json`, `<stage>/params/meta.json`. A stage's section
follows its kind (`config.<stage>.stage`, else its name):
  lm / distill   train/eval loss curves, held-out vs unigram perplexity
  pm / pmp       loss curves, held-out accuracy per subset with 95% intervals next to the
                 "longer response wins" baseline, accuracy by turn, calibration
  ppo            objective/score, objective/kl (training) and eval/score, eval/kl (held-out)
                 against iteration; held-out score against √KL with the linear fit of
                 PAPER.md §4.3 (summary["sqrt_kl_fit"], else fitted here); responses before
                 and after RLHF from the first and last `samples_<iteration>.jsonl`
  bon            hh_jax.stages.bon's rows: train- and judge-PM score of best-of-n against n and
                 against √KL (KL = log n − (n−1)/n), beside PPO's held-out scores
Then one section per evaluation under `WORKDIR/evals/` (report/evaluations.py).
A sweep root (`sweep.json`, or member dirs without a config.json of its own) gets the
sweep report (report/sweep.py) instead.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re

import numpy as np

from hh_jax.evals import fits
from hh_jax.metrics import pyplot
from hh_jax.report import online
from hh_jax.report.evaluations import evaluation_sections
from hh_jax.report.page import COLORS, Page, fmt


# ------------------------------------------------------------------------ reading a run
def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def read_metrics(stage_dir: str) -> list[dict]:
    """metrics.jsonl rows; a value logged twice for one step (a resumed run) keeps the last."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    merged: dict[tuple, dict] = {}
    for r in rows:
        merged[(r["step"], tuple(sorted(r)))] = r
    return sorted(merged.values(), key=lambda r: r["step"])


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), int | float)}
    steps = np.asarray(sorted(by_step), np.float64)
    return steps, np.asarray([by_step[s] for s in sorted(by_step)], np.float64)


def stage_order(workdir: str, config: dict) -> list[str]:
    """config.stages first, then any other stage directory (a stage added later)."""
    names = list(config.get("stages", []))
    for d in sorted(os.listdir(workdir)):
        full = os.path.join(workdir, d)
        if d not in names and os.path.isdir(full) and any(
                os.path.exists(os.path.join(full, f)) for f in ("summary.json", "metrics.jsonl")):
            names.append(d)
    return names


def stage_kind(name: str, config: dict, summary: dict) -> str:
    kind = (config.get(name) or {}).get("stage", name)
    if kind in ("lm", "distill", "sft", "pm", "pmp", "ppo", "bon", "online"):
        return {"distill": "lm", "sft": "lm", "pmp": "pm"}.get(kind, kind)
    if "report" in summary:
        return "pm"
    return "lm" if "eval/perplexity" in summary else "other"


def stages_of_kind(config: dict, kind: str) -> list[str]:
    """The config's stages of one kind (`stage_kind`, judged from the config alone), in
    run order."""
    return [s for s in config.get("stages", []) if stage_kind(s, config, {}) == kind]


# ----------------------------------------------------------------------------- sections
def _curves(page: Page, rows: list[dict], panels: list[list[str]], name: str, title: str,
            hlines: dict[str, float] | None = None) -> None:
    """One panel per key group, the group's keys overlaid; `hlines` adds reference levels
    to the panel holding that key."""
    panels = [[k for k in keys if len(series(rows, k)[0])] for keys in panels]
    panels = [keys for keys in panels if keys]
    if not panels:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.3), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key, color in zip(keys, COLORS, strict=False):
            s, v = series(rows, key)
            ax.plot(s, v, "o-" if len(s) < 30 else "-", color=color, ms=3, label=key)
        for key, level in (hlines or {}).items():
            if key in keys and level is not None:
                ax.axhline(level, color="gray", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    page.figure(fig, name, title)


def _scalars(summary: dict) -> list[list]:
    return [[k, v] for k, v in sorted(summary.items())
            if isinstance(v, int | float | str) and not isinstance(v, bool)]


def lm_section(page: Page, name: str, summary: dict, rows: list[dict]) -> None:
    if "eval/distill_kl" in summary:  # context distillation: before → after, vs the teacher
        keys = ["eval/distill_kl", "eval/perplexity", "eval/teacher_perplexity"]
        page.table(["held-out", "before (init_from)", "after"],
                   [[k, summary.get(k.replace("eval/", "eval_before/")), summary.get(k)]
                    for k in keys])
        _curves(page, rows, [["train/loss"], ["eval_before/distill_kl", "eval/distill_kl"]],
                f"{name}_loss",
                f"{name}: training loss; held-out KL(prompted teacher ‖ student) on top-k")
        return
    if "eval/perplexity" in summary:
        page.table(["held-out perplexity", "unigram perplexity", "eval loss", "steps", "params"],
                   [[summary["eval/perplexity"], summary.get("eval/unigram_perplexity"),
                     summary.get("eval/loss"), summary.get("steps"), summary.get("params")]])
    _curves(page, rows, [["train/loss", "eval/loss"], ["eval/perplexity"]], f"{name}_loss",
            f"{name}: training and held-out loss; held-out perplexity (dashed: the unigram "
            "perplexity of the same tokenizer)",
            {"eval/perplexity": summary.get("eval/unigram_perplexity")})


def pm_section(page: Page, name: str, summary: dict, rows: list[dict]) -> None:
    rep = summary.get("report")
    if rep:
        page.para(f"Held-out HH pairs: {rep['overall']['n']} (the project's deterministic "
                  "held-out part of the official test splits); intervals are 95% Wilson.")
        table = []
        for sub, r in list(rep["per_subset"].items()) + [("ALL", rep["overall"])]:
            table.append([sub, r["n"], r["accuracy"], f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                          r["longer_wins"]])
        page.table(["subset", "pairs", "accuracy", "95% CI", "longer wins"], table)
        page.table(["Human turns", "pairs", "accuracy"],
                   [[t, r["n"], r["accuracy"]] for t, r in rep["per_turn"].items()])
        page.para(f"ECE {rep['calibration']['ece']:.4f}; scores mean {rep['scores']['mean']:.3f}"
                  f", std {rep['scores']['std']:.3f}.")
        _accuracy_plot(page, name, rep)
    _curves(page, rows, [["train/loss"], ["train/accuracy", "eval/accuracy"]], f"{name}_train",
            f"{name}: training loss; training and held-out accuracy (dashed: chance)",
            {"train/accuracy": 0.5})


def error_bars(acc, ci) -> np.ndarray:
    """[below, above] for errorbar; ≥ 0 (at 0% or 100% the Wilson bound is off by 1 ulp)."""
    acc, ci = np.asarray(acc, np.float64), np.asarray(ci, np.float64).reshape(-1, 2)
    return np.maximum(np.stack([acc - ci[:, 0], ci[:, 1] - acc]), 0.0)


def _accuracy_plot(page: Page, name: str, rep: dict) -> None:
    plt = pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8),
                                     gridspec_kw={"width_ratios": [1.6, 1, 1]})
    subs = list(rep["per_subset"].items()) + [("ALL", rep["overall"])]
    y = np.arange(len(subs))
    acc = np.asarray([r["accuracy"] for _, r in subs])
    ci = np.asarray([r["ci95"] for _, r in subs])
    a1.barh(y, acc, color=COLORS[0], alpha=0.8, label="PM accuracy")
    a1.errorbar(acc, y, xerr=error_bars(acc, ci), fmt="none", ecolor="k", capsize=3)
    a1.plot([r["longer_wins"] for _, r in subs], y, "D", color=COLORS[1], label="longer wins")
    a1.axvline(0.5, color="gray", ls="--", lw=1)
    a1.set_yticks(y, [f"{s} (n={r['n']})" for s, r in subs], fontsize=8)
    a1.set_xlim(0, 1)
    a1.set_xlabel("held-out accuracy (95% CI)")
    a1.legend(fontsize=7, loc="lower right")
    turns = list(rep["per_turn"].items())
    t_acc = np.asarray([r["accuracy"] for _, r in turns])
    t_ci = np.asarray([r["ci95"] for _, r in turns]).reshape(-1, 2)
    a2.errorbar([int(t) for t, _ in turns], t_acc, yerr=error_bars(t_acc, t_ci), fmt="o-",
                capsize=3)
    a2.axhline(0.5, color="gray", ls="--", lw=1)
    a2.set_xlabel("Human turns in the context")
    a2.set_ylabel("accuracy")
    bins = [b for b in rep["calibration"]["bins"] if b["n"] > 0]
    a3.plot([0, 1], [0, 1], "k--", lw=1)
    a3.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-",
            label=f"ECE {rep['calibration']['ece']:.3f}")
    a3.set_xlabel("predicted P(A > B) = σ(Δr)")
    a3.set_ylabel("observed frequency")
    a3.legend(fontsize=8)
    page.figure(fig, f"{name}_accuracy", f"{name}: accuracy per subset (bars, 95% CI) and the "
                "longer-response baseline; accuracy by number of turns; calibration")


def _pairs(rows: list[dict], xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[xkey], r[ykey]) for r in rows if isinstance(r.get(xkey), int | float)
           and isinstance(r.get(ykey), int | float)]
    return tuple(np.asarray(pts, np.float64).reshape(-1, 2).T)


def ppo_points(summary: dict, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, str]:
    """(KL, score, score name) of the held-out evaluations (the test PM's score when there
    is one), else of the training iterations."""
    evals = summary.get("evals") or [r for r in rows if "eval/kl" in r]
    key = "eval/test_score" if evals and "eval/test_score" in evals[0] else "eval/score"
    kl, score = _pairs(evals, "eval/kl", key)
    if len(kl):
        return kl, score, key
    return (*_pairs(rows, "objective/kl", "objective/score"), "objective/score")


def ppo_section(page: Page, name: str, summary: dict, rows: list[dict], stage_dir: str) -> None:
    _curves(page, rows, [["objective/score", "eval/score", "eval/test_score"],
                         ["objective/kl", "eval/kl", "eval/kl_sample"], ["ppo/policy/clipfrac"],
                         ["ppo/val/var_explained"]], f"{name}_curves", f"{name}: PM score, "
            "KL(π‖π0), clip fraction and value variance explained against iteration")
    kl, score, key = ppo_points(summary, rows)
    if len(kl):
        own = summary.get("sqrt_kl_fit") or {}
        fit = ({"a": own["intercept"], "b": own["slope"], "r2": own["r2"], "n": own["n"]}
               if "slope" in own else fits.sqrt_kl_fit(kl, score))
        page.table(["fit", "a", "b", "R²", "points"],
                   [[f"{key} ≈ a + b·√KL", fit["a"], fit["b"], fit["r2"], fit["n"]]])
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        tkl, tscore = _pairs(rows, "objective/kl", "objective/score")
        ax.plot(np.sqrt(np.maximum(tkl, 0)), tscore, ".", alpha=0.3, label="training batches")
        ax.plot(np.sqrt(np.maximum(kl, 0)), score, "o-", ms=4, label=key)
        if math.isfinite(fit["b"]):
            xs = np.linspace(0, np.sqrt(max(kl.max(), 0)), 50)
            ax.plot(xs, fit["a"] + fit["b"] * xs, "k--", lw=1,
                    label=f"{fit['a']:.3g} + {fit['b']:.3g}·√KL (R² {fit['r2']:.2f})")
        ax.set_xlabel("√KL(π‖π0) (nats)")
        ax.set_ylabel("PM score")
        ax.legend(fontsize=8)
        page.figure(fig, f"{name}_sqrt_kl", f"{name}: PM score against √KL (PAPER.md §4.3)")
    _samples(page, name, stage_dir)


def _samples(page: Page, name: str, stage_dir: str, k: int = 5) -> None:
    """samples_<iteration>.jsonl rows {prompt, response, score, kl}: the first file is π0
    (before RLHF), the last the final policy, on the same held-out prompts."""
    files = sorted((int(m.group(1)), f) for f in os.listdir(stage_dir)
                   if (m := re.fullmatch(r"samples_(\d+)\.jsonl", f)))
    if len(files) < 2:
        return
    (_, f0), (it, f1) = files[0], files[-1]
    before, after = _jsonl(os.path.join(stage_dir, f0)), _jsonl(os.path.join(stage_dir, f1))
    page.heading(f"{name}: sample responses before and after RLHF", 3)
    for b, a in list(zip(before, after, strict=False))[:k]:
        page.sample([("Prompt", b["prompt"]),
                     (f"Before RLHF (π0): PM score {b['score']:.3f}", b["response"]),
                     (f"After RLHF (iteration {it}): PM score {a['score']:.3f}, "
                      f"KL {a.get('kl', float('nan')):.2f}", a["response"])])


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def bon_section(page: Page, name: str, summary: dict, ppo: tuple | None) -> None:
    """hh_jax.stages.bon's summary["rows"]: {n, kl, score (train PM), test_score (judge PM),
    ppo_test_score_at_same_kl}; KL = log n − (n − 1)/n is analytic (PAPER.md §4.3)."""
    rows = summary.get("rows") or []
    if not rows:
        return
    judge = summary.get("judge", "eval/score")
    page.table(["n", "KL = log n − (n−1)/n", "train-PM score", f"judge ({judge})",
                "PPO at the same KL"],
               [[r["n"], r["kl"], r["score"], r.get("test_score"),
                 r.get("ppo_test_score_at_same_kl")] for r in rows])
    n, kl = np.asarray([r["n"] for r in rows]), np.asarray([r["kl"] for r in rows])
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("score", "train PM"), ("test_score", f"judge ({judge})")):
        if all(isinstance(r.get(key), int | float) for r in rows):
            y = [r[key] for r in rows]
            a1.plot(n, y, "o-", label=label)
            a2.plot(np.sqrt(kl), y, "o-", label=f"best of n, {label}")
    if ppo is not None and len(ppo[0]):
        a2.plot(np.sqrt(np.maximum(ppo[0], 0)), ppo[1], "s--", ms=3, label=f"PPO ({ppo[2]})")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("n (samples per prompt)")
    a2.set_xlabel("√KL(π‖π0) (nats)")
    for ax in (a1, a2):
        ax.set_ylabel("PM score")
        ax.legend(fontsize=7)
    page.figure(fig, f"{name}_curve", f"{name}: best-of-n PM score against n and, beside "
                "PPO, against √KL")


# --------------------------------------------------------------------------- the report
def headline(kind: str, summary: dict, rows: list[dict]) -> str:
    """One line per stage for the table at the top of the page."""
    if not summary:
        return "not complete"
    if kind == "lm" and "eval/distill_kl" in summary:
        return (f"held-out distill KL {summary.get('eval_before/distill_kl', float('nan')):.4g}"
                f" → {summary['eval/distill_kl']:.4g}")
    if kind == "lm" and "eval/perplexity" in summary:
        return (f"held-out perplexity {summary['eval/perplexity']:.4g} (unigram "
                f"{summary.get('eval/unigram_perplexity', float('nan')):.4g})")
    if kind == "pm" and "report" in summary:
        o = summary["report"]["overall"]
        return (f"accuracy {o['accuracy']:.3f} [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}] on "
                f"{o['n']} pairs; longer-wins {o['longer_wins']:.3f}")
    if kind == "ppo":
        kl, score, key = ppo_points(summary, rows)
        if len(kl):
            return f"{key} {score[0]:.4g} → {score[-1]:.4g} at KL {kl[-1]:.4g}"
    if kind == "bon" and summary.get("rows"):
        best = max(summary["rows"], key=lambda r: r["n"])
        return (f"best of {best['n']}: train-PM score {best['score']:.4g}, judge "
                f"{best.get('test_score', float('nan')):.4g}")
    if kind == "online":
        return online.headline(summary)
    return "complete"


def run_report(page: Page, workdir: str) -> None:
    config = read_json(os.path.join(workdir, "config.json"), {})
    page.para(f"Workdir {workdir}; report written {datetime.datetime.now():%Y-%m-%d %H:%M}. "
              "HH numbers are on the project's held-out split of the official HH-RLHF test "
              "files, not the paper's test split (README).")
    names = stage_order(workdir, config)
    rows_by = {n: read_metrics(os.path.join(workdir, n)) for n in names}
    summaries = {n: read_json(os.path.join(workdir, n, "summary.json"), {}) for n in names}
    page.table(["stage", "kind", "headline"], [
        [n, stage_kind(n, config, summaries[n]), headline(
            stage_kind(n, config, summaries[n]), summaries[n], rows_by[n])] for n in names])
    for name in names:
        stage_dir = os.path.join(workdir, name)
        summary = summaries[name]
        kind = stage_kind(name, config, summary)
        page.heading(f"Stage {name} ({kind})" + ("" if summary else " — not complete"))
        if kind == "lm":
            lm_section(page, name, summary, rows_by[name])
        elif kind == "pm":
            pm_section(page, name, summary, rows_by[name])
        elif kind == "ppo":
            ppo_section(page, name, summary, rows_by[name], stage_dir)
        elif kind == "bon":
            ppo = next((n for n in names if stage_kind(n, config, {}) == "ppo"), None)
            bon_section(page, name, summary, None if ppo is None else ppo_points(
                summaries[ppo], rows_by[ppo]))
        elif kind == "online":
            online.section(page, summary, stage_dir)
        else:
            _curves(page, rows_by[name], [["train/loss"]], f"{name}_loss", f"{name}: loss")
        scalars = _scalars(summary)
        if scalars:
            page.pre(f"{name}: summary.json scalars", "\n".join(f"{k} = {fmt(v)}"
                                                                 for k, v in scalars))
    evaluation_sections(page, workdir)
    if config:
        page.pre("config.json", json.dumps(config, indent=1, sort_keys=True))
