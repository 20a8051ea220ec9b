"""Stage `lm`: next-token training (pretraining from scratch / SFT) with held-out perplexity.

Pure step functions at module level, jitted once with explicit shardings and a donated
state; the loop around them does data, logging, checkpoints and evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from hh_jax import checkpoint, losses, metrics, sharding, state, trainer
from hh_jax.data import loaders
from hh_jax.model import SIZES, ModelConfig, Transformer
from hh_jax.optim import make_optimizer
from hh_jax.tokenizer import unigram_perplexity


def model_config(cfg: ConfigDict, vocab_size: int) -> ModelConfig:
    """The SIZES entry named by `cfg.model`, with `cfg.model_overrides` applied."""
    if cfg.model not in SIZES:
        raise ValueError(f"unknown model size {cfg.model!r}; known: {sorted(SIZES)}")
    overrides = dict(cfg.get("model_overrides", {}) or {})
    return SIZES[cfg.model].replace(vocab_size=vocab_size, **overrides)


def _forward(params, batch, model: Transformer):
    """Packed rows carry segment ids and per-document positions: documents stay apart."""
    return model.apply(params, batch["tokens_BxL"], mask_BxL=batch["mask_BxL"],
                       segment_ids_BxL=batch.get("segment_ids_BxL"),
                       positions_BxL=batch.get("positions_BxL"))


def lm_loss(params, batch, model: Transformer):
    out = _forward(params, batch, model)
    nll, count = losses.next_token_xent(out["logits_BxLxV"], batch["tokens_BxL"],
                                        batch["weights_BxL"])
    return nll / jnp.maximum(count, 1.0), count


def train_step(st: state.TrainState, batch, *, model: Transformer,
               optimizer: optax.GradientTransformation):
    """One optimizer step on the mean next-token loss of the global batch."""
    (loss, count), grads = jax.value_and_grad(lm_loss, has_aux=True)(st.params, batch, model)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    out = {"train/loss": loss, "train/tokens": count, "train/grad_norm": optax.global_norm(grads)}
    return st.replace(step=st.step + 1, params=params, opt_state=opt_state), out


def eval_step(params, batch, *, model: Transformer):
    """(summed NLL, scored tokens) of a batch: summed so eval averages exactly."""
    out = _forward(params, batch, model)
    return losses.next_token_xent(out["logits_BxLxV"], batch["tokens_BxL"], batch["weights_BxL"])


def evaluate(eval_fn, params, batches: list[dict], mesh) -> dict:
    nll, count = 0.0, 0.0
    for batch in batches:
        s, c = eval_fn(params, sharding.put_batch(batch, mesh))
        nll, count = nll + float(s), count + float(c)
    loss = nll / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/tokens": count}


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs the LM stage into `stage_dir`; returns its summary."""
    os.makedirs(stage_dir, exist_ok=True)
    texts, data_report, tok = _texts_and_tokenizer(cfg, stage_dir)
    train_ds = loaders.lm_dataset(texts["train"], tok, seq_len=cfg.seq_len,
                                  global_batch=cfg.batch_size, seed=cfg.seed)
    eval_batches = [loaders.lm_inputs(b) for b in loaders.heldout_batches(
        texts["heldout"], tok, seq_len=cfg.seq_len, global_batch=cfg.batch_size,
        max_tokens=cfg.eval_tokens)]
    mesh = sharding.make_mesh(cfg.mesh)
    mcfg = model_config(cfg, tok.vocab_size)
    model = Transformer(mcfg)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(
        cfg, stage_dir, state.lm_init(model, cfg.seed), optimizer, mesh)
    it = iter(train_ds)
    if data_state is not None:  # the grain iterator's position, saved with the model
        it.set_state(data_state["iterator"])
    step_fn = trainer.jit_train_step(
        functools.partial(train_step, model=model, optimizer=optimizer), st_sh, mesh)
    eval_fn = jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(st_sh.params, sharding.batch_sharding(mesh)))
    writer = metrics.MetricsWriter(stage_dir)
    print(f"[lm] {mcfg.n_layers}L d{mcfg.d_model} vocab {mcfg.vocab_size}, packed rows of "
          f"{cfg.seq_len}, {how}", flush=True)
    try:
        with sharding.activate(mesh):
            st = trainer.train_loop(
                "lm", cfg, st, step_fn, lambda _: loaders.lm_inputs(next(it)),
                lambda _: {"iterator": it.get_state()}, ckpts, writer, mesh, cfg.steps,
                real_tokens=lambda b: float(b["weights_BxL"].sum()),
                evaluate=lambda s, _: evaluate(eval_fn, s.params, eval_batches, mesh))
            final = evaluate(eval_fn, st.params, eval_batches, mesh)
    finally:  # also on NaN / Ctrl-C: let in-flight saves of good checkpoints commit
        ckpts.close()
    writer.write(int(st.step), final)
    writer.close()
    return _finish(cfg, stage_dir, st, mcfg, tok, texts, eval_batches, final, data_report)


def _texts_and_tokenizer(cfg: ConfigDict, stage_dir: str) -> tuple:
    """(train / held-out dialogues, the data report, the tokenizer)."""
    texts, data_report = loaders.dialogue_texts(cfg.data.hh_dir, list(cfg.data.subsets) or None,
                                                cfg.data.skip_invalid)
    print(f"[lm] data: {data_report['comparisons']} comparisons of {data_report['rows']} rows; "
          f"skipped by reason: {data_report['skipped'] or 'none'}; dialogues "
          f"{len(texts['train'])} train / {len(texts['heldout'])} held-out", flush=True)
    tok = loaders.get_tokenizer(cfg.tokenizer.kind, texts["train"], stage_dir,
                                cfg.tokenizer.vocab_size, cfg.seed)
    return texts, data_report, tok


def _finish(cfg, stage_dir, st, mcfg, tok, texts, eval_batches, final, data_report) -> dict:
    # the training stream as the LM sees it (each document ends with EOS, a scored target)
    train_ids = [np.append(ids, tok.eos_id) for ids in loaders.encode_all(tok, texts["train"])]
    # the tokens the LM is scored on: every weighted target (not a document's first token)
    eval_ids = [b["tokens_BxL"][:, 1:][b["weights_BxL"][:, 1:] > 0] for b in eval_batches]
    unigram = unigram_perplexity(train_ids, eval_ids, tok.vocab_size)
    export_dir = os.path.join(stage_dir, "params")
    checkpoint.export_params(export_dir, st.params, {
        "stage": "lm", "step": int(st.step), "model": dataclasses.asdict(mcfg),
        "tokenizer": _export_tokenizer(cfg, tok, export_dir)})
    summary = {**final, "eval/unigram_perplexity": unigram, "steps": int(st.step),
               "params": int(sum(x.size for x in jax.tree_util.tree_leaves(st.params))),
               "train_dialogues": len(texts["train"]), "eval_batches": len(eval_batches),
               "data": data_report}
    metrics.write_summary(stage_dir, summary)
    print(f"[lm] held-out perplexity {final['eval/perplexity']:.2f} "
          f"(unigram {unigram:.2f}) after {int(st.step)} steps", flush=True)
    return summary


def _export_tokenizer(cfg: ConfigDict, tok, export_dir: str) -> str:
    """Copies a trained tokenizer beside the params so the export is self-contained."""
    path = getattr(tok, "path", None)
    if path is None:
        return cfg.tokenizer.kind
    dest = os.path.join(export_dir, "tokenizer.model")
    if jax.process_index() == 0:
        os.makedirs(export_dir, exist_ok=True)
        shutil.copyfile(path, dest)
    return "tokenizer.model"
