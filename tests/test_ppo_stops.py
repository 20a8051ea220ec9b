"""Stop strings in PPO, its evaluation and best-of-n: stops planted on a known token stream
(the rollout without stops, same key), checked against a scan of that stream.

The stop string is trained like a multi-token EOS (mask = response + stop tokens, the score
at the last stop token) but is never part of the PM's input."""

from __future__ import annotations

import functools
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from model_helpers import random_params

from hh_jax import policy, ppo, reward
from hh_jax.model import SIZES, ScalarHead, Transformer
from hh_jax.sampling import SamplingConfig, stop_table_from_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = SIZES["test"].replace(vocab_size=16, max_len=32)
MODEL = Transformer(CFG)
Q, R, EOS, PAD, EOC, TEMP = 4, 8, 1, 0, 2, 1.0
KEY = jax.random.key(11)


def scan(stream, seqs, eos):
    """(length, stop tokens, ended, stopped) of one row from its unstopped stream: it ends
    at the first token that is EOS or completes one of `seqs`."""
    stream = [int(t) for t in stream]
    for t, tok in enumerate(stream):
        if tok == eos:
            return t + 1, 0, True, False
        done = [len(s) for s in seqs if len(s) <= t + 1 and stream[t + 1 - len(s):t + 1] == s]
        if done:
            return t + 1 - max(done), max(done), False, True
    return len(stream), 0, False, False


def _params():
    pm_head = ScalarHead(CFG.d_model, use_bias=False).init(jax.random.key(1),
                                                           jnp.zeros((1, CFG.d_model)))
    pm_head = jax.tree_util.tree_map(lambda x: x * 3.0, pm_head)  # scores far apart
    return (random_params(CFG, seed=1), random_params(CFG, seed=2),
            {"backbone": random_params(CFG, seed=3), "head": pm_head})


def _prompts():
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, Q), 3, 16), np.int32)
    masks = np.arange(Q)[None] >= np.array([[0], [1], [0], [2], [0], [0], [1], [0]])
    return np.where(masks, tokens, PAD), masks


def _rollout(reuse=True):
    return jax.jit(functools.partial(
        ppo.rollout, policy_model=MODEL, value_model=MODEL,
        sample_cfg=SamplingConfig(max_new_tokens=R, temperature=TEMP), eos_id=EOS,
        pad_id=PAD, temperature=TEMP, reuse_sampler_logprobs=reuse, with_values=False))


def _planted(stream):
    """Two stop sequences taken from the stream: the first two tokens of a row (that row's
    response is empty) and two tokens in the middle of another."""
    free = [b for b in range(len(stream)) if EOS not in stream[b][:6]]
    a, b = free[0], free[1]
    return [list(map(int, stream[a][:2])), list(map(int, stream[b][3:5]))]


def test_rollout_with_planted_stops():
    pol, ref, pm = _params()
    prompts, masks = _prompts()
    base = jax.device_get(_rollout()(pol, ref, None, prompts, masks, KEY))
    stream = base["tokens_BxT"][:, Q:]
    seqs = _planted(stream)
    table = stop_table_from_ids(seqs, CFG.vocab_size, slots=4, width=4)
    roll = jax.device_get(_rollout()(pol, ref, None, prompts, masks, KEY, table))
    want = np.array([scan(row, seqs, EOS) for row in stream])
    lengths, stop_len = want[:, 0], want[:, 1]
    ended, stopped = want[:, 2].astype(bool), want[:, 3].astype(bool)
    # every kind of row: ended at EOS, stopped with an empty / non-empty response, ran out
    assert ended.any() and (stopped & (lengths == 0)).any() and (stopped & (lengths > 0)).any()
    assert (~ended & ~stopped).any()
    np.testing.assert_array_equal(roll["lengths_B"], lengths)
    np.testing.assert_array_equal(roll["stop_lengths_B"], stop_len)
    np.testing.assert_array_equal(roll["ended_B"], ended)
    np.testing.assert_array_equal(roll["stopped_B"], stopped)

    # the trained tokens: the response and its stop tokens, as drawn without stops
    m = roll["mask_BxR"]
    np.testing.assert_array_equal(m.sum(1), lengths + stop_len)
    np.testing.assert_array_equal(roll["tokens_BxT"][:, Q:][m], stream[m])
    np.testing.assert_allclose(roll["logp_BxR"][m], base["logp_BxR"][m], atol=1e-5)
    stop_pos = m & (np.arange(R)[None] >= lengths[:, None])
    assert stop_pos.sum() == stop_len.sum() and (roll["logp_BxR"][stop_pos] != 0).all()
    # log π recomputed by a full forward covers the stop tokens as well; log π0 the same
    full = jax.device_get(_rollout(reuse=False)(pol, ref, None, prompts, masks, KEY, table))
    np.testing.assert_array_equal(full["mask_BxR"], m)
    np.testing.assert_allclose(full["logp_BxR"][m], roll["logp_BxR"][m], atol=1e-4)
    np.testing.assert_array_equal(full["ref_logp_BxR"], roll["ref_logp_BxR"])

    # the PM's input ends before the stop string: the score of prompt + response + EOC
    score = np.asarray(jax.jit(functools.partial(ppo.score_rollout, q=Q, pm_model=MODEL,
                                                 eoc_id=EOC))(pm, roll))
    rows = [list(p[mk]) + list(s[:n - e]) for p, mk, s, n, e in
            zip(prompts, masks, stream, lengths, ended, strict=True)]
    assert score.shape == (8,)
    np.testing.assert_allclose(score, _direct(pm, [r + [EOC] for r in rows]), atol=1e-4)
    with_stop = _direct(pm, [r + list(s[n:n + k]) + [EOC] for r, s, n, k in
                             zip(rows, stream, lengths, stop_len, strict=True)])
    assert np.abs(with_stop - score)[stopped].min() > 1e-3  # the test tells them apart

    # rewards: the score at the last trained token (the last stop token of a stopped row,
    # index stop_len − 1 for an empty response); missing_eos_score only where neither
    cfg = ppo.PPOConfig(missing_eos_score=-5.0)
    batch, metrics = jax.jit(functools.partial(ppo.advantages, cfg=cfg))(roll, score, 0.1)
    used = np.where(ended | stopped, score, -5.0)
    kl = (roll["logp_BxR"] - roll["ref_logp_BxR"]) * m
    placed = np.asarray(batch["rewards_BxR"]) + 0.1 * kl
    last = lengths + stop_len - 1
    want_r = np.zeros((8, R))
    want_r[np.arange(8), last] = used
    np.testing.assert_allclose(placed, want_r, atol=1e-5)
    np.testing.assert_allclose(metrics["objective/score_used"], used.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["response/stopped"], stopped.mean())
    np.testing.assert_allclose(metrics["response/ended"], ended.mean())
    np.testing.assert_allclose(metrics["objective/kl"], kl.sum(1).mean(), rtol=1e-5)

    # the evaluation (same sampler, key and table): the same PM input, KL over the same mask
    ev = jax.device_get(jax.jit(functools.partial(
        policy.sample_and_score, policy_model=MODEL, pm_model=MODEL, test_pm_model=MODEL,
        sample_cfg=SamplingConfig(max_new_tokens=R, temperature=TEMP),
        tok=types.SimpleNamespace(eos_id=EOS, pad_id=PAD, eoc_id=EOC), temperature=TEMP))(
            pol, ref, pm, pm, prompts, masks, KEY, table))
    np.testing.assert_array_equal(ev["stopped_B"], stopped)
    np.testing.assert_allclose(ev["score_B"], score, atol=1e-5)
    np.testing.assert_allclose(ev["test_score_B"], score, atol=1e-5)
    np.testing.assert_allclose(ev["kl_sample_B"], kl.sum(1), atol=1e-4)


def _direct(pm, seqs):
    """The PM's score of each unpadded sequence, in its training layout (right-padded)."""
    width = max(map(len, seqs))
    tokens = jnp.array([s + [PAD] * (width - len(s)) for s in seqs], jnp.int32)
    return np.asarray(jax.jit(functools.partial(reward.pm_scores, model=MODEL))(
        pm, tokens, jnp.array([len(s) for s in seqs]))[0])


def test_another_table_of_the_same_shape_reuses_the_compiled_rollout():
    pol, ref, _ = _params()
    prompts, masks = _prompts()
    traces = [0]

    def counted(*args):
        traces[0] += 1
        return ppo.rollout(*args, policy_model=MODEL, value_model=MODEL,
                           sample_cfg=SamplingConfig(max_new_tokens=R, temperature=TEMP),
                           eos_id=EOS, pad_id=PAD, temperature=TEMP, with_values=False)

    run = jax.jit(counted)
    outs = [jax.device_get(run(pol, ref, None, prompts, masks, KEY,
                               stop_table_from_ids(seqs, CFG.vocab_size, slots=4, width=4)))
            for seqs in ([[5, 6]], [[7], [8, 9, 10]])]
    assert traces[0] == 1
    assert not np.array_equal(outs[0]["mask_BxR"], outs[1]["mask_BxR"])


def test_stage_stops_and_the_eval_setup():
    from hh_jax.stages import bon
    from hh_jax.tokenizer import ByteTokenizer

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from common import bon_config, ppo_config

    tok = ByteTokenizer()
    c = ppo_config()
    assert tuple(c.stop_strings) == ("\n\nHuman:",) == tuple(bon_config().stop_strings)
    table = policy.stage_stops(c, tok, 300)
    assert table.first_SxV.shape[1] == 300 and table.lengths_S.max() == 8  # bytes
    assert policy.stage_stops(ppo_config(stop_strings=()), tok, 300) is None
    # best-of-n compares with a PPO run only under the same stop strings (JSON: lists)
    a = policy.eval_setup(c, 1.0)
    assert a["stop_strings"] == ["\n\nHuman:"]
    assert bon.setup_mismatch(a, policy.eval_setup(bon_config(**{
        k: c[k] for k in policy.EVAL_SETUP_KEYS}), 1.0)) is None
    b = policy.eval_setup(ppo_config(stop_strings=()), 1.0)
    assert "stop_strings" in bon.setup_mismatch(a, b)


def test_bon_stage_with_stops_runs(tmp_path):
    """Best-of-n with stop strings a random byte model hits often (any printable ASCII
    character): rows stop, some with an empty response, and the stage completes."""
    from test_ppo import _random_exports

    from hh_jax.stages import bon

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from common import bon_config

    _random_exports(tmp_path)
    cfg = bon_config(policy_from=str(tmp_path / "lm"), pm_from=str(tmp_path / "pm"),
                     test_pm_from=str(tmp_path / "pm"), ppo_dir="", ns=(1, 2), eval_prompts=4,
                     prompt_len=24, response_len=6, batch_size=8,
                     stop_strings=tuple(chr(c) for c in range(32, 127)))
    summary = bon.train_and_evaluate(cfg, str(tmp_path / "bon"))
    assert 0 < summary["samples"]["stopped"] <= 1
    assert [r["n"] for r in summary["rows"]] == [1, 2]
    assert all(np.isfinite(r["test_score"]) for r in summary["rows"])
