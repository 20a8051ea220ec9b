"""Stages `pmp` and `pm`: preference models (PAPER.md §3–4) with one code path.

The PM's functions are hh_jax.reward's. Loss: Bradley–Terry, log(1 + exp(r_bad − r_good))
(eq. 4.2), weighted λ on harmless-subset pairs (§5.1), plus an optional LM term. Held-out
accuracy, calibration and the report: hh_jax.evals.pm_accuracy.
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

from hh_jax import (checkpoint, losses, metrics, pm_cache, pm_top, reward, sharding, state, trainer,
                    trunk)
from hh_jax.data import hh, loaders, stackexchange
from hh_jax.evals import pm_accuracy, pm_probe
from hh_jax.model import SIZES, ModelConfig, Transformer
from hh_jax.optim import make_optimizer
from hh_jax.policy import Frozen
from hh_jax.pretrained import convert, registry
from hh_jax.tokenizer import load_tokenizer


def pm_loss(params, batch, model: Transformer, lm_coef: float):
    r_good_B, r_bad_B, logits, chosen_BxL = reward.pair_scores(params, batch, model=model,
                                                               with_logits=lm_coef > 0)
    w_B = batch["weight_B"]
    loss = reward.bradley_terry(r_good_B, r_bad_B, w_B)
    aux = {"train/bt_loss": loss, **reward.pair_metrics(r_good_B, r_bad_B, w_B)}
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


def pair_batches(cfg: ConfigDict, tok) -> tuple:
    """(grain pair batches of every epoch, steps, the data report): each epoch in a fresh
    length-grouped order."""
    comps, data_report = load_comparisons(cfg.data)
    lengths = reward.pair_row_lengths(comps, tok, cfg.max_len, cfg.get("pair_layout", "shared"))
    ordered = []
    for epoch in range(cfg.epochs):
        ordered += length_grouped(comps, lengths, cfg.batch_size, cfg.seed + epoch)
    ds = loaders.pm_dataset(ordered, tok, max_len=cfg.max_len, global_batch=cfg.batch_size,
                            seed=cfg.seed, shuffle=False, drop_remainder=True,
                            buckets=tuple(cfg.get("buckets", ()) or ()) or None,
                            layout=cfg.get("pair_layout", "shared"))
    return ds, len(comps) // cfg.batch_size * cfg.epochs, data_report


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs a `pmp` or `pm` stage into `stage_dir`; returns its summary."""
    name = os.path.basename(os.path.normpath(stage_dir))
    os.makedirs(stage_dir, exist_ok=True)
    mcfg, tok, init_stage = _model_and_tokenizer(cfg)
    ds, total_steps, data_report = pair_batches(cfg, tok)
    held = heldout_pairs(cfg.eval)
    print(f"[{name}] {data_report['used']} training pairs ({data_report}), {total_steps} steps; "
          f"{len(held)} held-out HH pairs", flush=True)
    mesh = sharding.make_mesh(cfg.mesh)
    model = Transformer(mcfg)
    lr = cfg.base_lr * cfg.lr_ratio  # PAPER.md §3: PMP 0.1×, finetune 0.01× the LM's LR
    optimizer = make_optimizer(cfg.optim, total_steps, lr=lr)
    boxed_init = reward.pm_init(model, cfg.seed)
    head_init = reward.head_init(mcfg.d_model, cfg.seed + 1)
    _, p_sh = state.param_shardings(boxed_init, mesh)
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(
        cfg, stage_dir, boxed_init, optimizer, mesh,
        _loader_from(init_stage, lambda: nn.unbox(head_init()), p_sh["head"]))
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state["iterator"])
    step_fn = trainer.jit_train_step(functools.partial(
        train_step, model=model, optimizer=optimizer, lm_coef=cfg.lm_coef), st_sh, mesh)
    score_fn = jax.jit(functools.partial(reward.score_step, model=model))
    print(f"[{name}] {mcfg.n_layers}L d{mcfg.d_model}, lr {lr:.2e}, {how}", flush=True)
    st, report = _train(cfg, stage_dir, st, step_fn, lambda: next(it),
                        lambda: {"iterator": it.get_state()}, ckpts, mesh, total_steps,
                        lambda params: pm_accuracy.evaluate_pairs(score_fn, params, held, tok,
                                                                  cfg, mesh))
    return _finish(cfg, stage_dir, int(st.step), st.params, mcfg, report, data_report, len(held))


def _train(cfg: ConfigDict, stage_dir: str, st, step_fn, next_batch, data_state, ckpts, mesh,
           total_steps: int, heldout) -> tuple:
    """trainer.train_loop over λ-weighted pair batches, then the held-out report of the
    final params (`heldout(params)`); returns (state, report)."""
    name = os.path.basename(os.path.normpath(stage_dir))
    weight = _pair_weights(cfg)
    writer = metrics.MetricsWriter(stage_dir)
    try:
        with sharding.activate(mesh):
            st = trainer.train_loop(
                name, cfg, st, step_fn, lambda _: weight(next_batch()),
                lambda _: data_state(), ckpts, writer, mesh, total_steps,
                evaluate=lambda s, _: pm_accuracy.eval_metrics(heldout(s.params)),
                real_tokens=_real_tokens)
            report = heldout(st.params)
    finally:
        ckpts.close()
    writer.write(int(st.step), pm_accuracy.eval_metrics(report))
    writer.close()
    return st, report


def train_frozen_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Stage `pm_frozen`: the PM finetuned above a frozen trunk (hh_jax/pm_top.py).

    The trunk (layers below `frozen_layers`) runs once per pair into a cache on disk
    (hh_jax/pm_cache.py; `cache_dir`, shared by stages: a cache holding every pair of the
    same trunk and settings is reused); each step then trains the top layers, the final
    norm and the head on cached activations. Held-out pairs are scored the same way.
    The export is an ordinary PM export (trunk + trained top + head). Same config as `pm`
    plus `frozen_layers` and `cache_dir`; `init_from` must be an LM export (e.g. `base`).
    `probe_layers` (1-based) adds a linear preference probe of the frozen model per layer
    (hh_jax/evals/pm_probe.py) to the summary and probes.png.
    """
    name = os.path.basename(os.path.normpath(stage_dir))
    os.makedirs(stage_dir, exist_ok=True)
    mcfg, tok, lm_params = _frozen_start(cfg, name)
    comps, data_report = load_comparisons(cfg.data)
    held = heldout_pairs(cfg.eval)
    kw = dict(max_len=cfg.max_len, n_frozen=cfg.frozen_layers)
    cache, rows = pm_cache.find_or_build(cfg.cache_dir, f"pairs_{len(comps)}_{cfg.max_len}",
                                         comps, tok, mcfg, lm_params, **kw)
    hcache, hrows = pm_cache.find_or_build(cfg.cache_dir, f"heldout_{len(held)}_{cfg.max_len}",
                                           held, tok, mcfg, lm_params, **kw)
    if cfg.get("read_layers"):
        return _head_only(cfg, stage_dir, mcfg, lm_params, (comps, cache, rows),
                          (held, hcache, hrows), data_report)
    order = []
    for epoch in range(cfg.epochs):  # one fresh length-grouped order per epoch
        order += length_grouped(list(rows), cache["lengths"][rows], cfg.batch_size,
                                cfg.seed + epoch)
    batches = pm_top.CacheBatches(cache, order, cfg.batch_size)
    print(f"[{name}] {len(rows)} training pairs ({data_report}), {len(batches)} steps, top "
          f"{mcfg.n_layers - cfg.frozen_layers} of {mcfg.n_layers} layers trained; "
          f"{len(held)} held-out HH pairs", flush=True)
    mesh = sharding.make_mesh(cfg.mesh)
    boxed_top = lambda: pm_top.split_params(  # noqa: E731
        reward.pm_init(Transformer(mcfg), cfg.seed)(), cfg.frozen_layers)[1]
    frozen, top0 = pm_top.split_params({"backbone": lm_params, "head": jax.device_get(
        nn.unbox(reward.head_init(mcfg.d_model, cfg.seed + 1)()))}, cfg.frozen_layers)
    lr = cfg.base_lr * cfg.lr_ratio
    optimizer = make_optimizer(cfg.optim, len(batches), lr=lr)
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(
        cfg, stage_dir, boxed_top, optimizer, mesh, lambda _, target: jax.tree_util.tree_map(
            lambda x, t: jax.device_put(x, t.sharding), top0, target))
    if data_state is not None:
        batches.set_state(data_state["iterator"])
    step_fn = trainer.jit_train_step(functools.partial(
        pm_top.train_step, cfg=mcfg, optimizer=optimizer, bradley_terry=reward.bradley_terry),
        st_sh, mesh)
    score_fn = jax.jit(functools.partial(pm_top.pair_scores, cfg=mcfg))
    print(f"[{name}] {mcfg.n_layers}L d{mcfg.d_model}, lr {lr:.2e}, {how}", flush=True)
    st, report = _train(cfg, stage_dir, st, step_fn, batches.next,
                        lambda: {"iterator": batches.get_state()}, ckpts, mesh, len(batches),
                        lambda top: pm_accuracy.comparisons_report(
                            held, *pm_top.score_cache(score_fn, top, hcache, hrows)))
    extra = {"frozen_layers": cfg.frozen_layers, "cache": cache["meta"],
             **_probes(cfg, stage_dir, (cache, rows), (hcache, hrows), report)}
    return _finish(cfg, stage_dir, int(st.step), pm_top.join_params(frozen, jax.device_get(
        st.params)), mcfg, report, data_report, len(held), extra=extra)


def _head_only(cfg: ConfigDict, stage_dir: str, mcfg: ModelConfig, lm_params, train: tuple,
               held: tuple, data_report: dict) -> dict:
    """`pm_frozen` with `read_layers`: no layer trained, only the reward head. The PM is
    the pretrained model's first l layers + its final norm + a linear head, l among
    `read_layers` (1-based) and the L2 strength among `l2_grid` picked by 5-fold
    cross-validation on the train pairs (pm_probe.select_head: the exact BT MLE, on the
    cache's per-layer reads). Deterministic and seconds long: no checkpoints."""
    name = os.path.basename(os.path.normpath(stage_dir))
    (comps, cache, rows), (held_comps, hcache, hrows) = train, held
    norm = jax.jit(lambda h: trunk.final_norm(mcfg, lm_params["params"]["final_norm"], h))

    def feats(reads, rws, layer):  # final_norm(h_l) at the chosen and rejected read tokens
        h = np.asarray(reads[np.asarray(rws), :, layer - 1], np.float32)
        return np.asarray(norm(h), np.float64)

    def diffs(layer):
        f = feats(cache["reads_Px2xNxD"], rows, layer)
        return f[:, 0] - f[:, 1]

    harmless = np.asarray([c.subset == "harmless-base" for c in comps])
    head = pm_probe.select_head(diffs, list(cfg.read_layers), len(rows),
                                l2_grid=tuple(cfg.get("l2_grid", (0.01, 0.03, 0.1))),
                                weight_P=np.where(harmless, cfg.harmless_weight, 1.0),
                                seed=cfg.seed)
    layer, w_D = head["layer"], head["w_D"]
    print(f"[{name}] head only: layer {layer} of {mcfg.n_layers}, L2 {head['l2_per_pair']} "
          "per pair (5-fold CV on train pairs: " + ", ".join(
              f"{r['layer']}/{r['l2_per_pair']}: {r['accuracy']:.3f}" for r in head["cv"]) + ")",
          flush=True)
    r_Px2 = feats(hcache["reads_Px2xNxD"], hrows, layer) @ w_D
    report = pm_accuracy.comparisons_report(held_comps, r_Px2[:, 0], r_Px2[:, 1])
    p = lm_params["params"]
    backbone = {**p, "layers": trunk.layer_slice(p["layers"], 0, layer)}
    params = {"backbone": {"params": backbone},
              "head": {"params": {"kernel": np.asarray(w_D, np.float32)}}}
    extra = {"frozen_layers": layer, "cache": cache["meta"],
             "head_only": {k: v for k, v in head.items() if k != "w_D"},
             **_probes(cfg, stage_dir, (cache, rows), (hcache, hrows), report)}
    return _finish(cfg, stage_dir, 0, params, mcfg.replace(n_layers=layer), report,
                   data_report, len(held_comps), extra=extra)


def _frozen_start(cfg: ConfigDict, name: str) -> tuple:
    """(model config, tokenizer, host params) of the LM export a frozen-trunk PM starts from."""
    if jax.process_count() > 1:
        raise NotImplementedError("pm_frozen runs on one process (its cache is local)")
    lm = Frozen(cfg.init_from, None, None, dict(cfg.get("model_overrides", {}) or {}))
    if lm.meta.get("stage") != "lm":
        raise ValueError(f"{name}.init_from {cfg.init_from}: a {lm.meta.get('stage')!r} export; "
                         "the frozen-trunk PM starts from an LM export (e.g. the base stage's)")
    tok = load_tokenizer(checkpoint.tokenizer_spec(cfg.init_from))
    return lm.cfg, tok, jax.device_get(lm.params)


def _probes(cfg: ConfigDict, stage_dir: str, train: tuple, held: tuple, report: dict) -> dict:
    """{"probes": ...}: linear probes of the frozen model's layers `cfg.probe_layers`
    (1-based) beside the PM, plotted in probes.png; {} without probe_layers."""
    if not cfg.get("probe_layers"):
        return {}
    name = os.path.basename(os.path.normpath(stage_dir))
    (cache, rows), (hcache, hrows) = train, held
    probes = pm_probe.layer_probes(cache["reads_Px2xNxD"], rows, hcache["reads_Px2xNxD"], hrows,
                                   [layer - 1 for layer in cfg.probe_layers])
    pm_probe.plot(probes, os.path.join(stage_dir, "probes.png"),
                  f"{name}: linear probes of the frozen model (held-out pairs)",
                  report["overall"]["longer_wins"], report["overall"]["accuracy"])
    print(f"[{name}] probe accuracy by layer: " + ", ".join(
        f"{r['layer']}: {r['accuracy']:.3f}" for r in probes["layers"]), flush=True)
    return {"probes": probes}


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


def _finish(cfg, stage_dir, step: int, params, mcfg, report, data_report, n_held,
            extra: dict | None = None) -> dict:
    name = os.path.basename(os.path.normpath(stage_dir))
    export_dir = os.path.join(stage_dir, "params")
    if registry.is_pretrained(cfg.get("init_from", "")):
        tok_name = cfg.init_from  # load_tokenizer resolves the name / file again
    elif cfg.get("init_from"):
        tok_name = checkpoint.copy_tokenizer(cfg.init_from, export_dir)
    else:
        tok_name = cfg.tokenizer
    checkpoint.export_params(export_dir, params, {
        "stage": "pm" if cfg.stage == "pm_frozen" else cfg.stage, "step": step,
        "model": dataclasses.asdict(mcfg),
        "tokenizer": tok_name, "scores": report["scores"], "max_len": cfg.max_len,
        "pair_layout": cfg.get("pair_layout", "shared")})
    table = pm_accuracy.format_table(report, f"[{name}] held-out HH accuracy ({n_held} pairs)")
    print(table, flush=True)
    pm_accuracy.reliability_plot(report, os.path.join(stage_dir, "calibration.png"),
                              f"{name}: held-out HH pairs")
    summary = {**pm_accuracy.eval_metrics(report), "report": report, "steps": step,
               "data": data_report, "heldout_pairs": n_held, **(extra or {})}
    metrics.write_summary(stage_dir, summary)
    return summary
