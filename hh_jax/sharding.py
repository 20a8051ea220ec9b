"""The mesh, the ONE logical-axis rules table, and shardings for state and batches.

Model code names axes logically ("embed", "heads", "act_batch", ...); this table maps
them to the mesh axes ("data", "fsdp", "tensor"). Pure data parallel, FSDP and tensor
parallel are mesh shapes over the same table: mesh (8,1,1) is data parallel, (1,8,1)
shards params and batch over "fsdp" (ZeRO-3 style), (1,1,8) is Megatron-style tensor
parallel on heads / ffw / vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one -1 entry is filled with the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"{len(devices)} available")
    if jax.process_count() > 1:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_shardings(logical_specs, mesh: Mesh):
    """Pytree of logical PartitionSpecs (nn.get_partition_spec) → NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over the data-parallel axes (data × fsdp) on their leading dim; the
    spec names only that dim, so one sharding fits arrays of any rank."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh + rules in context, so `nn.with_logical_constraint` inside jit takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch → global arrays split over the data axes.

    Each process passes only its own rows (its share of the global batch, in process
    order); `jax.make_array_from_process_local_data` assembles the global array. With
    several processes, `*_BxL` arrays are first right-padded with 0 to the longest length
    any process has: PM batches pick their bucket from their own rows, and every process
    must build the same global shape (0 is padding in every `*_BxL` field: masks,
    segment / branch ids, and tokens past each row's length, which nothing attends to).
    """
    arrays = {name: np.asarray(x) for name, x in batch.items()}
    if jax.process_count() > 1:
        arrays = _pad_lengths_across_processes(arrays)
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh), x)
            for name, x in arrays.items()}


def _pad_lengths_across_processes(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from jax.experimental import multihost_utils

    lengths = [x.shape[1] for name, x in arrays.items() if name.endswith("_BxL")]
    if not lengths:
        return arrays
    length = int(np.max(multihost_utils.process_allgather(np.int32(max(lengths)))))
    return {name: np.pad(x, ((0, 0), (0, length - x.shape[1])))
            if name.endswith("_BxL") and x.shape[1] < length else x
            for name, x in arrays.items()}


def host_rows_in_global_order(local_B: np.ndarray) -> np.ndarray:
    """Every process's host-local rows of one batch, in the data pipeline's global order.

    The grain loaders (hh_jax/data/loaders.py) give process p the elements p, p + P, p + 2P, …
    of each global batch; gathered and interleaved back, the rows are in the order of
    the data. One process: the rows themselves."""
    if jax.process_count() == 1:
        return np.asarray(local_B)
    from jax.experimental import multihost_utils

    stacked_PxB = np.asarray(multihost_utils.process_allgather(np.asarray(local_B)))
    return np.swapaxes(stacked_PxB, 0, 1).reshape(-1, *stacked_PxB.shape[2:])


def host_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (what it passed to put_batch)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, mesh, batch_sharding(mesh).spec))
