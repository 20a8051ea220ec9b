"""PPO: GAE, losses and rewards against references; a toy task; sharding; resume."""

import functools
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

from hh_jax import checkpoint, losses, policy, ppo, sampling, sharding, state
from hh_jax.model import SIZES, ScalarHead, Transformer
from hh_jax.stages import ppo as ppo_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gae_matches_python_loop():
    rng = np.random.default_rng(0)
    b, r, gamma, lam = 3, 7, 0.9, 0.8
    rewards, values = rng.normal(size=(b, r)), rng.normal(size=(b, r))
    lengths = np.array([7, 4, 1])
    mask = np.arange(r)[None] < lengths[:, None]
    adv_ref = np.zeros((b, r))
    for i in range(b):
        last = 0.0
        for t in reversed(range(lengths[i])):
            nv = values[i, t + 1] if t + 1 < lengths[i] else 0.0
            delta = rewards[i, t] + gamma * nv - values[i, t]
            last = delta + gamma * lam * last
            adv_ref[i, t] = last
    adv, ret = losses.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                          jnp.asarray(mask), gamma, lam)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (adv_ref + values) * mask, rtol=1e-5, atol=1e-5)


def test_ppo_losses_match_numpy():
    rng = np.random.default_rng(1)
    logp, old, adv = rng.normal(size=(4, 6)) * 0.3, rng.normal(size=(4, 6)) * 0.3, rng.normal(
        size=(4, 6))
    mask = rng.uniform(size=(4, 6)) > 0.3
    ratio = np.exp(logp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    loss, stats = losses.ppo_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv)),
                                         jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(loss, per[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["ppo/policy/clipfrac"],
                               (-adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio)[mask].mean())
    v, vold, ret = (rng.normal(size=(4, 6)) for _ in range(3))
    vc = vold + np.clip(v - vold, -0.2, 0.2)
    ref = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)[mask].mean()
    vloss, _ = losses.ppo_value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, vold, ret)),
                                     jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(vloss, ref, rtol=1e-5)
    _, vstats = losses.ppo_value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, vold, ret)),
                                      jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(vstats["ppo/val/clipfrac"],
                               ((vc - ret) ** 2 > (v - ret) ** 2)[mask].mean(), rtol=1e-6)
    w = losses.masked_whiten(jnp.asarray(adv, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(w)[mask].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w)[mask].std(), 1, atol=1e-3)
    assert np.all(np.asarray(w)[~mask] == 0)


def test_reward_assembly_by_hand():
    logp = jnp.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -3.0], [-2.0, -2.0, -2.0], [-1.0, -2.0, -4.0]])
    # row 2: stopped with an empty response (0 tokens before a 2-token stop string): the
    # mask covers the stop tokens
    mask = jnp.array([[True, True, False], [True, True, True], [True, True, False]])
    finished = jnp.array([True, False, True])  # ended, ran out, stopped
    cfg = ppo.PPOConfig(score_shift=1.0, score_scale=2.0, missing_eos_score=-5.0)
    rewards, kl, score = ppo.compute_rewards(jnp.array([3.0, 9.0, 7.0]), logp, ref, mask,
                                             finished, 0.1, cfg)
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # row 0: ended; score (3−1)/2 = 1 at its last real token (index 1); nothing after EOS
    np.testing.assert_allclose(rewards[0], [-0.05, 0.1 + 1.0, 0.0], atol=1e-6)
    # row 1: no EOS → the fixed penalty score replaces the PM's
    np.testing.assert_allclose(rewards[1], [-0.1, -0.1, -0.1 - 5.0], atol=1e-6)
    # row 2: stopped → the PM's score (7−1)/2 = 3, at the last stop token (index 1)
    np.testing.assert_allclose(rewards[2], [0.0, -0.1 + 3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(score, [1.0, -5.0, 3.0])


def test_token_kl_is_exact_and_sums_to_the_sequence_kl():
    """Summed over positions and averaged over π's samples, the per-token exact KL is the
    sequence KL(π‖π0): checked on a two-token toy by enumerating all 3 × 3 sequences."""
    rng = np.random.default_rng(0)
    v = 3
    log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))  # noqa: E731
    p1, q1 = log_softmax(rng.normal(size=v)), log_softmax(rng.normal(size=v))
    p2, q2 = log_softmax(rng.normal(size=(v, v))), log_softmax(rng.normal(size=(v, v)))
    seq_p, seq_q = p1[:, None] + p2, q1[:, None] + q2  # log π(x1, x2), log π0(x1, x2)
    seq_kl = float((np.exp(seq_p) * (seq_p - seq_q)).sum())
    kl1 = np.asarray(ppo.token_kl(jnp.asarray(p1)[None, None], jnp.asarray(q1)[None, None]))
    kl2_by_x1 = np.asarray(ppo.token_kl(jnp.asarray(p2)[:, None], jnp.asarray(q2)[:, None]))
    np.testing.assert_allclose(kl1[0, 0] + (np.exp(p1) * kl2_by_x1[:, 0]).sum(), seq_kl,
                               rtol=1e-5)
    logits = rng.normal(size=(2, 4, 11)) * 3
    a, b = log_softmax(logits), log_softmax(logits[::-1])
    kl = np.asarray(ppo.token_kl(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(kl, (np.exp(a) * (a - b)).sum(-1), rtol=1e-5, atol=1e-7)
    assert kl.min() >= 0


def test_with_eoc_places_the_pm_token_after_the_response():
    prompt = jnp.array([[0, 7, 8]])
    pmask = jnp.array([[False, True, True]])
    resp = jnp.array([[5, 6, 2, 0]])  # EOS (2) at index 2
    tokens, mask, length = ppo.with_eoc(prompt, pmask, resp, jnp.array([3]), jnp.array([True]), 9)
    np.testing.assert_array_equal(tokens, [[0, 7, 8, 5, 6, 9, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 1, 0, 0]])
    assert int(length[0]) == 6


def test_pm_score_ignores_left_padding_of_the_prompt():
    """The rollout's prompts are left-padded; the PM must score prompt + response + EOC as
    it was trained (`reward.pm_scores`: the unpadded dialogue, positions from 0), however much
    padding sits in front. Also the ended / not-ended EOC placement of `with_eoc`."""
    from hh_jax import reward

    cfg = SIZES["test"]
    model = Transformer(cfg)
    backbone = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    head = ScalarHead(cfg.d_model, use_bias=False).init(jax.random.key(1),
                                                        jnp.zeros((1, cfg.d_model)))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, {"backbone": backbone, "head": head})
    prompt, eos, eoc, pad = [11, 12, 13, 14, 15], 2, 9, 0
    responses = [[21, 22, eos, pad], [23, 24, 25, 26]]  # ended; cut at R without EOS
    q = 12
    rows, masks, resp, lengths, ended = [], [], [], [], []
    for n_pad in (0, 3, 7):
        for r in responses:
            rows.append([pad] * n_pad + prompt + [pad] * (q - n_pad - len(prompt)))
            masks.append([False] * n_pad + [True] * len(prompt) + [False] * (q - n_pad - 5))
            resp.append(r)
            lengths.append(3 if eos in r else 4)
            ended.append(eos in r)
    # sampling.sample left-aligns prompts: real tokens at the right end of the Q slots
    tok_BxQ, mask_BxQ = sampling.left_align(jnp.array(rows), jnp.array(masks))
    roll = {"tokens_BxT": jnp.concatenate([tok_BxQ, jnp.array(resp)], 1),
            "mask_BxT": jnp.concatenate([mask_BxQ, jnp.ones((len(rows), 4), bool)], 1),
            "lengths_B": jnp.array(lengths), "ended_B": jnp.array(ended)}
    score = jax.jit(functools.partial(ppo.score_rollout, q=q, pm_model=model, eoc_id=eoc))
    got = np.asarray(score(params, roll))
    seqs = [prompt + [t for t in r if t not in (eos, pad)] + [eoc] for r in responses]
    # the PM's training layout: context + response + EOC, right-padded
    tokens = jnp.array([seq + [pad] * (12 - len(seq)) for seq in seqs])
    want = np.asarray(jax.jit(functools.partial(reward.pm_scores, model=model))(
        params, tokens, jnp.array([len(seq) for seq in seqs]))[0]).tolist()
    np.testing.assert_allclose(got, want * 3, rtol=1e-4, atol=1e-4)
    assert abs(want[0] - want[1]) > 1e-3  # the two responses are told apart


def test_temperature_must_be_positive():
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="ppo.temperature must be > 0"):
            ppo.PPOConfig(temperature=t)
    assert ppo.PPOConfig(temperature=0.7).temperature == 0.7


def test_value_head_from_the_pm_starts_in_the_reward_units():
    """With normalize_scores the reward is (r_PM − shift) / scale; the value head copied from
    the PM gives exactly that at every hidden state ("zero": 0 everywhere)."""
    import types

    d, shift, scale = 16, -2.3, 1.7
    import flax.linen as nn

    pm_head = nn.unbox(ScalarHead(d, use_bias=False).init(jax.random.key(0), jnp.zeros((1, d))))
    pm = types.SimpleNamespace(params={"backbone": {"w": jnp.ones(3)}, "head": pm_head})
    h = jax.random.normal(jax.random.key(1), (5, d))
    r_pm = np.asarray(ScalarHead(d, use_bias=False).apply(pm_head, h))
    v = ppo_stage.value_params_from_pm(pm, "pm", shift, scale)
    got = np.asarray(ScalarHead(d, zero_init=True).apply(v["head"], h))
    np.testing.assert_allclose(got, (r_pm - shift) / scale, rtol=1e-5, atol=1e-6)
    zero = ppo_stage.value_params_from_pm(pm, "zero", shift, scale)
    np.testing.assert_array_equal(ScalarHead(d, zero_init=True).apply(zero["head"], h), 0.0)
    with pytest.raises(ValueError, match="value_head_init"):
        ppo_stage.value_params_from_pm(pm, "other")


def test_bon_compares_with_ppo_only_on_the_same_eval_setup():
    """Best-of-n's "PPO at the same KL" needs the same π0, PMs, held-out prompts and
    temperature; a PPO summary from other settings is named, not used."""
    from hh_jax import experiment
    from hh_jax.stages import bon

    c = experiment.fill_workdir(experiment.load_config(os.path.join(REPO, "experiments",
                                                                     "smoke.py")), "/w")
    ppo_setup = policy.eval_setup(c.ppo, c.ppo.ppo.temperature)
    assert bon.setup_mismatch(ppo_setup, policy.eval_setup(c.bon, c.bon.temperature)) is None
    c.bon.temperature, c.bon.response_len = 0.7, 64
    why = bon.setup_mismatch(ppo_setup, policy.eval_setup(c.bon, c.bon.temperature))
    assert "temperature 1.0 (ppo) vs 0.7 (bon)" in why and "response_len 32" in why
    assert "no eval_setup" in bon.setup_mismatch(None, ppo_setup)
    for spec in ("smoke.py", "smoke.py:tiny", "ppo_hh.py", "ppo_hh.py:cpu", "ppo_hh.py:tiny"):
        c = experiment.fill_workdir(experiment.load_config(os.path.join(REPO, "experiments",
                                                                         spec)), "/w")
        assert bon.setup_mismatch(policy.eval_setup(c.ppo, c.ppo.ppo.temperature),
                                  policy.eval_setup(c.bon, c.bon.temperature)) is None, spec


def test_kl_controller_adaptive_rule():
    c = ppo.KLController(0.1, target=6.0, horizon=100)
    c.update(12.0, 10)  # error clipped to +0.2 → ×1.02
    assert c.value == pytest.approx(0.102)
    fixed = ppo.KLController(0.1, None, 100)
    assert fixed.update(50.0, 10) == 0.1
    assert ppo.bon_kl(1) == 0 and ppo.bon_kl(16) == pytest.approx(np.log(16) - 15 / 16)


def _toy(mesh, cfg=None, with_values=True):
    """Policy = value model = a "test" transformer; the PM is a plain function (count of a
    token), so the optimum is known: emit token 7."""
    mcfg = SIZES["test"].replace(vocab_size=16, max_len=32)
    model = Transformer(mcfg)
    boxed = lambda: model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))  # noqa: E731
    pol_params, _ = state.init_params(boxed, mesh)
    vboxed = lambda: {"backbone": model.init(jax.random.key(1), jnp.zeros((2, 8), jnp.int32)),  # noqa
                      "head": ScalarHead(mcfg.d_model, zero_init=True).init(
                          jax.random.key(2), jnp.zeros((2, mcfg.d_model)))}
    val_params, _ = state.init_params(vboxed, mesh)
    opt = optax.adam(3e-3)
    pol, _ = ppo_stage.train_state(pol_params, opt, mesh)
    val, _ = ppo_stage.train_state(val_params, opt, mesh)
    st = ppo.PPOState(policy=pol, value=val,
                      rng=jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh)))
    cfg = cfg or ppo.PPOConfig(kl_coef=0.05, epochs=2, minibatches=2)
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    roll = jax.jit(functools.partial(ppo.rollout, policy_model=model, value_model=model,
                                     sample_cfg=scfg, eos_id=1, pad_id=0, temperature=1.0,
                                     with_values=with_values))
    upd = jax.jit(functools.partial(ppo.ppo_update, policy_model=model, value_model=model,
                                    policy_opt=opt, value_opt=opt, cfg=cfg, q=4))
    adv = jax.jit(functools.partial(ppo.advantages, cfg=cfg))
    return st, pol_params, roll, upd, adv, cfg


def _toy_iteration(st, ref, roll, upd, adv, it, prompts, masks):
    r = roll(st.policy.params, ref, st.value.params, prompts, masks,
             jax.random.fold_in(jax.random.PRNGKey(1), it))
    score = (r["tokens_BxT"][:, 4:] == 7).sum(1).astype(jnp.float32) * 0.5
    batch, m = adv(r, score, 0.05)
    st, stats = upd(st, batch)
    return st, {**m, **stats}, r


def test_toy_task_ppo_raises_score_with_finite_smooth_kl():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    st, ref, roll, upd, adv, _ = _toy(mesh)
    prompts = jnp.tile(jnp.array([[3, 4, 5, 6]], jnp.int32), (16, 1))
    masks = jnp.ones_like(prompts, bool)
    scores, kls = [], []
    with sharding.activate(mesh):
        for it in range(25):
            sampled_with = st.policy.params
            st, m, r = _toy_iteration(st, ref, roll, upd, adv, it, prompts, masks)
            scores.append(float(m["objective/score"]))
            kls.append(float(m["objective/kl"]))
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.5, scores
    assert all(np.isfinite(kls)) and max(kls) < 50
    assert np.mean(kls[-5:]) > np.mean(kls[:3])  # the policy moved away from π0
    # the rollout's log π (the sampler's) equals a full forward's (same π, temperature 1)
    logp, _ = ppo.response_logprobs(sampled_with, r["tokens_BxT"], r["mask_BxT"], 4,
                                    model=Transformer(SIZES["test"].replace(vocab_size=16,
                                                                            max_len=32)))
    np.testing.assert_allclose(r["logp_BxR"] * r["mask_BxR"], logp * r["mask_BxR"], atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_response_logits_equal_full_logits_sliced(tie):
    """The LM head applied at the R response positions only == the full forward's logits
    there; log π and entropies == a numpy log-softmax of those logits."""
    mcfg = SIZES["test"].replace(vocab_size=64, max_len=32, tie_embeddings=tie)
    model = Transformer(mcfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    import flax.linen as nn

    params = nn.unbox(params)
    q, t = 5, 12
    tokens = jax.random.randint(jax.random.key(1), (3, t), 0, 64)
    mask = jnp.arange(t)[None] >= jnp.array([[0], [2], [4]])  # left padding
    full = model.apply(params, tokens, mask_BxL=mask)["logits_BxLxV"][:, q - 1:-1]
    got = ppo.response_logits(params, tokens, mask, q, model=model)
    chex.assert_shape(got, (3, t - q, 64))
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    temp = 0.7
    logp, ent = ppo.response_logprobs(params, tokens, mask, q, model=model, temperature=temp)
    z = np.asarray(full, np.float64) / temp
    ref = z - z.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(logp, np.take_along_axis(ref, np.asarray(tokens)[:, q:, None],
                                                        -1)[..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(ref) * ref).sum(-1), rtol=1e-5, atol=1e-5)


def test_evaluation_kl_is_the_exact_per_token_kl_and_k1_the_sampled_log_ratio():
    """sample_and_score: kl_B sums the exact KL(π‖π0) of each position over the response,
    kl_sample_B the log π − log π0 of the sampled tokens; both against numpy on the full
    forward's logits, only the tokens up to EOS counted."""
    import types

    import flax.linen as nn

    mcfg = SIZES["test"].replace(vocab_size=16, max_len=32)
    model = Transformer(mcfg)
    init = lambda k: nn.unbox(model.init(jax.random.key(k), jnp.zeros((2, 8), jnp.int32)))  # noqa
    pol, ref = init(0), init(1)
    pm = {"backbone": init(2), "head": nn.unbox(ScalarHead(mcfg.d_model, use_bias=False).init(
        jax.random.key(3), jnp.zeros((2, mcfg.d_model))))}
    q, r, temp = 4, 8, 0.8
    prompts = jax.random.randint(jax.random.key(4), (6, q), 3, 16)
    evaluate = jax.jit(functools.partial(
        policy.sample_and_score, policy_model=model, pm_model=model, test_pm_model=None,
        sample_cfg=sampling.SamplingConfig(max_new_tokens=r, temperature=temp),
        tok=types.SimpleNamespace(eos_id=1, pad_id=0, eoc_id=2), temperature=temp))
    out = jax.device_get(evaluate(pol, ref, pm, None, prompts, jnp.ones_like(prompts, bool),
                                  jax.random.key(5)))
    m = np.arange(r)[None] < out["lengths_B"][:, None]
    assert not m.all()  # some responses ended early
    tokens = jnp.concatenate([prompts, out["tokens_BxR"]], 1)
    mask = jnp.concatenate([jnp.ones_like(prompts, bool), m], 1)

    def log_softmax(params):
        z = np.asarray(model.apply(params, tokens, mask_BxL=mask)["logits_BxLxV"],
                       np.float64)[:, q - 1:-1] / temp
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(pol), log_softmax(ref)
    picked = lambda x: np.take_along_axis(x, out["tokens_BxR"][..., None], -1)[..., 0]  # noqa
    np.testing.assert_allclose(out["kl_B"], ((np.exp(lp) * (lp - lq)).sum(-1) * m).sum(1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["kl_sample_B"], ((picked(lp) - picked(lq)) * m).sum(1),
                               rtol=1e-4, atol=1e-4)


def test_rollout_sampler_logprobs_equal_recomputed():
    """reuse_sampler_logprobs (the default) changes nothing but where log π comes from:
    same samples, log π0, values; log π and entropies equal a full forward's."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    st, ref, _, _, _, _ = _toy(mesh)
    mcfg = SIZES["test"].replace(vocab_size=16, max_len=32)
    model = Transformer(mcfg)
    prompts = jax.random.randint(jax.random.key(3), (6, 4), 2, 16)
    masks = jnp.arange(4)[None] >= jnp.array([[0], [1], [0], [2], [0], [0]])
    outs = {}
    for reuse in (True, False):
        for temp in (1.0, 0.6):
            scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=temp)
            roll = jax.jit(functools.partial(
                ppo.rollout, policy_model=model, value_model=model, sample_cfg=scfg, eos_id=1,
                pad_id=0, temperature=temp, reuse_sampler_logprobs=reuse))
            outs[reuse, temp] = jax.device_get(roll(st.policy.params, ref, st.value.params,
                                                    prompts, masks, jax.random.key(7)))
    for temp in (1.0, 0.6):
        a, b = outs[True, temp], outs[False, temp]
        assert a["ended_B"].any() and not a["ended_B"].all()  # both kinds of rows
        for k in ("tokens_BxT", "mask_BxT", "lengths_B", "ref_logp_BxR", "values_BxR"):
            np.testing.assert_array_equal(a[k], b[k])
        m = a["mask_BxR"]
        np.testing.assert_allclose(a["logp_BxR"][m], b["logp_BxR"][m], atol=1e-4)
        np.testing.assert_allclose(a["entropy_BxR"][m], b["entropy_BxR"][m], atol=1e-4)
        assert (a["logp_BxR"][~m] == 0).all() and (a["entropy_BxR"][~m] == 0).all()
    # the default (None) under bf16 compute: log π from a full forward, not the sampler's
    # (in float32 the default reuses the sampler's: every stage test runs that path)
    m16 = Transformer(mcfg.replace(dtype="bfloat16"))
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    a, b = (jax.device_get(jax.jit(functools.partial(
        ppo.rollout, policy_model=m16, value_model=m16, sample_cfg=scfg, eos_id=1, pad_id=0,
        temperature=1.0, with_values=False, reuse_sampler_logprobs=reuse))(
            st.policy.params, ref, st.value.params, prompts, masks, jax.random.key(7)))
        for reuse in (None, False))
    np.testing.assert_array_equal(a["logp_BxR"], b["logp_BxR"])
    m = a["mask_BxR"]
    assert not np.array_equal(a["logp_BxR"][m], a["sampler_logp_BxR"][m])  # bf16: they differ
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        ppo.rollout(st.policy.params, ref, st.value.params, prompts, masks, jax.random.key(7),
                    policy_model=model, value_model=model, sample_cfg=scfg, eos_id=1, pad_id=0,
                    temperature=0.5)


# False: the single-pass update (K = 1, one minibatch: the paper's default) in the default
# suite; True (values from the rollout, as K > 1 needs) with the slow checks, for time
@pytest.mark.parametrize("with_values", [pytest.param(True, marks=pytest.mark.slow), False])
def test_ppo_step_sharded_equals_single_device(eight_devices, with_values):
    prompts = jnp.tile(jnp.array([[3, 4, 5, 6]], jnp.int32), (8, 1))
    masks = jnp.ones_like(prompts, bool)
    cfg = ppo.PPOConfig(kl_coef=0.05, epochs=1, minibatches=1)
    out = []
    for mesh in (sharding.make_mesh((1, 1, 1), eight_devices[:1]),
                 sharding.make_mesh((2, 2, 2), eight_devices)):
        st, ref, roll, upd, adv, _ = _toy(mesh, cfg, with_values)
        with sharding.activate(mesh):
            p = jax.device_put(prompts, sharding.batch_sharding(mesh))
            m_ = jax.device_put(masks, sharding.batch_sharding(mesh))
            st, m, _ = _toy_iteration(st, ref, roll, upd, adv, 0, p, m_)
        out.append((jax.device_get(st.policy.params), float(m["ppo/policy/loss"])))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(out[0][0], out[1][0], rtol=1e-3, atol=2e-5)


def test_single_pass_update_equals_values_from_the_rollout():
    """K = 1, one minibatch: values from the update's own forward (no value pass in the
    rollout) give the same step and the same metrics as values computed in the rollout."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = ppo.PPOConfig(kl_coef=0.05, epochs=1, minibatches=1)
    assert ppo.single_pass(cfg) and not ppo.single_pass(ppo.PPOConfig(epochs=2))
    st, ref, _, upd, adv, _ = _toy(mesh, cfg)
    model = Transformer(SIZES["test"].replace(vocab_size=16, max_len=32))
    prompts = jnp.tile(jnp.array([[3, 4, 5, 6]], jnp.int32), (8, 1))
    masks = jnp.ones_like(prompts, bool)
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    outs = []
    for with_values in (True, False):
        roll = jax.jit(functools.partial(
            ppo.rollout, policy_model=model, value_model=model, sample_cfg=scfg, eos_id=1,
            pad_id=0, temperature=1.0, with_values=with_values))
        with sharding.activate(mesh):
            r = roll(st.policy.params, ref, st.value.params, prompts, masks, jax.random.key(2))
            assert ("values_BxR" in r) == with_values
            score = (r["tokens_BxT"][:, 4:] == 7).sum(1).astype(jnp.float32) * 0.5
            batch, m = adv(r, score, 0.05)
            assert ("adv_BxR" in batch) == with_values
            new, stats = upd(st, batch)
        outs.append((jax.device_get(new), jax.device_get({**m, **stats})))
    (a, ma), (b, mb) = outs
    assert set(ma) == set(mb)
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Adam's first step is ≈ lr·sign(g): tolerances as for the sharded step below
    chex.assert_trees_all_close(a.policy.params, b.policy.params, rtol=1e-3, atol=2e-5)
    chex.assert_trees_all_close(a.value.params, b.value.params, rtol=1e-3, atol=2e-5)
    # more than one pass over the batch needs the rollout's values
    multi = ppo.PPOConfig(epochs=2, minibatches=1)
    with pytest.raises(ValueError, match="epochs == minibatches == 1"):
        ppo.ppo_update(st, batch, policy_model=model, value_model=model,
                       policy_opt=optax.adam(1e-3), value_opt=optax.adam(1e-3), cfg=multi, q=4)


EXPERIMENT = '''"""PPO resume test. Command: hh-jax run {path} --workdir DIR"""
import sys
sys.path.insert(0, {exp!r})
from common import ppo_config
from ml_collections import ConfigDict


def get_config(arg=""):
    c = ConfigDict()
    c.stages = ("ppo",)
    c.ppo = ppo_config(policy_from={policy!r}, pm_from={pm!r}, test_pm_from={pm!r},
                       prompt_len=24, response_len=6, batch_size=4, iterations=6, eval_prompts=4,
                       eval_every=2, ckpt_every=2, log_every=1, lr_ratio=1.0)
    c.ppo.ppo.kl_target = 1.0  # adaptive controller: its state must survive the restart
    c.ppo.ppo.kl_horizon = 10
    return c
'''


def _random_exports(root):
    """An LM export and a PM export with random weights and the byte tokenizer."""
    import dataclasses

    mcfg = SIZES["test"].replace(vocab_size=260, max_len=64)
    model = Transformer(mcfg)
    import flax.linen as nn

    lm = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    head = nn.unbox(ScalarHead(mcfg.d_model, use_bias=False).init(
        jax.random.key(1), jnp.zeros((1, mcfg.d_model))))
    meta = {"model": dataclasses.asdict(mcfg), "tokenizer": "byte"}
    checkpoint.export_params(str(root / "lm"), lm, {**meta, "stage": "lm"})
    checkpoint.export_params(str(root / "pm"), {"backbone": lm, "head": head},
                             {**meta, "stage": "pm", "scores": {"mean": 0.0, "std": 1.0}})


def test_ppo_stage_sigkill_resume_is_bitwise(tmp_path):
    _random_exports(tmp_path)
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.format(path=exp, exp=os.path.join(REPO, "experiments"),
                                     policy=str(tmp_path / "lm"), pm=str(tmp_path / "pm")))
    killed, sa, sb = run_whole_and_resumed(str(exp), tmp_path, "ppo", 2)
    assert killed < 6
    assert sa["evals"] == sb["evals"]
    rows = [r for r in map(eval_json, open(tmp_path / "b" / "ppo" / "metrics.jsonl"))
            if "objective/kl_coef" in r]
    assert len({r["objective/kl_coef"] for r in rows}) > 1  # the controller moved


def eval_json(line):
    import json

    return json.loads(line)


def test_ppo_config_fields_cover_the_dataclass():
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from common import ppo_config

    c = ppo_config()
    import dataclasses

    names = {f.name for f in dataclasses.fields(ppo.PPOConfig)} - {"score_shift", "score_scale"}
    assert names <= set(c.ppo.keys()), names - set(c.ppo.keys())
    assert c.ppo.kl_coef == 0.001 and c.ppo.clip == 0.2 and c.ppo.gamma == 1.0
    assert isinstance(c, ConfigDict)


def test_model_overrides_reach_every_model_of_a_ppo_stage(tmp_path):
    """`model_overrides` (compute-only: remat here) applies to the policy, the PM (whose
    model the value model uses) and the test PM; without it they keep their exports'."""
    from hh_jax import policy, sharding

    _random_exports(tmp_path)
    mesh = sharding.make_mesh((-1, 1, 1))
    c = ConfigDict(dict(policy_from=str(tmp_path / "lm"), pm_from=str(tmp_path / "pm"),
                        test_pm_from=str(tmp_path / "pm"), model_overrides={"remat": True}))
    models = policy.load_models(c, mesh)[:3]
    assert all(m.cfg.remat and m.model.cfg.remat for m in models)
    del c.model_overrides
    assert not any(m.cfg.remat for m in policy.load_models(c, mesh)[:3])
