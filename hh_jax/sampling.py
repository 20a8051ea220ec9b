"""Jitted autoregressive sampling with a KV cache.

Prefill the (left-aligned) prompt in one call, then one token per iteration inside
`lax.while_loop`: no host round-trip per token, and the loop exits as soon as every row
has produced EOS. Temperature, top-k, top-p; per-row lengths. Prompts may be left- or
right-padded (any layout: real tokens are moved to the right end, keeping their order).

Returned logprobs are those of the sampled tokens under the temperature-scaled, *not*
truncated distribution: the policy π that PPO optimises (RLHF_PRACTICE.md §2.11, and
trl#6789 for the bias top-k/top-p truncation would add to the importance ratio).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hh_jax import decode_step, losses
from hh_jax.model import Transformer, init_cache, lm_head_logits


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    # decode steps through `decode_step` (every layer's weights and cache apart, split once
    # before the loop; the split weights are held while sampling) instead of the model's
    # stacked layer scan. None → on off CPU for a `Transformer` (on GPU, slicing stacked
    # weights inside the loop copies them every token), off on CPU. The same computation
    # either way (tests on CPU: identical draws in float32; in bfloat16 identical greedy
    # tokens, logprobs within bf16 rounding, which XLA may apply at other places).
    split_layers: bool | None = None


def _decoder(params, model: Transformer, cfg: SamplingConfig, cache: dict):
    """(decode(tokens_Bx1, positions_Bx1, cache, kv_valid_BxS) → (logits_BxV, cache), the
    initial cache in the layout it takes)."""
    split = cfg.split_layers
    if split is None:
        split = isinstance(model, Transformer) and jax.default_backend() != "cpu"
    if split:
        rest, layers = decode_step.split_layers(params, model.cfg)
        return (lambda tokens_Bx1, positions_Bx1, c, kv_valid_BxS: decode_step.step(
            rest, layers, tokens_Bx1, positions_Bx1, c, kv_valid_BxS, model.cfg),
            decode_step.split_cache(cache, model.cfg))

    def decode(tokens_Bx1, positions_Bx1, c, kv_valid_BxS):
        out = model.apply(params, tokens_Bx1, positions_BxL=positions_Bx1, cache=c,
                          kv_valid_BxS=kv_valid_BxS)
        return out["logits_BxLxV"][:, -1], out["cache"]
    return decode, cache


def left_align(tokens_BxQ: jax.Array, mask_BxQ: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the right end (stable), padding to the left."""
    order_BxQ = jnp.argsort(mask_BxQ.astype(jnp.int32), axis=1, stable=True)
    return (jnp.take_along_axis(tokens_BxQ, order_BxQ, axis=1),
            jnp.take_along_axis(mask_BxQ, order_BxQ, axis=1))


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf."""
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                            keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg, logits_BxV)
    return logits_BxV


def draw(logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
    """One token per row from softmax(logits_BxV), by inverse CDF: one uniform per row
    (Gumbel-max, as in jax.random.categorical, draws V of them — most of a decode step's
    sampling time at V = 8192). Tokens without probability mass (filtered) are never drawn.
    """
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = jax.random.uniform(rng, cdf_BxV[:, :1].shape, cdf_BxV.dtype) * cdf_BxV[:, -1:]
    token_B = jnp.sum(cdf_BxV <= u_Bx1, axis=-1)
    # u·total may round up to total: then the last token with mass
    last_B = logits_BxV.shape[-1] - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)
    return jnp.minimum(token_B, last_B)


def _pick(logits_BxV, rng, cfg: SamplingConfig):
    """(token_B, logprob_B, entropy_B) — under the untruncated tempered distribution."""
    if cfg.temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled_BxV = logits_BxV / cfg.temperature
        logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
        token_B = draw(filter_logits(scaled_BxV, cfg.top_k, cfg.top_p), rng)
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B, losses.entropy(logp_BxV)


def sample(params, prompt_BxQ: jax.Array, prompt_mask_BxQ: jax.Array, rng: jax.Array, *,
           model: Transformer, cfg: SamplingConfig, eos_id: int, pad_id: int) -> dict:
    """Samples up to `cfg.max_new_tokens` per row.

    Returns tokens_BxR (pad after EOS), logprobs_BxR and entropies_BxR (of the distribution
    each token was drawn from; 0 after EOS), lengths_B (tokens up to and including EOS),
    ended_B (row produced EOS), and the left-aligned prompt.
    """
    prompt_BxQ, prompt_mask_BxQ = left_align(prompt_BxQ, prompt_mask_BxQ)
    b, q = prompt_BxQ.shape
    r = cfg.max_new_tokens
    kv_valid_BxS = jnp.concatenate([prompt_mask_BxQ, jnp.zeros((b, r), bool)], axis=1)
    positions_BxQ = jnp.maximum(jnp.cumsum(prompt_mask_BxQ, axis=1) - 1, 0)
    # prefill: the LM head (V wide) only at the last prompt position, the one that is read
    out = model.apply(params, prompt_BxQ, positions_BxL=positions_BxQ,
                      cache=init_cache(model.cfg, b, q + r), kv_valid_BxS=kv_valid_BxS,
                      with_logits=False)
    logits_Bx1xV = lm_head_logits(params, out["hidden_BxLxD"][:, -1:], model.cfg)
    decode, cache = _decoder(params, model, cfg, out["cache"])
    init = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits_BxV=logits_Bx1xV[:, 0],
                kv_valid_BxS=kv_valid_BxS, pos_B=prompt_mask_BxQ.sum(axis=1).astype(jnp.int32),
                done_B=jnp.zeros((b,), bool), tokens_BxR=jnp.full((b, r), pad_id, jnp.int32),
                logprobs_BxR=jnp.zeros((b, r), jnp.float32),
                entropies_BxR=jnp.zeros((b, r), jnp.float32), rng=rng)

    def cond(c):
        return (c["i"] < r) & ~jnp.all(c["done_B"])

    def body(c):
        rng, step_rng = jax.random.split(c["rng"])
        token_B, logp_B, entropy_B = _pick(c["logits_BxV"], step_rng, cfg)
        live_B = ~c["done_B"]
        token_B = jnp.where(live_B, token_B, pad_id)
        i = c["i"]
        kv_valid_BxS = c["kv_valid_BxS"].at[:, q + i].set(live_B)
        logits_BxV, cache = decode(token_B[:, None], c["pos_B"][:, None], c["cache"],
                                   kv_valid_BxS)
        return dict(i=i + 1, cache=cache, logits_BxV=logits_BxV,
                    kv_valid_BxS=kv_valid_BxS, pos_B=c["pos_B"] + 1,
                    done_B=c["done_B"] | (token_B == eos_id),
                    tokens_BxR=c["tokens_BxR"].at[:, i].set(token_B),
                    logprobs_BxR=c["logprobs_BxR"].at[:, i].set(jnp.where(live_B, logp_B, 0.0)),
                    entropies_BxR=c["entropies_BxR"].at[:, i].set(
                        jnp.where(live_B, entropy_B, 0.0)),
                    rng=rng)

    c = jax.lax.while_loop(cond, body, init)
    ended_B = jnp.any(c["tokens_BxR"] == eos_id, axis=1)
    lengths_B = jnp.where(ended_B, jnp.argmax(c["tokens_BxR"] == eos_id, axis=1) + 1, c["i"])
    return {"tokens_BxR": c["tokens_BxR"], "logprobs_BxR": c["logprobs_BxR"],
            "entropies_BxR": c["entropies_BxR"], "lengths_B": lengths_B.astype(jnp.int32),
            "ended_B": ended_B, "prompt_BxQ": prompt_BxQ, "prompt_mask_BxQ": prompt_mask_BxQ}


def pad_prompts(token_lists: list[list[int]], pad_id: int, length: int | None = None,
                left: bool = True):
    """Host-side helper: list of id lists → (tokens_BxQ, mask_BxQ) numpy, left-padded."""
    import numpy as np

    q = length or max(len(t) for t in token_lists)
    tokens = np.full((len(token_lists), q), pad_id, np.int32)
    mask = np.zeros((len(token_lists), q), bool)
    for i, ids in enumerate(token_lists):
        ids = list(ids)[-q:]  # keep the end of an over-long prompt
        sl = slice(q - len(ids), q) if left else slice(0, len(ids))
        tokens[i, sl], mask[i, sl] = ids, True
    return tokens, mask
