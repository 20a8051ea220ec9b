"""Stage `ppo`: the RLHF loop around hh_jax.ppo's pure functions, and its evaluation.

Policy and π0 start from `policy_from` (the distilled model); the value model from the
train PM (`pm_from`); a held-out *test PM* (`test_pm_from`, trained on the other half of
the comparisons, PAPER.md §4.2) scores evaluation samples beside the train PM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics, ppo, sampling, sharding, state, trainer
from hh_jax.evals import fits
from hh_jax.model import Transformer
from hh_jax.optim import make_optimizer
from hh_jax.policy import (
    Frozen,
    encode_prompts,
    eval_setup,
    load_models,
    load_prompts,
    sample_and_score,
    stage_stops,
)


def value_params_from_pm(pm: Frozen, mode: str, score_shift: float = 0.0,
                         score_scale: float = 1.0):
    """Value model = PM backbone + a head with a bias: the PM's head ("pm") or zeros.

    "pm" starts V in the reward's units: the rewards use (r_PM − shift) / scale
    (`normalize_scores`), so the head is the PM's divided by `score_scale` with bias
    −shift / scale, and V(prefix) = the normalised PM score read at that prefix."""
    kernel = pm.params["head"]["params"]["kernel"]
    bias = jnp.zeros((), jnp.float32)
    if mode == "zero":
        kernel = jnp.zeros_like(kernel)
    elif mode == "pm":
        kernel, bias = kernel / score_scale, bias - score_shift / score_scale
    else:
        raise ValueError(f"value_head_init must be 'pm' or 'zero', got {mode!r}")
    head = {"params": {"kernel": kernel, "bias": bias}}
    return {"backbone": pm.params["backbone"], "head": head}


def train_state(params, optimizer, mesh):
    """A TrainState of `params` for `optimizer`, sharded like the params (and its shardings)."""
    abstract = jax.eval_shape(lambda: params)
    devices = set(mesh.devices.flat)
    # a leaf made outside the mesh (the value head's fresh bias, on one device) is
    # replicated over it: jit refuses a state whose leaves live on different device sets
    p_sh = jax.tree_util.tree_map(lambda x: x.sharding if x.sharding.device_set == devices
                                  else sharding.replicated(mesh), params)
    st_sh = state.state_shardings(p_sh, optimizer, abstract, mesh)
    return state.init_state(params, optimizer, st_sh), st_sh


def write_samples(path: str, tok, prompts: list[str], out: dict) -> None:
    if jax.process_index() != 0:
        return
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            n = int(out["lengths_B"][i])
            row = {"prompt": p, "response": tok.decode(out["tokens_BxR"][i][:n]),
                   "score": float(out["score_B"][i]), "kl": float(out["kl_B"][i]),
                   "kl_sample": float(out["kl_sample_B"][i]),
                   "ended": bool(out["ended_B"][i]), "stopped": bool(out["stopped_B"][i])}
            if "test_score_B" in out:
                row["test_score"] = float(out["test_score_B"][i])
            f.write(json.dumps(row) + "\n")


def iteration_fns(pcfg: ppo.PPOConfig, *, policy_model: Transformer, value_model: Transformer,
                  pm_model: Transformer, sample_cfg: sampling.SamplingConfig, eos_id: int,
                  pad_id: int, eoc_id: int, policy_opt, value_opt, q: int) -> dict:
    """The jitted functions of one PPO iteration: what the stage runs and what
    bench/ppo_iteration.py times. "update" takes the state's shardings first."""
    return {
        "rollout": jax.jit(functools.partial(
            ppo.rollout, policy_model=policy_model, value_model=value_model,
            sample_cfg=sample_cfg, eos_id=eos_id, pad_id=pad_id, temperature=pcfg.temperature,
            reuse_sampler_logprobs=pcfg.reuse_sampler_logprobs,
            with_values=not ppo.single_pass(pcfg))),
        "score": jax.jit(functools.partial(ppo.score_rollout, q=q, pm_model=pm_model,
                                           eoc_id=eoc_id)),
        "advantages": jax.jit(functools.partial(ppo.advantages, cfg=pcfg)),
        "update": lambda st_sh: jax.jit(functools.partial(
            ppo.ppo_update, policy_model=policy_model, value_model=value_model,
            policy_opt=policy_opt, value_opt=value_opt, cfg=pcfg, q=q), donate_argnums=0,
            out_shardings=(st_sh, None)),  # same layout in and out: no second compile
    }


def run_iteration(fns: dict, st: ppo.PPOState, ref_params, pm_params, prompts_BxQ, masks_BxQ,
                  rng, kl_coef: float, mark=None, stops=None) -> tuple[ppo.PPOState, dict]:
    """rollout → PM score → advantages → update; dispatched without a host sync. `mark`,
    when given, is called as mark(phase, outputs) after each phase (timing splits);
    `stops`: the stop strings' table (`policy.stage_stops`), or None."""
    roll = fns["rollout"](st.policy.params, ref_params, st.value.params, prompts_BxQ, masks_BxQ,
                          rng, stops)
    if mark is not None:
        mark("rollout", roll)
    score = fns["score"](pm_params, roll)
    if mark is not None:
        mark("score", score)
    batch, m = fns["advantages"](roll, score, kl_coef)
    st, stats = fns["update"](st, batch)
    if mark is not None:
        mark("update", (st, stats))
    return st, {**m, **stats}


def make_fns(cfg: ConfigDict, pcfg: ppo.PPOConfig, policy: Frozen, pm: Frozen,
             test_pm: Frozen | None, tok, policy_opt, value_opt, q: int) -> dict:
    """The jitted functions of an iteration (rollout, score, advantages, update) and eval."""
    sample_cfg = sampling.SamplingConfig(max_new_tokens=cfg.response_len,
                                         temperature=pcfg.temperature)
    fns = iteration_fns(pcfg, policy_model=policy.model, value_model=pm.model,
                        pm_model=pm.model, sample_cfg=sample_cfg, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, eoc_id=tok.eoc_id, policy_opt=policy_opt,
                        value_opt=value_opt, q=q)
    fns["evaluate"] = jax.jit(functools.partial(
        sample_and_score, policy_model=policy.model, pm_model=pm.model,
        test_pm_model=None if test_pm is None else test_pm.model, sample_cfg=sample_cfg,
        tok=tok, temperature=pcfg.temperature))
    return fns


def ppo_config(cfg: ConfigDict, pm: Frozen) -> ppo.PPOConfig:
    kw = dict(cfg.ppo.to_dict())
    if cfg.normalize_scores:  # r ← (r − mean) / std over the PM's held-out scores
        kw["score_shift"] = pm.meta["scores"]["mean"]
        kw["score_scale"] = pm.meta["scores"]["std"]
    return ppo.PPOConfig(**kw)


def optimizers(cfg: ConfigDict):
    """(policy, value) optimizers: `optim` at base_lr × lr_ratio / value_lr_ratio."""
    steps = cfg.iterations * cfg.ppo.epochs * cfg.ppo.minibatches
    return (make_optimizer(cfg.optim, steps, lr=cfg.base_lr * cfg.lr_ratio),
            make_optimizer(cfg.optim, steps, lr=cfg.base_lr * cfg.value_lr_ratio))


def _prompt_batch(n: int, batch: int, seed: int, it: int) -> np.ndarray:
    per_epoch = n // batch
    epoch, i = divmod(it, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[i * batch:(i + 1) * batch]


def _evaluate(fns, st, ref_params, pm, test_pm, ev_tokens, ev_masks, cfg, it,
              stops) -> tuple[dict, dict]:
    out = jax.device_get(fns["evaluate"](
        st.policy.params, ref_params, pm.params, None if test_pm is None else test_pm.params,
        ev_tokens, ev_masks, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), 0), stops))
    m = {"iteration": it, "eval/score": float(out["score_B"].mean()),
         "eval/kl": float(out["kl_B"].mean()), "eval/kl_sample": float(out["kl_sample_B"].mean()),
         "eval/length": float(out["lengths_B"].mean()),
         "eval/ended": float(out["ended_B"].mean()), "eval/stopped": float(out["stopped_B"].mean())}
    if "test_score_B" in out:
        m["eval/test_score"] = float(out["test_score_B"].mean())
    return m, out


class Iterations:
    """PPO as `trainer.train_loop`'s steps: `batch(t)` is iteration t's prompts (this
    process's rows), `step` runs the iteration; around it, on the host, the KL controller
    (it reads each iteration's KL: every iteration syncs), the phase timing, and the
    held-out evaluations with their sample files."""

    def __init__(self, cfg: ConfigDict, stage_dir: str, models: tuple, fns: dict,
                 kl: ppo.KLController, stops):
        self.cfg, self.stage_dir, self.fns, self.kl, self.stops = cfg, stage_dir, fns, kl, stops
        self.policy, self.pm, self.test_pm, self.tok = models
        self.prompts = load_prompts(cfg.data, "train")
        self.ev_prompts = load_prompts(cfg.data, "heldout")[:cfg.eval_prompts]
        self.ev_tokens, self.ev_masks = encode_prompts(self.tok, self.ev_prompts, cfg.prompt_len)
        self.evals: list[dict] = []
        self.it = 0
        self.timing = {"rollout": 0.0, "score": 0.0, "update": 0.0, "iteration": 0.0, "n": 0,
                       "n_split": 0}
        self._marks: list[float] = []

    def batch(self, it: int) -> dict:
        self.it = it
        cfg = self.cfg
        idx = _prompt_batch(len(self.prompts), cfg.batch_size, cfg.seed, it)
        idx = np.array_split(idx, jax.process_count())[jax.process_index()]
        tokens, masks = encode_prompts(self.tok, [self.prompts[i] for i in idx], cfg.prompt_len)
        return {"prompts_BxQ": tokens, "masks_BxQ": masks}

    def _mark(self, phase, out) -> None:
        jax.block_until_ready(out)
        self._marks.append(time.time())

    def step(self, st: ppo.PPOState, batch: dict) -> tuple[ppo.PPOState, dict]:
        """One iteration, dispatched without a host sync until its metrics are read; a
        logged iteration also syncs at each phase boundary for the time split."""
        split = (self.it + 1) % self.cfg.log_every == 0
        self._marks[:] = [time.time()]
        st, m = run_iteration(self.fns, st, self.policy.params, self.pm.params,
                              batch["prompts_BxQ"], batch["masks_BxQ"],
                              jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), self.it),
                              self.kl.value, self._mark if split else None, self.stops)
        m = metrics.to_python(m)
        m["time/iteration"] = time.time() - self._marks[0]
        self.timing["iteration"] += m["time/iteration"]
        self.timing["n"] += 1
        if split:
            self.timing["n_split"] += 1
            for k, dt in zip(("rollout", "score", "update"), np.diff(self._marks), strict=True):
                self.timing[k] += float(dt)
                m[f"time/{k}"] = float(dt)
        self.kl.update(m["objective/kl"], self.cfg.batch_size)
        return st, m

    def evaluate(self, st: ppo.PPOState, it: int) -> dict:
        m, out = _evaluate(self.fns, st, self.policy.params, self.pm, self.test_pm,
                           self.ev_tokens, self.ev_masks, self.cfg, it, self.stops)
        self.evals.append(m)
        write_samples(os.path.join(self.stage_dir, f"samples_{it}.jsonl"), self.tok,
                      self.ev_prompts, out)
        return m

    def data_state(self, it: int) -> dict:
        return {"iteration": it, "kl": self.kl.state(), "evals": self.evals}

    def describe(self, m: dict) -> str:
        return (f"score {m['objective/score']:.3f} kl {m['objective/kl']:.3f} "
                f"({m['time/iteration']:.2f}s)")


def initial_state(cfg: ConfigDict, pcfg: ppo.PPOConfig, policy: Frozen, pm: Frozen, mesh):
    """PPOState: the policy from π0, the value model from the PM (`value_params_from_pm`);
    and the (policy, value) optimizers."""
    policy_opt, value_opt = optimizers(cfg)
    pol, _ = train_state(jax.tree_util.tree_map(jnp.copy, policy.params), policy_opt, mesh)
    val, _ = train_state(value_params_from_pm(pm, cfg.value_head_init, pcfg.score_shift,
                                              pcfg.score_scale), value_opt, mesh)
    # the key placed like the update's output, so its jit sees one layout and compiles once
    st = ppo.PPOState(policy=pol, value=val, rng=jax.device_put(jax.random.PRNGKey(cfg.seed),
                                                                sharding.replicated(mesh)))
    return st, policy_opt, value_opt


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs PPO into `stage_dir`; resumes bitwise (state, KL controller, data position)."""
    os.makedirs(stage_dir, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    policy, pm, test_pm, tok = load_models(cfg, mesh)
    stops = stage_stops(cfg, tok, policy.cfg.vocab_size, mesh)
    pcfg = ppo_config(cfg, pm)
    st, policy_opt, value_opt = initial_state(cfg, pcfg, policy, pm, mesh)
    kl = ppo.KLController(pcfg.kl_coef, pcfg.kl_target, pcfg.kl_horizon)
    ckpts = checkpoint.StageCheckpoints(os.path.join(stage_dir, "checkpoints"))
    st, ds = trainer.restore_latest(ckpts, st)
    fns = make_fns(cfg, pcfg, policy, pm, test_pm, tok, policy_opt, value_opt, cfg.prompt_len)
    fns["update"] = fns["update"](jax.tree_util.tree_map(lambda x: x.sharding, st))
    loop = Iterations(cfg, stage_dir, (policy, pm, test_pm, tok), fns, kl, stops)
    start = 0 if ds is None else ds["iteration"]
    if ds is not None:
        loop.evals = ds["evals"]
        kl.load(ds["kl"])
    writer = metrics.MetricsWriter(stage_dir)
    print(f"[ppo] {len(loop.prompts)} train prompts, {len(loop.ev_prompts)} held-out, "
          f"{cfg.iterations} iterations of {cfg.batch_size}; from iteration {start}", flush=True)
    try:
        with sharding.activate(mesh):
            if start == 0:  # π0's held-out numbers: the first point of every curve
                loop.evaluate(st, 0)
            st = trainer.train_loop("ppo", cfg, st, loop.step, loop.batch, loop.data_state,
                                    ckpts, writer, mesh, cfg.iterations, loop.evaluate,
                                    start=start, every_step=True, describe=loop.describe)
            if loop.evals[-1]["iteration"] != cfg.iterations:  # the final policy's
                writer.write(cfg.iterations, loop.evaluate(st, cfg.iterations))
    finally:
        ckpts.close()
    writer.close()
    return _finish(cfg, pcfg, stage_dir, st, policy, loop.evals, loop.timing)


def _finish(cfg, pcfg, stage_dir, st, policy, evals, timing) -> dict:
    export_dir = os.path.join(stage_dir, "params")
    checkpoint.export_params(export_dir, st.policy.params, {
        "stage": "ppo", "model": dataclasses.asdict(policy.cfg),
        "tokenizer": checkpoint.copy_tokenizer(cfg.policy_from, export_dir)})
    key = "eval/test_score" if "eval/test_score" in evals[0] else "eval/score"
    fit = fits.early_sqrt_kl_fit(evals, key)
    phases = ("rollout", "score", "update")
    split_total = sum(timing[k] for k in phases) or 1.0
    summary = {"initial": evals[0], "final": evals[-1], "evals": evals, "sqrt_kl_fit": fit,
               "time_share": {k: timing[k] / split_total for k in phases},
               "seconds_per_iteration": timing["iteration"] / max(timing["n"], 1),
               "eval_setup": eval_setup(cfg, pcfg.temperature)}
    plot_sqrt_kl(evals, fit, key, os.path.join(stage_dir, "sqrt_kl.png"))
    metrics.write_summary(stage_dir, summary)
    f, i = evals[-1], evals[0]
    print(f"[ppo] held-out {key}: {i[key]:.3f} (π0) → {f[key]:.3f} at KL {f['eval/kl']:.2f}; "
          f"√KL fit R² {fit.get('r2', float('nan')):.3f}", flush=True)
    return summary


def plot_sqrt_kl(evals: list[dict], fit: dict, key: str, path: str) -> None:
    plt = metrics.pyplot()
    x = np.sqrt(np.maximum([e["eval/kl"] for e in evals], 0.0))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, [e[key] for e in evals], "o-", label=f"PPO, {key.split('/')[-1]}")
    if "eval/test_score" in evals[0]:
        ax.plot(x, [e["eval/score"] for e in evals], "s--", alpha=0.6, label="PPO, train PM")
    if "slope" in fit:
        xs = np.linspace(0, x.max() if len(x) else 1, 20)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "k:",
                label=f"fit a + b√KL (R² {fit['r2']:.2f}, early {fit['n']} pts)")
    ax.set_xlabel("√KL(π ‖ π0)  (nats, per response)")
    ax.set_ylabel("PM score (held-out prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
