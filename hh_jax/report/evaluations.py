"""The run report's evaluation sections: one per `summary.json` under `WORKDIR/evals/`.

`hh-jax eval {pm,hhh,mc,ood,elo}` writes there by default when it evaluates a run's export
`WORKDIR/<stage>/params` (`evals/<what>_<stage>/`, `evals/elo/`; hh_jax/evals/cli.py
`default_out`); any folder under `evals/` holding a summary.json counts (`--out` to put
one there by hand). The kind is read from the summary's keys, not the folder name:
  hhh   accuracy per category (PM, and log-likelihood per norm) with Wilson 95% intervals
  mc    TruthfulQA MC1 / MC2, BBQ-lite accuracy and bias scores, gender bias, winogenerated
  ood   per pool and method: the best layer's AUROC (mean ± std over splits), the last's
  elo   Elo with bootstrap intervals, soft Elo, 174·ΔPM, mean PM score, win rate
  pm    PM accuracy per subset with intervals, next to "longer response wins"
then every PNG in the folder. Files only: nothing here imports an evaluator. A summary that
cannot be read or is not one of these gets a one-line note instead of a section.
"""

from __future__ import annotations

import json
import math
import os

from hh_jax.report.page import Page, fmt

HHH_CATEGORIES = ("helpful", "honest", "harmless", "other")
NORMS = ("sum", "per_token", "per_char")  # hh_jax/evals/loglik.py's order; summaries sort keys
OOD_METHODS = {"mahalanobis": "Mahalanobis", "relative_mahalanobis": "simplified relative MD",
               "outlier_exposure": "few-shot outlier exposure"}


def eval_dirs(workdir: str) -> list[str]:
    """Every folder under WORKDIR/evals holding a summary.json, relative to WORKDIR, sorted."""
    root = os.path.join(workdir, "evals")
    found = [os.path.relpath(d, workdir) for d, _, files in os.walk(root)
             if "summary.json" in files]
    return sorted(found)


def eval_kind(summary: dict) -> str | None:
    if not isinstance(summary, dict):
        return None
    if "pm_accuracy" in summary or "loglik_accuracy" in summary:
        return "hhh"
    if any(k in summary for k in ("truthfulqa", "bbq", "gender_bias", "winogenerated")):
        return "mc"
    if "auroc" in summary:
        return "ood"
    if "elo" in summary and "policies" in summary:
        return "elo"
    if "report" in summary:
        return "pm"
    return None


def acc_ci(a: dict) -> str:
    """An evaluator's accuracy dict ({"accuracy", "lo", "hi"} or pm's {"accuracy", "ci95"})."""
    lo, hi = a["ci95"] if "ci95" in a else (a["lo"], a["hi"])
    return f"{_f3(a['accuracy'])} [{_f3(lo)}, {_f3(hi)}]"


def _f3(x) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def by_norm(d: dict) -> list[tuple[str, object]]:
    """A {norm: value} dict's items, the log-likelihood norms in NORMS order first."""
    return [(k, d[k]) for k in NORMS if k in d] + [(k, v) for k, v in d.items()
                                                   if k not in NORMS]


def _nan(x) -> bool:
    return x is None or isinstance(x, float) and math.isnan(x)


# ------------------------------------------------------------------ one builder per kind
# Each returns (headline, blocks): blocks are ("para", text) or ("table", header, rows),
# built in full before anything reaches the page, so a malformed summary adds nothing.
def hhh_blocks(s: dict):
    cols = ([("PM", s["pm_accuracy"])] if "pm_accuracy" in s else []) + [
        (f"log P ({norm})", acc) for norm, acc in by_norm(s.get("loglik_accuracy", {}))]
    cats = list(cols[0][1])
    cats = ([c for c in HHH_CATEGORIES if c in cats]
            + sorted(c for c in cats if c not in HHH_CATEGORIES and c != "all") + ["all"])
    rows = [[c, *(acc_ci(acc[c]) for _, acc in cols), cols[0][1][c]["n"]] for c in cats]
    judges = [f"PM {s['pm']}" if s.get("pm") else "",
              f"policy {s['model']} (conditional log-likelihood)" if s.get("model") else ""]
    text = (f"BIG-bench hhh_alignment, {s.get('items', '?')} items; judged by "
            f"{' and '.join(j for j in judges if j)}; Wilson 95% intervals; a response "
            "pair is won by the judge's higher score.")
    if "pm_margin" in s:
        text += f" Mean PM margin (better − worse): {fmt(s['pm_margin'])}."
    head = "; ".join(f"{name} {acc_ci(acc['all'])}" for name, acc in cols)
    return f"accuracy {head}", [("para", text),
                                ("table", ["category", *(n for n, _ in cols), "n"], rows)]


def mc_blocks(s: dict):
    blocks = [("para", f"Multiple choice by conditional log-likelihood of {s.get('model')}; "
               "per norm: the choice's summed log-probability, per token, per character.")]
    heads = []
    if "truthfulqa" in s:
        rows = [[norm, acc_ci(r["mc1"]), f"{_f3(r['mc2']['score'])} [{_f3(r['mc2']['lo'])}, "
                 f"{_f3(r['mc2']['hi'])}]", r["mc1"]["n"]] for norm, r in by_norm(s["truthfulqa"])]
        blocks.append(("table", ["TruthfulQA norm", "MC1 accuracy [95%]", "MC2 score [95%]",
                                 "questions"], rows))
        norm = "sum" if "sum" in s["truthfulqa"] else next(iter(s["truthfulqa"]))
        r = s["truthfulqa"][norm]
        heads.append(f"TruthfulQA MC1 {_f3(r['mc1']['accuracy'])}, MC2 "
                     f"{_f3(r['mc2']['score'])} ({norm})")
    if "bbq" in s:
        rows, skipped = [], 0
        for norm, r in by_norm(s["bbq"]):
            bias = [("n/a" if r["bias"][c] is None else f"{r['bias'][c]['bias']:+.3f}")
                    for c in ("ambig", "disambig")]
            rows.append([norm, acc_ci(r["accuracy_ambig"]), acc_ci(r["accuracy_disambig"]),
                         *bias, _f3(r.get("unknown_rate_ambig")),
                         r["accuracy_ambig"]["n"] + r["accuracy_disambig"]["n"]])
            skipped = r["bias"].get("items_without_target", 0)
        blocks.append(("table", ["BBQ-lite norm", "accuracy ambiguous [95%]",
                                 "accuracy disambiguated [95%]", "bias ambiguous",
                                 "bias disambiguated", "'unknown' picked (ambiguous)",
                                 "items"], rows))
        blocks.append(("para", "Bias scores of the BBQ paper (−1 … 1; > 0: the stereotyped "
                       "answer)" + (f"; {skipped} items without a stereotyped target are left "
                                    "out of them." if skipped else ".")))
        norm = "sum" if "sum" in s["bbq"] else next(iter(s["bbq"]))
        heads.append(f"BBQ bias ambiguous {_bbq(s['bbq'][norm], 'ambig')}, disambiguated "
                     f"{_bbq(s['bbq'][norm], 'disambig')} ({norm})")
    if "gender_bias" in s:
        g = s["gender_bias"]
        blocks.append(("table", ["gender bias (PAPER.md §7)", "B [95%]", "signed mean",
                                 "occupations"],
                       [["log P(O | female) − log P(O | male)",
                         f"{_f3(g['B'])} [{_f3(g['lo'])}, {_f3(g['hi'])}]",
                         f"{g['signed_mean']:+.3f}", len(g["occupations"])]]))
        heads.append(f"gender B {_f3(g['B'])}")
    if "winogenerated" in s:
        w = s["winogenerated"]["sum"]
        blocks.append(("table", ["winogenerated", "P(female pronoun)", "Pearson r with BLS",
                                 "occupations", "sentences"],
                       [["sum", _f3(w["female_share"]), _f3(w["pearson_r_bls"]),
                         w["occupations"], w["n"]]]))
    return "; ".join(heads) or "no task", blocks


def _bbq(r: dict, cond: str) -> str:
    b = r["bias"][cond]
    return "n/a" if b is None else f"{b['bias']:+.3f}"


def ood_blocks(s: dict):
    rows, best = [], None
    for pool, by_method in s["auroc"].items():
        for method in [m for m in OOD_METHODS if m in by_method] + [
                m for m in by_method if m not in OOD_METHODS]:
            a = by_method[method]
            mean, std = list(a["mean"]), list(a["std"])
            ok = [k for k, m in enumerate(mean) if not _nan(m)]
            if not ok:
                rows.append([pool, OOD_METHODS.get(method, method), "n/a", "n/a", "n/a"])
                continue
            k = max(ok, key=lambda i: mean[i])
            rows.append([pool, OOD_METHODS.get(method, method), k + 1,
                         f"{_f3(mean[k])} ± {_f3(std[k])}",
                         f"{_f3(mean[-1])} ± {_f3(std[-1])}"])
            if best is None or mean[k] > best[0]:
                best = (mean[k], method, pool, k + 1)
    text = (f"In-distribution: {s.get('n_in')} helpful prompts; OOD: {s.get('n_out')} harmless "
            f"prompts; activations of {s.get('model')} after each of its {s.get('layers')} "
            f"layers, pooled at the last prompt token and over the prompt; AUROC mean ± std "
            f"over {s.get('n_splits')} random splits; outlier exposure sees {s.get('n_shot')} "
            "OOD prompts.")
    head = ("no AUROC" if best is None else
            f"best AUROC {_f3(best[0])} ({best[1]}, {best[2]} pool, layer {best[3]})")
    return head, [("para", text), ("table", ["pool", "method", "best layer",
                                             "AUROC at best layer", "AUROC at last layer"],
                                   rows)]


def elo_blocks(s: dict):
    def num(x, spec):
        return "-" if _nan(x) else format(float(x), spec)

    rows = [[n, f"{num(e, '.0f')} [{num(lo, '.0f')}, {num(hi, '.0f')}]", num(se, ".0f"),
             num(pe, ".0f"), num(m, ".3f"), num(w, ".3f")]
            for n, e, lo, hi, se, pe, m, w in zip(
                s["policies"], s["elo"], s["lo"], s["hi"], s["soft_elo"], s["pm_elo"],
                s["mean_pm_score"], s["win_rate_vs_anchor"], strict=True)]
    text = (f"Every policy answers the same {s.get('prompts')} HH prompts; judge PM "
            f"{s.get('pm')}; Bradley–Terry Elo anchored at {s['policies'][0]}, 95% bootstrap "
            f"intervals over prompts. Elo per PM unit: {num(s.get('elo_per_pm_unit'), '.0f')} "
            f"(the paper: ≈ {num(s.get('paper_elo_per_pm_unit', 174), '.0f')}).")
    top = max(range(len(rows)), key=lambda i: s["elo"][i])
    return (f"top: {rows[top][0]} Elo {rows[top][1]} over {len(rows)} policies",
            [("para", text), ("table", ["policy", "Elo [95%]", "soft Elo", "174·ΔPM",
                                        "mean PM score", "win rate vs anchor"], rows)])


def pm_blocks(s: dict):
    rep = s["report"]
    rows = [[sub, r["n"], acc_ci(r), _f3(r["longer_wins"])]
            for sub, r in list(rep["per_subset"].items()) + [("ALL", rep["overall"])]]
    text = (f"PM accuracy on {rep['overall']['n']} pairs of {', '.join(s.get('files', []))}; "
            f"Wilson 95% intervals; ECE {_f3(rep['calibration']['ece'])}.")
    return (f"accuracy {acc_ci(rep['overall'])} on {rep['overall']['n']} pairs",
            [("para", text), ("table", ["subset", "pairs", "accuracy [95%]", "longer wins"],
                              rows)])


BUILDERS = {"hhh": hhh_blocks, "mc": mc_blocks, "ood": ood_blocks, "elo": elo_blocks,
            "pm": pm_blocks}


def read_eval(path: str, shown: str | None = None) -> tuple[str | None, str, list]:
    """(kind, headline, blocks) of one summary.json; no blocks, and the reason as the
    headline, when it cannot be read or is of no known kind (kind None) or lacks what its
    kind needs. `shown`: the path as the reason names it."""
    shown = shown or path
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"could not read {shown}: {type(e).__name__}: {e}", []
    kind = eval_kind(summary)
    if kind is None:
        keys = ", ".join(sorted(summary)[:8]) if isinstance(summary, dict) else type(summary)
        return None, f"could not read {shown}: not a known evaluation (keys: {keys})", []
    try:
        head, blocks = BUILDERS[kind](summary)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as e:
        return kind, f"could not read {shown} ({kind} summary): {type(e).__name__}: {e}", []
    return kind, head, blocks


def evaluation_sections(page: Page, workdir: str) -> None:
    """An overview table, then one section per evaluation under WORKDIR/evals."""
    found = [(rel, *read_eval(os.path.join(workdir, rel, "summary.json"),
                              os.path.join(rel, "summary.json")))
             for rel in eval_dirs(workdir)]
    if not found:
        return
    page.heading("Evaluations")
    page.table(["evaluation", "kind", "headline"], [[rel, kind or "?", head]
                                                    for rel, kind, head, _ in found])
    for rel, kind, head, blocks in found:
        page.heading(f"Evaluation {rel} ({kind or '?'})", 3)
        if not blocks:
            page.para(head)
        for block in blocks:
            if block[0] == "para":
                page.para(block[1])
            else:
                page.table(block[1], block[2])
        folder = os.path.join(workdir, rel)
        for png in sorted(f for f in os.listdir(folder) if f.endswith(".png")):
            page.image(os.path.join(folder, png), f"{rel}: {png}")
