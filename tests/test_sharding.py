"""Sharded (2×2×2 mesh) LM train steps equal single-device ones; mesh and batch helpers."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from hh_jax import sharding, state
from hh_jax.model import SIZES, Transformer
from hh_jax.optim import make_optimizer
from hh_jax.stages import lm

# These tests check semantics, not speed: cheaper CPU codegen cuts compile time ~3x.
FAST_COMPILE = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
                if jax.default_backend() == "cpu" else None)

CFG = SIZES["test"]
B, L, STEPS = 8, 16, 3


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(4, CFG.vocab_size, (B, L)).astype(np.int32)
        mask = np.ones((B, L), bool)
        for b in range(B):
            mask[b, :rng.integers(0, 5)] = False  # left padding of varying length
        weights = mask.astype(np.float32)
        weights[:, : L // 2] *= 0.5  # fractional loss weights too
        out.append({"tokens_BxL": tokens, "mask_BxL": mask, "weights_BxL": weights})
    return out


def _train(mesh):
    """STEPS jitted LM train steps on `mesh`; returns (losses, final params, initial params,
    state shardings, number of traces)."""
    model = Transformer(CFG)
    optimizer = make_optimizer(ConfigDict(dict(lr=1e-3, warmup_steps=1, schedule="cosine",
                                               weight_decay=0.1, grad_clip=1.0)), 10)
    boxed_init = lambda: model.init(jax.random.key(0), jnp.zeros((B, L), jnp.int32))
    abstract, p_sh = state.param_shardings(boxed_init, mesh)
    params, _ = state.init_params(boxed_init, mesh)
    init_params = jax.tree_util.tree_map(np.asarray, params)
    st_sh = state.state_shardings(p_sh, optimizer, abstract, mesh)
    st = state.init_state(params, optimizer, st_sh)
    traces = []

    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def step(st, batch):
        traces.append(1)
        return lm.train_step(st, batch, model=model, optimizer=optimizer)

    step_fn = jax.jit(step, in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(st_sh, None), donate_argnums=0,
                      compiler_options=FAST_COMPILE)
    losses = []
    with sharding.activate(mesh):
        for batch in _batches():
            st, metrics = step_fn(st, sharding.put_batch(batch, mesh))
            losses.append(float(metrics["train/loss"]))
    return losses, st, init_params, st_sh, len(traces)


@pytest.fixture(scope="module")
def runs(eight_devices):
    sharded = _train(sharding.make_mesh((2, 2, 2)))
    single = _train(sharding.make_mesh((1, 1, 1), devices=eight_devices[:1]))
    return sharded, single


def test_sharded_train_step_equals_single_device(runs):
    (loss8, st8, init8, _, _), (loss1, st1, init1, _, _) = runs
    # init is the same function of the key whatever the mesh
    jax.tree_util.tree_map(np.testing.assert_array_equal, init8, init1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    assert int(st8.step) == int(st1.step) == STEPS
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                atol=1e-5), st8.params, st1.params)
    # the params did move (a step that changed nothing would pass the comparison above)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                   st1.params, init1)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-5
    assert np.isfinite(loss8).all()


def test_train_step_traced_once(runs):
    (_, _, _, _, traces8), (_, _, _, _, traces1) = runs
    assert traces8 == 1 and traces1 == 1


def test_params_and_optimizer_state_really_sharded(runs):
    (_, st8, _, st_sh, _), _ = runs
    q = st8.params["params"]["layers"]["attn"]["q"]["kernel"]  # layers, embed, heads, kv
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert not q.sharding.is_fully_replicated
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
    emb = st8.params["params"]["embed"]["embedding"]  # vocab, embed
    assert emb.sharding.spec == P("tensor", "fsdp")
    # Adam moments follow their params; the step counter is replicated
    adam = st8.opt_state[1][0]
    mu_q = adam.mu["params"]["layers"]["attn"]["q"]["kernel"]
    assert mu_q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert adam.count.sharding.is_fully_replicated
    assert st8.step.sharding.is_fully_replicated
    n_sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(st8))
    assert n_sharded >= 2 * 7  # every matrix and its two moments, at least
    assert jax.tree_util.tree_structure(st_sh) == jax.tree_util.tree_structure(st8)


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes(eight_devices):
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh((1, 1, -1)).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    mesh = sharding.make_mesh((2, 2, 2))
    assert mesh.axis_names == sharding.MESH_AXES
    assert set(mesh.devices.ravel().tolist()) == set(eight_devices)
    assert sharding.data_parallel_size(mesh) == 4
    with pytest.raises(ValueError, match="needs 3 devices, 8 available"):
        sharding.make_mesh((3, 1, 1))
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 2))
    with pytest.raises(ValueError, match="3 entries"):
        sharding.make_mesh((8, 1))
    one = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
    assert one.devices.size == 1


def test_put_batch_splits_rows_over_data_axes(eight_devices):
    mesh = sharding.make_mesh((2, 2, 2))
    x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    y = np.arange(8, dtype=np.float32)
    out = sharding.put_batch({"x": x, "y": y}, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), x)
    np.testing.assert_array_equal(np.asarray(out["y"]), y)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    assert out["x"].sharding.is_equivalent_to(rows, 2)
    assert out["y"].sharding.is_equivalent_to(rows, 1)
    # each device holds 2 consecutive rows; the tensor axis holds replicas
    for shard in out["x"].addressable_shards:
        rows = shard.index[0]
        assert rows.stop - rows.start == 2
        np.testing.assert_array_equal(shard.data, x[rows])


def test_logical_rules_map_every_param_axis():
    specs = {"q": P("layers", "embed", "heads", "kv"), "down": P("layers", "mlp", "embed"),
             "emb": P("vocab", "embed"), "norm": P("layers", "norm")}
    mesh = sharding.make_mesh((2, 2, 2))
    got = {k: v.spec for k, v in sharding.logical_shardings(specs, mesh).items()}
    assert got == {"q": P(None, "fsdp", "tensor", None), "down": P(None, "tensor", "fsdp"),
                   "emb": P("tensor", "fsdp"), "norm": P(None, None)}


def test_with_logical_constraint_active_inside_activate():
    """`activate` promises that nn.with_logical_constraint takes effect inside jit."""
    mesh = sharding.make_mesh((2, 2, 2))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def f(x):
        return nn.with_logical_constraint(x * 2, ("act_batch", "act_length", "act_mlp"))

    with sharding.activate(mesh):
        y = f(jnp.ones((8, 4, 6)))
    want = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert isinstance(y.sharding, NamedSharding) and y.sharding.is_equivalent_to(want, 3), (
        f"constraint dropped: output sharding {y.sharding}")
