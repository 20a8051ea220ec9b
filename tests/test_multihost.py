"""Multi-host code path on one machine: 2 processes × 4 fake CPU devices (gloo collectives)
run PM train steps on a (2,2,2) mesh and must match one process with 8 devices; the
checkpoint both processes save together must restore in one process (DESIGN.md §6).

Run as a script, this file is one worker: `python test_multihost.py PORT ID OUT`.
"""

import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np

N_PROCS, LOCAL_DEVICES, STEPS = 2, 4, 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch():
    rng = np.random.default_rng(0)
    return {"chosen_tokens_BxL": rng.integers(4, 500, (8, 24), dtype=np.int32),
            "rejected_tokens_BxL": rng.integers(4, 500, (8, 24), dtype=np.int32),
            "chosen_len_B": rng.integers(5, 25, 8, dtype=np.int32),
            "rejected_len_B": rng.integers(5, 25, 8, dtype=np.int32),
            "weight_B": rng.uniform(0.5, 2.0, 8).astype(np.float32)}


def _setup(mesh):
    """(state, state shardings, jitted step) for the "test" PM; SGD so that float noise on
    near-zero gradients is not amplified into full steps, as Adam would."""
    import jax
    import jax.numpy as jnp

    from hh_jax import sharding, state
    from hh_jax.model import SIZES, ScalarHead, Transformer
    from hh_jax.stages import pm

    model, opt = Transformer(SIZES["test"]), _opt()
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    boxed = lambda: {"backbone": model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)),  # noqa
                     "head": head.init(jax.random.key(1), jnp.zeros((2, model.cfg.d_model)))}
    abstract, p_sh = state.param_shardings(boxed, mesh)
    st_sh = state.state_shardings(p_sh, opt, abstract, mesh)
    st = state.init_state(state.init_params(boxed, mesh)[0], opt, st_sh)
    step = jax.jit(functools.partial(pm.train_step, model=model, optimizer=opt),
                   in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)
    return st, st_sh, step, abstract


def _pm_eval(params, mesh) -> dict:
    """pm_accuracy.evaluate_pairs on 20 comparisons of varied length (each its own subset, so the
    per-subset accuracies pin every score to its pair), 3 eval batches of 8, fine buckets:
    the hosts' rows of a batch get different padded lengths."""
    import jax
    from ml_collections import ConfigDict

    from hh_jax import reward, sharding
    from hh_jax.data import hh
    from hh_jax.evals import pm_accuracy
    from hh_jax.model import SIZES, Transformer
    from hh_jax.tokenizer import ByteTokenizer

    comps = [hh.Comparison(subset=f"s{i:02d}", context=f"\n\nHuman: {'q' * (3 * i % 17)}?"
                             "\n\nAssistant:", chosen=" " + "a" * (i % 7 + 1),
                             rejected=" " + "b" * (2 * i % 11 + 1), first_human="q", source="t",
                             line=i + 1, split="heldout") for i in range(20)]
    cfg = ConfigDict(dict(max_len=64, eval_batch_size=8, pair_layout="shared",
                          buckets=tuple(range(8, 129, 8))))
    fn = jax.jit(functools.partial(reward.score_step, model=Transformer(SIZES["test"])))
    with sharding.activate(mesh):
        return pm_accuracy.evaluate_pairs(fn, params, comps, ByteTokenizer(), cfg, mesh)


def _run_steps(st, step, batch, mesh):
    from hh_jax import sharding

    with sharding.activate(mesh):
        for _ in range(STEPS):
            st, m = step(st, sharding.put_batch(batch, mesh))
    return st, m


def worker(port: int, pid: int, out: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_threefry_partitionable", True)
    from hh_jax import checkpoint, distributed, sharding, state

    assert distributed.maybe_initialize(f"localhost:{port}", N_PROCS, pid)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = sharding.make_mesh((2, 2, 2))
    st, st_sh, step, abstract = _setup(mesh)
    batch = _batch()
    rows = slice(pid * 4, pid * 4 + 4)  # this host's share of the global batch
    local = {k: v[rows] for k, v in batch.items()}
    glob = multihost_utils.process_allgather(sharding.put_batch(local, mesh), tiled=True)
    for k, v in batch.items():  # the global batch is the hosts' rows in process order
        np.testing.assert_array_equal(glob[k], v)
    # rows of different lengths on the two hosts: one global shape, zero-padded
    ragged = {"x_BxL": np.full((4, 20 + 8 * pid), pid + 1, np.int32)}
    glob = multihost_utils.process_allgather(sharding.put_batch(ragged, mesh), tiled=True)
    assert glob["x_BxL"].shape == (8, 28) and (glob["x_BxL"][:4, 20:] == 0).all()
    report = _pm_eval(st.params, mesh)  # before the steps: the reference's params
    st, m = _run_steps(st, step, local, mesh)
    params = multihost_utils.process_allgather(st.params, tiled=True)
    ckpts = checkpoint.StageCheckpoints(os.path.join(out, "checkpoints"))
    ckpts.save(STEPS, st, {"note": "multihost"})
    ckpts.wait()
    target = checkpoint.abstract_with_shardings(
        state.abstract_state(abstract, _opt()), st_sh)
    restored, _ = ckpts.restore(target)
    ckpts.close()
    again = multihost_utils.process_allgather(restored.params, tiled=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    if distributed.is_main_process():
        flat = {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(os.path.join(out, "result.npz"), loss=float(m["train/loss"]), **flat)
        with open(os.path.join(out, "pm_eval.json"), "w") as f:
            json.dump(report, f)
    multihost_utils.sync_global_devices("done")


def _opt():
    import optax

    return optax.sgd(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, eight_devices):
    import jax

    from hh_jax import checkpoint, sharding, state

    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                        "--xla_backend_optimization_level=0"}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(N_PROCS)]
    mesh = sharding.make_mesh((2, 2, 2), eight_devices)  # the single-process reference,
    st, st_sh, step, abstract = _setup(mesh)              # computed while the workers run
    init_head = np.asarray(jax.device_get(st.params["head"]["params"]["kernel"]))
    ref_eval = _pm_eval(st.params, mesh)
    st, m = _run_steps(st, step, _batch(), mesh)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)[-6000:]
    got = np.load(tmp_path / "result.npz")
    print(f"loss: 2 processes {float(got['loss']):.9g}, 1 process {float(m['train/loss']):.9g}")
    np.testing.assert_allclose(got["loss"], float(m["train/loss"]), rtol=1e-5)
    ref = jax.device_get(st.params)
    assert not np.allclose(init_head, ref["head"]["params"]["kernel"])  # the steps did move
    diffs = [np.abs(got[jax.tree_util.keystr(p)] - x).max() for p, x in
             jax.tree_util.tree_leaves_with_path(ref)]
    print(f"params: {len(diffs)} leaves, max |2 processes − 1 process| = {max(diffs):.3g}")
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    assert len(leaves) == len(got.files) - 1
    for path, x in leaves:
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], x, rtol=1e-5, atol=1e-6)
    # PM evaluation: each host scored its rows; gathered, every pair keeps its own score
    with open(tmp_path / "pm_eval.json") as f:
        got_eval = json.load(f)
    assert len(ref_eval["per_subset"]) == 20
    flat_ref, flat_got = (jax.tree_util.tree_leaves_with_path(json.loads(json.dumps(r)))
                          for r in (ref_eval, got_eval))
    assert [p for p, _ in flat_got] == [p for p, _ in flat_ref]
    for (path, x), (_, y) in zip(flat_ref, flat_got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # the checkpoint the two hosts wrote together restores, complete, in one process
    target = checkpoint.abstract_with_shardings(state.abstract_state(abstract, _opt()), st_sh)
    ckpts = checkpoint.StageCheckpoints(tmp_path / "checkpoints")
    restored, data_state = ckpts.restore(target)
    ckpts.close()
    assert int(restored.step) == STEPS and data_state == {"note": "multihost"}
    for (path, x), y in zip(leaves, jax.tree_util.tree_leaves(restored.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


def test_detect_reads_only_the_environment():
    from hh_jax.distributed import detect

    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "2"}
    assert detect(explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                "process_id": 2}
    assert detect({**explicit, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert detect({}) is None  # a laptop, one GPU, a one-host TPU VM
    assert detect({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == {}  # pod slice: JAX auto-detects
    assert detect({"TPU_WORKER_HOSTNAMES": "t-0"}) is None
    assert detect({"TPU_WORKER_HOSTNAMES": "t-0,t-1", "HH_JAX_DISTRIBUTED": "0"}) is None
    assert detect({"HH_JAX_DISTRIBUTED": "auto"}) == {}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_GPUS_ON_NODE": "8"}
    assert detect(slurm) == {"local_device_ids": list(range(8))}  # one task drives all GPUs
    assert detect({**slurm, "SLURM_NTASKS_PER_NODE": "8"}) == {}  # one task per GPU
    assert detect({**slurm, "SLURM_NTASKS": "1"}) is None
    assert detect({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
