"""`hh-jax eval {hhh,mc,ood,elo}` through hh_jax.main: dispatch, outputs, missing options."""

import json
import os

import pytest

from hh_jax import main as cli_main
from tests.test_evals_run import exports  # noqa: F401  (the tiny policy and PM exports)


@pytest.mark.parametrize("argv, needs", [
    (["eval", "mc"], "--model"), (["eval", "ood"], "--model"), (["eval", "hhh"], "--model"),
    (["eval", "elo", "--pm", "x"], "--policy"), (["eval", "pm"], "--params"),
])
def test_missing_options_are_named(argv, needs):
    with pytest.raises(SystemExit, match=needs):
        cli_main.main(argv)


def test_unknown_mc_task():
    with pytest.raises(SystemExit, match="unknown tasks"):
        cli_main.main(["eval", "mc", "--model", "x", "--tasks", "truthfulqa,nope"])


def test_eval_hhh_and_elo_from_the_command_line(exports, tmp_path, capsys):  # noqa: F811
    policy, pm = exports
    out = str(tmp_path / "hhh")
    assert cli_main.main(["eval", "hhh", "--pm", pm, "--limit", "4", "--out", out]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["pm_accuracy"]["all"]["n"] == 4
    assert os.path.exists(os.path.join(out, "hhh.png"))
    responses = tmp_path / "r.jsonl"
    rows = [{"policy": p, "prompt": q, "response": r}
            for p, rs in (("a", "xy"), ("b", "zw")) for q, r in zip("pq", rs, strict=True)]
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "elo")
    assert cli_main.main(["eval", "elo", "--pm", pm, "--policy", "a=unused", "--policy",
                          "b=unused", "--responses", str(responses), "--n-boot", "5",
                          "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "elo.png"))
    assert "Elo on 2 prompts" in capsys.readouterr().out
    # bad input: a file:line error, exit 1
    responses.write_text("{not json\n")
    assert cli_main.main(["eval", "elo", "--pm", pm, "--policy", "a=x", "--responses",
                          str(responses), "--out", out]) == 1
    assert f"{responses}:1: bad_row" in capsys.readouterr().err
