"""hh_jax.model against independent references (numpy re-implementations, second code paths)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import FAST_COMPILE, jit, random_params  # noqa: F401

from hh_jax import sharding
from hh_jax.model import (
    SIZES,
    ScalarHead,
    Transformer,
    attention_mask,
    chunked_causal_attention,
    gather_at,
    init_cache,
    rope,
)

CFG = SIZES["test"]
PAPER_FAMILY = ("13M", "42M", "197M", "810M", "2.7B", "13B", "52B")
_random_params = random_params


@pytest.fixture(scope="module")
def test_model():
    return Transformer(CFG), _random_params(CFG)


@pytest.fixture(scope="module")
def apply_fn(test_model):
    model, _ = test_model
    return jit(model.apply)


def _tokens(b, length, seed=1, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(4, vocab, (b, length)), jnp.int32)


# ---------------------------------------------------------------- numpy reference

def _np_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x_BxLxHxK, pos_BxL, theta):
    """Rotate-half layout written pair by pair: (x_i, x_{i+K/2}) rotated by pos·θ^(-2i/K)."""
    k = x_BxLxHxK.shape[-1]
    half = k // 2
    out = np.empty_like(x_BxLxHxK)
    for i in range(half):
        ang = pos_BxL[:, :, None] * theta ** (-2.0 * i / k)
        a, b = x_BxLxHxK[..., i], x_BxLxHxK[..., i + half]
        out[..., i] = a * np.cos(ang) - b * np.sin(ang)
        out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


def _np_forward(params, tokens_BxL, cfg, mask_BxL=None):
    """Llama forward in float64 numpy straight from the param dict."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params["params"])
    tokens = np.asarray(tokens_BxL)
    b, length = tokens.shape
    mask = np.ones((b, length), bool) if mask_BxL is None else np.asarray(mask_BxL)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.float64)
    h_, g_, k_ = cfg.n_heads, cfg.n_kv_heads, cfg.k
    x = p["embed"]["embedding"][tokens]
    lay = p["layers"]
    for n in range(cfg.n_layers):
        h = _np_rmsnorm(x, lay["attn_norm"]["scale"][n], cfg.norm_eps)
        q = np.einsum("bld,dhk->blhk", h, lay["attn"]["q"]["kernel"][n])
        kk = np.einsum("bld,dgk->blgk", h, lay["attn"]["k"]["kernel"][n])
        v = np.einsum("bld,dgk->blgk", h, lay["attn"]["v"]["kernel"][n])
        q, kk = _np_rope(q, pos, cfg.rope_theta), _np_rope(kk, pos, cfg.rope_theta)
        att = np.zeros((b, length, h_, k_))
        for head in range(h_):
            g = head // (h_ // g_)  # query heads share kv heads in consecutive groups
            s = np.einsum("bik,bjk->bij", q[:, :, head], kk[:, :, g]) / np.sqrt(k_)
            allowed = np.tril(np.ones((length, length), bool))[None] & mask[:, None, :]
            s = np.where(allowed, s, -1e30)
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            att[:, :, head] = np.einsum("bij,bjk->bik", s, v[:, :, g])
        x = x + np.einsum("blhk,hkd->bld", att, lay["attn"]["o"]["kernel"][n])
        h = _np_rmsnorm(x, lay["mlp_norm"]["scale"][n], cfg.norm_eps)
        gate = h @ lay["mlp"]["gate"]["kernel"][n]
        up = h @ lay["mlp"]["up"]["kernel"][n]
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ lay["mlp"]["down"]["kernel"][n]
    hidden = _np_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return hidden @ head, hidden


# ---------------------------------------------------------------- tests
# Most calls use one (2, 10) shape with an explicit mask, so the jitted apply compiles once.

B, L = 2, 10


def _run(apply_fn, params, tokens, mask=None, **kw):
    mask = np.ones(tokens.shape, bool) if mask is None else mask
    out = apply_fn(params, jnp.asarray(tokens), mask_BxL=jnp.asarray(mask), **kw)
    return np.asarray(out["logits_BxLxV"]), out


def test_output_shapes_and_dtypes(test_model, apply_fn):
    _, params = test_model
    logits, out = _run(apply_fn, params, _tokens(B, L))
    assert logits.shape == (B, L, CFG.vocab_size)
    assert out["logits_BxLxV"].dtype == jnp.float32
    assert out["hidden_BxLxD"].shape == (B, L, CFG.d_model)
    assert out["cache"] is None


def _check_against_numpy(apply_fn, params, cfg):
    tokens = _tokens(B, L, seed=4)
    mask = np.ones((B, L), bool)
    mask[1, :3] = False  # a left-padded row exercises the key mask and the positions
    logits, out = _run(apply_fn, params, tokens, mask)
    ref_logits, ref_hidden = _np_forward(params, tokens, cfg, mask)
    np.testing.assert_allclose(logits[0], ref_logits[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits[1, 3:], ref_logits[1, 3:], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["hidden_BxLxD"][0], ref_hidden[0], atol=1e-4, rtol=1e-4)


def test_matches_numpy_reference_tied(test_model, apply_fn):
    _check_against_numpy(apply_fn, test_model[1], CFG)


def test_matches_numpy_reference_untied():
    cfg = CFG.replace(tie_embeddings=False)
    _check_against_numpy(jit(Transformer(cfg).apply), _random_params(cfg, seed=3), cfg)


def test_rope_against_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 100, (2, 5))
    theta, half = 500.0, 4
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(
        1j * pos[:, :, None, None] * theta ** (-np.arange(half) / half))
    expected = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(rope(jnp.asarray(x), jnp.asarray(pos), theta), expected,
                               atol=2e-5, rtol=1e-5)


def test_attention_mask_against_loops():
    rng = np.random.default_rng(2)
    b, length, s = 2, 3, 6
    q_pos = np.array([2, 3, 4])
    valid = rng.random((b, s)) < 0.7
    qseg, kseg = rng.integers(0, 2, (b, length)), rng.integers(0, 2, (b, s))
    got = np.asarray(attention_mask(jnp.asarray(q_pos), jnp.asarray(valid), jnp.asarray(qseg),
                                    jnp.asarray(kseg)))
    assert got.shape == (b, 1, length, s)
    for bi in range(b):
        for i in range(length):
            for j in range(s):
                want = j <= q_pos[i] and valid[bi, j] and qseg[bi, i] == kseg[bi, j]
                assert got[bi, 0, i, j] == want


def test_attention_mask_branches_against_loops():
    rng = np.random.default_rng(5)
    b, length = 3, 7
    valid = rng.random((b, length)) < 0.8
    branch = rng.integers(1, 4, (b, length))
    got = np.asarray(attention_mask(jnp.arange(length), jnp.asarray(valid),
                                    q_branch_BxL=jnp.asarray(branch),
                                    kv_branch_BxS=jnp.asarray(branch)))
    for bi in range(b):
        for i in range(length):
            for j in range(length):  # the context (branch 1) is everyone's; branches are private
                want = (j <= i and valid[bi, j]
                        and (branch[bi, j] == 1 or branch[bi, j] == branch[bi, i]))
                assert got[bi, 0, i, j] == want


@pytest.mark.parametrize("length, chunk", [(300, 128), (256, 64), (40, 128)])
def test_chunked_attention_matches_full_mask_attention(length, chunk):
    """Values and gradients against jax.nn.dot_product_attention over the full mask."""
    rng = np.random.default_rng(length)
    b, h, g, k = 2, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.normal(size=(b, length, n, k)), jnp.float32)
                for n in (h, g, g))
    valid = np.ones((b, length), bool)
    valid[1, length // 2:] = False  # right padding
    branch = np.ones((b, length), np.int32)
    branch[0, length // 3: 2 * length // 3], branch[0, 2 * length // 3:] = 2, 3
    mask = attention_mask(jnp.arange(length), jnp.asarray(valid), q_branch_BxL=branch,
                          kv_branch_BxS=branch)
    w = jnp.asarray(rng.normal(size=(b, length, h, k)), jnp.float32) * valid[:, :, None, None]

    def loss(fn, q, kk, v):
        return (fn(q, kk, v) * w).sum()

    full = functools.partial(jax.nn.dot_product_attention, mask=mask, implementation="xla")
    ours = functools.partial(chunked_causal_attention, mask_Bx1xLxL=mask, chunk=chunk)
    np.testing.assert_allclose(jax.jit(ours)(q, kk, v) * valid[:, :, None, None],
                               jax.jit(full)(q, kk, v) * valid[:, :, None, None], atol=1e-5,
                               rtol=1e-5)
    g_ours = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, kk, v)
    g_full = jax.jit(jax.grad(functools.partial(loss, full), argnums=(0, 1, 2)))(q, kk, v)
    for a, b_ in zip(g_ours, g_full, strict=True):
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-4)


def test_causality(test_model, apply_fn):
    _, params = test_model
    tokens = np.asarray(_tokens(B, L, seed=5))
    base, _ = _run(apply_fn, params, tokens)
    for t in (0, 4, 9):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 17) % CFG.vocab_size
        out, _ = _run(apply_fn, params, changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        diff = np.abs(out[:, t:] - base[:, t:]).max(axis=-1)  # B x (L - t)
        assert (diff > 1e-3).all(), f"perturbing token {t} left some later logits unchanged"


def test_left_and_right_padding_match_unpadded(test_model, apply_fn):
    _, params = test_model
    row = np.asarray(_tokens(1, 6, seed=6))[0]
    # By causality (tested above) the first 6 logits of an unmasked length-10 row are the
    # logits of the unpadded length-6 row.
    unpadded, _ = _run(apply_fn, params, np.stack([np.r_[row, 5, 6, 7, 8]] * 2))
    pads = np.full(4, 7)
    tokens = np.stack([np.r_[pads, row], np.r_[row, pads]])
    mask = np.ones((B, L), bool)
    mask[0, :4] = False
    mask[1, 6:] = False
    out, _ = _run(apply_fn, params, tokens, mask)
    np.testing.assert_allclose(out[0, 4:], unpadded[0, :6], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1, :6], unpadded[0, :6], atol=1e-5, rtol=1e-5)


def test_segments_keep_packed_documents_apart(test_model, apply_fn):
    # RoPE scores depend on relative position only, so a packed document attends exactly
    # as it would alone even though its absolute positions are shifted.
    _, params = test_model
    a, b = np.asarray(_tokens(2, 5, seed=8))
    alone, _ = _run(apply_fn, params, np.stack([np.r_[a, b], np.r_[b, a]]))  # by causality
    seg = jnp.asarray([[1] * 5 + [2] * 5, [1] * 5 + [2] * 5], jnp.int32)
    out, _ = _run(apply_fn, params, np.stack([np.r_[a, b], np.r_[b, a]]), segment_ids_BxL=seg)
    np.testing.assert_allclose(out[:, :5], alone[:, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone[1, :5], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[1, 5:], alone[0, :5], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SIZES))
def test_eval_shape_init_every_size(name):
    cfg = SIZES[name]
    model = Transformer(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    # Every leaf is boxed with one logical name per dimension, all known to the rules table.
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree_util.tree_leaves(nn.unbox(boxed))
    spec_leaves = jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    known = {rule for rule, _ in sharding.LOGICAL_RULES}
    for x, spec in zip(leaves, spec_leaves, strict=True):
        assert len(spec) == x.ndim, (name, x.shape, spec)
        assert all(a in known for a in spec), (name, spec)
    params = nn.unbox(boxed)["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(cfg.param_dtype)}
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    embedding = params["embed"]["embedding"].size + (
        0 if cfg.tie_embeddings else params["lm_head"]["kernel"].size)
    non_embedding = total - embedding
    if name in PAPER_FAMILY:
        # PAPER.md §2: non-embedding parameters ≈ 12·L·d² for the paper's model family.
        expected = 12 * cfg.n_layers * cfg.d_model**2
        assert abs(non_embedding / expected - 1) < 0.15, (
            f"{name}: {non_embedding / 1e6:.1f}M non-embedding params, "
            f"12·L·d² = {expected / 1e6:.1f}M (ratio {non_embedding / expected:.3f})")
    if name == "smollm2-135m":
        assert abs(total - 134.5e6) < 1e6, total


def test_remat_same_loss_and_grads(test_model):
    _, params = test_model
    tokens = _tokens(B, L, seed=10)

    def loss(p, remat):
        logits = Transformer(CFG.replace(remat=remat)).apply(p, tokens)["logits_BxLxV"]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    l0, g0 = jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    l1, g1 = jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    assert float(optax_global_norm(g0)) > 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7),
                           g0, g1)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


def test_bfloat16_compute_close_to_float32(test_model, apply_fn):
    _, params = test_model
    tokens = _tokens(B, L, seed=11)
    a, _ = _run(apply_fn, params, tokens)
    bf16 = jit(Transformer(CFG.replace(dtype="bfloat16")).apply)(params, tokens)
    assert bf16["logits_BxLxV"].dtype == jnp.float32
    assert bf16["hidden_BxLxD"].dtype == jnp.bfloat16
    b = np.asarray(bf16["logits_BxLxV"])
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_kv_cache_decode_matches_full_forward(test_model, apply_fn):
    _, params = test_model
    prefill, slots = 4, 12
    tokens = np.asarray(_tokens(B, L, seed=12))
    mask = np.ones((B, L), bool)
    mask[1, :2] = False  # row 1 is left-padded
    full, _ = _run(apply_fn, params, tokens, mask)

    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    kv_valid = jnp.asarray(np.concatenate([mask, np.zeros((B, slots - L), bool)], 1))
    cache = init_cache(CFG, B, slots)
    assert cache["k"].shape == (CFG.n_layers, B, slots, CFG.n_kv_heads, CFG.k)

    def step(cache, t0, t1):
        out = apply_fn(params, jnp.asarray(tokens[:, t0:t1]), positions_BxL=pos[:, t0:t1],
                       cache=cache, kv_valid_BxS=kv_valid)
        return out["cache"], np.asarray(out["logits_BxLxV"])

    cache, first = step(cache, 0, prefill)
    pieces = [first]
    assert int(cache["index"]) == prefill
    for t in range(prefill, L):
        cache, logits = step(cache, t, t + 1)
        pieces.append(logits)
    assert int(cache["index"]) == L
    decoded = np.concatenate(pieces, axis=1)
    np.testing.assert_allclose(decoded[0], full[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded[1, 2:], full[1, 2:], atol=1e-5, rtol=1e-5)


def test_scalar_head_and_gather_at():
    rng = np.random.default_rng(13)
    hidden = rng.normal(size=(3, 5, 8)).astype(np.float32)
    head = ScalarHead(8)
    params = nn.unbox(head.init(jax.random.key(0), jnp.zeros((1, 1, 8))))
    params = jax.tree_util.tree_map(lambda x: x + 0.3, params)  # a non-zero bias too
    k, bias = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    np.testing.assert_allclose(head.apply(params, jnp.asarray(hidden)), hidden @ k + bias,
                               rtol=1e-5, atol=1e-5)
    zero = nn.unbox(ScalarHead(8, zero_init=True).init(jax.random.key(0), jnp.zeros((1, 1, 8))))
    assert not np.any(np.asarray(zero["params"]["kernel"]))
    idx = np.array([4, 0, 2])
    got = np.asarray(gather_at(jnp.asarray(hidden), jnp.asarray(idx)))
    np.testing.assert_array_equal(got, np.stack([hidden[i, j] for i, j in enumerate(idx)]))


def test_hidden_only_mode_matches_full_forward(test_model, apply_fn):
    model, params = test_model
    tokens = _tokens(B, L, seed=14)
    mask = np.ones((B, L), bool)
    mask[0, :3] = False
    _, full = _run(apply_fn, params, tokens, mask)
    hidden_only = jit(functools.partial(model.apply, with_logits=False))(
        params, tokens, mask_BxL=jnp.asarray(mask))
    assert hidden_only["logits_BxLxV"] is None
    np.testing.assert_allclose(hidden_only["hidden_BxLxD"], full["hidden_BxLxD"], atol=1e-6,
                               rtol=1e-6)


def test_read_index_runs_last_layer_for_read_tokens_only(test_model):
    """`read_index_BxQ` (a PM's read-out) against gathering the full forward's hidden
    states: values and parameter gradients."""
    model, params = test_model
    tokens, mask = _tokens(3, 40, seed=9), np.arange(40)[None] < np.array([[40], [30], [20]])
    idx = jnp.asarray([[39, 10], [29, 5], [19, 0]])

    def read(p):
        return model.apply(p, tokens, mask_BxL=mask, with_logits=False,
                           read_index_BxQ=idx)["hidden_BxQxD"]

    def full(p):
        hidden = model.apply(p, tokens, mask_BxL=mask, with_logits=False)["hidden_BxLxD"]
        return jnp.take_along_axis(hidden, idx[:, :, None], axis=1)

    np.testing.assert_allclose(jax.jit(read)(params), jax.jit(full)(params), atol=1e-5,
                               rtol=1e-5)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, CFG.d_model)), jnp.float32)
    g_read = jax.jit(jax.grad(lambda p: (read(p) * w).sum()))(params)
    g_full = jax.jit(jax.grad(lambda p: (full(p) * w).sum()))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_read), jax.tree_util.tree_leaves(g_full),
                    strict=True):  # two compiled programs: float32 reassociation, ~1e-5
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
