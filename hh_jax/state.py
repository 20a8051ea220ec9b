"""Train state and its sharded initialisation, shared by the stages.

Init goes `jax.eval_shape` → logical specs → shardings → `jax.jit(init, out_shardings=…)`
(STYLE.md §8.1), so no array ever exists unsharded on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hh_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def lm_init(model, seed: int = 0) -> Callable[[], Any]:
    """The boxed init of a Transformer's params (logical axis names kept), keyed by `seed`:
    what `param_shardings` and `init_params` take. reward.pm_init builds the PM's."""
    return lambda: model.init(jax.random.key(seed), jnp.zeros((2, 8), jnp.int32))


def param_shardings(boxed_init: Callable[[], Any], mesh: Mesh) -> tuple[Any, Any]:
    """(abstract unboxed params, their NamedShardings) from a boxed init function."""
    abstract_boxed = jax.eval_shape(boxed_init)
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.unbox(abstract_boxed), sharding.logical_shardings(specs, mesh)


def init_params(boxed_init: Callable[[], Any], mesh: Mesh) -> tuple[Any, Any]:
    """Sharded params (plain dict) and their shardings."""
    _, shardings = param_shardings(boxed_init, mesh)
    params = jax.jit(lambda: nn.unbox(boxed_init()), out_shardings=shardings)()
    return params, shardings


def state_shardings(params_shardings: Any, optimizer: optax.GradientTransformation,
                    abstract_params: Any, mesh: Mesh) -> TrainState:
    """Shardings of the whole TrainState; optimizer moments follow their params."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    return TrainState(step=sharding.replicated(mesh), params=params_shardings,
                      opt_state=_follow_params(abstract_opt, abstract_params, params_shardings,
                                               mesh))


def _follow_params(abstract_opt, abstract_params, params_shardings, mesh):
    # optax states hold params-shaped trees (Adam's mu, nu) and scalars (count). A leaf
    # whose key path ends with a param's path and has its shape takes that param's
    # sharding; everything else is replicated.
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                            jax.tree_util.tree_leaves(params_shardings), strict=True):
        by_path[tuple(path)] = (x.shape, s)

    def pick(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def init_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState
               ) -> TrainState:
    """Wraps (already sharded) params into a TrainState with a sharded optimizer state."""
    make = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,  # noqa: E731
                                opt_state=optimizer.init(p))
    return jax.jit(make, out_shardings=shardings)(params)


def abstract_state(abstract_params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)),
        abstract_params)
