"""experiments/paper_52b.py: its 52B PM state, built abstractly (jax.eval_shape) and sharded
on 8 fake CPU devices and on the pod mesh, without materialising one array."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh
from ml_collections import ConfigDict

from hh_jax import checkpoint, experiment, reward, sharding, state
from hh_jax.model import SIZES, Transformer
from hh_jax.optim import make_optimizer
from hh_jax.stages import pm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "experiments", "paper_52b.py")


def _expected_params(m) -> int:
    """Independent count: per layer q,k,v,o + SwiGLU gate/up/down + 2 norms; untied
    embedding and LM head; final norm; the PM's scalar head."""
    k = m.d_model // m.n_heads
    layer = m.d_model * k * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff \
        + 2 * m.d_model
    return m.n_layers * layer + 2 * m.vocab_size * m.d_model + m.d_model + m.d_model


def _abstract_state(stage: ConfigDict, mesh):
    mcfg = SIZES[stage.model].replace(**stage.model_overrides.to_dict())
    model = Transformer(mcfg)
    opt = make_optimizer(stage.optim, 1000, lr=stage.base_lr * stage.lr_ratio)
    abstract, p_sh = state.param_shardings(reward.pm_init(model), mesh)
    st_sh = state.state_shardings(p_sh, opt, abstract, mesh)
    target = checkpoint.abstract_with_shardings(state.abstract_state(abstract, opt), st_sh)
    return mcfg, model, opt, target, st_sh


def _bytes_per_device(tree) -> int:
    """The largest per-device shard of every leaf, summed (all shards are equal here)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def test_52b_sharded_abstract_state(eight_devices):
    config = experiment.load_config(PATH)
    stage = config.pmp
    assert (stage.max_len, config.pm.max_len) == (1024, 1024)  # PAPER.md §2: PM context 1024
    assert (stage.lr_ratio, config.pm.lr_ratio) == (0.1, 0.01)  # PAPER.md §3: × pretrain LR
    assert stage.base_lr == config.pm.base_lr == config.lm.optim.lr == 8e-5
    assert stage.model_overrides.remat and stage.model_overrides.dtype == "bfloat16"
    mesh = sharding.make_mesh((1, 8, 1), eight_devices)
    mcfg, model, opt, target, st_sh = _abstract_state(stage, mesh)
    leaves = jax.tree_util.tree_leaves(target)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing materialised
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(target.params))
    assert n_params == _expected_params(mcfg)
    assert 52.0e9 < n_params < 53.0e9
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    assert abs(total - 12 * n_params) < 1e6  # f32 params + Adam mu + nu
    per_device = _bytes_per_device(target)
    assert total / 8 <= per_device <= total / 8 * 1.001  # only norms/scalars replicated

    print(f"\n52B PM: {n_params:,} params; train state {total / 1e9:.1f} GB; per device "
          f"{per_device / 1e9:.2f} GB on mesh (1,8,1)")
    for arg in ("", "v4"):  # the pod meshes of the config, abstract: no devices needed
        mesh_shape = tuple(experiment.load_config(PATH + (f":{arg}" if arg else "")).pmp.mesh)
        pod_bytes = _bytes_per_device(_abstract_state(
            stage, AbstractMesh(mesh_shape, sharding.MESH_AXES))[3])
        n_pod = int(np.prod(mesh_shape))
        assert n_pod == 64 and total / n_pod <= pod_bytes <= total / n_pod * 1.01
        assert pod_bytes < 16e9  # fits a v4 chip (32 GB) with room for grads and activations
        print(f"  {pod_bytes / 1e9:.2f} GB per device on the pod mesh {mesh_shape}")

    # the sharded train step at the paper's PM shapes traces and lowers (no compile)
    b, length = stage.batch_size, stage.max_len
    batch = {"chosen_tokens_BxL": jax.ShapeDtypeStruct((b, length), jnp.int32),
             "rejected_tokens_BxL": jax.ShapeDtypeStruct((b, length), jnp.int32),
             "chosen_len_B": jax.ShapeDtypeStruct((b,), jnp.int32),
             "rejected_len_B": jax.ShapeDtypeStruct((b,), jnp.int32),
             "weight_B": jax.ShapeDtypeStruct((b,), jnp.float32)}
    step = jax.jit(functools.partial(pm.train_step, model=model, optimizer=opt),
                   in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)
    with sharding.activate(mesh):
        lowered = step.lower(target, batch)
    assert "sharding" in lowered.as_text()[:200_000]
