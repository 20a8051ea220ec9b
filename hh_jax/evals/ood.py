"""OOD detection on a model's activations (PAPER.md §6 [P §5.4, App. B.9]).

In-distribution: helpfulness prompts; out-of-distribution: harmlessness (red-team)
prompts, both from the shipped HH files (the first Human turn of each dialogue, rendered
in the policy's chat format up to where the Assistant speaks). For every layer ℓ, the
residual stream after block ℓ is pooled per prompt (the last prompt token, and the mean
over the prompt's tokens: the paper does not say which; both are reported), and

  * Mahalanobis: μ, Σ (1/N) fitted on in-distribution train prompts, score (x−μ)ᵀΣ⁻¹(x−μ);
  * simplified relative Mahalanobis: the same minus (x−μ)ᵀΣ_diag⁻¹(x−μ) (stats.py);
  * few-shot outlier exposure: a linear classifier on the frozen activations, M OOD
    prompts (default 10) replicated N_train // M times against the N_train
    in-distribution ones; the score is its class-1 probability;

scored by AUROC (in-distribution test prompts vs the OOD prompts not used for training),
mean ± std over random train/test splits (3 by default, as the paper's error bars).

The per-layer residual stream comes from `residual_stream`, which applies the model's
stacked (nn.scan) layer params one layer at a time, as model.py's read-out path does.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import chat, trunk
from hh_jax.data import hh
from hh_jax.evals import common, datasets, loglik, stats

POOLS = ("last", "mean")
SCORES = ("mahalanobis", "relative_mahalanobis", "outlier_exposure")


def residual_stream(params, tokens_BxL, mask_BxL, *, cfg) -> dict[str, jax.Array]:
    """{"last": x_NxBxD, "mean": x_NxBxD}: the residual stream after each of the N blocks
    (before the final norm), at the last real token and averaged over the real tokens."""
    p = nn.unbox(params)
    positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
    last_B = jnp.maximum(mask_BxL.sum(1) - 1, 0)
    w_BxL = mask_BxL / jnp.maximum(mask_BxL.sum(1, keepdims=True), 1)

    def pools(y_BxLxD):
        y32 = y_BxLxD.astype(jnp.float32)
        last = jnp.take_along_axis(y32, last_B[:, None, None], axis=1)[:, 0]
        return last, jnp.einsum("bl,bld->bd", w_BxL, y32)

    _, (last_NxBxD, mean_NxBxD) = trunk.run_layers(
        cfg, p["params"]["layers"], trunk.embed(cfg, p, tokens_BxL), positions_BxL,
        trunk.mask_for(positions_BxL, mask_BxL), read=pools)
    return {"last": last_NxBxD, "mean": mean_NxBxD}


def prompt_activations(model, params, tok, fmt: chat.ChatFormat, prompts: list[str], *,
                       batch_size: int = 8, max_len: int = 256, progress: bool = False
                       ) -> dict[str, np.ndarray]:
    """{pool: acts_NxPxD} for the prompts (P of them), padded to power-of-two buckets."""
    fn = jax.jit(functools.partial(residual_stream, cfg=model.cfg))
    ids = [chat.prompt_ids(tok, [("Human", p)], fmt)[-max_len:] for p in prompts]
    order = np.argsort([len(i) for i in ids], kind="stable")
    out = {k: np.zeros((model.cfg.n_layers, len(ids), model.cfg.d_model), np.float32)
           for k in POOLS}
    t0 = time.time()
    for s in range(0, len(ids), batch_size):
        idx = order[s:s + batch_size]
        length = max(16, 1 << (max(len(ids[i]) for i in idx) - 1).bit_length())
        toks = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), bool)
        for k, i in enumerate(idx):
            toks[k, :len(ids[i])], mask[k, :len(ids[i])] = ids[i], True
        res = jax.device_get(fn(params, toks, mask))
        for k in POOLS:
            out[k][:, idx] = res[k][:, :len(idx)]
        if progress and (s // batch_size) % 10 == 9:
            print(f"  activations {s + len(idx)}/{len(ids)} prompts, {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    return out


def layer_aurocs(acts_in_NxIxD: np.ndarray, acts_out_NxOxD: np.ndarray, *, n_splits: int = 3,
                 train_frac: float = 0.5, n_shot: int = 10, ridge: float = 1e-3,
                 l2: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """{score: auroc_SxN} over S random splits and N layers. A split draws the
    in-distribution train rows and the `n_shot` OOD rows outlier exposure sees (those are
    left out of its OOD test rows; the distances never see OOD rows)."""
    n_layers, n_in, _ = acts_in_NxIxD.shape
    n_out = acts_out_NxOxD.shape[1]
    res = {k: np.full((n_splits, n_layers), np.nan) for k in SCORES}
    for s in range(n_splits):
        rng = np.random.default_rng([seed, s])
        perm = rng.permutation(n_in)
        tr, te = perm[:int(train_frac * n_in)], perm[int(train_frac * n_in):]
        shot = rng.choice(n_out, min(n_shot, n_out - 1), replace=False) if n_shot else []
        ood_te = np.setdiff1d(np.arange(n_out), shot)
        for layer in range(n_layers):
            x_tr, x_te = acts_in_NxIxD[layer, tr], acts_in_NxIxD[layer, te]
            x_ood = acts_out_NxOxD[layer]
            g = stats.fit_gaussian(x_tr, ridge=ridge)
            res["mahalanobis"][s, layer] = stats.auroc(stats.mahalanobis(g, x_te),
                                                       stats.mahalanobis(g, x_ood))
            res["relative_mahalanobis"][s, layer] = stats.auroc(
                stats.relative_mahalanobis(g, x_te), stats.relative_mahalanobis(g, x_ood))
            if len(shot):
                reps = max(len(tr) // len(shot), 1)  # [P App. B.9]: replicate to balance
                x = np.concatenate([x_tr, np.repeat(x_ood[shot], reps, axis=0)])
                y = np.r_[np.zeros(len(tr)), np.ones(len(shot) * reps)]
                predict = stats.logistic_fit(x, y, l2=l2)
                res["outlier_exposure"][s, layer] = stats.auroc(predict(x_te),
                                                                predict(x_ood[ood_te]))
    return res


def run(model_spec: str, out_dir: str, *, n_in: int = 1000, n_out: int = 500,
        n_splits: int = 3, n_shot: int = 10, train_frac: float = 0.8, ridge: float = 1e-3,
        batch_size: int = 8, max_len: int = 256, seed: int = 0,
        in_file: str | None = None, out_file: str | None = None, progress: bool = True) -> dict:
    """`hh-jax eval ood`: summary.json, a table per pool on stdout, ood_auroc_<pool>.png.

    The Gaussian is fitted on train_frac·n_in prompts: keep that above d_model (576 for
    SmolLM2), or Σ is singular and the ridge decides the distances."""
    in_file = in_file or os.path.join(datasets.HH_DIR, "helpful-base", "test.jsonl.gz")
    out_file = out_file or os.path.join(datasets.HH_DIR, "harmless-base", "test.jsonl.gz")
    p_in, p_out = (hh.load_hh_prompts(in_file, n_in, seed),
                    hh.load_hh_prompts(out_file, n_out, seed))
    model, params, tok, fmt = loglik.load_model(model_spec)
    acts_in = prompt_activations(model, params, tok, fmt, p_in, batch_size=batch_size,
                                 max_len=max_len, progress=progress)
    acts_out = prompt_activations(model, params, tok, fmt, p_out, batch_size=batch_size,
                                  max_len=max_len, progress=progress)
    summary = {"model": model_spec, "in_distribution": in_file, "ood": out_file,
               "prompts": "first Human turn, chat format up to the Assistant",
               "n_in": len(p_in), "n_out": len(p_out), "n_splits": n_splits, "n_shot": n_shot,
               "train_frac": train_frac, "ridge": ridge, "pools": list(POOLS),
               "layers": model.cfg.n_layers, "chat_format": fmt.to_meta(), "auroc": {}}
    for pool in POOLS:
        res = layer_aurocs(acts_in[pool], acts_out[pool], n_splits=n_splits, n_shot=n_shot,
                           train_frac=train_frac, ridge=ridge, seed=seed)
        summary["auroc"][pool] = {k: {"mean": v.mean(0), "std": v.std(0), "splits": v}
                                  for k, v in res.items()}
        print(report_table(summary, pool), flush=True)
        plot(summary, pool, os.path.join(out_dir, f"ood_auroc_{pool}.png"))
    common.write_summary(out_dir, summary)
    return summary


def report_table(summary: dict, pool: str) -> str:
    a = summary["auroc"][pool]
    rows = [(layer + 1, *(f"{a[k]['mean'][layer]:.3f} ± {a[k]['std'][layer]:.3f}"
                          for k in SCORES)) for layer in range(summary["layers"])]
    return common.table(("layer", "Mahalanobis", "relative MD", f"{summary['n_shot']}-shot OE"),
                        rows, f"OOD AUROC ({pool} token pool): {summary['model']}, "
                        f"{summary['n_in']} helpful vs {summary['n_out']} harmless prompts")


def plot(summary: dict, pool: str, path: str) -> None:
    plt = common.pyplot()
    a = summary["auroc"][pool]
    x = np.arange(1, summary["layers"] + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, label in zip(SCORES, ("Mahalanobis", "simplified relative MD",
                                 f"{summary['n_shot']}-shot outlier exposure"), strict=True):
        m, sd = np.asarray(a[k]["mean"]), np.asarray(a[k]["std"])
        if np.all(np.isnan(m)):
            continue
        ax.errorbar(x, m, yerr=sd, marker="o", ms=3, capsize=2, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"AUROC (mean ± std, {summary['n_splits']} splits)")
    ax.set_title(f"OOD: helpful (in) vs harmless (out), {pool} token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
