"""PPO against a PM with a KL penalty to π0 (PAPER.md §4–5): pure functions, shapes in names.

One iteration: `rollout` (KV-cache sampling from π; per-token logprobs under π and π0 from a
full forward pass, values, the PM score at the end of each response) → `compute_rewards`
(−λ·(log π − log π0) per token, PM score at the final real token) → `gae` → `ppo_update`
(K epochs × minibatches inside one jit). Policy and value are separate param trees; π0 and
the PM are frozen jit arguments. The KL controller runs on the host.

Legend: B prompts, Q prompt length, R response length, T = Q + R, V vocab, D model.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from hh_jax import losses, sampling
from hh_jax.model import ScalarHead, Transformer, gather_at
from hh_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Every choice the paper leaves open is a field here (PAPER.md §5, RLHF_PRACTICE §2)."""

    kl_coef: float = 0.001  # λ_KL (paper)
    kl_target: float | None = None  # adaptive controller when set (LMHP: 6.0)
    kl_horizon: int = 10_000
    clip: float = 0.2  # ε (paper)
    value_clip: float = 0.2  # LMHP
    gamma: float = 1.0  # paper
    lam: float = 0.95  # GAE λ, not stated in the paper (LMHP)
    epochs: int = 1  # K re-uses of each sample (paper: 1, 2 or 4)
    minibatches: int = 1
    value_coef: float = 1.0  # weight of the value loss in the joint objective
    whiten_advantages: bool = True
    missing_eos_score: float | None = None  # score for responses without EOS (None: PM's)
    score_shift: float = 0.0  # r_PM ← (r_PM − shift) / scale: the PM's score statistics
    score_scale: float = 1.0
    temperature: float = 1.0


@flax.struct.dataclass
class PPOState:
    policy: TrainState
    value: TrainState
    rng: jax.Array


def response_logprobs(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer,
                      temperature: float = 1.0):
    """log π(response token t | prefix) for the R tokens after position q, and entropies."""
    out = model.apply(params, tokens_BxT, mask_BxL=mask_BxT)
    logits_BxRxV = out["logits_BxLxV"][:, q - 1:-1] / temperature
    logp_BxRxV = jax.nn.log_softmax(logits_BxRxV, axis=-1)
    logp_BxR = jnp.take_along_axis(logp_BxRxV, tokens_BxT[:, q:, None], axis=-1)[..., 0]
    entropy_BxR = -(jnp.exp(logp_BxRxV) * logp_BxRxV).sum(-1)
    return logp_BxR, entropy_BxR


def values_of(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer):
    """V(prefix before response token t) for t < R: the value head at positions q−1..T−2."""
    out = model.apply(params["backbone"], tokens_BxT, mask_BxL=mask_BxT, with_logits=False)
    head = ScalarHead(model.cfg.d_model, zero_init=True)
    return head.apply(params["head"], out["hidden_BxLxD"][:, q - 1:-1])


def pm_score(params, tokens_BxT, lengths_B, *, model: Transformer):
    """PM reward read at index lengths_B − 1 (where the caller put the EOC token)."""
    mask = jnp.arange(tokens_BxT.shape[1])[None, :] < lengths_B[:, None]
    out = model.apply(params["backbone"], tokens_BxT, mask_BxL=mask, with_logits=False)
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    return head.apply(params["head"], gather_at(out["hidden_BxLxD"], lengths_B - 1))


def with_eoc(prompt_BxQ, prompt_mask_BxQ, response_BxR, lengths_B, ended_B, eoc_id: int):
    """PM input: prompt + response (without its EOS) + EOC, and the index after the EOC."""
    q = prompt_BxQ.shape[1]
    r = response_BxR.shape[1]
    body_B = lengths_B - ended_B.astype(jnp.int32)  # response tokens before EOS
    tokens_BxT1 = jnp.concatenate([prompt_BxQ, response_BxR, jnp.zeros_like(response_BxR[:, :1])],
                                  axis=1)
    pos_R1 = jnp.arange(r + 1)[None, :]
    resp_BxR1 = jnp.where(pos_R1 < body_B[:, None], tokens_BxT1[:, q:], 0)
    resp_BxR1 = jnp.where(pos_R1 == body_B[:, None], eoc_id, resp_BxR1)
    tokens_BxT1 = jnp.concatenate([prompt_BxQ, resp_BxR1], axis=1)
    mask_BxT1 = jnp.concatenate([prompt_mask_BxQ, pos_R1 <= body_B[:, None]], axis=1)
    return tokens_BxT1, mask_BxT1, q + body_B + 1


def rollout(policy_params, ref_params, value_params, prompt_BxQ, prompt_mask_BxQ, rng, *,
            policy_model: Transformer, value_model: Transformer, sample_cfg, eos_id: int,
            pad_id: int, temperature: float):
    """Samples responses from π; logprobs under π and π0 from a full forward pass (not the
    sampler's, so the trainer and the "engine" can never disagree: RLHF_PRACTICE §2.18)."""
    s = sampling.sample(policy_params, prompt_BxQ, prompt_mask_BxQ, rng, model=policy_model,
                        cfg=sample_cfg, eos_id=eos_id, pad_id=pad_id)
    q, r = prompt_BxQ.shape[1], sample_cfg.max_new_tokens
    mask_BxR = jnp.arange(r)[None, :] < s["lengths_B"][:, None]
    tokens_BxT = jnp.concatenate([s["prompt_BxQ"], s["tokens_BxR"]], axis=1)
    mask_BxT = jnp.concatenate([s["prompt_mask_BxQ"], mask_BxR], axis=1)
    logp_BxR, entropy_BxR = response_logprobs(policy_params, tokens_BxT, mask_BxT, q,
                                              model=policy_model, temperature=temperature)
    ref_logp_BxR, _ = response_logprobs(ref_params, tokens_BxT, mask_BxT, q, model=policy_model,
                                        temperature=temperature)
    values_BxR = values_of(value_params, tokens_BxT, mask_BxT, q, model=value_model)
    return {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "mask_BxR": mask_BxR,
            "logp_BxR": logp_BxR, "ref_logp_BxR": ref_logp_BxR, "values_BxR": values_BxR,
            "entropy_BxR": entropy_BxR, "lengths_B": s["lengths_B"], "ended_B": s["ended_B"],
            "sampler_logp_BxR": s["logprobs_BxR"]}


def score_rollout(pm_params, roll: dict, q: int, *, pm_model: Transformer, eoc_id: int):
    """The PM's score of each (prompt, response): read at an EOC put after the response."""
    tokens, _, length_B = with_eoc(roll["tokens_BxT"][:, :q], roll["mask_BxT"][:, :q],
                                   roll["tokens_BxT"][:, q:], roll["lengths_B"], roll["ended_B"],
                                   eoc_id)
    return pm_score(pm_params, tokens, length_B, model=pm_model)


def compute_rewards(score_B, logp_BxR, ref_logp_BxR, mask_BxR, lengths_B, ended_B, kl_coef,
                    cfg: PPOConfig):
    """Per-token −λ·(log π − log π0) (k1 estimator, LMHP), plus the normalised PM score at
    the final real token; responses without EOS may get a fixed score instead."""
    score_B = (score_B - cfg.score_shift) / cfg.score_scale
    if cfg.missing_eos_score is not None:
        score_B = jnp.where(ended_B, score_B, cfg.missing_eos_score)
    kl_BxR = (logp_BxR - ref_logp_BxR) * mask_BxR
    rewards_BxR = -kl_coef * kl_BxR
    last_BxR = jnp.arange(mask_BxR.shape[1])[None, :] == (lengths_B - 1)[:, None]
    rewards_BxR = rewards_BxR + jnp.where(last_BxR & mask_BxR, score_B[:, None], 0.0)
    return rewards_BxR, kl_BxR, score_B


def _minibatch_loss(params, mb, *, policy_model, value_model, cfg: PPOConfig, q: int):
    logp, entropy = response_logprobs(params["policy"], mb["tokens_BxT"], mb["mask_BxT"], q,
                                      model=policy_model, temperature=cfg.temperature)
    pg_loss, pg_stats = losses.ppo_policy_loss(logp, mb["logp_BxR"], mb["adv_BxR"],
                                               mb["mask_BxR"], cfg.clip)
    v = values_of(params["value"], mb["tokens_BxT"], mb["mask_BxT"], q, model=value_model)
    v_loss, v_stats = losses.ppo_value_loss(v, mb["values_BxR"], mb["returns_BxR"],
                                            mb["mask_BxR"], cfg.value_clip)
    stats = {**pg_stats, **v_stats, "ppo/policy/loss": pg_loss, "ppo/val/loss": v_loss,
             "ppo/policy/entropy": losses.masked_mean(entropy, mb["mask_BxR"])}
    return pg_loss + cfg.value_coef * v_loss, stats


def ppo_update(st: PPOState, batch, *, policy_model, value_model, policy_opt, value_opt,
               cfg: PPOConfig, q: int):
    """K epochs × minibatches of clipped PPO on one rollout batch, inside one jit."""
    b = batch["tokens_BxT"].shape[0]
    if b % cfg.minibatches:
        raise ValueError(f"batch {b} is not divisible into {cfg.minibatches} minibatches")
    adv = batch["adv_BxR"]
    if cfg.whiten_advantages:
        adv = losses.masked_whiten(adv, batch["mask_BxR"])
    data = {**batch, "adv_BxR": adv}
    rng, perm_rng = jax.random.split(st.rng)
    grad_fn = jax.value_and_grad(_minibatch_loss, has_aux=True)

    def one_minibatch(carry, idx_M):
        pol, val = carry
        mb = jax.tree_util.tree_map(lambda x: x[idx_M], data)
        (_, stats), g = grad_fn({"policy": pol.params, "value": val.params}, mb,
                                policy_model=policy_model, value_model=value_model, cfg=cfg,
                                q=q)
        pu, pstate = policy_opt.update(g["policy"], pol.opt_state, pol.params)
        vu, vstate = value_opt.update(g["value"], val.opt_state, val.params)
        pol = pol.replace(step=pol.step + 1, params=optax.apply_updates(pol.params, pu),
                          opt_state=pstate)
        val = val.replace(step=val.step + 1, params=optax.apply_updates(val.params, vu),
                          opt_state=vstate)
        return (pol, val), stats

    perms = jnp.stack([jax.random.permutation(k, b) for k in
                       jax.random.split(perm_rng, cfg.epochs)])
    idx = perms.reshape(cfg.epochs * cfg.minibatches, b // cfg.minibatches)
    (pol, val), stats = jax.lax.scan(one_minibatch, (st.policy, st.value), idx)
    stats = jax.tree_util.tree_map(jnp.mean, stats)
    return PPOState(policy=pol, value=val, rng=rng), stats


def advantages(roll: dict, score_B, kl_coef, cfg: PPOConfig) -> tuple[dict, dict]:
    """Rewards → GAE; returns the update batch and the iteration's objective metrics."""
    raw_score_B = score_B
    rewards, kl_BxR, score_B = compute_rewards(score_B, roll["logp_BxR"],
                                               roll["ref_logp_BxR"], roll["mask_BxR"],
                                               roll["lengths_B"], roll["ended_B"], kl_coef, cfg)
    adv, returns = losses.gae(rewards, roll["values_BxR"], roll["mask_BxR"], cfg.gamma, cfg.lam)
    kl_B = kl_BxR.sum(1)
    m = roll["mask_BxR"]
    resid = losses.masked_mean((returns - roll["values_BxR"]) ** 2, m)
    var = losses.masked_mean((returns - losses.masked_mean(returns, m)) ** 2, m)
    metrics = {"objective/score": raw_score_B.mean(), "objective/score_used": score_B.mean(),
               "objective/kl": kl_B.mean(), "objective/sqrt_kl": jnp.sqrt(jnp.maximum(
                   kl_B.mean(), 0.0)), "objective/kl_coef": kl_coef,
               "objective/entropy": (roll["entropy_BxR"] * m).sum(1).mean(),
               "ppo/val/var_explained": 1.0 - resid / jnp.maximum(var, 1e-8),
               "ppo/returns/mean": losses.masked_mean(returns, m),
               "response/length": roll["lengths_B"].mean(),
               "response/ended": roll["ended_B"].mean()}
    batch = {k: roll[k] for k in ("tokens_BxT", "mask_BxT", "mask_BxR", "logp_BxR",
                                  "values_BxR")}
    return {**batch, "adv_BxR": adv, "returns_BxR": returns}, metrics


class KLController:
    """Fixed λ, or LMHP's adaptive rule λ ← λ·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_samples / self.horizon
        return self.value

    def state(self) -> dict:
        return {"value": self.value}

    def load(self, state: dict) -> None:
        self.value = float(state["value"])


def bon_kl(n: int) -> float:
    """Analytic KL of best-of-n sampling from π0: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n
