"""The preference model as functions (PAPER.md §3–4), shared by the pm stage, PPO,
best-of-n and the evaluations.

PM = Transformer backbone + ScalarHead read at the end-of-context token (the last real
token of `context + response + EOC`). Params: {"backbone": <LM params>, "head": ...}.
`pm_init` builds the tree, `pair_scores` scores a batch of the loaders' pairs in either
layout, `bradley_terry` is the loss, `score_pairs` scores a list of comparisons on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from hh_jax import sharding, state
from hh_jax.data import loaders
from hh_jax.model import ScalarHead, Transformer, gather_at


def head_init(d_model: int, seed: int = 0):
    """The boxed init of the PM's head: a ScalarHead without bias (the BT loss is blind to
    a bias), keyed by `seed`."""
    return lambda: ScalarHead(d_model, use_bias=False).init(jax.random.key(seed),
                                                            jnp.zeros((2, d_model)))


def pm_init(model: Transformer, seed: int = 0):
    """The boxed init of a PM, {"backbone": the LM's params (key `seed`), "head":
    `head_init` (key seed + 1)}: the one builder of the PM tree, for its abstract form and
    shardings (`state.param_shardings`: loading an export, resuming) and a fresh PM."""
    backbone, head = state.lm_init(model, seed), head_init(model.cfg.d_model, seed + 1)
    return lambda: {"backbone": backbone(), "head": head()}


def pm_scores(params, tokens_BxL, len_B, *, model: Transformer, with_logits: bool = False):
    """(scores_B, logits_BxLxV or None): the head on the hidden state at index len_B − 1."""
    mask_BxL = jnp.arange(tokens_BxL.shape[1])[None, :] < len_B[:, None]
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    if not with_logits:  # the last layer runs for the read token alone
        out = model.apply(params["backbone"], tokens_BxL, mask_BxL=mask_BxL, with_logits=False,
                          read_index_BxQ=(len_B - 1)[:, None])
        return head.apply(params["head"], out["hidden_BxQxD"][:, 0]), None
    out = model.apply(params["backbone"], tokens_BxL, mask_BxL=mask_BxL, with_logits=True)
    hidden_BxD = gather_at(out["hidden_BxLxD"], len_B - 1)
    return head.apply(params["head"], hidden_BxD), out["logits_BxLxV"]


def pair_scores(params, batch, *, model: Transformer, with_logits: bool = False):
    """(r_chosen_B, r_rejected_B, logits, chosen_tokens_BxL) for either pair layout.

    "separate": chosen and rejected sequences go through the model as one batch of 2B rows.
    "shared" (loaders.pm_shared_example): one row per pair, the context run once, each
    response masked from the other (branch ids); the logits then cover the whole row, whose
    first chosen_len_B tokens are the chosen dialogue.
    """
    head = ScalarHead(model.cfg.d_model, use_bias=False)
    if "pair_tokens_BxL" in batch:
        branch_BxL = batch["pair_branch_BxL"].astype(jnp.int32)
        index_Bx2 = jnp.stack([batch["chosen_index_B"], batch["rejected_index_B"]], axis=1)
        out = model.apply(params["backbone"], batch["pair_tokens_BxL"],
                          positions_BxL=batch["pair_positions_BxL"], mask_BxL=branch_BxL > 0,
                          branch_ids_BxL=branch_BxL, with_logits=with_logits,
                          read_index_BxQ=None if with_logits else index_Bx2)
        if with_logits:  # the LM term needs every position
            hidden_Bx2xD = jnp.take_along_axis(out["hidden_BxLxD"], index_Bx2[:, :, None], axis=1)
        else:
            hidden_Bx2xD = out["hidden_BxQxD"]
        r_Bx2 = head.apply(params["head"], hidden_Bx2xD)
        return r_Bx2[:, 0], r_Bx2[:, 1], out["logits_BxLxV"], batch["pair_tokens_BxL"]
    b = batch["chosen_tokens_BxL"].shape[0]
    length = max(batch["chosen_tokens_BxL"].shape[1], batch["rejected_tokens_BxL"].shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1])))  # noqa: E731
    tokens_2BxL = jnp.concatenate([pad(batch["chosen_tokens_BxL"]),
                                   pad(batch["rejected_tokens_BxL"])])
    len_2B = jnp.concatenate([batch["chosen_len_B"], batch["rejected_len_B"]])
    r_2B, logits = pm_scores(params, tokens_2BxL, len_2B, model=model, with_logits=with_logits)
    return r_2B[:b], r_2B[b:], None if logits is None else logits[:b], tokens_2BxL[:b]


def bradley_terry(r_good_B: jax.Array, r_bad_B: jax.Array, weight_B: jax.Array) -> jax.Array:
    """Weighted mean of log(1 + exp(r_bad − r_good)) (PAPER.md eq. 4.2)."""
    per_B = jax.nn.softplus(r_bad_B - r_good_B)
    return (per_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1e-8)


def pair_metrics(r_good_B: jax.Array, r_bad_B: jax.Array, weight_B: jax.Array) -> dict:
    """The PM stages' weighted training metrics of a batch of pairs: train/accuracy (ties
    count ½, as in pm_accuracy.pm_report) and train/margin (mean r_good − r_bad)."""
    total = jnp.maximum(weight_B.sum(), 1e-8)
    correct_B = (r_good_B > r_bad_B) + 0.5 * (r_good_B == r_bad_B)
    return {"train/accuracy": (correct_B * weight_B).sum() / total,
            "train/margin": ((r_good_B - r_bad_B) * weight_B).sum() / total}


def score_step(params, batch, *, model: Transformer):
    """(r_chosen_B, r_rejected_B) for evaluation, either layout."""
    r_good_B, r_bad_B, _, _ = pair_scores(params, batch, model=model)
    return r_good_B, r_bad_B


def pair_row_lengths(comps, tok, max_len: int, layout: str) -> np.ndarray:
    """Each pair's row length in tokens, as the loader will build it: the PM stage's
    length_grouped sorts by it (by characters, batches pad more: BENCHMARKS.md)."""
    if layout == "shared":
        return np.asarray([len(loaders.pm_shared_example(c, tok, max_len)["tokens"])
                           for c in comps])
    return np.asarray([max(len(loaders.pm_example(c, tok, max_len)[s]) for s in
                           ("chosen", "rejected")) for c in comps])


def score_pairs(score_fn, params, comps, tok, cfg: ConfigDict, mesh
                ) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen_P, r_rejected_P): every pair scored once (padding rows dropped) by
    `score_fn` (a jitted `score_step`), in the order of `comps`.

    Pairs are scored in order of row length (batches pad little) and put back in order."""
    layout = cfg.get("pair_layout", "shared")
    by_length = np.argsort(pair_row_lengths(comps, tok, cfg.max_len, layout), kind="stable")
    ds = loaders.pm_dataset([comps[i] for i in by_length], tok, max_len=cfg.max_len,
                            global_batch=cfg.eval_batch_size, seed=0, shuffle=False,
                            drop_remainder=False,
                            buckets=tuple(cfg.get("buckets", ()) or ()) or None, layout=layout)
    rows = []  # per batch: (r_chosen, r_rejected, weight) of every row
    for batch in ds:  # each process: its rows; gathered (once) back into the data's order
        c, r = score_fn(params, sharding.put_batch(
            {k: v for k, v in batch.items() if v.dtype != object}, mesh))
        local_Bx3 = np.stack([sharding.host_local(c, mesh), sharding.host_local(r, mesh),
                              batch["weight_B"]], axis=1)
        rows.append(sharding.host_rows_in_global_order(local_Bx3))
    rc_all, rr_all, w_all = np.concatenate(rows).T
    keep = w_all > 0
    rc_sorted, rr_sorted = rc_all[keep], rr_all[keep]
    assert len(rc_sorted) == len(comps), (len(rc_sorted), len(comps))
    rc, rr = np.empty_like(rc_sorted), np.empty_like(rr_sorted)
    rc[by_length], rr[by_length] = rc_sorted, rr_sorted  # back to the order of comps
    return rc, rr
