"""hh_jax.checkpoint: bitwise params export/import and stage checkpoints, sharded."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hh_jax import checkpoint, sharding, state
from hh_jax.model import SIZES, Transformer

CFG = SIZES["test"].replace(n_layers=1)


def _boxed_init():
    return Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def _random_like(abstract, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract)


@pytest.fixture(scope="module")
def mesh(eight_devices):
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def sharded_params(mesh):
    abstract, shardings = state.param_shardings(_boxed_init, mesh)
    host = _random_like(abstract, seed=0)
    return host, jax.device_put(host, shardings), abstract, shardings


def _assert_bitwise(a_tree, b_tree):
    assert jax.tree_util.tree_structure(a_tree) == jax.tree_util.tree_structure(b_tree)

    def same(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()

    jax.tree_util.tree_map(same, a_tree, b_tree)


def test_export_import_round_trip_bitwise(tmp_path, sharded_params):
    host, params, abstract, shardings = sharded_params
    meta = {"stage": "lm", "step": 7, "model": {"d_model": CFG.d_model}}
    checkpoint.export_params(str(tmp_path / "export"), params, meta)
    assert checkpoint.read_meta(str(tmp_path / "export")) == meta

    # no target: plain restore of the same values
    _assert_bitwise(checkpoint.import_params(str(tmp_path / "export")), host)

    # target with shardings: arrays land sharded as asked
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    got = checkpoint.import_params(str(tmp_path / "export"), target)
    _assert_bitwise(got, host)
    for x, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(shardings),
                    strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(got))

    # restoring into another mesh layout (resharding on load) gives the same values
    other = sharding.make_mesh((1, 4, 2))
    _, other_sh = state.param_shardings(_boxed_init, other)
    got = checkpoint.import_params(str(tmp_path / "export"),
                                   checkpoint.abstract_with_shardings(abstract, other_sh))
    _assert_bitwise(got, host)
    q = got["params"]["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.is_equivalent_to(
        other_sh["params"]["layers"]["attn"]["q"]["kernel"], q.ndim)


def test_import_errors(tmp_path, sharded_params):
    _, params, abstract, shardings = sharded_params
    with pytest.raises(FileNotFoundError):
        checkpoint.import_params(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        checkpoint.read_meta(str(tmp_path / "nothing"))
    checkpoint.export_params(str(tmp_path / "export"), params)
    bad = jax.tree_util.tree_map(lambda x: x, abstract)
    emb = bad["params"]["embed"]["embedding"]
    bad["params"]["embed"]["embedding"] = jax.ShapeDtypeStruct(
        (emb.shape[0] * 2, emb.shape[1]), emb.dtype)
    with pytest.raises(Exception):  # noqa: B017 - any error, but never a silent restore
        checkpoint.import_params(str(tmp_path / "export"), checkpoint.abstract_with_shardings(
            bad, shardings))


def _train_state(params, seed):
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    # non-trivial moments, so a restore that returned zeros would fail
    opt_state = jax.tree_util.tree_map(
        lambda x: x + seed if x.dtype == jnp.float32 else x, opt_state)
    return state.TrainState(step=jnp.asarray(seed, jnp.int32), params=params,
                            opt_state=opt_state), optimizer


def test_stage_checkpoints_save_restore(tmp_path, mesh, sharded_params):
    host, params, abstract, p_sh = sharded_params
    st5, optimizer = _train_state(params, 5)
    st_sh = state.state_shardings(p_sh, optimizer, abstract, mesh)
    st5 = jax.device_put(st5, st_sh)
    st9 = jax.device_put(_train_state(jax.tree_util.tree_map(lambda x: x * 2, params), 9)[0],
                         st_sh)
    target = checkpoint.abstract_with_shardings(state.abstract_state(abstract, optimizer),
                                                st_sh)

    ckpts = checkpoint.StageCheckpoints(str(tmp_path / "checkpoints"), max_to_keep=2)
    assert ckpts.latest_step() is None
    with pytest.raises(FileNotFoundError):
        ckpts.restore(target)
    ckpts.save(5, st5, {"epoch": 0, "position": 40, "order_seed": 3})
    ckpts.save(9, st9, {"epoch": 1, "position": 8, "order_seed": 3})
    ckpts.close()

    again = checkpoint.StageCheckpoints(str(tmp_path / "checkpoints"))  # a resumed run
    assert again.latest_step() == 9
    restored, data = again.restore(target)
    assert isinstance(restored, state.TrainState)
    assert data == {"epoch": 1, "position": 8, "order_seed": 3}
    _assert_bitwise(restored, st9)
    for x, s in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(st_sh),
                    strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    old, old_data = again.restore(target, step=5)
    _assert_bitwise(old, st5)
    assert old_data["position"] == 40
    _assert_bitwise(old.params, host)

    # max_to_keep=2: a third save drops the oldest
    again.save(12, st9, {"epoch": 2, "position": 0, "order_seed": 3})
    again.wait()
    assert again.latest_step() == 12
    with pytest.raises(Exception):  # noqa: B017
        again.restore(target, step=5)
    again.close()


def test_is_complete(tmp_path):
    assert not checkpoint.is_complete(str(tmp_path))
    (tmp_path / "summary.json").write_text("{}")
    assert checkpoint.is_complete(str(tmp_path))


def test_abstract_with_shardings(mesh):
    abstract = {"a": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
    s = {"a": sharding.replicated(mesh)}
    out = checkpoint.abstract_with_shardings(abstract, s)
    assert out["a"].shape == (4, 2) and out["a"].dtype == jnp.float32
    assert out["a"].sharding == s["a"]
    assert isinstance(nn.unbox(out)["a"], jax.ShapeDtypeStruct)
