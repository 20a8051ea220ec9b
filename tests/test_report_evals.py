"""The run report's evaluation sections (hh_jax/report/evaluations.py): every evaluator run
end to end on tiny exports of a run (`WORKDIR/<stage>/params`, as test_evals_run makes
them), writing where `hh-jax eval` puts a run's evaluations by default
(`WORKDIR/evals/<what>_<stage>`); then `hh-jax report`'s Markdown carries each summary's
headline numbers, and the evaluators' PNGs, byte for byte."""

import base64
import dataclasses
import json
import os
import re

import numpy as np
import pytest

from hh_jax import checkpoint, report
from hh_jax import main as cli_main
from hh_jax.evals import cli as eval_cli
from hh_jax.evals import datasets, hhh, mc, ood
from tests.model_helpers import random_params
from tests.test_evals_run import CFG

TOL = 5e-4  # the report rounds to 3 decimals


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with an lm and a pm export, evaluated by every evaluator, and its report."""
    root = tmp_path_factory.mktemp("run")
    (root / "config.json").write_text(json.dumps({"stages": ["lm", "pm"],
                                                  "pm": {"stage": "pm"}}))
    lm, pm = str(root / "lm" / "params"), str(root / "pm" / "params")
    meta = {"tokenizer": "byte", "model": dataclasses.asdict(CFG), "chat_format": "hh"}
    checkpoint.export_params(lm, random_params(CFG, seed=1), {**meta, "stage": "lm"})
    head = {"params": {"kernel": np.random.default_rng(0).normal(size=CFG.d_model)
                       .astype(np.float32)}}
    checkpoint.export_params(pm, {"backbone": random_params(CFG, seed=2), "head": head},
                             {**meta, "stage": "pm", "max_len": 128})
    pairs = root.parent / f"{root.name}_pairs" / "helpful-base" / "test.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text("".join(json.dumps({
        "chosen": f"\n\nHuman: q{k}?\n\nAssistant: yes {k}",
        "rejected": f"\n\nHuman: q{k}?\n\nAssistant: no"}) + "\n" for k in range(6)))
    # through the CLI, without --out: the run-relative default
    assert cli_main.main(["eval", "hhh", "--pm", pm, "--limit", "4"]) == 0
    assert cli_main.main(["eval", "pm", "--params", pm, "--data", str(pairs)]) == 0
    assert cli_main.main(["eval", "elo", "--pm", pm, "--policy", f"pi0={lm}", "--policy",
                          f"bon3={lm}@bon:3", "--n-prompts", "4", "--max-new-tokens", "4",
                          "--batch-size", "4", "--n-boot", "10"]) == 0
    # the library calls, into the same place; HHH's real items are too long for bytes
    data = root.parent / f"{root.name}_data"
    for k, cat in enumerate(datasets.HHH_CATEGORIES):
        d = data / "hhh_alignment" / cat
        d.mkdir(parents=True)
        ex = {"input": f"question {k}?\n\nAssistant: hm\n\nHuman: well?",
              "target_scores": {"a good answer": 1, "bad": 0}}
        (d / "task.json").write_text(json.dumps({"examples": [ex, ex]}))
    hhh.run(str(root / "evals" / "hhh_lm"), model_spec=lm, pm=pm, data_dir=str(data))
    mc.run(lm, str(root / "evals" / "mc_lm"), limit=3, max_len=256,
           tasks=("truthfulqa", "bbq", "gender", "winogenerated"))
    ood.run(lm, str(root / "evals" / "ood_lm"), n_in=16, n_out=8, n_shot=2, train_frac=0.5,
            max_len=64)
    for name, text in (("broken", "{not json"), ("unknown", '{"foo": 1}'),
                       ("bad_elo", '{"elo": [0], "policies": ["a"]}')):
        (root / "evals" / name).mkdir()
        (root / "evals" / name / "summary.json").write_text(text)
    report.write_report(str(root))
    return root


def _summary(root, name):
    with open(os.path.join(root, "evals", name, "summary.json")) as f:
        return json.load(f)


def _section(root, name) -> str:
    md = (root / "report.md").read_text()
    start = md.index(f"### Evaluation evals/{name} (")
    end = min([i for i in (md.find("\n## ", start), md.find("\n### ", start + 1)) if i > 0]
              + [len(md)])
    return md[start:end]


def _table(section: str, header: str) -> dict[str, list[str]]:
    """The Markdown table whose first header cell is `header`: its rows by first cell, and
    the rest of its header as row ""."""
    lines = section.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    out = {"": [c.strip() for c in lines[k].strip("|").split(" | ")][1:]}  # the header
    for line in lines[k + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        out[cells[0]] = cells[1:]
    return out


def _nums(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?|nan", cell)]


def _close(cell: str, *want) -> None:
    got = _nums(cell)
    assert len(got) == len(want), (cell, want)
    for g, w in zip(got, want, strict=True):
        assert (np.isnan(g) and np.isnan(w)) or abs(g - w) <= TOL, (cell, want)


def test_default_out_follows_the_run(run_dir, tmp_path):
    lm = str(run_dir / "lm" / "params")
    assert eval_cli.default_out("mc", [lm]) == str(run_dir / "evals" / "mc_lm")
    assert eval_cli.default_out("elo", [None, lm]) == str(run_dir / "evals" / "elo")
    assert eval_cli.default_out("mc", ["smollm2-135m"]) == "eval_mc"
    assert eval_cli.default_out("pm", [str(tmp_path)]) == "pm_eval"
    assert sorted(os.listdir(run_dir / "evals")) == [
        "bad_elo", "broken", "elo", "hhh_lm", "hhh_pm", "mc_lm", "ood_lm", "pm_pm", "unknown"]


@pytest.mark.parametrize("name", ["hhh_lm", "hhh_pm"])
def test_hhh_section(run_dir, name):
    s = _summary(run_dir, name)
    rows = _table(_section(run_dir, name), "category")
    header = rows.pop("")
    norms = ("sum", "per_token", "per_char") if name == "hhh_lm" else ()
    assert header == ["PM", *(f"log P ({n})" for n in norms), "n"]
    cols = [s["pm_accuracy"]] + [s["loglik_accuracy"][n] for n in norms]
    assert list(rows)[-1] == "all" and set(rows) == set(s["pm_accuracy"])
    assert list(rows)[:4] == list(datasets.HHH_CATEGORIES) or name == "hhh_pm"
    for cat, cells in rows.items():
        assert len(cells) == len(cols) + 1
        for cell, acc in zip(cells, cols, strict=False):
            _close(cell, acc[cat]["accuracy"], acc[cat]["lo"], acc[cat]["hi"])
        assert cells[-1] == str(s["pm_accuracy"][cat]["n"])


def test_mc_section(run_dir):
    s = _summary(run_dir, "mc_lm")
    section = _section(run_dir, "mc_lm")
    tqa, bbq = _table(section, "TruthfulQA norm"), _table(section, "BBQ-lite norm")
    for norm in ("sum", "per_token", "per_char"):
        t = s["truthfulqa"][norm]
        _close(tqa[norm][0], t["mc1"]["accuracy"], t["mc1"]["lo"], t["mc1"]["hi"])
        _close(tqa[norm][1], t["mc2"]["score"], t["mc2"]["lo"], t["mc2"]["hi"])
        assert tqa[norm][2] == str(t["mc1"]["n"]) == "3"
        b = s["bbq"][norm]
        for cell, cond in zip(bbq[norm][:2], ("ambig", "disambig"), strict=True):
            a = b[f"accuracy_{cond}"]
            _close(cell, a["accuracy"], a["lo"], a["hi"])
        for cell, cond in zip(bbq[norm][2:4], ("ambig", "disambig"), strict=True):
            if b["bias"][cond] is None:
                assert cell == "n/a"
            else:
                _close(cell, b["bias"][cond]["bias"])
    g = s["gender_bias"]
    gender = _table(section, "gender bias (PAPER.md §7)")
    cells = gender[r"log P(O \| female) − log P(O \| male)"]
    _close(cells[0], g["B"], g["lo"], g["hi"])
    _close(cells[1], g["signed_mean"])
    w = s["winogenerated"]["sum"]
    cells = _table(section, "winogenerated")["sum"]
    _close(cells[0], w["female_share"])
    _close(cells[1], w["pearson_r_bls"])


def test_ood_section(run_dir):
    s = _summary(run_dir, "ood_lm")
    lines = [line for line in _section(run_dir, "ood_lm").splitlines()
             if line.startswith(("| last |", "| mean |"))]
    assert len(lines) == 6  # 2 pools × 3 methods
    assert [line.split(" | ")[1] for line in lines[:3]] == [
        "Mahalanobis", "simplified relative MD", "few-shot outlier exposure"]
    names = {"Mahalanobis": "mahalanobis", "simplified relative MD": "relative_mahalanobis",
             "few-shot outlier exposure": "outlier_exposure"}
    for line in lines:
        pool, method, layer, at_best, at_last = [c.strip() for c in
                                                 line.strip("|").split(" | ")]
        a = s["auroc"][pool][names[method]]
        mean = np.asarray(a["mean"], np.float64)
        k = int(np.nanargmax(mean))
        assert int(layer) == k + 1
        _close(at_best, mean[k], a["std"][k])
        _close(at_last, mean[-1], a["std"][-1])


def test_elo_section(run_dir):
    s = _summary(run_dir, "elo")
    rows = _table(_section(run_dir, "elo"), "policy")
    for k, name in enumerate(s["policies"]):
        elo, soft, pm_elo, mean, win = rows[name]
        for cell, keys in ((elo, ("elo", "lo", "hi")), (soft, ("soft_elo",)),
                           (pm_elo, ("pm_elo",))):  # whole Elo points
            got = _nums(cell)
            assert len(got) == len(keys) and all(
                abs(g - s[key][k]) <= 0.5 for g, key in zip(got, keys, strict=True)), cell
        _close(mean, s["mean_pm_score"][k])
        if np.isnan(s["win_rate_vs_anchor"][k]):
            assert win == "-"
        else:
            _close(win, s["win_rate_vs_anchor"][k])


def test_pm_section(run_dir):
    s = _summary(run_dir, "pm_pm")["report"]
    rows = _table(_section(run_dir, "pm_pm"), "subset")
    for sub, r in [*s["per_subset"].items(), ("ALL", s["overall"])]:
        n, acc, longer = rows[sub]
        assert int(n) == r["n"] == 6
        _close(acc, r["accuracy"], *r["ci95"])
        _close(longer, r["longer_wins"])


def test_pngs_are_embedded_and_bad_summaries_are_one_line(run_dir):
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    for name, png in (("hhh_lm", "hhh.png"), ("mc_lm", "mc.png"), ("elo", "elo.png"),
                      ("ood_lm", "ood_auroc_mean.png"), ("pm_pm", "calibration.png")):
        m = re.search(rf"!\[evals/{name}: {png}\]\((report_files/[^)]+)\)", md)
        assert m, name
        data = (run_dir / "evals" / name / png).read_bytes()
        assert (run_dir / m.group(1)).read_bytes() == data
        assert base64.b64encode(data).decode() in html
    assert "could not read evals/broken/summary.json: JSONDecodeError" in _section(
        run_dir, "broken")
    assert "not a known evaluation (keys: foo)" in _section(run_dir, "unknown")
    assert "evals/bad_elo/summary.json (elo summary): KeyError" in _section(run_dir, "bad_elo")
    overview = _table(md[md.index("## Evaluations"):], "evaluation")
    assert overview.pop("") == ["kind", "headline"]
    assert overview["evals/hhh_lm"][0] == "hhh" and overview["evals/ood_lm"][0] == "ood"
    assert overview["evals/broken"][0] == "?"
