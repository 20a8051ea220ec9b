"""`hh-jax report`: a self-contained HTML page and a Markdown twin from a workdir's files.

The workdirs are written with the stages' own writers (metrics.MetricsWriter,
metrics.write_summary, pm_accuracy.pm_report), so the report reads the real formats.
"""

import base64
import io
import json
import math
import os
import re

import matplotlib.image
import numpy as np
import pytest

from hh_jax import main, metrics, report
from hh_jax.evals import fits, pm_accuracy
from hh_jax.report import page as report_page
from hh_jax.report import run as run_report

MODEL = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 128}


def _pm_stage(stage_dir, rng, n=200, skill=1.0):
    w = metrics.MetricsWriter(str(stage_dir))
    for step in range(5, 30, 5):
        w.write(step, {"train/loss": 0.7 - step / 200, "train/accuracy": 0.5 + step / 100})
    w.close()
    margin = rng.normal(skill, 1.0, n)
    rc = rng.normal(0, 1, n)
    subsets = rng.choice(["harmless-base", "helpful-base"], n)
    rep = pm_accuracy.pm_report(rc, rc - margin, subsets, rng.integers(1, 4, n),
                             rng.integers(10, 200, n), rng.integers(10, 200, n))
    metrics.write_summary(str(stage_dir), {"eval/accuracy": rep["overall"]["accuracy"],
                                           "report": rep, "steps": 25,
                                           "data": {"used": 400}})
    os.makedirs(stage_dir / "params", exist_ok=True)
    (stage_dir / "params" / "meta.json").write_text(json.dumps({"stage": "pm", "model": MODEL}))
    return rep


def _workdir(root, with_rl=True, seed=0):
    rng = np.random.default_rng(seed)
    stages = ["lm", "pmp", "pm"] + (["ppo", "bon"] if with_rl else [])
    config = {"stages": stages, "pmp": {"stage": "pmp"}, "pm": {"stage": "pm"},
              "lm": {"model": "test"}}
    os.makedirs(root, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    w = metrics.MetricsWriter(str(root / "lm"))
    for step in (2, 4, 6):
        w.write(step, {"train/loss": 7.0 - step / 2})
    w.write(6, {"eval/loss": 4.87, "eval/perplexity": 130.19})
    w.close()
    metrics.write_summary(str(root / "lm"), {"eval/perplexity": 130.19, "eval/loss": 4.87,
                                             "eval/unigram_perplexity": 29.53, "steps": 6})
    reps = {s: _pm_stage(root / s, rng) for s in ("pmp", "pm")}
    if with_rl:  # hh_jax.stages.ppo's outputs
        w = metrics.MetricsWriter(str(root / "ppo"))
        evals = []
        for it in range(0, 21):
            kl = 0.4 * it
            if it:
                w.write(it, {"objective/kl": kl * 1.1, "objective/score": 0.2 + math.sqrt(kl)})
            if it % 4 == 0:
                evals.append({"iteration": it, "eval/kl": kl,
                              "eval/score": 0.3 + 0.8 * math.sqrt(kl)})
                w.write(it, evals[-1])
        w.close()
        for it, response, score in [(0, "I don't know.", -0.5), (20, "Mix flour, water...", 1.25)]:
            with open(root / "ppo" / f"samples_{it}.jsonl", "w") as f:
                f.write(json.dumps({"prompt": "Human: How do I bake bread? <b>", "kl": 0.1 * it,
                                    "response": response, "score": score}) + "\n")
        metrics.write_summary(str(root / "ppo"), {"initial": evals[0], "final": evals[-1],
                                                  "evals": evals})
        metrics.write_summary(str(root / "bon"), {"judge": "eval/score", "rows": [
            {"n": n, "kl": math.log(n) - (n - 1) / n, "score": 0.1 * math.log(n),
             "test_score": 0.08 * math.log(n), "ppo_test_score_at_same_kl": None}
            for n in (1, 2, 4, 8, 16, 32, 64)]})  # hh_jax.stages.bon's summary
    return reps


def _images(html: str) -> list[np.ndarray]:
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(b)), format="png")
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_is_self_contained_and_complete(tmp_path):
    reps = _workdir(tmp_path / "run")
    path = report.write_report(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "report.html")
    page = open(path).read()
    md = open(tmp_path / "run" / "report.md").read()
    images = _images(page)
    # lm curves; pmp and pm: accuracy panel + training curves; ppo curves + √KL; bon curve
    assert len(images) == 1 + 2 * 2 + 2 + 1
    for img in images:  # decodable PNGs that are not blank
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.05
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    files = sorted(os.listdir(tmp_path / "run" / "report_files"))
    assert len(files) == len(images) and all(f"report_files/{f}" in md for f in files)
    for stage in ("lm", "pmp", "pm", "ppo", "bon"):
        assert f"Stage {stage}" in page and f"Stage {stage}" in md
    acc = report_page.fmt(reps["pm"]["per_subset"]["helpful-base"]["accuracy"])
    lo, hi = reps["pm"]["per_subset"]["helpful-base"]["ci95"]
    for text in (acc, f"[{lo:.3f}, {hi:.3f}]", "130.2", "29.53"):
        assert text in page and text in md
    # the planted score = 0.3 + 0.8·√KL is recovered and printed
    assert re.search(r"eval/score ≈ a \+ b·√KL \| 0\.3 \| 0\.8 \| 1 \| 6 \|", md)
    assert "eval/score 0.3 → 2.563 at KL 8" in md  # the headline: π0 → final
    assert "Before RLHF (π0): PM score -0.500" in md and "Mix flour, water..." in md
    assert "After RLHF (iteration 20): PM score 1.250" in page
    assert "&lt;b&gt;" in page  # sample text is escaped, not markup
    assert "| 8 | 1.204 | 0.2079 | 0.1664 | None |" in md  # best of 8: log 8 − 7/8, 0.1·ln 8
    assert "best of 64: train-PM score 0.4159, judge 0.3327" in md


def test_rl_sections_appear_only_when_their_stages_exist(tmp_path):
    _workdir(tmp_path / "run", with_rl=False)
    page = open(report.write_report(str(tmp_path / "run"))).read()
    assert "Stage ppo" not in page and "Stage bon" not in page and "√KL" not in page
    assert len(_images(page)) == 5


def test_perfect_and_zero_accuracy_render(tmp_path):
    """At 6/6 the Wilson upper bound is 1 − 1e-16: error bars must not go negative."""
    lo, hi = pm_accuracy.wilson_interval(6, 6)
    assert hi < 1.0  # the float effect this guards against
    rep = pm_accuracy.pm_report([1.0] * 6 + [0.0] * 3, [0.0] * 6 + [1.0] * 3, ["a"] * 6 + ["b"] * 3,
                             [1] * 6 + [2] * 3, [5] * 9, [4] * 9)
    assert rep["per_subset"]["a"]["accuracy"] == 1.0 and rep["per_turn"][2]["accuracy"] == 0.0
    page = report_page.Page(str(tmp_path), "t")
    run_report.pm_section(page, "pm", {"report": rep}, [])
    assert page.n_figures == 1
    np.testing.assert_array_equal(run_report.error_bars([1.0], [[lo, hi]])[1], [0.0])


def test_sqrt_kl_fit_recovers_planted_line():
    rng = np.random.default_rng(0)
    kl = rng.uniform(0, 25, 400)
    score = -0.2 + 0.45 * np.sqrt(kl) + rng.normal(0, 0.01, 400)
    fit = fits.sqrt_kl_fit(kl, score)
    assert fit["a"] == pytest.approx(-0.2, abs=0.01) and fit["b"] == pytest.approx(0.45, abs=0.01)
    assert fit["r2"] > 0.99
    assert math.isnan(fits.sqrt_kl_fit([1.0], [2.0])["b"])


def test_ppo_stage_fit_uses_the_early_two_thirds_only():
    kl = np.linspace(0.5, 9.0, 9)
    score = 1.0 + 0.3 * np.sqrt(kl)
    score[6:] = 0.0  # a late collapse (over-optimisation) outside the early phase
    pts = [{"eval/kl": k, "eval/test_score": s} for k, s in zip(kl, score, strict=True)]
    fit = fits.early_sqrt_kl_fit(pts)
    assert fit["n"] == 6 and fit["r2"] == pytest.approx(1.0)
    assert fit["intercept"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(0.3)
    still = [{"eval/kl": 0.0, "eval/test_score": s} for s in (1.0, 2.0, 3.0)]
    assert fits.early_sqrt_kl_fit(still) == {"n": 3, "degenerate": True}
    assert fits.early_sqrt_kl_fit(pts[:2]) == {"n": 2}


def test_metrics_of_a_resumed_run_keep_one_row_per_step(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path))
    for step, loss in [(2, 5.0), (4, 4.0), (4, 3.5), (6, 3.0)]:  # step 4 logged again
        w.write(step, {"train/loss": loss})
    w.write(4, {"eval/loss": 4.2})
    w.close()
    steps, loss = run_report.series(run_report.read_metrics(str(tmp_path)), "train/loss")
    np.testing.assert_array_equal(steps, [2, 4, 6])
    np.testing.assert_array_equal(loss, [5.0, 3.5, 3.0])
    rows = run_report.read_metrics(str(tmp_path))
    assert run_report.series(rows, "eval/loss")[1].tolist() == [4.2]


def test_cli_report(tmp_path, capsys):
    _workdir(tmp_path / "run", with_rl=False)
    assert main.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.html")
    assert os.path.exists(tmp_path / "out" / "report.md")
    assert main.main(["report", str(tmp_path / "missing")]) == 1
    assert "no such workdir" in capsys.readouterr().err
