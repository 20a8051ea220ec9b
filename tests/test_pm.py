"""Preference models: BT loss, planted-signal learning, sharding, resume, evaluation."""

import functools
import gzip
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict
from resume_helpers import run_whole_and_resumed

from hh_jax import checkpoint, experiment, reward, sharding, state
from hh_jax.data import hh, loaders
from hh_jax.evals import pm_accuracy
from hh_jax.model import SIZES, ScalarHead, Transformer
from hh_jax.stages import pm
from hh_jax.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bradley_terry_matches_numpy():
    rng = np.random.default_rng(0)
    good, bad, w = rng.normal(size=64), rng.normal(size=64), rng.uniform(0, 2, size=64)
    ref = (np.log1p(np.exp(bad - good)) * w).sum() / w.sum()
    got = reward.bradley_terry(jnp.asarray(good), jnp.asarray(bad), jnp.asarray(w))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # large margins stay finite (softplus, not log(1+exp))
    assert np.isfinite(reward.bradley_terry(jnp.array([0.0]), jnp.array([200.0]), jnp.ones(1)))


def test_wilson_interval_matches_closed_form():
    lo, hi = pm_accuracy.wilson_interval(81, 100)  # textbook value: [0.7222, 0.8749]
    np.testing.assert_allclose([lo, hi], [0.72216, 0.87492], atol=1e-4)


def test_calibrated_scores_have_near_zero_ece():
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 2, size=200_000)
    chosen_wins = rng.uniform(size=delta.size) < 1 / (1 + np.exp(-delta))
    # the labelled "chosen" is the winner: its margin is +Δ when A won, −Δ otherwise
    margin = np.where(chosen_wins, delta, -delta)
    assert pm_accuracy.calibration(margin)["ece"] < 0.01
    assert pm_accuracy.calibration(3 * margin)["ece"] > 0.05  # over-confident is caught


def test_report_baselines_and_turns():
    rep = pm_accuracy.pm_report([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 1.0],
                             ["a", "a", "b", "b"], [1, 1, 2, 2], [10, 5, 3, 3], [5, 10, 3, 9])
    assert rep["overall"]["accuracy"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert rep["per_subset"]["a"]["longer_wins"] == 0.5
    assert rep["per_subset"]["b"]["longer_wins"] == pytest.approx((0.5 + 0) / 2)
    assert rep["per_turn"][2]["n"] == 2


def _write_planted(root, n=400, seed=0):
    """HH-format files where the chosen response carries the marker word 'zebra'."""
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "paper", "light"]
    os.makedirs(root / "helpful-base", exist_ok=True)
    with gzip.open(root / "helpful-base" / "test.jsonl.gz", "wt") as f:
        for i in range(n):
            ctx = f"\n\nHuman: q{i} " + " ".join(rng.choice(words, 3)) + "\n\nAssistant:"
            body = " ".join(rng.choice(words, 4))
            good, bad = f" {body} zebra", f" {body} {rng.choice(words)}"
            f.write(json.dumps({"chosen": ctx + good, "rejected": ctx + bad}) + "\n")


def _planted_config(root, **kw):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from common import pm_config

    c = pm_config("pm", init_from="", model="test", tokenizer="byte", base_lr=3e-3,
                  lr_ratio=1.0, max_len=64, batch_size=16, eval_batch_size=32, epochs=4,
                  log_every=10, ckpt_every=10, **kw)
    c.data.hh_dir = c.eval.hh_dir = str(root)
    c.data.subsets = c.eval.subsets = ("helpful-base",)
    c.model_overrides.max_len = 64
    return c


def test_planted_signal_is_learned(tmp_path):
    _write_planted(tmp_path / "data")
    summary = pm.train_and_evaluate(_planted_config(tmp_path / "data"), str(tmp_path / "pm"))
    assert summary["heldout_pairs"] > 60
    assert summary["eval/accuracy"] >= 0.99, summary["report"]["overall"]
    assert os.path.exists(tmp_path / "pm" / "calibration.png")
    meta = checkpoint.read_meta(tmp_path / "pm" / "params")
    assert meta["stage"] == "pm" and "std" in meta["scores"]


def _pm_state(mesh, model, opt):
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    boxed = lambda: {"backbone": model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)),  # noqa
                     "head": head.init(jax.random.key(1), jnp.zeros((2, model.cfg.d_model)))}
    abstract, p_sh = state.param_shardings(boxed, mesh)
    st_sh = state.state_shardings(p_sh, opt, abstract, mesh)
    return state.init_state(state.init_params(boxed, mesh)[0], opt, st_sh), st_sh


def _loader_batch(layout, n=8, max_len=200, seed=0):
    """One batch of n synthetic pairs (byte tokens) in the given layout, numeric keys only."""
    rng = np.random.default_rng(seed)
    comps = [hh.Comparison(
        subset="helpful-base", context=f"\n\nHuman: question {i} " + "x" * rng.integers(0, 60)
        + "\n\nAssistant:", chosen=" yes " + "y" * rng.integers(0, 30),
        rejected=" no " + "n" * rng.integers(0, 30), first_human=f"q{i}", source="t", line=i,
        split="train") for i in range(n)]
    batch = next(iter(loaders.pm_dataset(comps, ByteTokenizer(), max_len=max_len, global_batch=n,
                                         seed=0, shuffle=False, layout=layout)))
    return {k: v for k, v in batch.items() if v.dtype != object}


def test_shared_layout_scores_loss_and_grads_equal_separate():
    """The shared row (context once, branch mask, continued positions) against the textbook
    two-sequence layout on the same pairs: scores, BT + LM loss and gradients."""
    model = Transformer(SIZES["test"].replace(attention_chunk=32))
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    params = {"backbone": model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)),
              "head": head.init(jax.random.key(1), jnp.zeros((2, model.cfg.d_model)))}
    sep, shared = _loader_batch("separate"), _loader_batch("shared")
    assert not sep["chosen_truncated_B"].any()
    np.testing.assert_array_equal(sep["chosen_len_B"], shared["chosen_len_B"])
    for got, want in zip(reward.score_step(params, shared, model=model),
                         reward.score_step(params, sep, model=model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.value_and_grad(pm.pm_loss, has_aux=True), static_argnums=(2, 3))
    (l_sh, aux_sh), g_sh = grad(params, shared, model, 0.5)
    (l_sep, aux_sep), g_sep = grad(params, sep, model, 0.5)
    np.testing.assert_allclose(l_sh, l_sep, rtol=1e-5)
    np.testing.assert_allclose(aux_sh["train/lm_loss"], aux_sep["train/lm_loss"], rtol=1e-5)
    chex.assert_trees_all_close(g_sh, g_sep, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_pm_step_sharded_equals_single_device(eight_devices, layout):
    model = Transformer(SIZES["test"])
    # SGD, not Adam: Adam's g/sqrt(v) turns float noise on ~zero gradients into full steps
    opt = optax.sgd(0.1)
    batch = _loader_batch(layout, max_len=64)
    results = []
    for mesh in (sharding.make_mesh((1, 1, 1), eight_devices[:1]),
                 sharding.make_mesh((2, 2, 2), eight_devices)):
        st, st_sh = _pm_state(mesh, model, opt)
        step = jax.jit(functools.partial(pm.train_step, model=model, optimizer=opt),
                       in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                       out_shardings=(st_sh, None), donate_argnums=0)
        with sharding.activate(mesh):
            for _ in range(2):
                st, m = step(st, sharding.put_batch(batch, mesh))
        results.append((jax.device_get(st.params), float(m["train/loss"])))
    (p1, l1), (p8, l8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    chex.assert_trees_all_close(p1, p8, rtol=1e-5, atol=1e-6)
    p0 = jax.device_get(_pm_state(sharding.make_mesh((1, 1, 1), eight_devices[:1]), model,
                                  opt)[0].params)
    assert not np.allclose(p0["head"]["params"]["kernel"], p8["head"]["params"]["kernel"])


EXPERIMENT = '''"""Planted-signal PM for the resume test.

Command: hh-jax run {path} --workdir DIR
"""
import sys
sys.path.insert(0, {tests!r})
from test_pm import _planted_config
from ml_collections import ConfigDict
import pathlib


def get_config(arg=""):
    c = ConfigDict()
    c.stages = ("pm",)
    c.pm = _planted_config(pathlib.Path({root!r}), eval_every=1000)
    c.pm.epochs, c.pm.ckpt_every, c.pm.log_every = 1, 4, 4
    return c
'''


def test_pm_stage_sigkill_resume_is_bitwise(tmp_path):
    _write_planted(tmp_path / "data", n=300)
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.format(path=exp, tests=os.path.dirname(__file__),
                                     root=str(tmp_path / "data")))
    killed, sa, sb = run_whole_and_resumed(str(exp), tmp_path, "pm", 4)
    assert killed < 16
    assert sa["eval/accuracy"] == sb["eval/accuracy"] and sa["report"] == sb["report"]


def test_length_grouped_order_is_a_permutation_with_tight_batches():
    comps = list(range(100))
    lengths = np.random.default_rng(0).integers(1, 1000, 100)
    out = pm.length_grouped(comps, lengths, batch=10, seed=3, window=10)
    assert sorted(out) == comps
    spread = [np.ptp(lengths[out[i:i + 10]]) for i in range(0, 100, 10)]
    assert np.mean(spread) < np.ptp(lengths) / 3
    assert pm.length_grouped(comps, lengths, 10, 3, 10) == out  # deterministic


def test_experiment_pm_split_has_no_heldout_pairs():
    config = experiment.load_config(os.path.join(REPO, "experiments", "smoke.py"))
    comps, _ = pm.load_comparisons(config.pm.data)
    assert comps and all(c.split == "train" for c in comps)
    assert all(hh.split_of(c.first_human) == "train" for c in comps)


def test_score_pairs_sorts_by_length_and_restores_order():
    """score_pairs batches pairs by row length; each score must come back to its own pair.
    A fake PM scores a pair +1 / −1 by its subset, looked up from the batch's content (the
    chosen length identifies the pair): subset "a" then has accuracy 1 and "b" 0 only if
    the scores are put back in the order of the pairs."""
    rng = np.random.default_rng(3)
    lengths = rng.permutation(np.arange(1, 80))[:37]  # distinct, in no particular order
    comps = [hh.Comparison(subset="a" if i % 2 else "b",
                             context="\n\nHuman: " + "q" * int(n) + "\n\nAssistant:",
                             chosen=" c", rejected=" r", first_human=str(i), source="t", line=i,
                             split="heldout") for i, n in enumerate(lengths)]
    tok = ByteTokenizer()
    sign = {len(tok.encode(c.context + c.chosen)) + 1: 1.0 if c.subset == "a" else -1.0
            for c in comps}
    assert len(sign) == len(comps)

    def fake_pm(params, batch):
        r = np.asarray([sign.get(int(n), 0.0) for n in batch["chosen_len_B"]], np.float32)
        return r, np.zeros_like(r)

    cfg = ConfigDict({"max_len": 512, "eval_batch_size": 8, "pair_layout": "shared"})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rep = pm_accuracy.evaluate_pairs(fake_pm, None, comps, tok, cfg, mesh)
    assert rep["per_subset"]["a"]["accuracy"] == 1.0
    assert rep["per_subset"]["b"]["accuracy"] == 0.0


def test_train_accuracy_counts_ties_as_half_like_the_eval():
    """A zero head scores every response 0: every pair is a tie, ½ as pm_accuracy.pm_report
    counts it; a random head's accuracy equals the same count done in numpy."""
    model = Transformer(SIZES["test"])
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    params = {"backbone": model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)),
              "head": head.init(jax.random.key(1), jnp.zeros((2, model.cfg.d_model)))}
    batch = _loader_batch("shared")
    zero = jax.tree_util.tree_map(jnp.zeros_like, params["head"])
    loss = jax.jit(pm.pm_loss, static_argnums=(2, 3))
    _, aux = loss({**params, "head": zero}, batch, model, 0.0)
    assert float(aux["train/accuracy"]) == 0.5
    rc, rr = (np.asarray(x) for x in jax.jit(functools.partial(reward.score_step, model=model))(
        params, batch))
    w = batch["weight_B"]
    want = float((((rc > rr) + 0.5 * (rc == rr)) * w).sum() / w.sum())
    _, aux = loss(params, batch, model, 0.0)
    np.testing.assert_allclose(float(aux["train/accuracy"]), want, rtol=1e-6)
