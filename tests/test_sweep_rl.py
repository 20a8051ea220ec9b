"""experiments/ppo_hh.py's sweep (policy size × λ_KL) and the RL part of the sweep report."""

import json
import math
import os
import re

import numpy as np

from hh_jax import checkpoint, experiment, main, metrics, sweep
from hh_jax.evals import pm_accuracy
from hh_jax.model import SIZES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO_HH = os.path.join(REPO, "experiments", "ppo_hh.py")
SLOPE = {"test": 0.5, "6M": 1.0}  # planted: score = 0.1 + slope(size) · √KL


def _final_kl(kl_coef: float) -> float:
    return 0.02 / kl_coef ** 0.5  # planted: a larger λ_KL holds the policy closer to π0


def _bon_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


def _fake_run(calls):
    """Stands in for experiment.run: writes each stage's summary and export meta."""

    def run(config, workdir):
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, default=list)
        size = config.lm.model
        for name in config.stages:
            stage_dir = os.path.join(workdir, name)
            if checkpoint.is_complete(stage_dir):
                continue
            calls.append((os.path.basename(workdir), name))
            if name == "ppo":
                kl = np.linspace(0, _final_kl(config.ppo.ppo.kl_coef), 5)
                score = 0.1 + SLOPE[size] * np.sqrt(kl)
                b, a = np.polyfit(np.sqrt(kl), score, 1)
                evals = [{"iteration": 10 * i, "eval/kl": float(k), "eval/score": float(s),
                          "eval/test_score": float(s)} for i, (k, s) in enumerate(
                              zip(kl, score, strict=True))]
                summary = {"evals": evals, "sqrt_kl_fit": {"intercept": a, "slope": b,
                                                           "r2": 1.0, "n": 5}}
            elif name == "bon":
                summary = {"judge": "eval/test_score", "rows": [
                    {"n": n, "kl": _bon_kl(n), "score": 0.0, "test_score": 0.1 + n / 100}
                    for n in (1, 2, 4, 8, 16)]}
            elif name in ("pmp", "pm", "pm_test"):
                rep = pm_accuracy.pm_report([1.0, 0.0], [0.0, 1.0], ["a", "b"], [1, 1], [5, 5],
                                         [6, 4])
                summary = {"report": rep, "data": {"used": 100}}
            else:
                summary = {"done": True}
            metrics.write_summary(stage_dir, summary)
            os.makedirs(os.path.join(stage_dir, "params"), exist_ok=True)
            with open(os.path.join(stage_dir, "params", "meta.json"), "w") as f:
                json.dump({"model": vars(SIZES[size])}, f)
    return run


def test_ppo_sweep_reruns_only_ppo_and_bon_and_reports_each_member(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(experiment, "run", _fake_run(calls))
    root = tmp_path / "sweep"
    assert main.main(["sweep", PPO_HH + ":cpu", "--workdir", str(root)]) == 0
    dirs = [str(root / name) for name, _ in sweep.members(PPO_HH + ":cpu")]
    assert len(dirs) == 6  # 2 sizes × 3 λ_KL
    ran = [s for _, s in calls]
    for stage in ("lm", "distill", "pmp", "pm", "pm_test"):  # shared within a size
        assert ran.count(stage) == 2, stage
    assert ran.count("ppo") == 6 and ran.count("bon") == 6
    md = open(root / "report.md").read()
    assert "RLHF: PPO against √KL" in md
    rl_part = md.split("RLHF: PPO against √KL")[1]  # after the PM table of the same members
    for d in dirs:
        config = json.load(open(os.path.join(d, "config.json")))
        size, coef = config["lm"]["model"], config["ppo"]["ppo"]["kl_coef"]
        name = os.path.basename(d)
        line = next(ln for ln in rl_part.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        kl = _final_kl(coef)
        assert cells[1] == size and float(cells[3]) == coef
        assert float(cells[4]) == 0.1  # π0
        np.testing.assert_allclose(float(cells[5]), 0.1 + SLOPE[size] * math.sqrt(kl),
                                   rtol=1e-3)
        np.testing.assert_allclose([float(cells[6]), float(cells[7])], [kl, SLOPE[size]],
                                   rtol=1e-3)
        n = min((1, 2, 4, 8, 16), key=lambda n: abs(_bon_kl(n) - kl))  # the nearest KL
        assert re.fullmatch(rf"n={n}, KL {_bon_kl(n):.2f}: .*", cells[9]), cells[9]
    assert open(root / "report.html").read().count('alt="Held-out judge score against') == 1


def test_ppo_hh_paper_sweep_is_paper_sizes_and_paper_response_length():
    members = experiment.expand_sweep(PPO_HH, "")
    assert {m["lm.model"] for m in members} == {"13M", "42M", "197M"}
    assert {m["ppo.ppo.kl_coef"] for m in members} >= {0.001}  # the paper's λ_KL
    config = experiment.load_config(PPO_HH)
    assert config.ppo.response_len == 128 and config.ppo.ppo.kl_coef == 0.001
    assert config.pm.data.half == "a" and config.pm_test.data.half == "b"
    assert config.ppo.test_pm_from.endswith("pm_test/params")
