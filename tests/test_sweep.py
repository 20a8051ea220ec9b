"""`hh-jax sweep`: member commands, local runs with shared stages, the scaling fit, and the
cluster launchers in dry-run."""

import json
import os
import re
import shlex
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hh_jax import experiment, main, metrics, report, sweep
from hh_jax.evals import fits, pm_accuracy
from hh_jax.model import SIZES, Transformer
from hh_jax.report import sweep as sweep_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALING = os.path.join(REPO, "experiments", "pm_scaling.py")


@pytest.mark.parametrize("arg", ["", ":cpu"])
def test_dry_run_prints_one_runnable_command_per_member(arg, capsys, tmp_path):
    spec = SCALING + arg
    assert main.main(["sweep", spec, "--dry-run", "--workdir", str(tmp_path / "root"),
                      "--config.pm.seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    members = experiment.expand_sweep(SCALING, arg.lstrip(":"))
    assert len(lines) == len(members) == (16 if arg == "" else 6)
    workdirs = set()
    for line, member in zip(lines, members, strict=True):
        argv = shlex.split(line)
        assert argv[:3] == ["hh-jax", "run", spec] and argv[3] == "--workdir"
        workdirs.add(argv[4])
        got = experiment.load_config(spec, argv[5:])  # what `hh-jax run` would build
        want = experiment.load_config(spec, ["--config.pm.seed=3"])
        for key, value in member.items():
            experiment.set_path(want, key, value)
        assert got.to_dict() == want.to_dict()
    assert len(workdirs) == len(lines)  # one directory per member
    assert not os.path.exists(tmp_path / "root")  # a dry run writes nothing


def test_fit_scaling_recovers_the_planted_law():
    rng = np.random.default_rng(0)
    p = np.repeat([1e7, 4e7, 2e8, 8e8], 4)
    d = np.tile([500, 2000, 8000, 32000], 4)
    acc = 0.70 + 0.01 * np.log(p / 1e11) + 0.02 * np.log(d / 8e4)
    fit = fits.fit_scaling(p, d, acc)
    np.testing.assert_allclose([fit["a"], fit["b"], fit["c"]], [0.70, 0.01, 0.02], atol=1e-9)
    noisy = fits.fit_scaling(p, d, acc + rng.normal(0, 0.002, acc.size))
    np.testing.assert_allclose([noisy["b"], noisy["c"]], [0.01, 0.02], atol=0.002)
    one_size = fits.fit_scaling(p[:4], d[:4], acc[:4])  # P never varies: b is not identifiable
    assert np.isnan(one_size["b"]) and one_size["c"] == pytest.approx(0.02)


@pytest.mark.parametrize("size", ["test", "6M", "13M", "smollm2-135m"])
def test_non_embedding_params_match_the_model(size):
    cfg = SIZES[size]
    params = nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))["params"]
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    embed = params["embed"]["embedding"].size + (
        0 if cfg.tie_embeddings else params["lm_head"]["kernel"].size)
    assert fits.non_embedding_params(vars(cfg)) == total - embed


def _fake_run(calls, law):
    """Stands in for experiment.run: writes what each stage would, records what ran."""
    from hh_jax import checkpoint

    def run(config, workdir):
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, default=list)
        for name in config.stages:
            stage_dir = os.path.join(workdir, name)
            if checkpoint.is_complete(stage_dir):
                continue
            calls.append((os.path.basename(workdir), name))
            cfg = vars(SIZES[config.lm.model])
            used = int(4000 * config[name].get("data", {}).get("fraction", 1.0))
            acc = law(fits.non_embedding_params(cfg), used)
            rep = pm_accuracy.pm_report([1.0, 0.0], [0.0, 1.0], ["a", "b"], [1, 1], [5, 5], [6, 4])
            rep["overall"].update(accuracy=acc, ci95=[acc - 0.02, acc + 0.02])
            metrics.write_summary(stage_dir, {"report": rep, "data": {"used": used},
                                              "eval/accuracy": acc})
            os.makedirs(os.path.join(stage_dir, "params"), exist_ok=True)
            with open(os.path.join(stage_dir, "params", "meta.json"), "w") as f:
                json.dump({"model": cfg}, f)
    return run


def test_local_sweep_shares_stages_and_fits(tmp_path, monkeypatch):
    calls = []
    law = lambda p, d: 0.72 + 0.007 * np.log(p / 1e11) + 0.015 * np.log(d / 8e4)  # noqa
    monkeypatch.setattr(experiment, "run", _fake_run(calls, law))
    root = tmp_path / "sweep"
    assert main.main(["sweep", SCALING + ":cpu", "--workdir", str(root)]) == 0
    dirs = [str(root / name) for name, _ in sweep.members(SCALING + ":cpu")]
    assert len(dirs) == 6
    # lm and pmp run once per size; pm once per member
    assert [s for _, s in calls].count("lm") == 2 and [s for _, s in calls].count("pm") == 6
    assert os.path.islink(root / os.path.basename(dirs[1]) / "lm")
    assert not os.path.islink(root / os.path.basename(dirs[3]) / "lm")  # another size
    rows = sweep_report.collect(str(root))
    assert all(r["complete"] for r in rows) and {r["size"] for r in rows} == {"test", "6M"}
    md = open(root / "report.md").read()
    assert "| pm (ours, 6 runs) | 0.72 | 0.007 | 0.015 | 1 |" in md
    assert os.path.exists(root / os.path.basename(dirs[0]) / "report.html")
    page = open(root / "report.html").read()
    assert page.count("data:image/png;base64,") == 1


def test_sweep_report_without_sweep_json(tmp_path, monkeypatch):
    """Members run one by one on a cluster leave no sweep.json; the report finds them."""
    calls = []
    law = lambda p, d: 0.6 + 0.01 * np.log(d / 8e4)  # noqa
    monkeypatch.setattr(experiment, "run", _fake_run(calls, law))
    for name, member in sweep.members(SCALING + ":tiny"):
        experiment.run(sweep.member_config(SCALING + ":tiny", member), str(tmp_path / name))
    assert sweep_report.is_sweep_root(str(tmp_path))
    report.write_report(str(tmp_path))
    md = open(tmp_path / "report.md").read()
    b = re.search(r"\| pm \(ours, 4 runs\) \| 0\.6 \| (\S+) \| 0\.01 \|", md).group(1)
    assert abs(float(b)) < 1e-9  # the planted law has no size term


def test_tpu_launcher_dry_run_prints_gcloud_commands(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "launch", "tpu_pod.py"), "--name", "hh-pod",
           "--zone", "us-east5-a", "--accelerator", "v5p-128", "--create", "--delete",
           "--bucket", "bkt", "--sweep", "experiments/pm_scaling.py", "--member", "5",
           "--workdir", "/gcs/bkt/pm_scaling"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    lines = [shlex.split(x) for x in out.splitlines() if not x.startswith("#")]
    gcloud = [x for x in lines if x[0] == "gcloud"]
    assert [x[4] for x in gcloud] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    assert all(x[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "hh-pod" in " ".join(x)
               and "--zone=us-east5-a" in x for x in gcloud)
    assert "--accelerator-type=v5p-128" in gcloud[0] and "--version=v2-alpha-tpuv5" in gcloud[0]
    assert all("--worker=all" in x for x in gcloud[1:5])
    run = next(a for a in gcloud[4] if a.startswith("--command="))
    name, member = sweep.members(SCALING)[5]
    assert "HH_JAX_DISTRIBUTED=auto .venv/bin/hh-jax run experiments/pm_scaling.py" in run
    assert f"--workdir /gcs/bkt/pm_scaling/{name}" in run
    assert all(a in run for a in sweep.override_args(member))
    bad = subprocess.run(cmd[:-4] + ["--member", "99", "--workdir", "/x"], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode != 0 and "has 16 members" in bad.stderr


def test_slurm_recipe_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "slurm.sbatch")], check=True)
