"""Kill-and-resume harness shared by the stage tests (LM, PM, PPO)."""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from hh_jax import checkpoint

# One device, as a user's run; a low LLVM level compiles ~3x faster (tests only). The runs
# of one test session share a persistent compilation cache: the killed and the resumed run
# load the executables the uninterrupted run compiled (the same programs, so the same
# numbers) instead of compiling them again.
_XLA_CACHE = tempfile.mkdtemp(prefix="hh_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": _XLA_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_cmd(experiment: str, workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hh_jax.main", "run", experiment, "--workdir", str(workdir),
            *extra]


def committed_steps(ckpt_dir) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def kill_after_checkpoint(cmd: list[str], ckpt_dir, min_step: int, timeout: float = 240) -> int:
    """Starts `cmd`, SIGKILLs it once a checkpoint ≥ min_step is committed; returns it."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not [s for s in committed_steps(ckpt_dir) if s >= min_step]:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return max(committed_steps(ckpt_dir))


def assert_same_params(export_a, export_b) -> None:
    a = jax.device_get(checkpoint.import_params(str(export_a)))
    b = jax.device_get(checkpoint.import_params(str(export_b)))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def run_whole_and_resumed(experiment: str, tmp_path, stage: str, kill_at: int) -> tuple:
    """Runs `experiment` uninterrupted into tmp_path/a, and into tmp_path/b killed (SIGKILL)
    after the checkpoint of step ≥ kill_at, then resumed; asserts the stage's exported params
    are bitwise equal. Returns (step killed at, summary a, summary b)."""
    from hh_jax import metrics

    subprocess.run(run_cmd(experiment, tmp_path / "a"), check=True, env=ENV,
                   capture_output=True)
    killed = kill_after_checkpoint(run_cmd(experiment, tmp_path / "b"),
                                   tmp_path / "b" / stage / "checkpoints", kill_at)
    assert not (tmp_path / "b" / stage / "summary.json").exists()
    subprocess.run(run_cmd(experiment, tmp_path / "b"), check=True, env=ENV,
                   capture_output=True)
    assert_same_params(tmp_path / "a" / stage / "params", tmp_path / "b" / stage / "params")
    return killed, *(metrics.read_summary(tmp_path / w / stage) for w in ("a", "b"))
