"""Losses shared by the stages. Pure functions of arrays; shapes in names."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """log p(target) per position, computed in float32."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def entropy(logp_xV: jax.Array) -> jax.Array:
    """Entropy −Σ p·log p of each distribution given by its log-probs over the last axis
    (0·log 0 = 0: tokens without mass, e.g. −inf log-probs after filtering, add nothing)."""
    return -jnp.sum(jnp.where(logp_xV > -jnp.inf, jnp.exp(logp_xV) * logp_xV, 0.0), axis=-1)


def next_token_xent(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, weights_BxL: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of scored tokens.

    Position t predicts token t+1; `weights_BxL[:, t+1]` says whether token t+1 counts
    (loss masking: padding, and e.g. the Human turns in SFT). Returning the sum and the
    count, not the mean, lets callers average exactly over a global batch.
    """
    logp_BxLm1 = token_logprobs(logits_BxLxV[:, :-1], tokens_BxL[:, 1:])
    w_BxLm1 = weights_BxL[:, 1:].astype(jnp.float32)
    return -(logp_BxLm1 * w_BxLm1).sum(), w_BxLm1.sum()


# ------------------------------------------------------------------------------ RLHF / PPO
def masked_mean(x, mask, axis=None):
    mask = mask.astype(x.dtype)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_whiten(x_BxR: jax.Array, mask_BxR: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x − mean) / std over valid tokens only (RLHF_PRACTICE.md §2.6)."""
    mean = masked_mean(x_BxR, mask_BxR)
    var = masked_mean((x_BxR - mean) ** 2, mask_BxR)
    out = (x_BxR - mean) * jax.lax.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask_BxR


def gae(rewards_BxR, values_BxR, mask_BxR, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens (masks after EOS).

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 past the last valid token; A_t = δ_t + γλ·A_{t+1}.
    Returns (advantages_BxR, returns_BxR = A + V), both 0 on invalid tokens.
    """
    m = mask_BxR.astype(jnp.float32)
    v = values_BxR * m
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = rewards_BxR * m + gamma * next_v - v

    def back(carry_B, xs):
        delta_B, m_B = xs
        adv_B = (delta_B + gamma * lam * carry_B) * m_B
        return adv_B, adv_B

    _, adv_RxB = jax.lax.scan(back, jnp.zeros(delta.shape[0]), (delta.T, m.T), reverse=True)
    adv = adv_RxB.T
    return adv, (adv + v) * m


def ppo_policy_loss(logp_BxR, old_logp_BxR, adv_BxR, mask_BxR, clip: float):
    """Clipped surrogate (Schulman et al. 2017); also clipfrac and approx KL (½·mean Δ², the
    k2 estimator, as LMHP)."""
    ratio = jnp.exp(logp_BxR - old_logp_BxR)
    unclipped = -adv_BxR * ratio
    clipped = -adv_BxR * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask_BxR)
    clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask_BxR)
    approxkl = 0.5 * masked_mean((logp_BxR - old_logp_BxR) ** 2, mask_BxR)
    return loss, {"ppo/policy/clipfrac": clipfrac, "ppo/policy/approxkl": approxkl}


def ppo_value_loss(v_BxR, old_v_BxR, returns_BxR, mask_BxR, clip: float):
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²) over valid tokens (LMHP); clipfrac as
    LMHP's vf_clipfrac: the share of tokens where the clipped term is the larger one."""
    v_clipped = old_v_BxR + jnp.clip(v_BxR - old_v_BxR, -clip, clip)
    unclipped, clipped = (v_BxR - returns_BxR) ** 2, (v_clipped - returns_BxR) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask_BxR)
    clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask_BxR)
    return loss, {"ppo/val/clipfrac": clipfrac}
