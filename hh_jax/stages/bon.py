"""Stage `bon`: best-of-N rejection sampling from π0 with the train PM (PAPER.md §4.3).

For each held-out prompt, N samples from π0; best-of-n keeps the one the *train* PM scores
highest among the first n, and is judged by the *test* PM. Its KL to π0 is analytic,
log n − (n − 1)/n. Beside each n, the PPO run's test-PM score at the same KL (linearly
interpolated over its evaluations) answers "is RL better than BoN at equal KL?".
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics, ppo, sharding
from hh_jax.policy import (
    encode_prompts,
    eval_setup,
    load_models,
    load_prompts,
    sample_and_score,
    stage_stops,
)
from hh_jax.sampling import SamplingConfig


def best_of(train_PxN: np.ndarray, judge_PxN: np.ndarray, n: int) -> tuple[float, float]:
    """Mean train-PM and judge scores of the train-PM's pick among the first n samples."""
    pick_P = np.argmax(train_PxN[:, :n], axis=1)
    rows = np.arange(len(pick_P))
    return float(train_PxN[rows, pick_P].mean()), float(judge_PxN[rows, pick_P].mean())


def ppo_at_kl(evals: list[dict], kl: float, key: str) -> float | None:
    """The PPO run's held-out `key` at a given KL, interpolated; None outside its range."""
    pts = sorted((max(e["eval/kl"], 0.0), e[key]) for e in evals if key in e)
    if not pts or kl > pts[-1][0]:
        return None
    xs, ys = zip(*pts, strict=True)
    return float(np.interp(kl, xs, ys))


def setup_mismatch(ppo_setup: dict | None, bon_setup: dict) -> str | None:
    """Why best-of-n and a PPO run's held-out scores are not comparable, or None: they need
    the same π0, PMs, held-out prompts and temperature (the KL is to π0 at that
    temperature)."""
    if ppo_setup is None:
        return "its summary.json has no eval_setup (written before it was recorded)"
    diff = [f"{k} {ppo_setup.get(k)!r} (ppo) vs {v!r} (bon)" for k, v in bon_setup.items()
            if ppo_setup.get(k) != v]
    return "; ".join(diff) or None


def _samples(cfg, policy, pm, test_pm, tok, prompts, mesh):
    n_max = max(cfg.ns)
    tokens, masks = encode_prompts(tok, prompts, cfg.prompt_len)
    tokens, masks = np.repeat(tokens, n_max, axis=0), np.repeat(masks, n_max, axis=0)
    fn = jax.jit(functools.partial(
        sample_and_score, policy_model=policy.model, pm_model=pm.model,
        test_pm_model=None if test_pm is None else test_pm.model,
        sample_cfg=SamplingConfig(max_new_tokens=cfg.response_len,
                                  temperature=cfg.temperature),
        tok=tok, temperature=cfg.temperature))
    stops = stage_stops(cfg, tok, policy.cfg.vocab_size, mesh)
    train, judge, ends = [], [], np.zeros(2)
    for i in range(0, len(tokens), cfg.batch_size):  # the last chunk may recompile once
        out = jax.device_get(fn(policy.params, None, pm.params,
                                None if test_pm is None else test_pm.params,
                                tokens[i:i + cfg.batch_size], masks[i:i + cfg.batch_size],
                                jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i), stops))
        train.append(out["score_B"])
        judge.append(out.get("test_score_B", out["score_B"]))
        ends += out["ended_B"].sum(), out["stopped_B"].sum()
    shape = (len(prompts), n_max)
    ended, stopped = (float(x) / len(tokens) for x in ends)
    return (np.concatenate(train).reshape(shape), np.concatenate(judge).reshape(shape),
            {"ended": ended, "stopped": stopped})


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    ppo.check_temperature(cfg.temperature, "bon.temperature")
    os.makedirs(stage_dir, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    policy, pm, test_pm, tok = load_models(cfg, mesh)
    prompts = load_prompts(cfg.data, "heldout")[:cfg.eval_prompts]
    with sharding.activate(mesh):
        train_PxN, judge_PxN, ends = _samples(cfg, policy, pm, test_pm, tok, prompts, mesh)
    key = "eval/test_score" if test_pm is not None else "eval/score"
    ppo_evals, skipped = [], None
    if cfg.ppo_dir and checkpoint.is_complete(cfg.ppo_dir):
        ppo_summary = metrics.read_summary(cfg.ppo_dir)
        skipped = setup_mismatch(ppo_summary.get("eval_setup"), eval_setup(cfg, cfg.temperature))
        if skipped:
            print(f"[bon] not comparing with the PPO run in {cfg.ppo_dir}: {skipped}",
                  flush=True)
        else:
            ppo_evals = ppo_summary["evals"]
    rows = []
    for n in cfg.ns:
        score, judged = best_of(train_PxN, judge_PxN, n)
        row = {"n": n, "kl": ppo.bon_kl(n), "score": score, "test_score": judged}
        row["ppo_test_score_at_same_kl"] = ppo_at_kl(ppo_evals, row["kl"], key)
        rows.append(row)
        print(f"[bon] n={n:>3} KL {row['kl']:.3f}  train PM {score:+.3f}  test PM {judged:+.3f}"
              + (f"  PPO at same KL {row['ppo_test_score_at_same_kl']:+.3f}"
                 if row["ppo_test_score_at_same_kl"] is not None else ""), flush=True)
    plot(rows, ppo_evals, key, os.path.join(stage_dir, "bon.png"))
    summary = {"rows": rows, "prompts": len(prompts), "judge": key, "samples": ends}
    if skipped:
        summary["ppo_comparison_skipped"] = skipped
    metrics.write_summary(stage_dir, summary)
    return summary


def plot(rows: list[dict], ppo_evals: list[dict], key: str, path: str) -> None:
    plt = metrics.pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([np.sqrt(r["kl"]) for r in rows], [r["test_score"] for r in rows], "o-",
            label="best-of-n (test PM)")
    for r in rows:
        ax.annotate(f"n={r['n']}", (np.sqrt(r["kl"]), r["test_score"]), fontsize=7)
    if ppo_evals:
        ax.plot(np.sqrt(np.maximum([e["eval/kl"] for e in ppo_evals], 0.0)),
                [e[key] for e in ppo_evals], "s--", label="PPO (held-out evals)")
    ax.set_xlabel("√KL(π ‖ π0)")
    ax.set_ylabel("test-PM score, held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
