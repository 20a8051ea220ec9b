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
