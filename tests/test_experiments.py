"""Every experiment file loads, every sweep expands, every member's overrides apply."""

import glob
import os

import pytest
from ml_collections import ConfigDict

from hh_jax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(REPO, "experiments", "*.py"))
               if not os.path.basename(f).startswith(("_", "common")))


def test_there_are_experiment_files():
    assert any(f.endswith("smoke.py") for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_experiment_loads_and_sweep_expands(path):
    module = experiment.load_module(path)
    assert module.__doc__ and "hh-jax run" in module.__doc__, "docstring must give the command"
    config = experiment.load_config(path)
    assert isinstance(config, ConfigDict) and len(config.stages) > 0
    for stage in config.stages:
        assert stage in config, f"stage {stage!r} has no config"
    members = experiment.expand_sweep(path)
    if hasattr(module, "sweep"):
        assert members, "sweep() added no member"
    for member in members:
        c = experiment.load_config(path)
        for key, value in member.items():
            experiment.set_path(c, key, value)  # raises on a key the config lacks


def test_overrides_parse_and_type_check():
    config = experiment.load_config(os.path.join(REPO, "experiments", "smoke.py"),
                                    ["--config.lm.steps=7", "--config.lm.model=test",
                                     "--config.lm.optim.lr=1"])
    assert config.lm.steps == 7 and config.lm.model == "test"
    assert config.lm.optim.lr == 1.0 and isinstance(config.lm.optim.lr, float)
    with pytest.raises(KeyError, match="no field"):
        experiment.load_config(os.path.join(REPO, "experiments", "smoke.py"),
                               ["--config.lm.stepz=7"])
    with pytest.raises(ValueError, match="expected --config"):
        experiment.parse_override("--lm.steps=7")


def test_workdir_placeholder_is_filled():
    c = ConfigDict({"stages": ("lm",), "lm": {"init_from": "{workdir}/x/params", "n": 1}})
    out = experiment.fill_workdir(c, "/runs/a")
    assert out.lm.init_from == "/runs/a/x/params" and c.lm.init_from == "{workdir}/x/params"


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_stage_lrs_follow_the_lm_lr(path):
    """Stages tied to the LM (experiments/common.py tie_lrs) keep their ratio when the LM's
    LR is overridden, as a sweep member would; every trained stage's optim has no `lr` of
    its own (base_lr × lr_ratio is its LR)."""
    config = experiment.load_config(path)
    stages = [s for s in config.stages if "lr_ratio" in config[s]]
    for s in stages:
        assert "lr" not in config[s].get("optim", {}), s
    if "lm" not in config:
        return
    before = {s: config[s].base_lr * config[s].lr_ratio for s in stages}
    tied = [s for s in stages if config[s].base_lr == config.lm.optim.lr]
    experiment.set_path(config, "lm.optim.lr", config.lm.optim.lr * 10)
    for s in stages:
        want = before[s] * (10 if s in tied else 1)
        assert config[s].base_lr * config[s].lr_ratio == pytest.approx(want), s
    filled = experiment.fill_workdir(config, "/w")  # what the stages receive
    assert {s: filled[s].base_lr for s in tied} == {s: config.lm.optim.lr for s in tied}


def test_smoke_lrs_are_the_papers_ratios_of_the_lm_lr():
    config = experiment.load_config(os.path.join(REPO, "experiments", "smoke.py"),
                                    ["--config.lm.optim.lr=1e-3"])
    lr = {s: config[s].base_lr * config[s].lr_ratio for s in ("pmp", "pm", "distill", "ppo")}
    assert lr == pytest.approx({"pmp": 1e-4, "pm": 1e-5, "distill": 5e-5, "ppo": 1e-5})
    assert config.ppo.base_lr * config.ppo.value_lr_ratio == pytest.approx(1e-5)
    config.pm.base_lr = 2e-3  # a stage set on its own keeps its value; the LM's stays
    assert config.lm.optim.lr == 1e-3 and config.pmp.base_lr == 1e-3
