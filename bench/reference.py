"""A plain-JAX Llama reference for the benchmarks: jax.numpy only, no Flax/optax/sharding.

Same architecture as hh_jax.model (RMSNorm, RoPE rotate-half, GQA, SwiGLU, tied head) so
the benchmarks compare like with like; hand-written Adam.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def ref_init(cfg, key):
    d, f, h, g, k, n = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.n_layers
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa
    return {"embed": normal((cfg.vocab_size, d), d ** -0.5),
            "wq": normal((n, d, h * k), d ** -0.5), "wk": normal((n, d, g * k), d ** -0.5),
            "wv": normal((n, d, g * k), d ** -0.5), "wo": normal((n, h * k, d), (h * k) ** -0.5),
            "w1": normal((n, d, f), d ** -0.5), "w3": normal((n, d, f), d ** -0.5),
            "w2": normal((n, f, d), f ** -0.5), "n1": jnp.ones((n, d)), "n2": jnp.ones((n, d)),
            "nf": jnp.ones((d,))}


def _rms(x, w, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):
    b, t, h, k = x.shape
    freq = 1.0 / theta ** (jnp.arange(k // 2) / (k // 2))
    ang = jnp.arange(t)[:, None] * freq
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_hidden(p, tokens, cfg, mask=None):
    """Final hidden states; `mask` (B, T) hides padding keys."""
    b, t = tokens.shape
    h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.k
    x = p["embed"][tokens]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if mask is not None:
        causal = causal & mask[:, None, None, :]

    def layer(x, w):
        y = _rms(x, w["n1"])
        q = _rope((y @ w["wq"]).reshape(b, t, h, k), cfg.rope_theta)
        kk = _rope((y @ w["wk"]).reshape(b, t, g, k), cfg.rope_theta)
        v = (y @ w["wv"]).reshape(b, t, g, k)
        kk, v = jnp.repeat(kk, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
        s = jnp.einsum("bqhk,bshk->bhqs", q, kk) / np.sqrt(k)
        a = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
        x = x + jnp.einsum("bhqs,bshk->bqhk", a, v).reshape(b, t, h * k) @ w["wo"]
        y = _rms(x, w["n2"])
        return x + (jax.nn.silu(y @ w["w1"]) * (y @ w["w3"])) @ w["w2"], None

    stacked = {n: p[n] for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "n1", "n2")}
    x, _ = jax.lax.scan(layer, x, stacked)
    return _rms(x, p["nf"])


def ref_loss(p, tokens, cfg):
    logits = ref_hidden(p, tokens, cfg) @ p["embed"].T
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def ref_step(p, m, v, step, tokens, cfg, lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, loss_fn=None):
    loss, grads = jax.value_and_grad(loss_fn or ref_loss)(p, tokens, cfg)
    step = step + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    p = jax.tree_util.tree_map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps),
                               p, m, v)
    return p, m, v, step, loss


def time_fn(fn, n):
    fn()  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
