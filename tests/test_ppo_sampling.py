"""The rollout sampler's token draw (inverse CDF) against exact probabilities."""

import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import sampling


def test_draw_matches_softmax_and_skips_filtered_tokens():
    logits = jnp.array([[2.0, 0.5, -1.0, 1.0, -3.0, 0.0, 1.5, -0.5],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [9.0, -4.0, 3.0, -9.0, 0.0, 8.5, 1.0, 2.0]])
    filtered = sampling.filter_logits(logits, top_k=3, top_p=1.0)
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    for lg in (logits, filtered):
        toks = np.asarray(jax.jit(jax.vmap(lambda k, lg=lg: sampling.draw(lg, k)))(keys))
        p = np.asarray(jax.nn.softmax(lg, axis=-1), np.float64)
        for b in range(lg.shape[0]):
            freq = np.bincount(toks[:, b], minlength=8) / n
            assert (freq[p[b] == 0] == 0).all(), "drew a token without mass"
            # 5 binomial standard deviations per token
            np.testing.assert_array_less(np.abs(freq - p[b]),
                                         5 * np.sqrt(p[b] * (1 - p[b]) / n) + 1e-9)


def test_draw_rounding_edge_picks_a_token_with_mass():
    # one token holds all the mass and sits first: any u (even u·total == total) picks it
    lg = jnp.array([[0.0] + [jnp.finfo(jnp.float32).min] * 7])
    for seed in range(20):
        assert int(sampling.draw(lg, jax.random.key(seed))[0]) == 0
    # the mass at the end: the fallback clamps to the last token with mass
    lg = jnp.array([[jnp.finfo(jnp.float32).min] * 5 + [0.0, 0.0, jnp.finfo(jnp.float32).min]])
    toks = {int(sampling.draw(lg, jax.random.key(s))[0]) for s in range(50)}
    assert toks == {5, 6}
