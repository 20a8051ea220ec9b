r"""PPO against a PM with a KL penalty to π0 (PAPER.md §4–5): pure functions, shapes in names.

One iteration: `rollout` (KV-cache sampling from π, which also gives log π; per-token log π0
from a full forward pass; values, the PM score at the end of each response) →
`compute_rewards` (−λ·(log π − log π0) per token, PM score at the final trained token) →
`gae` → `ppo_update` (K epochs × minibatches inside one jit). Policy and value are separate
param trees; π0 and the PM are frozen jit arguments. The KL controller runs on the host.

A response ends at EOS or at a stop string (`sampling.sample`'s `stops`, e.g. "\n\nHuman:":
the model starting the next Human turn itself). The stop string is trained like a
multi-token EOS: the response mask covers the response and its stop tokens (the policy
learns to end its turn there) and the score sits at the last stop token; the PM's *input*
ends before the stop string (`with_eoc` over the response only), so it never scores an
invented Human turn.

Work not repeated: the last layer and the LM head (V wide) run at the R response positions
only (the PM's last layer: at its one read position); with K = 1 and one minibatch
(`single_pass`) the values come from the update's own forward.

Legend: B prompts, Q prompt length, R response length, T = Q + R, V vocab, D model.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from hh_jax import losses, sampling
from hh_jax.model import ScalarHead, Transformer, lm_head_logits
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
    # log π of the rollout: the sampler's own (True), or a full forward pass recomputing it
    # (False); None: the sampler's under float32 compute, recomputed under bf16, where the
    # KV-cache decode and the full forward round differently and log π − log π0 would not
    # be 0 at π = π0 (RLHF_PRACTICE §2.18)
    reuse_sampler_logprobs: bool | None = None

    def __post_init__(self):
        check_temperature(self.temperature, "ppo.temperature")


def check_temperature(t: float, name: str) -> None:
    """PPO and best-of-n sample from π at temperature t and divide logits by t for log π /
    log π0: t must be > 0 (t = 0 would be greedy decoding, not sampling from π, and NaN
    log-probs)."""
    if not t > 0:
        raise ValueError(f"{name} must be > 0 (got {t}): PPO and best-of-n sample from the "
                         f"tempered policy; greedy decoding (0) has no log-probs to compare")


@flax.struct.dataclass
class PPOState:
    policy: TrainState
    value: TrainState
    rng: jax.Array


def response_positions(tokens_BxT, q: int):
    """The R positions q−1..T−2 whose hidden states predict (or value) the response tokens."""
    b, t = tokens_BxT.shape
    return jnp.broadcast_to(jnp.arange(q - 1, t - 1, dtype=jnp.int32), (b, t - q))


def response_logits(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer):
    """Logits predicting the R response tokens (positions q−1..T−2): the backbone on all T
    tokens but its last layer and the LM head (V wide) only where they are read."""
    out = model.apply(params, tokens_BxT, mask_BxL=mask_BxT,
                      read_index_BxQ=response_positions(tokens_BxT, q))
    return lm_head_logits(params, out["hidden_BxQxD"], model.cfg)


def response_log_softmax(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer,
                         temperature: float = 1.0):
    """log π(· | prefix) over the whole vocabulary at the R response positions, tempered."""
    logits_BxRxV = response_logits(params, tokens_BxT, mask_BxT, q, model=model)
    return jax.nn.log_softmax(logits_BxRxV / temperature, axis=-1)


def token_logprobs(logp_BxRxV, tokens_BxR):
    """log p of the given token at each position."""
    return jnp.take_along_axis(logp_BxRxV, tokens_BxR[..., None], axis=-1)[..., 0]


def token_kl(logp_BxRxV, ref_logp_BxRxV):
    """KL(π(·|prefix) ‖ π0(·|prefix)) at each position, exact over the vocabulary (≥ 0).

    Summed over a response sampled from π it is an unbiased estimate of the sequence-level
    KL(π ‖ π0) (chain rule), like the sum of log π − log π0 of the sampled tokens (k1, the
    reward's penalty), but never negative and with far less variance: what the evaluation
    reports and the √KL law is fitted on (RLHF_PRACTICE §1.2: "negative KL")."""
    return jnp.sum(jnp.exp(logp_BxRxV) * (logp_BxRxV - ref_logp_BxRxV), axis=-1)


def response_logprobs(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer,
                      temperature: float = 1.0):
    """log π(response token t | prefix) for the R tokens after position q, and entropies."""
    logp_BxRxV = response_log_softmax(params, tokens_BxT, mask_BxT, q, model=model,
                                      temperature=temperature)
    return token_logprobs(logp_BxRxV, tokens_BxT[:, q:]), losses.entropy(logp_BxRxV)


def values_of(params, tokens_BxT, mask_BxT, q: int, *, model: Transformer):
    """V(prefix before response token t) for t < R: the value head at positions q−1..T−2."""
    out = model.apply(params["backbone"], tokens_BxT, mask_BxL=mask_BxT,
                      read_index_BxQ=response_positions(tokens_BxT, q))
    head = ScalarHead(model.cfg.d_model, zero_init=True)
    return head.apply(params["head"], out["hidden_BxQxD"])


def pm_score(params, tokens_BxT, mask_BxT, read_B, *, model: Transformer):
    """PM reward read at index read_B (where the caller put the EOC token). `mask_BxT` marks
    the real tokens: left padding of the prompt is neither attended to nor counted in the
    positions, so a row scores the same however much its prompt is padded."""
    out = model.apply(params["backbone"], tokens_BxT, mask_BxL=mask_BxT,
                      read_index_BxQ=read_B[:, None].astype(jnp.int32))
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    return head.apply(params["head"], out["hidden_BxQxD"][:, 0])


def with_eoc(prompt_BxQ, prompt_mask_BxQ, response_BxR, lengths_B, ended_B, eoc_id: int):
    """PM input: prompt + response (without its EOS) + EOC, its mask of real tokens (the
    prompt's padding excluded), and the index after the EOC."""
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


def trained_mask(s: dict, r: int):
    """The response positions PPO trains on (and sums KL over) of `sampling.sample`'s output
    `s`: the response (EOS included) and, for a stopped row, its stop string's tokens."""
    n_B = s["lengths_B"] + s["stop_lengths_B"]
    return jnp.arange(r)[None, :] < n_B[:, None]


def rollout(policy_params, ref_params, value_params, prompt_BxQ, prompt_mask_BxQ, rng,
            stops: sampling.StopTable | None = None, *, policy_model: Transformer,
            value_model: Transformer, sample_cfg, eos_id: int, pad_id: int, temperature: float,
            reuse_sampler_logprobs: bool | None = None, with_values: bool = True):
    """Samples responses from π; per-token log π0 from a full forward pass, values.

    `stops`: the stop strings' table (a traced argument: any table of the same shape runs
    the same program). `mask_BxR` covers each response and its stop tokens (`trained_mask`);
    `lengths_B` is the response before the stop string, what the PM scores.

    log π (and the entropy) are the sampler's own — the KV-cache decode of the same π at
    the same temperature, equal to a full forward's within float tolerance (tested) — or,
    with `reuse_sampler_logprobs=False`, recomputed by a full forward pass so the trainer
    and the "engine" can never disagree (RLHF_PRACTICE §2.18; e.g. a bf16 cache). None:
    the sampler's under float32 compute, recomputed otherwise. Without values
    (`with_values=False`) the update computes them (`single_pass`)."""
    if reuse_sampler_logprobs is None:
        reuse_sampler_logprobs = jnp.dtype(policy_model.cfg.dtype) == jnp.float32
    s = sampling.sample(policy_params, prompt_BxQ, prompt_mask_BxQ, rng, model=policy_model,
                        cfg=sample_cfg, eos_id=eos_id, pad_id=pad_id, stops=stops)
    q, r = prompt_BxQ.shape[1], sample_cfg.max_new_tokens
    mask_BxR = trained_mask(s, r)
    tokens_BxT = jnp.concatenate([s["prompt_BxQ"], s["tokens_BxR"]], axis=1)
    mask_BxT = jnp.concatenate([s["prompt_mask_BxQ"], mask_BxR], axis=1)
    if reuse_sampler_logprobs:
        if sample_cfg.temperature != temperature:
            raise ValueError(f"sampler temperature {sample_cfg.temperature} != PPO temperature "
                             f"{temperature}: the sampler's logprobs are not log π")
        logp_BxR, entropy_BxR = s["logprobs_BxR"], s["entropies_BxR"]
    else:
        logp_BxR, entropy_BxR = response_logprobs(policy_params, tokens_BxT, mask_BxT, q,
                                                  model=policy_model, temperature=temperature)
    ref_logp_BxR, _ = response_logprobs(ref_params, tokens_BxT, mask_BxT, q, model=policy_model,
                                        temperature=temperature)
    out = {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "mask_BxR": mask_BxR,
           "logp_BxR": logp_BxR, "ref_logp_BxR": ref_logp_BxR, "entropy_BxR": entropy_BxR,
           "lengths_B": s["lengths_B"], "ended_B": s["ended_B"], "stopped_B": s["stopped_B"],
           "stop_lengths_B": s["stop_lengths_B"], "sampler_logp_BxR": s["logprobs_BxR"]}
    if with_values:
        out["values_BxR"] = values_of(value_params, tokens_BxT, mask_BxT, q, model=value_model)
    return out


def score_rollout(pm_params, roll: dict, q: int, *, pm_model: Transformer, eoc_id: int):
    """The PM's score of each (prompt, response): read at an EOC put after the response
    (`lengths_B` tokens: a stopped row's stop string is not part of the PM's input)."""
    tokens, mask, length_B = with_eoc(roll["tokens_BxT"][:, :q], roll["mask_BxT"][:, :q],
                                      roll["tokens_BxT"][:, q:], roll["lengths_B"],
                                      roll["ended_B"], eoc_id)
    return pm_score(pm_params, tokens, mask, length_B - 1, model=pm_model)


def compute_rewards(score_B, logp_BxR, ref_logp_BxR, mask_BxR, finished_B, kl_coef,
                    cfg: PPOConfig):
    """Per-token −λ·(log π − log π0) (k1 estimator, LMHP), plus the normalised PM score at
    the last trained token (`mask_BxR`, a prefix of each row: the EOS, or a stopped row's
    last stop token); responses that neither ended nor stopped (`finished_B` False) may
    get a fixed score instead."""
    score_B = (score_B - cfg.score_shift) / cfg.score_scale
    if cfg.missing_eos_score is not None:
        score_B = jnp.where(finished_B, score_B, cfg.missing_eos_score)
    kl_BxR = (logp_BxR - ref_logp_BxR) * mask_BxR
    rewards_BxR = -kl_coef * kl_BxR
    last_B = mask_BxR.sum(axis=1) - 1
    last_BxR = jnp.arange(mask_BxR.shape[1])[None, :] == last_B[:, None]
    rewards_BxR = rewards_BxR + jnp.where(last_BxR & mask_BxR, score_B[:, None], 0.0)
    return rewards_BxR, kl_BxR, score_B


def value_targets(rewards_BxR, values_BxR, mask_BxR, cfg: PPOConfig) -> tuple[dict, dict]:
    """GAE advantages and returns from per-token rewards and V(prefix); value-fit metrics."""
    adv, returns = losses.gae(rewards_BxR, values_BxR, mask_BxR, cfg.gamma, cfg.lam)
    m = mask_BxR
    resid = losses.masked_mean((returns - values_BxR) ** 2, m)
    var = losses.masked_mean((returns - losses.masked_mean(returns, m)) ** 2, m)
    metrics = {"ppo/val/var_explained": 1.0 - resid / jnp.maximum(var, 1e-8),
               "ppo/returns/mean": losses.masked_mean(returns, m)}
    return {"values_BxR": values_BxR, "adv_BxR": adv, "returns_BxR": returns}, metrics


def _minibatch_loss(params, mb, *, policy_model, value_model, cfg: PPOConfig, q: int,
                    own_values: bool = False):
    logp, entropy = response_logprobs(params["policy"], mb["tokens_BxT"], mb["mask_BxT"], q,
                                      model=policy_model, temperature=cfg.temperature)
    v = values_of(params["value"], mb["tokens_BxT"], mb["mask_BxT"], q, model=value_model)
    v_stats = {}
    if own_values:  # K = 1, one minibatch: V_old is this very pass's V (same params)
        targets, v_stats = value_targets(mb["rewards_BxR"], jax.lax.stop_gradient(v),
                                         mb["mask_BxR"], cfg)
        if cfg.whiten_advantages:
            targets["adv_BxR"] = losses.masked_whiten(targets["adv_BxR"], mb["mask_BxR"])
        mb = {**mb, **targets}
    pg_loss, pg_stats = losses.ppo_policy_loss(logp, mb["logp_BxR"], mb["adv_BxR"],
                                               mb["mask_BxR"], cfg.clip)
    v_loss, vl_stats = losses.ppo_value_loss(v, mb["values_BxR"], mb["returns_BxR"],
                                             mb["mask_BxR"], cfg.value_clip)
    stats = {**pg_stats, **vl_stats, **v_stats, "ppo/policy/loss": pg_loss, "ppo/val/loss": v_loss,
             "ppo/policy/entropy": losses.masked_mean(entropy, mb["mask_BxR"])}
    return pg_loss + cfg.value_coef * v_loss, stats


def single_pass(cfg: PPOConfig) -> bool:
    """K = 1 and one minibatch: the update's forward pass is at the rollout's params, so
    the values need not be computed in the rollout (its V_old is the update's own V)."""
    return cfg.epochs == 1 and cfg.minibatches == 1


def ppo_update(st: PPOState, batch, *, policy_model, value_model, policy_opt, value_opt,
               cfg: PPOConfig, q: int):
    """K epochs × minibatches of clipped PPO on one rollout batch, inside one jit.

    `batch` holds advantages and returns (from `advantages` of a rollout with values), or —
    only when `single_pass(cfg)` — per-token rewards, turned into advantages here from the
    values of the update's own forward pass (the same numbers, one value forward fewer)."""
    b = batch["tokens_BxT"].shape[0]
    if b % cfg.minibatches:
        raise ValueError(f"batch {b} is not divisible into {cfg.minibatches} minibatches")
    own_values = "adv_BxR" not in batch
    if own_values and not single_pass(cfg):
        raise ValueError("a batch without advantages needs epochs == minibatches == 1")
    data = dict(batch)
    if cfg.whiten_advantages and not own_values:
        data["adv_BxR"] = losses.masked_whiten(batch["adv_BxR"], batch["mask_BxR"])
    rng, perm_rng = jax.random.split(st.rng)
    grad_fn = jax.value_and_grad(functools.partial(_minibatch_loss, own_values=own_values),
                                 has_aux=True)

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
    """Rewards → GAE; returns the update batch and the iteration's objective metrics.

    A rollout without values (`rollout(..., with_values=False)`, for `single_pass`) gives
    a batch with the per-token rewards instead: `ppo_update` finishes GAE there."""
    raw_score_B = score_B
    stopped_B = roll["stopped_B"]
    rewards, kl_BxR, score_B = compute_rewards(score_B, roll["logp_BxR"],
                                               roll["ref_logp_BxR"], roll["mask_BxR"],
                                               roll["ended_B"] | stopped_B, kl_coef, cfg)
    kl_B = kl_BxR.sum(1)
    m = roll["mask_BxR"]
    metrics = {"objective/score": raw_score_B.mean(), "objective/score_used": score_B.mean(),
               "objective/kl": kl_B.mean(), "objective/sqrt_kl": jnp.sqrt(jnp.maximum(
                   kl_B.mean(), 0.0)), "objective/kl_coef": kl_coef,
               "objective/entropy": (roll["entropy_BxR"] * m).sum(1).mean(),
               "response/length": roll["lengths_B"].mean(),
               "response/ended": roll["ended_B"].mean(),
               "response/stopped": stopped_B.mean()}
    batch = {k: roll[k] for k in ("tokens_BxT", "mask_BxT", "mask_BxR", "logp_BxR")}
    if "values_BxR" not in roll:
        return {**batch, "rewards_BxR": rewards}, metrics
    targets, v_metrics = value_targets(rewards, roll["values_BxR"], m, cfg)
    return {**batch, **targets}, {**metrics, **v_metrics}


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
