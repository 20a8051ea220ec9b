"""hh_jax.losses against numpy loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import losses


def _np_xent(logits, tokens, weights):
    """Explicit loops: position t predicts token t+1, counted with weight w[t+1]."""
    b, length, _ = logits.shape
    total, count = 0.0, 0.0
    for i in range(b):
        for t in range(length - 1):
            row = logits[i, t].astype(np.float64)
            logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            total += -(row[tokens[i, t + 1]] - logz) * weights[i, t + 1]
            count += weights[i, t + 1]
    return total, count


def test_next_token_xent_matches_numpy_with_weights():
    rng = np.random.default_rng(0)
    b, length, v = 3, 7, 11
    logits = (3 * rng.normal(size=(b, length, v))).astype(np.float32)
    tokens = rng.integers(0, v, (b, length))
    weights = (rng.random((b, length)) < 0.6).astype(np.float32)
    weights[0, 0] = 1.0  # weight of token 0 must not matter: nothing predicts it
    nll, count = losses.next_token_xent(jnp.asarray(logits), jnp.asarray(tokens),
                                        jnp.asarray(weights))
    ref_nll, ref_count = _np_xent(logits, tokens, weights)
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
    assert float(count) == ref_count


def test_next_token_xent_fractional_weights_and_bf16_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    tokens = rng.integers(0, 6, (2, 5))
    weights = rng.random((2, 5)).astype(np.float32)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    nll, count = losses.next_token_xent(bf16, jnp.asarray(tokens), jnp.asarray(weights))
    assert nll.dtype == jnp.float32
    ref_nll, ref_count = _np_xent(np.asarray(bf16.astype(jnp.float32)), tokens, weights)
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
    np.testing.assert_allclose(float(count), ref_count, rtol=1e-6)


def test_token_logprobs_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (2, 4))
    got = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ref = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - z
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_entropy_matches_a_python_loop_and_skips_tokens_without_mass():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 7)).astype(np.float32) * 3
    logits[1, [0, 4]] = -np.inf  # filtered tokens: no mass, no NaN
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    want = [-sum(math.exp(v) * v for v in row if v > -math.inf) for row in logp.tolist()]
    np.testing.assert_allclose(np.asarray(losses.entropy(jnp.asarray(logp))), want, rtol=1e-5)
    uniform = jnp.full((2, 8), -math.log(8.0))
    np.testing.assert_allclose(np.asarray(losses.entropy(uniform)), [math.log(8.0)] * 2,
                               rtol=1e-6)
