"""Llama-style decoder-only Transformer (Linen, pure functional) and its scalar head.

One model serves every stage (STYLE.md §9.2): `Transformer` returns logits and the final
hidden states; the PM reward and PPO value heads are a `ScalarHead` on those hidden states.

Block: x + Attn(RMSNorm(x)) then x + SwiGLU(RMSNorm(x)); rotary position embeddings in
the Hugging Face "rotate half" layout; grouped-query attention; tied or untied LM head.
Layers are `nn.scan`ned (params stacked on a leading "layers" axis), so compile time does
not grow with depth. Every parameter carries logical axis names (sharding.py maps them).

Shapes in names: B batch, L length, S cache slots, D model, H heads, G kv heads, K head
dim, F ffw, V vocab, N layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # default d_model // n_heads
    rope_theta: float = 10_000.0
    max_len: int = 2048
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; "bfloat16" for mixed precision
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass
    # "chunked" (default): causal attention in query chunks of `attention_chunk` that skip
    # the key blocks above the diagonal (about half the work at long lengths; exact); or a
    # jax.nn.dot_product_attention implementation ("xla", "cudnn") over the full mask.
    attention_impl: str = "chunked"
    attention_chunk: int = 128

    def __post_init__(self):  # None (in some exports' meta.json) is the default
        if self.attention_impl is None:
            object.__setattr__(self, "attention_impl", "chunked")

    @property
    def k(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _paper(n_layers: int, d_model: int) -> ModelConfig:
    # PAPER.md §2: d_model = 128·L (a fit to 12·L·d² ≈ the reported non-embedding sizes),
    # head dim 128, 8192-token context; vocab not given (65,536 assumed). The paper's 4d MLP
    # has two matrices, our SwiGLU three: d_ff = 8d/3 (up to a multiple of 128) keeps 8·d².
    d_ff = -(-8 * d_model // 3 // 128) * 128
    return ModelConfig(vocab_size=65_536, d_model=d_model, n_layers=n_layers,
                       n_heads=d_model // 128, n_kv_heads=d_model // 128, d_ff=d_ff,
                       max_len=8192, tie_embeddings=False)


SIZES: dict[str, ModelConfig] = {
    "test": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=128, max_len=256),
    # The CPU default and the shape of the benchmarks' anchors.
    "6M": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      d_ff=1024, max_len=1024),
    "13M": _paper(4, 512),
    "42M": _paper(6, 768),
    "197M": _paper(10, 1280),
    "810M": _paper(16, 2048),
    "2.7B": _paper(24, 3072),
    "13B": _paper(40, 5120),
    "52B": _paper(64, 8192),
    "smollm2-135m": ModelConfig(vocab_size=49_152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, d_ff=1536, rope_theta=100_000.0, max_len=8192,
                                tie_embeddings=True, norm_eps=1e-5),
}


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary embedding, "rotate half" layout (HF Llama): pairs (i, i + K/2)."""
    half = x_BxLxHxK.shape[-1] // 2
    freq_K2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_BxLx1xK2 = (positions_BxL.astype(jnp.float32)[..., None] * freq_K2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
    """x contracted over its last `n_in` axes with a kernel of shape in_shape + out_shape.

    nn.DenseGeneral creates multi-axis kernels flat and reshapes them, which breaks
    logical-axis constraints on the boxed value under a mesh; this keeps the full shape.
    """

    out_shape: tuple[int, ...]
    n_in: int
    axes: tuple[str | None, ...]
    std: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape, lead = tuple(x.shape[-self.n_in:]), tuple(x.shape[:-self.n_in])
        kernel = self.param("kernel", _init(self.std, self.axes), in_shape + tuple(self.out_shape),
                            self.param_dtype)
        # one 2-D matmul: XLA:CPU runs the backward's weight gradient (a contraction over
        # batch and length) faster than over a 3-D operand (BENCHMARKS.md); same result
        n_in, n_out = math.prod(in_shape), math.prod(self.out_shape)
        y = jnp.dot(x.astype(self.dtype).reshape(-1, n_in),
                    kernel.astype(self.dtype).reshape(n_in, n_out))
        return y.reshape(lead + tuple(self.out_shape))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache, query_index_BxQ=None):
        """`query_index_BxQ`: only these positions query (keys and values stay all L); the
        output is then out_BxQxD (a PM's last layer, read at a few tokens per row)."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        std = cfg.d_model ** -0.5
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, 1, axes, std, dtype, pdtype, name=name)
        x_q, pos_q, mask_q = x_BxLxD, positions_BxL, mask_Bx1xLxS
        if query_index_BxQ is not None:
            x_q = jnp.take_along_axis(x_BxLxD, query_index_BxQ[:, :, None], axis=1)
            pos_q = jnp.take_along_axis(positions_BxL, query_index_BxQ, axis=1)
            mask_q = jnp.take_along_axis(mask_Bx1xLxS, query_index_BxQ[:, None, :, None], axis=2)
        q_BxLxHxK = dense((cfg.n_heads, cfg.k), ("embed", "heads", "kv"), "q")(x_q)
        k_BxLxGxK = dense((cfg.n_kv_heads, cfg.k), ("embed", "kv_heads", "kv"), "k")(x_BxLxD)
        v_BxLxGxK = dense((cfg.n_kv_heads, cfg.k), ("embed", "kv_heads", "kv"), "v")(x_BxLxD)
        q_BxLxHxK = rope(q_BxLxHxK, pos_q, cfg.rope_theta)
        k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, cfg.rope_theta)
        new_cache = None
        if cache is not None:  # decode: write this chunk at cache["index"], attend to all S
            idx = cache["index"]
            k_BxSxGxK = jax.lax.dynamic_update_slice(
                cache["k"], k_BxLxGxK.astype(cache["k"].dtype), (0, idx, 0, 0))
            v_BxSxGxK = jax.lax.dynamic_update_slice(
                cache["v"], v_BxLxGxK.astype(cache["v"].dtype), (0, idx, 0, 0))
            new_cache = {"k": k_BxSxGxK, "v": v_BxSxGxK, "index": idx}
            k_BxLxGxK, v_BxLxGxK = k_BxSxGxK.astype(dtype), v_BxSxGxK.astype(dtype)
        if cfg.attention_impl == "chunked" and cache is None and query_index_BxQ is None:
            out_BxLxHxK = chunked_causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                   mask_Bx1xLxS, cfg.attention_chunk)
        else:
            impl = None if cfg.attention_impl == "chunked" else cfg.attention_impl
            out_BxLxHxK = jax.nn.dot_product_attention(
                q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_q, implementation=impl)
        std_o = (cfg.n_heads * cfg.k) ** -0.5 / (2 * cfg.n_layers) ** 0.5
        out_BxLxD = Linear((cfg.d_model,), 2, ("heads", "kv", "embed"), std_o, dtype, pdtype,
                           name="o")(out_BxLxHxK)
        return out_BxLxD, new_cache


def chunked_causal_attention(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array,
                             mask_Bx1xLxL: Array, chunk: int) -> Array:
    """Softmax attention for a mask that is zero above the diagonal (causal, possibly
    narrower: padding, segments, branches). Queries go in chunks of `chunk`; chunk i only
    scores the keys up to its own end, so the blocks above the diagonal (masked anyway) are
    never computed. Exact: the skipped keys carry zero weight. Grouped-query heads share
    their K/V without a copy."""
    b, length, h, k = q_BxLxHxK.shape
    g = k_BxLxGxK.shape[2]
    q_BxLxGxRxK = (q_BxLxHxK * k ** -0.5).reshape(b, length, g, h // g, k)
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        s_BxGxRxCxE = jnp.einsum("bcgrk,begk->bgrce", q_BxLxGxRxK[:, start:end],
                                 k_BxLxGxK[:, :end], preferred_element_type=jnp.float32)
        m_Bx1x1xCxE = mask_Bx1xLxL[:, :, None, start:end, :end]
        s_BxGxRxCxE = jnp.where(m_Bx1x1xCxE, s_BxGxRxCxE, -1e30)
        p_BxGxRxCxE = jax.nn.softmax(s_BxGxRxCxE, axis=-1).astype(v_BxLxGxK.dtype)
        outs.append(jnp.einsum("bgrce,begk->bcgrk", p_BxGxRxCxE, v_BxLxGxK[:, :end]))
    return jnp.concatenate(outs, axis=1).reshape(b, length, h, k)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        dense = lambda feats, std, axes, name: Linear(  # noqa: E731
            (feats,), 1, axes, std, dtype, pdtype, name=name)
        gate_BxLxF = dense(cfg.d_ff, cfg.d_model ** -0.5, ("embed", "mlp"), "gate")(x_BxLxD)
        up_BxLxF = dense(cfg.d_ff, cfg.d_model ** -0.5, ("embed", "mlp"), "up")(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(nn.silu(gate_BxLxF) * up_BxLxF,
                                             ("act_batch", "act_length", "act_mlp"))
        std = cfg.d_ff ** -0.5 / (2 * cfg.n_layers) ** 0.5
        return dense(cfg.d_model, std, ("mlp", "embed"), "down")(h_BxLxF)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache, query_index_BxQ=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype),  # noqa: E731
                                    jnp.dtype(cfg.param_dtype), name=name)
        attn_BxLxD, new_cache = Attention(cfg, name="attn")(
            norm("attn_norm")(x_BxLxD), positions_BxL, mask_Bx1xLxS, cache, query_index_BxQ)
        if query_index_BxQ is not None:  # the residual stream of the querying tokens only
            x_BxLxD = jnp.take_along_axis(x_BxLxD, query_index_BxQ[:, :, None], axis=1)
        x_BxLxD = x_BxLxD + attn_BxLxD
        x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BxLxD))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
        return x_BxLxD, new_cache


def attention_mask(q_pos_L: Array, kv_valid_BxS: Array, q_segment_BxL: Array | None = None,
                   kv_segment_BxS: Array | None = None, q_branch_BxL: Array | None = None,
                   kv_branch_BxS: Array | None = None) -> Array:
    """Boolean mask_Bx1xLxS: causal in slot order, valid keys only, same segment only, and
    with branches: a key on branch 1 (a shared prefix) is seen by every query, any other
    key only by queries on its own branch (two responses after one context, one row).
    `q_pos_L` is each query's slot index among the S key slots (arange(L) without a cache,
    cache_index + arange(L) with one)."""
    s = kv_valid_BxS.shape[1]
    causal_LxS = jnp.arange(s)[None, :] <= q_pos_L[:, None]
    mask_BxLxS = causal_LxS[None] & kv_valid_BxS[:, None, :]
    if q_segment_BxL is not None:
        mask_BxLxS &= q_segment_BxL[:, :, None] == kv_segment_BxS[:, None, :]
    if q_branch_BxL is not None:
        mask_BxLxS &= ((kv_branch_BxS[:, None, :] == 1)
                       | (q_branch_BxL[:, :, None] == kv_branch_BxS[:, None, :]))
    return mask_BxLxS[:, None]


class Transformer(nn.Module):
    """tokens_BxL → {"logits_BxLxV" (float32), "hidden_BxLxD", "cache"}.

    `with_logits=False` skips the LM head (PM reward / value models read hidden states);
    `read_index_BxQ` returns only `hidden_BxQxD` at those positions, the last layer run for
    them alone. Without a cache: `mask_BxL` marks real tokens (padding is never attended
    to), `segment_ids_BxL` optionally keeps packed documents apart, `branch_ids_BxL` (1 =
    shared prefix, 2, 3, … = branches that see the prefix but not each other) lets a PM
    score two responses after one copy of their context. With a cache (decoding): the
    chunk is written at `cache["index"]` and attends to slots where `kv_valid_BxS` (with
    `segment_ids_BxL`: each packed document sees the cached prefix and itself only).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, mask_BxL=None, segment_ids_BxL=None,
                 cache=None, kv_valid_BxS=None, with_logits: bool = True, branch_ids_BxL=None,
                 read_index_BxQ=None):
        cfg = self.cfg
        b, length = tokens_BxL.shape
        mask_BxL = jnp.ones((b, length), bool) if mask_BxL is None else mask_BxL
        if positions_BxL is None:
            positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
        if cache is None:
            mask = attention_mask(jnp.arange(length), mask_BxL, segment_ids_BxL, segment_ids_BxL,
                                  branch_ids_BxL, branch_ids_BxL)
        else:  # segments see the cached prefix (branch 1) and themselves (branch id + 1)
            q_b = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32) + 1
            kv_b = None if q_b is None else jax.lax.dynamic_update_slice(
                jnp.ones(kv_valid_BxS.shape, jnp.int32), q_b, (0, cache["index"]))
            mask = attention_mask(cache["index"] + jnp.arange(length), kv_valid_BxS,
                                  q_branch_BxL=q_b, kv_branch_BxS=kv_b)
        embed = _embed(cfg, name="embed")
        x_BxLxD = embed(tokens_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = lambda n: nn.scan(  # noqa: E731
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0), length=n,
            metadata_params={nn.PARTITION_NAME: "layers"})
        final_norm = _final_norm(cfg, name="final_norm")
        if read_index_BxQ is not None and not self.is_initializing():
            # read-out only (PM / value): the last layer runs for the read tokens alone,
            # with the same stacked params, split into layers [0, n−1) and n − 1
            stacked = nn.unbox(self.variables["params"]["layers"])
            x_BxLxD, _ = layers(cfg.n_layers - 1)(cfg).apply(
                {"params": jax.tree_util.tree_map(lambda p: p[:-1], stacked)},
                x_BxLxD, positions_BxL, mask, None)
            x_BxQxD, _ = block(cfg).apply(
                {"params": jax.tree_util.tree_map(lambda p: p[-1], stacked)},
                x_BxLxD, positions_BxL, mask, None, read_index_BxQ)
            return {"logits_BxLxV": None, "hidden_BxQxD": final_norm(x_BxQxD), "cache": None}
        layer_cache = None if cache is None else {
            "k": cache["k"], "v": cache["v"],
            "index": jnp.broadcast_to(cache["index"], (cfg.n_layers,))}
        x_BxLxD, new_layer_cache = layers(cfg.n_layers)(cfg, name="layers")(
            x_BxLxD, positions_BxL, mask, layer_cache)
        hidden_BxLxD = final_norm(x_BxLxD)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_layer_cache["k"], "v": new_layer_cache["v"],
                         "index": cache["index"] + length}
        if not with_logits and not self.is_initializing():  # PM / value, or a prefill
            return {"logits_BxLxV": None, "hidden_BxLxD": hidden_BxLxD, "cache": new_cache}
        head = embed.attend if cfg.tie_embeddings else _untied_head(cfg, name="lm_head")
        return {"logits_BxLxV": _float32_logits(head(hidden_BxLxD)),
                "hidden_BxLxD": hidden_BxLxD, "cache": new_cache}


def _embed(cfg: ModelConfig, name: str | None = None) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                    embedding_init=_init(cfg.d_model ** -0.5, ("vocab", "embed")))


def _final_norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)


def _untied_head(cfg: ModelConfig, name: str | None = None) -> Linear:
    return Linear((cfg.vocab_size,), 1, ("embed", "vocab"), cfg.d_model ** -0.5,
                  jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)


def _float32_logits(logits_BxLxV: Array) -> Array:
    return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32),
                                      ("act_batch", "act_length", "act_vocab"))


def lm_head_logits(params, hidden_BxLxD: Array, cfg: ModelConfig) -> Array:
    """The Transformer's LM head (the tied embedding or `lm_head`, the same modules) on the
    given hidden states only: float32 logits, as `Transformer` computes at every position."""
    p = params["params"]
    if cfg.tie_embeddings:
        logits_BxLxV = _embed(cfg).apply({"params": p["embed"]}, hidden_BxLxD,
                                         method=nn.Embed.attend)
    else:
        logits_BxLxV = _untied_head(cfg).apply({"params": p["lm_head"]}, hidden_BxLxD)
    return _float32_logits(logits_BxLxV)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> dict[str, Array]:
    """An empty KV cache: k/v_NxBxSxGxK plus the next write index."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.k)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


class ScalarHead(nn.Module):
    """Linear scalar read-out of a hidden state: the PM reward head / PPO value head.
    Init N(0, 1/√(D+1)) as lm-human-preferences' reward head (RLHF_PRACTICE.md §2.9)."""

    d_model: int
    zero_init: bool = False  # value heads start at 0 (RLHF_PRACTICE.md §2.9)
    use_bias: bool = True  # a PM has none: the BT loss is blind to it (zero gradient)

    @nn.compact
    def __call__(self, hidden_BxLxD: Array) -> Array:
        init = (nn.initializers.zeros if self.zero_init
                else nn.initializers.normal((self.d_model + 1) ** -0.5))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed",)),
                            (self.d_model,), jnp.float32)
        out = hidden_BxLxD.astype(jnp.float32) @ kernel
        if not self.use_bias:
            return out
        return out + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()),
                                (), jnp.float32)


def gather_at(x_BxLx_: Array, index_B: Array) -> Array:
    """x[b, index_B[b]] for every row (the hidden state at the end-of-context token)."""
    return jnp.take_along_axis(x_BxLx_, index_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
