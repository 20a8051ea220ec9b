"""The loop every training stage shares: resume order, steps, NaN guard, logs, saves.

Stage modules own their pure step functions and data; this module owns the order of
things around them, so each stage resumes, checkpoints and stops on NaN the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics, sharding, state


def resume_or_init(cfg: ConfigDict, stage_dir: str, boxed_init: Callable[[], Any], optimizer,
                   mesh, load_init_from: Callable[[str, Any], Any] | None = None):
    """DESIGN.md §3 resume order: own latest checkpoint → cfg.resume → cfg.init_from → scratch.

    `load_init_from(path, target)` turns a params export into this stage's params (target:
    abstract params with shardings); by default the export must match exactly.
    Returns (state, state shardings, checkpoint manager, data state or None, how).
    """
    abstract_params, p_sh = state.param_shardings(boxed_init, mesh)
    st_sh = state.state_shardings(p_sh, optimizer, abstract_params, mesh)
    target = checkpoint.abstract_with_shardings(state.abstract_state(abstract_params, optimizer),
                                                st_sh)
    ckpts = checkpoint.StageCheckpoints(os.path.join(stage_dir, "checkpoints"))
    if ckpts.latest_step() is not None:
        st, data_state = ckpts.restore(target)
        return st, st_sh, ckpts, data_state, f"resumed at step {int(st.step)}"
    if cfg.get("resume"):
        st, data_state = checkpoint.StageCheckpoints(cfg.resume).restore(target)
        return st, st_sh, ckpts, data_state, f"resumed from {cfg.resume}"
    params_target = checkpoint.abstract_with_shardings(abstract_params, p_sh)
    if cfg.get("init_from"):
        load = load_init_from or checkpoint.import_params
        params = load(cfg.init_from, params_target)
        how = f"params from {cfg.init_from}"
    else:
        params, _ = state.init_params(boxed_init, mesh)
        how = "from scratch"
    return state.init_state(params, optimizer, st_sh), st_sh, ckpts, None, how


def restore_latest(ckpts: checkpoint.StageCheckpoints, like):
    """(state, data state) of the stage's latest checkpoint, restored with the structure and
    shardings of `like`; (like, None) when there is none yet."""
    if ckpts.latest_step() is None:
        return like, None
    target = checkpoint.abstract_with_shardings(
        jax.eval_shape(lambda: like), jax.tree_util.tree_map(lambda x: x.sharding, like))
    return ckpts.restore(target)


def train_loop(stage: str, cfg: ConfigDict, st, step_fn, next_batch: Callable[[int], dict],
               data_state: Callable[[int], dict], ckpts, writer: metrics.MetricsWriter, mesh,
               total_steps: int, evaluate: Callable[[Any, int], dict] | None = None,
               real_tokens: Callable[[dict], float] | None = None, *, start: int | None = None,
               every_step: bool = False, describe: Callable[[dict], str] | None = None):
    """Runs steps start..total_steps (start: `st.step` unless given).

    Every `cfg.log_every` steps (and at each save) the pending metrics are checked for
    NaN/Inf before anything is written or saved, the last row is written with throughput
    and printed (`describe(row)`, by default the loss and the throughput);
    `every_step=True` writes every step's row (a stage whose steps sync the host anyway).
    `evaluate(st, step)` runs every `cfg.eval_every` steps but the last (stages evaluate
    their final state themselves); its metrics are written. Checkpoints every
    `cfg.ckpt_every` steps and at the end hold the state and `data_state(step)`."""
    pending, t0, tokens, n = [], time.time(), 0.0, 0
    for step in range(int(st.step) if start is None else start, total_steps):
        host_batch = next_batch(step)
        if real_tokens is not None:
            tokens += real_tokens(host_batch)
        st, m = step_fn(st, sharding.put_batch(
            {k: v for k, v in host_batch.items() if v.dtype != object}, mesh))
        done, n = step + 1, n + 1
        pending.append((done, m))
        log = done % cfg.log_every == 0 or done % cfg.ckpt_every == 0 or done == total_steps
        if log or every_step:
            for s, mm in pending:  # NaN guard before anything is written or saved
                metrics.check_finite(mm, s, stage)
            row = metrics.to_python(pending[-1][1])
            if log:
                dt = time.time() - t0
                if real_tokens is not None:
                    row["perf/real_tokens_per_s"] = tokens / dt
                row["perf/steps_per_s"] = n / dt
                print(f"[{stage}] step {done}/{total_steps} " + (describe or _describe)(row),
                      flush=True)
                t0, tokens, n = time.time(), 0.0, 0
            writer.write(done, row)
            pending = []
        if evaluate is not None and done % cfg.eval_every == 0 and done != total_steps:
            writer.write(done, evaluate(st, done))
            t0 = time.time()  # eval time is not training throughput
        if done % cfg.ckpt_every == 0 or done == total_steps:
            ckpts.save(done, st, data_state(done))
    return st


def _describe(row: dict) -> str:
    speed = (f"{row['perf/real_tokens_per_s']:.0f} real tok/s" if "perf/real_tokens_per_s" in row
             else f"{row['perf/steps_per_s']:.2f} steps/s")
    return f"loss {row['train/loss']:.4f} {speed}"


def jit_train_step(step_fn, st_sh, mesh):
    return jax.jit(step_fn, in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)
