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


def train_loop(stage: str, cfg: ConfigDict, st, step_fn, next_batch: Callable[[int], dict],
               data_state: Callable[[int], dict], ckpts, writer: metrics.MetricsWriter, mesh,
               total_steps: int, evaluate: Callable[[Any, int], dict] | None = None,
               real_tokens: Callable[[dict], float] | None = None):
    """Runs steps st.step..total_steps; checks finiteness before any save or log."""
    pending, t0, tokens = [], time.time(), 0.0
    for step in range(int(st.step), total_steps):
        host_batch = next_batch(step)
        if real_tokens is not None:
            tokens += real_tokens(host_batch)
        st, m = step_fn(st, sharding.put_batch(
            {k: v for k, v in host_batch.items() if v.dtype != object}, mesh))
        pending.append((step + 1, m))
        done = step + 1
        if done % cfg.log_every == 0 or done % cfg.ckpt_every == 0 or done == total_steps:
            for s, mm in pending:  # NaN guard before anything is saved
                metrics.check_finite(mm, s, stage)
            last = metrics.to_python(pending[-1][1])
            dt = time.time() - t0
            if real_tokens is not None:
                last["perf/real_tokens_per_s"] = tokens / dt
            last["perf/steps_per_s"] = len(pending) / dt
            writer.write(done, last)
            print(f"[{stage}] step {done}/{total_steps} loss {last['train/loss']:.4f} "
                  + (f"{tokens / dt:.0f} real tok/s" if real_tokens else
                     f"{len(pending) / dt:.2f} steps/s"), flush=True)
            pending, t0, tokens = [], time.time(), 0.0
        if evaluate is not None and done % cfg.eval_every == 0 and done != total_steps:
            writer.write(done, evaluate(st.params, done))
            t0 = time.time()  # eval time is not training throughput
        if done % cfg.ckpt_every == 0 or done == total_steps:
            ckpts.save(done, st, data_state(done))
    return st


def jit_train_step(step_fn, st_sh, mesh):
    return jax.jit(step_fn, in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)
