"""Losses shared by the stages. Pure functions of arrays; shapes in names."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """log p(target) per position, computed in float32."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


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
