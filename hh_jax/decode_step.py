"""One decode step with every layer's weights and KV cache apart: the sampler's step on GPU.

Inside the sampler's `lax.while_loop`, a step through `Transformer`'s stacked layer scan
slices each layer's weights out of the stacked arrays, and on GPU the slices are copies:
every weight read and written once more per token. Here the weights are split once,
before the loop, and each layer keeps its own cache, so a step runs the layers' own
kernels only (kernel counts and tokens/s: BENCHMARKS.md, bench/sampler_vs_generate.py).
Same modules (`Block`, `RMSNorm`, the embedding and LM head), so the same computation as
`Transformer` with a cache: identical numbers in float32 (tested on CPU); in bf16, XLA may
round intermediates at other places.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hh_jax.model import Block, ModelConfig, _embed, _final_norm, attention_mask, lm_head_logits


def split_layers(params, cfg: ModelConfig) -> tuple[dict, tuple[dict, ...]]:
    """(the params outside the layers, one param tree per layer); call outside the loop.

    The copies are held while the loop runs, so matmul kernels are cast to the compute
    dtype here (what `Linear` does at every call anyway: the same numbers): under bf16
    compute with float32 master weights the copy is half their size. Norm scales stay.
    """
    p = params["params"]
    stacked = nn.unbox(p["layers"])
    dtype = jnp.dtype(cfg.dtype)

    def take(path, x, i):
        x = x[i]
        return x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x

    return ({k: v for k, v in p.items() if k != "layers"},
            tuple(jax.tree_util.tree_map_with_path(lambda path, x, i=i: take(path, x, i),
                                                   stacked) for i in range(cfg.n_layers)))


def split_cache(cache: dict, cfg: ModelConfig) -> dict:
    """`Transformer`'s stacked cache (k/v_NxBxSxGxK, index) → one k/v pair per layer."""
    return {"layers": tuple({"k": cache["k"][i], "v": cache["v"][i]}
                            for i in range(cfg.n_layers)),
            "index": cache["index"]}


def step(rest: dict, layers: tuple[dict, ...], tokens_Bx1: jax.Array, positions_Bx1: jax.Array,
         cache: dict, kv_valid_BxS: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """(float32 logits_BxV of the next token, the cache with this token written)."""
    index = cache["index"]
    mask = attention_mask(index + jnp.arange(1), kv_valid_BxS)
    x_Bx1xD = _embed(cfg).apply({"params": rest["embed"]}, tokens_Bx1)
    x_Bx1xD = nn.with_logical_constraint(x_Bx1xD, ("act_batch", "act_length", "act_embed"))
    new_layers = []
    for params, c in zip(layers, cache["layers"], strict=True):
        x_Bx1xD, new = Block(cfg).apply({"params": params}, x_Bx1xD, positions_Bx1, mask,
                                        {"k": c["k"], "v": c["v"], "index": index})
        new_layers.append({"k": new["k"], "v": new["v"]})
    hidden_Bx1xD = _final_norm(cfg).apply({"params": rest["final_norm"]}, x_Bx1xD)
    logits_BxV = lm_head_logits({"params": rest}, hidden_Bx1xD, cfg)[:, -1]
    return logits_BxV, {"layers": tuple(new_layers), "index": index + 1}
