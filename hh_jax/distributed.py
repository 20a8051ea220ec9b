"""Joining a multi-host JAX job (DESIGN.md §6): one process per host, same program on each.

`maybe_initialize()` runs before anything touches a JAX backend. It calls
`jax.distributed.initialize` when the process was launched as part of a multi-process job:

- explicitly: `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i`
  (or the same as function arguments);
- on a cluster JAX can auto-detect: a Cloud TPU pod slice or multislice
  (`TPU_WORKER_HOSTNAMES` / `MEGASCALE_COORDINATOR_ADDRESS`, or `HH_JAX_DISTRIBUTED=auto`,
  which launch/tpu_pod.py sets), SLURM with more than one task, Open MPI with more than
  one rank.

Otherwise it does nothing: a single process on a laptop, one GPU or a one-host TPU VM.
After it, `jax.devices()` lists every device of every host, and `sharding.put_batch`
builds global batches from each host's local rows.
"""

from __future__ import annotations

import os

import jax


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _slurm_local_devices(env) -> list[int] | None:
    """With one SLURM task per host, JAX's SLURM detection would make only device
    SLURM_LOCALID visible (it assumes one task per GPU); give the task every GPU instead."""
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "")
    gpus = _int(env.get("SLURM_GPUS_ON_NODE"))
    if per_node.split("(")[0] == "1" and gpus and not env.get("JAX_LOCAL_DEVICE_IDS"):
        return list(range(gpus))
    return None


def detect(env=None) -> dict | None:
    """The `jax.distributed.initialize` keyword arguments this process needs, or None when it
    is not part of a multi-process job. Reads only environment variables (no network)."""
    env = os.environ if env is None else env
    addr = env.get("JAX_COORDINATOR_ADDRESS")
    n, pid = _int(env.get("JAX_NUM_PROCESSES")), _int(env.get("JAX_PROCESS_ID"))
    if addr and n is not None and pid is not None:
        if n == 1:
            return None
        return {"coordinator_address": addr, "num_processes": n, "process_id": pid}
    if env.get("HH_JAX_DISTRIBUTED", "").lower() in ("0", "off", "false"):
        return None
    if env.get("HH_JAX_DISTRIBUTED", "").lower() in ("1", "auto", "true"):
        return {}  # let JAX detect the cluster (Cloud TPU metadata, SLURM, MPI, k8s)
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    if "SLURM_JOB_ID" in env and (_int(env.get("SLURM_NTASKS")) or 1) > 1:
        local = _slurm_local_devices(env)
        return {} if local is None else {"local_device_ids": local}
    if (_int(env.get("OMPI_COMM_WORLD_SIZE")) or 1) > 1:
        return {}
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises JAX's multi-controller runtime if this is a multi-process launch.

    Arguments override the environment. Returns True when the job is (now) multi-process.
    Must run before the first `jax.devices()` / array creation.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address and num_processes and process_id is not None:
        kwargs = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                  "process_id": process_id}
    else:
        kwargs = detect()
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    print(f"[distributed] process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    return True


def is_main_process() -> bool:
    """Process 0 writes metrics, summaries and reports; the others only compute."""
    return jax.process_index() == 0
