"""Stages `pmp` and `pm`: preference models (PAPER.md §3–4) with one code path.

PM = Transformer backbone + ScalarHead read at the end-of-context token (the last real
token of `context + response + EOC`). Loss: Bradley–Terry, log(1 + exp(r_bad − r_good))
(eq. 4.2), weighted λ on harmless-subset pairs (§5.1), plus an optional LM term. Chosen and
rejected go through the model as one batch of 2B rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from hh_jax import checkpoint, losses, metrics, sharding, state, trainer
from hh_jax.data import hh, loaders, stackexchange
from hh_jax.evals import pm_accuracy
from hh_jax.model import SIZES, ModelConfig, ScalarHead, Transformer, gather_at
from hh_jax.optim import make_optimizer
from hh_jax.pretrained import convert, registry
from hh_jax.tokenizer import load_tokenizer


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


def pm_loss(params, batch, model: Transformer, lm_coef: float):
    r_good_B, r_bad_B, logits, chosen_BxL = pair_scores(params, batch, model=model,
                                                        with_logits=lm_coef > 0)
    w_B = batch["weight_B"]
    loss = bradley_terry(r_good_B, r_bad_B, w_B)
    aux = {"train/bt_loss": loss,
           # ties count ½, as in pm_accuracy.pm_report
           "train/accuracy": (((r_good_B > r_bad_B) + 0.5 * (r_good_B == r_bad_B)) * w_B).sum()
           / jnp.maximum(w_B.sum(), 1e-8),
           "train/margin": ((r_good_B - r_bad_B) * w_B).sum() / jnp.maximum(w_B.sum(), 1e-8)}
    if lm_coef > 0:  # next-token loss on the chosen dialogue (A21's PMP adds an LM term)
        positions = jnp.arange(chosen_BxL.shape[1])[None, :]
        weights = (positions < batch["chosen_len_B"][:, None] - 1) * (w_B[:, None] > 0)
        nll, count = losses.next_token_xent(logits, chosen_BxL, weights)
        aux["train/lm_loss"] = nll / jnp.maximum(count, 1.0)
        loss = loss + lm_coef * aux["train/lm_loss"]
    aux["train/loss"] = loss
    return loss, aux


def train_step(st: state.TrainState, batch, *, model: Transformer,
               optimizer: optax.GradientTransformation, lm_coef: float = 0.0):
    (_, aux), grads = jax.value_and_grad(pm_loss, has_aux=True)(st.params, batch, model, lm_coef)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    aux["train/grad_norm"] = optax.global_norm(grads)
    return st.replace(step=st.step + 1, params=params, opt_state=opt_state), aux


def score_step(params, batch, *, model: Transformer):
    """(r_chosen_B, r_rejected_B) for evaluation, either layout."""
    r_good_B, r_bad_B, _, _ = pair_scores(params, batch, model=model)
    return r_good_B, r_bad_B


# ------------------------------------------------------------------------------ the stage
def load_comparisons(dcfg: ConfigDict) -> tuple[list, dict]:
    """Training comparisons of a stage's data config, and the load report's totals."""
    if dcfg.kind == "hh":
        comps, report = hh.load_hh_comparisons(dcfg.hh_dir, subsets=list(dcfg.subsets) or None,
                                                 skip_invalid=dcfg.skip_invalid)
        comps = hh.select_split(comps, "train")
        if dcfg.get("half"):  # robustness protocol (PAPER.md §4.2): train PM vs test PM
            comps = [c for c in comps if half_of(c.first_human) == dcfg.half]
        comps = hh.data_fraction(comps, dcfg.fraction)
    elif dcfg.kind == "stackexchange":
        comps, report = stackexchange.load_stackexchange(
            dcfg.se_dir, binarize=dcfg.binarize, skip_invalid=dcfg.skip_invalid)
        comps = hh.data_fraction(comps, dcfg.fraction)
    else:
        raise ValueError(f"data.kind must be 'hh' or 'stackexchange', got {dcfg.kind!r}")
    total = report.total.to_json()
    return comps, {"rows": total["rows"], "comparisons": total["comparisons"],
                   "skipped": total["skipped"], "used": len(comps)}


def half_of(first_human: str) -> str:
    """Splits the train conversations 50/50 ("a"/"b") by a hash independent of the held-out
    split: a train PM on one half and a test PM on the other see disjoint conversations."""
    digest = hashlib.sha256(("half\0" + first_human).encode("utf-8", "surrogatepass"))
    return "a" if digest.digest()[0] < 128 else "b"


def length_grouped(comps: list, lengths: np.ndarray, batch: int, seed: int, window: int = 32
                   ) -> list:
    """Shuffled order in which each batch holds pairs of similar length.

    Shuffle, cut into windows of `window` batches, sort each window by length, cut into
    batches, shuffle the batches: padding per batch shrinks (the buckets of the loader
    then fit tightly) while the order stays random at the batch level.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(comps))
    n = len(order) // batch * batch
    order, rest = order[:n], order[n:]
    batches = []
    for w in range(0, n, window * batch):
        chunk = order[w:w + window * batch]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return [comps[i] for b in batches for i in b] + [comps[i] for i in rest]


def pair_row_lengths(comps, tok, max_len: int, layout: str) -> np.ndarray:
    """Each pair's row length in tokens, as the loader will build it (length_grouped sorts
    by it: sorting by characters instead leaves ~10% more padding on HH)."""
    if layout == "shared":
        return np.asarray([len(loaders.pm_shared_example(c, tok, max_len)["tokens"])
                           for c in comps])
    return np.asarray([max(len(loaders.pm_example(c, tok, max_len)[s]) for s in
                           ("chosen", "rejected")) for c in comps])


def score_pairs(score_fn, params, comps, tok, cfg: ConfigDict, mesh) -> dict:
    """Scores every pair once (padding rows dropped); returns the pm_accuracy.pm_report.

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
    return pm_accuracy.comparisons_report(comps, rc, rr)


_PRETRAINED: dict = {}  # init_from spec → imported params, between config and loader


def _model_and_tokenizer(cfg: ConfigDict):
    if registry.is_pretrained(cfg.get("init_from", "")):  # e.g. init_from="smollm2-135m"
        mcfg, params, tok = convert.load_pretrained(cfg.init_from)
        _PRETRAINED[cfg.init_from] = params  # host numpy, placed by _loader_from
        return mcfg.replace(**dict(cfg.get("model_overrides", {}) or {})), tok, "pretrained"
    if cfg.get("init_from"):
        meta = checkpoint.read_meta(cfg.init_from)
        mcfg = ModelConfig(**meta["model"])
        tok = load_tokenizer(checkpoint.tokenizer_spec(cfg.init_from))
        return mcfg.replace(**dict(cfg.get("model_overrides", {}) or {})), tok, meta["stage"]
    tok = load_tokenizer(cfg.tokenizer)
    overrides = dict(cfg.get("model_overrides", {}) or {})
    return SIZES[cfg.model].replace(vocab_size=tok.vocab_size, **overrides), tok, None


def _loader_from(init_stage: str | None, head_init, head_sh):
    """init_from an LM export fills the backbone and starts a fresh head; a PM/PMP export
    fills both."""
    def load(path, target):
        if init_stage in ("pm", "pmp"):
            return checkpoint.import_params(path, target)
        if init_stage == "pretrained":
            backbone = jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding),
                                              _PRETRAINED.pop(path), target["backbone"])
        else:
            backbone = checkpoint.import_params(path, target["backbone"])
        return {"backbone": backbone, "head": jax.jit(head_init, out_shardings=head_sh)()}
    return load


def heldout_pairs(ecfg: ConfigDict) -> list:
    comps, _ = hh.load_hh_comparisons(ecfg.hh_dir, subsets=list(ecfg.subsets) or None,
                                        skip_invalid=True)
    held = hh.select_split(comps, "heldout")
    if ecfg.max_pairs and ecfg.max_pairs < len(held):  # a fixed, nested subset
        held = hh.data_fraction(held, ecfg.max_pairs / len(held))
    return held


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs a `pmp` or `pm` stage into `stage_dir`; returns its summary."""
    name = os.path.basename(os.path.normpath(stage_dir))
    os.makedirs(stage_dir, exist_ok=True)
    mcfg, tok, init_stage = _model_and_tokenizer(cfg)
    comps, data_report = load_comparisons(cfg.data)
    lengths = pair_row_lengths(comps, tok, cfg.max_len, cfg.get("pair_layout", "shared"))
    ordered = []
    for epoch in range(cfg.epochs):  # one fresh length-grouped order per epoch
        ordered += length_grouped(comps, lengths, cfg.batch_size, cfg.seed + epoch)
    ds = loaders.pm_dataset(ordered, tok, max_len=cfg.max_len, global_batch=cfg.batch_size,
                            seed=cfg.seed, shuffle=False, drop_remainder=True,
                            buckets=tuple(cfg.get("buckets", ()) or ()) or None,
                            layout=cfg.get("pair_layout", "shared"))
    total_steps = len(comps) // cfg.batch_size * cfg.epochs
    held = heldout_pairs(cfg.eval)
    print(f"[{name}] {data_report['used']} training pairs ({data_report}), {total_steps} steps; "
          f"{len(held)} held-out HH pairs", flush=True)
    mesh = sharding.make_mesh(cfg.mesh)
    model, head = Transformer(mcfg), ScalarHead(mcfg.d_model, use_bias=False)
    lr = cfg.base_lr * cfg.lr_ratio  # PAPER.md §3: PMP 0.1×, finetune 0.01× the LM's LR
    optimizer = make_optimizer(ConfigDict({**cfg.optim.to_dict(), "lr": lr}), total_steps)
    dummy_BxL = jnp.zeros((2, 8), jnp.int32)
    head_init = lambda: head.init(jax.random.key(cfg.seed + 1),  # noqa: E731
                                  jnp.zeros((2, mcfg.d_model)))
    boxed_init = lambda: {"backbone": model.init(jax.random.key(cfg.seed), dummy_BxL),  # noqa
                          "head": head_init()}
    _, p_sh = state.param_shardings(boxed_init, mesh)
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(
        cfg, stage_dir, boxed_init, optimizer, mesh,
        _loader_from(init_stage, lambda: nn.unbox(head_init()), p_sh["head"]))
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state["iterator"])
    step_fn = trainer.jit_train_step(functools.partial(
        train_step, model=model, optimizer=optimizer, lm_coef=cfg.lm_coef), st_sh, mesh)
    score_fn = jax.jit(functools.partial(score_step, model=model))
    writer = metrics.MetricsWriter(stage_dir)
    print(f"[{name}] {mcfg.n_layers}L d{mcfg.d_model}, lr {lr:.2e}, {how}", flush=True)
    weight = _pair_weights(cfg)
    eval_fn = lambda params, _: _eval_metrics(score_pairs(score_fn, params, held, tok, cfg, mesh))  # noqa
    try:
        with sharding.activate(mesh):
            st = trainer.train_loop(
                name, cfg, st, step_fn, lambda _: weight(next(it)),
                lambda _: {"iterator": it.get_state()}, ckpts, writer, mesh, total_steps,
                evaluate=eval_fn, real_tokens=_real_tokens)
            report = score_pairs(score_fn, st.params, held, tok, cfg, mesh)
    finally:
        ckpts.close()
    writer.write(int(st.step), _eval_metrics(report))
    writer.close()
    return _finish(cfg, stage_dir, st, mcfg, report, data_report, len(held))


def _pair_weights(cfg: ConfigDict):
    """λ-weighting of harmless pairs (PAPER.md §5.1: L = L_help + λ·L_harm)."""
    def apply(batch):
        harmless = np.asarray([s == "harmless-base" for s in batch["subset_B"]])
        batch["weight_B"] = batch["weight_B"] * np.where(harmless, cfg.harmless_weight, 1.0
                                                         ).astype(np.float32)
        return batch
    return apply


def _real_tokens(batch) -> float:
    live = batch["weight_B"] > 0
    return float((batch["chosen_len_B"] + batch["rejected_len_B"])[live].sum())


def _eval_metrics(report: dict) -> dict:
    out = {"eval/accuracy": report["overall"]["accuracy"],
           "eval/ece": report["calibration"]["ece"],
           "eval/longer_wins": report["overall"]["longer_wins"]}
    out.update({f"eval/accuracy/{s}": r["accuracy"] for s, r in report["per_subset"].items()})
    return out


def _finish(cfg, stage_dir, st, mcfg, report, data_report, n_held) -> dict:
    name = os.path.basename(os.path.normpath(stage_dir))
    export_dir = os.path.join(stage_dir, "params")
    if registry.is_pretrained(cfg.get("init_from", "")):
        tok_name = cfg.init_from  # load_tokenizer resolves the name / file again
    elif cfg.get("init_from"):
        tok_name = checkpoint.copy_tokenizer(cfg.init_from, export_dir)
    else:
        tok_name = cfg.tokenizer
    checkpoint.export_params(export_dir, st.params, {
        "stage": cfg.stage, "step": int(st.step), "model": dataclasses.asdict(mcfg),
        "tokenizer": tok_name, "scores": report["scores"], "max_len": cfg.max_len,
        "pair_layout": cfg.get("pair_layout", "shared")})
    table = pm_accuracy.format_table(report, f"[{name}] held-out HH accuracy ({n_held} pairs)")
    print(table, flush=True)
    pm_accuracy.reliability_plot(report, os.path.join(stage_dir, "calibration.png"),
                              f"{name}: held-out HH pairs")
    summary = {**_eval_metrics(report), "report": report, "steps": int(st.step),
               "data": data_report, "heldout_pairs": n_held}
    metrics.write_summary(stage_dir, summary)
    return summary


def eval_export(params_dir: str, files: list[str], out_dir: str, *, skip_invalid: bool = False,
                batch_size: int = 32, max_len: int | None = None, mesh_shape=(-1, 1, 1)) -> dict:
    """`hh-jax eval pm`: scores any HH-format jsonl(.gz) files with a PM export."""
    meta = checkpoint.read_meta(params_dir)
    if meta.get("stage") not in ("pm", "pmp"):
        raise ValueError(f"{params_dir}: a {meta.get('stage')!r} export, not a PM")
    mcfg = ModelConfig(**meta["model"])
    tok = load_tokenizer(checkpoint.tokenizer_spec(params_dir))
    comps, report = hh.load_hh_comparisons(files, skip_invalid=skip_invalid)
    mesh = sharding.make_mesh(mesh_shape)
    model, head = Transformer(mcfg), ScalarHead(mcfg.d_model, use_bias=False)
    boxed = lambda: {"backbone": model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)),  # noqa
                     "head": head.init(jax.random.key(0), jnp.zeros((2, mcfg.d_model)))}
    abstract, p_sh = state.param_shardings(boxed, mesh)
    params = checkpoint.import_params(params_dir,
                                      checkpoint.abstract_with_shardings(abstract, p_sh))
    cfg = ConfigDict({"max_len": max_len or meta.get("max_len", 512),
                      "eval_batch_size": batch_size,
                      "pair_layout": meta.get("pair_layout", "shared")})
    with sharding.activate(mesh):
        rep = score_pairs(jax.jit(functools.partial(score_step, model=model)), params, comps,
                          tok, cfg, mesh)
    print(pm_accuracy.format_table(rep, f"PM {params_dir} on {len(comps)} pairs"), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    pm_accuracy.reliability_plot(rep, os.path.join(out_dir, "calibration.png"), params_dir)
    summary = {**_eval_metrics(rep), "report": rep, "files": [str(f) for f in files],
               "data": report.total.to_json()}
    metrics.write_summary(out_dir, summary)
    return summary
