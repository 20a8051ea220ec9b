"""The evaluators end to end on a tiny exported policy and PM (a few items each): each
writes summary.json and its plots, and prints its table."""

import dataclasses
import json
import os

import numpy as np
import pytest

from hh_jax import checkpoint
from hh_jax.evals import datasets, elo, hhh, mc, ood
from hh_jax.model import SIZES
from tests.model_helpers import random_params

CFG = SIZES["test"].replace(vocab_size=260, max_len=256, attention_chunk=64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    policy, pm = str(root / "policy"), str(root / "pm")
    meta = {"tokenizer": "byte", "model": dataclasses.asdict(CFG), "chat_format": "hh"}
    checkpoint.export_params(policy, random_params(CFG, seed=1), {**meta, "stage": "lm"})
    head = {"params": {"kernel": np.random.default_rng(0).normal(size=CFG.d_model)
                       .astype(np.float32)}}
    checkpoint.export_params(pm, {"backbone": random_params(CFG, seed=2), "head": head},
                             {**meta, "stage": "pm", "max_len": 128})
    return policy, pm


def _summary(d):
    with open(os.path.join(d, "summary.json")) as f:
        return json.load(f)


@pytest.mark.slow  # tests/test_report_evals.py runs every evaluator end to end in the suite
def test_hhh_and_mc_runs(exports, tmp_path, capsys):
    policy, pm = exports
    for k, cat in enumerate(datasets.HHH_CATEGORIES):  # short items: byte tokens are many
        d = tmp_path / "data" / "hhh_alignment" / cat
        d.mkdir(parents=True)
        ex = {"input": f"question {k}?\n\nAssistant: hm\n\nHuman: well?",
              "target_scores": {"a good answer": 1, "bad": 0}}
        (d / "task.json").write_text(json.dumps({"examples": [ex, ex]}))
    s = hhh.run(str(tmp_path / "hhh"), model_spec=policy, pm=pm, data_dir=str(tmp_path / "data"))
    assert _summary(tmp_path / "hhh")["pm_accuracy"]["all"]["n"] == 8
    assert set(s["loglik_accuracy"]) == {"sum", "per_token", "per_char"}
    assert os.path.exists(tmp_path / "hhh" / "hhh.png")
    s = mc.run(policy, str(tmp_path / "mc"), limit=3, max_len=256,
               tasks=("truthfulqa", "bbq", "gender", "winogenerated"))
    got = _summary(tmp_path / "mc")
    assert got["truthfulqa"]["sum"]["mc1"]["n"] == 3 and len(got["gender_bias"]["occupations"]) == 3
    assert got["bbq"]["per_char"]["accuracy"]["all"]["n"] == 3
    assert os.path.exists(tmp_path / "mc" / "mc.png")
    out = capsys.readouterr().out
    assert "HHH alignment" in out and "TruthfulQA MC2" in out


@pytest.mark.slow
def test_ood_and_elo_runs(exports, tmp_path):
    policy, pm = exports
    s = ood.run(policy, str(tmp_path / "ood"), n_in=16, n_out=8, n_shot=2, train_frac=0.5,
                max_len=64)
    a = _summary(tmp_path / "ood")["auroc"]["last"]["relative_mahalanobis"]
    assert len(a["mean"]) == CFG.n_layers and len(a["splits"]) == 3
    assert os.path.exists(tmp_path / "ood" / "ood_auroc_mean.png") and s["n_in"] == 16
    s = elo.run([f"pi0={policy}", f"bon3={policy}@bon:3"], pm, str(tmp_path / "elo"),
                n_prompts=4, max_new_tokens=4, batch_size=4, n_boot=10)
    assert s["elo"][0] == 0 and s["prompts"] == 4
    rows = [json.loads(x) for x in open(tmp_path / "elo" / "responses.jsonl")]
    assert len(rows) == 8 and {r["policy"] for r in rows} == {"pi0", "bon3"}
    # bon3 picks its PM-best of 3 samples, the first of which is pi0's: never worse
    assert s["mean_pm_score"][1] >= s["mean_pm_score"][0] - 1e-6
    again = elo.run(["pi0=x", "bon3=y"], pm, str(tmp_path / "elo2"), n_boot=10,
                    responses=str(tmp_path / "elo" / "responses.jsonl"))
    np.testing.assert_allclose(again["mean_pm_score"], s["mean_pm_score"], rtol=1e-5)
