"""Helpers shared by the model and sampling tests: random params and cheap-codegen jit."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hh_jax.model import Transformer

# These tests check semantics, not speed: cheaper CPU codegen cuts compile time ~3x.
FAST_COMPILE = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
                if jax.default_backend() == "cpu" else None)
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def random_params(cfg, seed=0):
    """Random params of the model's shapes (numpy, no compile); norm scales random too, so a
    reference that ignored them would fail."""
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                              jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.asarray(1.0 + 0.3 * rng.normal(size=x.shape), x.dtype)
        fan_in = cfg.d_ff if "down" in jax.tree_util.keystr(path) else cfg.d_model
        return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract))
