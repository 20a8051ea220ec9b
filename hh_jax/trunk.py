"""A Transformer cut at a layer: the frozen trunk below it, the trainable top above it.

A PM (or a probe) over a frozen pretrained trunk runs the trunk once per example and keeps
its output; every epoch after that runs only the top layers. The same functions read the
residual stream after each layer (linear probes per layer, OOD detection by layer).

The stacked layer params of `model.Transformer` (`params["params"]["layers"]`, leading axis
N) are sliced, and each slice is applied with the same `Block` module the Transformer
scans, so trunk + top is the full model (tested against `Transformer.apply`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hh_jax.model import Block, ModelConfig, _embed, _final_norm, attention_mask

Array = jax.Array


def layer_slice(stacked, start: int, stop: int):
    """Layers [start, stop) of a stacked layer tree (leading axis = layer)."""
    return jax.tree_util.tree_map(lambda p: p[start:stop], stacked)


def embed(cfg: ModelConfig, params, tokens_BxL: Array) -> Array:
    return _embed(cfg).apply({"params": params["params"]["embed"]}, tokens_BxL)


def final_norm(cfg: ModelConfig, norm_params, x: Array) -> Array:
    return _final_norm(cfg).apply({"params": norm_params}, x)


def mask_for(positions_BxL: Array, valid_BxL: Array, branch_BxL: Array | None = None) -> Array:
    """The Transformer's attention mask without a cache (padding, optional branches)."""
    length = positions_BxL.shape[1]
    return attention_mask(jnp.arange(length), valid_BxL, None, None, branch_BxL, branch_BxL)


def run_layers(cfg: ModelConfig, stacked, x_BxLxD: Array, positions_BxL: Array,
               mask_Bx1xLxL: Array, read_index_BxQ: Array | None = None, read=None):
    """Applies every layer of `stacked` in order: (x after the last one, what was read
    after each layer, stacked on a leading layer axis, or None). `read_index_BxQ` reads the
    residual stream at those positions (reads_NxBxQxD); `read(x_BxLxD) -> pytree` reads
    anything else (e.g. pools over real tokens)."""
    block = Block(cfg)
    if read is None and read_index_BxQ is not None:
        def read(x):
            return jnp.take_along_axis(x, read_index_BxQ[:, :, None], axis=1)

    def body(x, layer_params):
        x, _ = block.apply({"params": layer_params}, x, positions_BxL, mask_Bx1xLxL, None)
        return x, None if read is None else read(x)

    return jax.lax.scan(body, x_BxLxD, stacked)


def top_read(cfg: ModelConfig, stacked_top, norm_params, x_BxLxD: Array, positions_BxL: Array,
             mask_Bx1xLxL: Array, read_index_BxQ: Array) -> Array:
    """The top layers on a trunk's output, read at `read_index_BxQ` after the final norm:
    hidden_BxQxD, as `Transformer(read_index_BxQ=...)` returns (its last layer runs for the
    read tokens alone, here too)."""
    n_top = jax.tree_util.tree_leaves(stacked_top)[0].shape[0]
    if n_top > 1:
        x_BxLxD, _ = run_layers(cfg, layer_slice(stacked_top, 0, n_top - 1), x_BxLxD,
                                positions_BxL, mask_Bx1xLxL)
    last = jax.tree_util.tree_map(lambda p: p[n_top - 1], stacked_top)
    x_BxQxD, _ = Block(cfg).apply({"params": last}, x_BxLxD, positions_BxL, mask_Bx1xLxL, None,
                                  read_index_BxQ)
    return final_norm(cfg, norm_params, x_BxQxD)
