"""The LM stage end to end: runs, resumes bitwise after SIGKILL, stops on NaN."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest
from resume_helpers import ENV, assert_same_params, committed_steps, kill_after_checkpoint, run_cmd

from hh_jax import checkpoint, experiment, metrics
from hh_jax.stages import lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "smoke.py")
# one subset (1,137 rows) keeps data loading short; the LM stage is what is under test
TINY = [f"--config.lm.{k}" for k in (
    "tokenizer.kind=byte", "steps=8", "ckpt_every=2", "log_every=2", "eval_every=4",
    "batch_size=8", "seq_len=32", "eval_tokens=512", "data.subsets=('helpful-online',)")
] + ["--config.stages=('lm',)"]  # the smoke lists every stage; only the LM is under test


def _cmd(workdir):
    return run_cmd(SMOKE + ":tiny", workdir, *TINY)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(_cmd(workdir), check=True, env=ENV, cwd=REPO, capture_output=True)
    return workdir


def test_stage_outputs_follow_the_metrics_contract(uninterrupted):
    stage = uninterrupted / "lm"
    summary = metrics.read_summary(stage)
    assert summary["steps"] == 8
    assert np.isfinite(summary["eval/perplexity"])
    rows = [json.loads(line) for line in open(stage / "metrics.jsonl")]
    assert all("step" in r for r in rows)
    assert any("train/loss" in r for r in rows) and any("eval/loss" in r for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(stage))
    meta = checkpoint.read_meta(stage / "params")
    assert meta["stage"] == "lm" and meta["model"]["vocab_size"] == 260
    # the data the stage skipped is reported with reasons, not silently dropped
    assert summary["data"]["rows"] == summary["data"]["comparisons"] + sum(
        summary["data"]["skipped"].values())


def test_sigkill_mid_training_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    killed_at = kill_after_checkpoint(_cmd(tmp_path), tmp_path / "lm" / "checkpoints", 4)
    assert 4 <= killed_at < 8, f"killed too late (latest checkpoint {killed_at})"
    assert not (tmp_path / "lm" / "summary.json").exists()
    resumed = subprocess.run(_cmd(tmp_path), check=True, env=ENV, cwd=REPO,
                             capture_output=True, text=True)
    assert "resumed at step" in resumed.stdout
    assert_same_params(uninterrupted / "lm" / "params", tmp_path / "lm" / "params")
    sa = metrics.read_summary(uninterrupted / "lm")
    sb = metrics.read_summary(tmp_path / "lm")
    assert sa["eval/loss"] == sb["eval/loss"]


def test_complete_stage_is_skipped(uninterrupted, capsys):
    config = experiment.load_config(SMOKE + ":tiny", TINY)
    experiment.run(config, str(uninterrupted))
    assert "complete, skipped" in capsys.readouterr().out


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = lm.train_step

    def poisoned(st, batch, **kw):  # loss turns NaN from the 6th step on
        st, m = real_step(st, batch, **kw)
        m["train/loss"] = jax.numpy.where(st.step >= 6, jax.numpy.nan, m["train/loss"])
        return st, m

    monkeypatch.setattr(lm, "train_step", poisoned)
    config = experiment.load_config(SMOKE + ":tiny", TINY)
    with pytest.raises(metrics.NonFiniteError, match="train/loss = nan at step 6"):
        experiment.run(config, str(tmp_path))
    assert committed_steps(tmp_path / "lm" / "checkpoints") == [2, 4]
    assert not (tmp_path / "lm" / "summary.json").exists()


def test_loss_never_crosses_a_document_boundary():
    """Every scored target is predicted from its own document: target t+1 is weighted iff
    tokens t and t+1 are real and in the same document piece (a slow loop over the rows)."""
    from hh_jax.data import loaders
    from hh_jax.tokenizer import ByteTokenizer

    texts = ["abc", "defg", "hi", "jklmnop", "q", "rstuv", "wx", "yz!"]
    for batch in loaders.lm_dataset(texts, ByteTokenizer(), seq_len=12, global_batch=2,
                                    seed=1, num_epochs=1, process_index=0, process_count=1):
        b = loaders.lm_inputs(batch)
        seg, w = np.asarray(batch["segment_ids_BxL"]), np.asarray(b["weights_BxL"])
        assert (seg[:, 1:] != seg[:, :-1]).any()  # some row holds two documents
        for r in range(seg.shape[0]):
            for t in range(seg.shape[1] - 1):
                same = seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]
                assert bool(w[r, t + 1]) == same, (r, t, seg[r], w[r])
