"""Stage `distill`: context distillation of an HHH prompt into the weights → π0.

PAPER.md §5 [P A.1]: the teacher is the LM with an HHH prompt prepended; the student, which
sees the text without the prompt, is trained to match the teacher's next-token distribution
reduced to its top-k tokens plus one "rest" bucket (top-50: a 51-way distribution), with LR
0.05× the pretraining LR decayed linearly to 0. Teacher and student start from the same LM
export; the teacher is frozen (a separate jit argument, never in the optimizer).

The prompt is prefilled once into a KV cache (batch 1, broadcast to the batch), so it costs
nothing per step: the teacher runs on the text only, its positions continuing after the
prompt; the student runs on the same text from position 0.

Shapes in names: B batch, L length, K top-k, V vocab, Q prompt, S cache slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import xlogy
from ml_collections import ConfigDict

from hh_jax import checkpoint, losses, metrics, sharding, state, trainer
from hh_jax.data import hh, loaders
from hh_jax.model import ModelConfig, Transformer, init_cache
from hh_jax.optim import make_optimizer
from hh_jax.tokenizer import load_tokenizer

DEFAULT_PROMPT = os.path.join(hh.PROMPTS_DIR, "hhh_prompt.txt")
# A finite "-inf" for masked logits: with k == V the rest bucket is empty, and logsumexp
# over all -inf would give NaN gradients; over -1e30 it gives a finite -1e30 (mass 0).
_MASKED = -1e30


# ------------------------------------------------------------------------------ the loss
def _logsumexp_except(logits_BxLxV: jax.Array, ids_BxLxK: jax.Array) -> jax.Array:
    """log Σ_{v ∉ ids} exp(logit_v): the rest bucket's (unnormalised) log mass, computed
    directly rather than as log(1 − Σ_k p_k), which cancels when the top-k hold ~all mass."""
    masked_BxLxV = jnp.put_along_axis(logits_BxLxV, ids_BxLxK, _MASKED, axis=-1, inplace=False)
    return jax.nn.logsumexp(masked_BxLxV, axis=-1)


def topk_rest_targets(teacher_logits_BxLxV: jax.Array, k: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The teacher's top-k + rest distribution: (ids_BxLxK, probs_BxLxK, rest_BxL).

    probs are the teacher's full-softmax probabilities of its k most likely tokens and
    rest = 1 − Σ probs (computed stably), so Σ probs + rest = 1 at every position.
    """
    logits_BxLxV = teacher_logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    top_BxLxK, ids_BxLxK = jax.lax.top_k(logits_BxLxV, k)
    probs_BxLxK = jnp.exp(top_BxLxK - lse_BxL[..., None])
    rest_BxL = jnp.exp(_logsumexp_except(logits_BxLxV, ids_BxLxK) - lse_BxL)
    return ids_BxLxK, probs_BxLxK, rest_BxL


def topk_rest_logprobs(logits_BxLxV: jax.Array, ids_BxLxK: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(log q_BxLxK, log q_rest_BxL): a model's distribution on the same k + 1 buckets."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    top_BxLxK = jnp.take_along_axis(logits_BxLxV, ids_BxLxK, axis=-1) - lse_BxL[..., None]
    return top_BxLxK, _logsumexp_except(logits_BxLxV, ids_BxLxK) - lse_BxL


def distill_kl_BxL(student_logits_BxLxV, ids_BxLxK, probs_BxLxK, rest_BxL) -> jax.Array:
    """KL(teacher_{k+rest} ‖ student_{k+rest}) at every position (PAPER.md §5)."""
    logq_BxLxK, logq_rest_BxL = topk_rest_logprobs(student_logits_BxLxV, ids_BxLxK)
    top_BxL = (xlogy(probs_BxLxK, probs_BxLxK) - probs_BxLxK * logq_BxLxK).sum(axis=-1)
    return top_BxL + xlogy(rest_BxL, rest_BxL) - rest_BxL * logq_rest_BxL


def distill_loss(student_logits_BxLxV, ids_BxLxK, probs_BxLxK, rest_BxL, weights_BxL
                 ) -> jax.Array:
    """The per-position KL averaged over positions weighted by `weights_BxL`.

    Position t is the distribution over token t+1 given tokens ≤ t; unlike the next-token
    loss it needs no label, so the last position of a window counts too.
    """
    w_BxL = weights_BxL.astype(jnp.float32)
    kl_BxL = distill_kl_BxL(student_logits_BxLxV, ids_BxLxK, probs_BxLxK, rest_BxL)
    return (kl_BxL * w_BxL).sum() / jnp.maximum(w_BxL.sum(), 1.0)


# ------------------------------------------------------------------------------ the teacher
def prefill_prompt(teacher_params, prompt_1xQ: jax.Array, *, model: Transformer, text_len: int
                   ) -> dict:
    """A batch-1 KV cache holding the prompt, with `text_len` free slots after it (S = Q + L).

    An empty prompt gives an empty cache: the teacher then equals the plain model.
    """
    q = prompt_1xQ.shape[1]
    cache = init_cache(model.cfg, 1, q + text_len)
    if q == 0:
        return cache
    out = model.apply(teacher_params, prompt_1xQ, positions_BxL=jnp.arange(q)[None],
                      cache=cache, kv_valid_BxS=jnp.ones((1, q + text_len), bool))
    return out["cache"]


def teacher_logits(teacher_params, tokens_BxL: jax.Array, prompt_cache: dict, *,
                   model: Transformer) -> jax.Array:
    """The teacher's logits_BxLxV on the text, reading it after the cached prompt."""
    b, length = tokens_BxL.shape
    n, _, s, g, kd = prompt_cache["k"].shape
    if s < length:
        raise ValueError(f"prompt cache has {s} slots, fewer than the text length {length}")
    cache = {"k": jnp.broadcast_to(prompt_cache["k"], (n, b, s, g, kd)),
             "v": jnp.broadcast_to(prompt_cache["v"], (n, b, s, g, kd)),
             "index": prompt_cache["index"]}
    positions_BxL = jnp.broadcast_to(prompt_cache["index"] + jnp.arange(length), (b, length))
    out = model.apply(teacher_params, tokens_BxL, positions_BxL=positions_BxL, cache=cache,
                      kv_valid_BxS=jnp.ones((b, s), bool))
    return out["logits_BxLxV"]


# ------------------------------------------------------------------------------ steps
def train_step(st: state.TrainState, batch, teacher_params, prompt_cache, *, model: Transformer,
               optimizer: optax.GradientTransformation, k: int,
               teacher_model: Transformer | None = None):
    """One optimizer step of the student on the top-k + rest KL to the prompted teacher."""
    t_logits = teacher_logits(teacher_params, batch["tokens_BxL"], prompt_cache,
                              model=teacher_model or model)
    ids, probs, rest = jax.lax.stop_gradient(topk_rest_targets(t_logits, k))

    def objective(params):
        out = model.apply(params, batch["tokens_BxL"], mask_BxL=batch["mask_BxL"])
        return distill_loss(out["logits_BxLxV"], ids, probs, rest, batch["weights_BxL"])

    loss, grads = jax.value_and_grad(objective)(st.params)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    w = batch["weights_BxL"].astype(jnp.float32)
    out = {"train/loss": loss, "train/positions": w.sum(),
           "train/grad_norm": optax.global_norm(grads),
           "train/teacher_rest_mass": (rest * w).sum() / jnp.maximum(w.sum(), 1.0)}
    return st.replace(step=st.step + 1, params=params, opt_state=opt_state), out


def eval_step(params, teacher_params, prompt_cache, batch, *, model: Transformer,
              teacher_model: Transformer, k: int) -> dict:
    """Sums over a batch: the KL, the student's and the prompted teacher's next-token NLL."""
    tokens, w = batch["tokens_BxL"], batch["weights_BxL"].astype(jnp.float32)
    t_logits = teacher_logits(teacher_params, tokens, prompt_cache, model=teacher_model)
    s_logits = model.apply(params, tokens, mask_BxL=batch["mask_BxL"])["logits_BxLxV"]
    kl_BxL = distill_kl_BxL(s_logits, *topk_rest_targets(t_logits, k))
    nll, count = losses.next_token_xent(s_logits, tokens, w)
    t_nll, _ = losses.next_token_xent(t_logits, tokens, w)
    return {"kl": (kl_BxL * w).sum(), "positions": w.sum(), "nll": nll, "tokens": count,
            "teacher_nll": t_nll}


def evaluate(eval_fn, params, windows_NxL: np.ndarray, batch_size: int, mesh) -> dict:
    """Held-out distillation KL and perplexities over fixed windows (exact averages), every
    window scored: the last batch is filled up with weight-0 copies (one batch shape)."""
    sums: dict[str, float] = {}
    for i in range(0, len(windows_NxL), batch_size):
        tokens = windows_NxL[i:i + batch_size]
        weights = np.ones_like(tokens, np.float32)
        if len(tokens) < batch_size:
            fill = batch_size - len(tokens)
            tokens = np.concatenate([tokens, windows_NxL[:fill]])
            weights = np.concatenate([weights, np.zeros_like(windows_NxL[:fill], np.float32)])
        out = eval_fn(params, sharding.put_batch(
            {"tokens_BxL": tokens, "mask_BxL": np.ones_like(tokens, bool),
             "weights_BxL": weights}, mesh))
        for name, v in out.items():
            sums[name] = sums.get(name, 0.0) + float(v)
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    t_loss = sums["teacher_nll"] / max(sums["tokens"], 1.0)
    return {"eval/distill_kl": sums["kl"] / max(sums["positions"], 1.0),
            "eval/loss": loss, "eval/perplexity": math.exp(loss),
            "eval/teacher_loss": t_loss, "eval/teacher_perplexity": math.exp(t_loss),
            "eval/tokens": sums["tokens"]}


# ------------------------------------------------------------------------------ the stage
def load_prompt(path: str) -> str:
    """A prompt file's text, verbatim but for trailing whitespace; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().rstrip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the prompt file is not UTF-8 text ({e})") from e
    if not text:
        raise ValueError(f"{path}: the prompt file is empty (the teacher would equal the "
                         f"student and there would be nothing to distill)")
    return text


def _models(cfg: ConfigDict):
    """Student and teacher model configs, the tokenizer, the teacher's path."""
    if not cfg.get("init_from"):
        raise ValueError("distill: init_from must name an LM export (the student's start and, "
                         "unless `teacher` is set, the teacher)")
    teacher = cfg.get("teacher") or cfg.init_from
    s_meta, t_meta = checkpoint.read_meta(cfg.init_from), checkpoint.read_meta(teacher)
    # compute-only overrides (dtype, remat, attention_impl) apply to both models
    overrides = dict(cfg.get("model_overrides", {}) or {})
    mcfg = ModelConfig(**s_meta["model"]).replace(**overrides)
    tmcfg = ModelConfig(**t_meta["model"]).replace(**overrides)
    s_tok, t_tok = checkpoint.tokenizer_spec(cfg.init_from), checkpoint.tokenizer_spec(teacher)
    if not _same_tokenizer(s_tok, t_tok) or mcfg.vocab_size != tmcfg.vocab_size:
        raise ValueError(f"distill: teacher {teacher} (tokenizer {t_tok}, vocab "
                         f"{tmcfg.vocab_size}) and student {cfg.init_from} (tokenizer {s_tok}, "
                         f"vocab {mcfg.vocab_size}) must share a tokenizer")
    return mcfg, tmcfg, load_tokenizer(s_tok), teacher


def _same_tokenizer(a: str, b: str) -> bool:
    if os.path.isfile(a) and os.path.isfile(b):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    return a == b


def _data(cfg: ConfigDict, tok):
    """Step-indexed train batches, fixed held-out windows, the data report."""
    texts, report = loaders.dialogue_texts(cfg.data.hh_dir, list(cfg.data.subsets) or None,
                                           cfg.data.skip_invalid)
    train = loaders.pack(loaders.encode_all(tok, texts["train"]), tok.eos_id, cfg.seq_len)
    held = loaders.pack(loaders.encode_all(tok, texts["heldout"]), tok.eos_id, cfg.seq_len)
    eval_NxL = loaders.eval_windows(held, cfg.eval_tokens)
    if len(eval_NxL) < cfg.batch_size:
        raise ValueError(f"distill: eval_tokens={cfg.eval_tokens} gives {len(eval_NxL)} "
                         f"held-out windows of {cfg.seq_len}, fewer than batch_size "
                         f"{cfg.batch_size}")
    return loaders.PackedBatches(train, cfg.batch_size, cfg.seed), eval_NxL, report


def _import(path: str, model: Transformer, mesh):
    boxed = lambda: model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))  # noqa: E731
    abstract, p_sh = state.param_shardings(boxed, mesh)
    return checkpoint.import_params(path, checkpoint.abstract_with_shardings(abstract, p_sh)), p_sh


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs the distill stage into `stage_dir`; returns its summary."""
    os.makedirs(stage_dir, exist_ok=True)
    mcfg, tmcfg, tok, teacher_path = _models(cfg)
    prompt_path, prompt_Q = _prompt(cfg, tok, tmcfg)
    batches, eval_NxL, data_report = _data(cfg, tok)
    mesh = sharding.make_mesh(cfg.mesh)
    model, tmodel = Transformer(mcfg), Transformer(tmcfg)
    lr = cfg.base_lr * cfg.lr_ratio  # PAPER.md §5: 0.05× the pretraining LR, linear to 0
    optimizer = make_optimizer(ConfigDict({**cfg.optim.to_dict(), "lr": lr}), cfg.steps)
    boxed_init = lambda: model.init(jax.random.key(cfg.seed),  # noqa: E731
                                    jnp.zeros((2, 8), jnp.int32))
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(cfg, stage_dir, boxed_init,
                                                               optimizer, mesh)
    if data_state is not None:
        batches.check_state(data_state, os.path.join(stage_dir, "checkpoints"))
    teacher_params, t_sh = _import(teacher_path, tmodel, mesh)
    with sharding.activate(mesh):  # the prompt's KV cache, once (batch 1, replicated)
        cache = jax.jit(functools.partial(prefill_prompt, model=tmodel, text_len=cfg.seq_len),
                        out_shardings=sharding.replicated(mesh))(
            teacher_params, jnp.asarray(prompt_Q)[None])
    step, ev = _jit_steps(model, tmodel, optimizer, cfg.top_k, st_sh, t_sh, mesh)
    eval_fn = lambda params, _=None: evaluate(  # noqa: E731
        lambda p, b: ev(p, teacher_params, cache, b), params, eval_NxL, cfg.batch_size, mesh)
    print(f"[distill] {mcfg.n_layers}L d{mcfg.d_model}, teacher {teacher_path}, prompt "
          f"{prompt_path} ({len(prompt_Q)} tokens), top-{cfg.top_k} + rest, lr {lr:.2e}, "
          f"{len(batches.windows_NxL)} train windows of {cfg.seq_len}, {how}", flush=True)
    before = _before(cfg, teacher_path, teacher_params, tmodel, model, eval_fn, mesh)
    writer = metrics.MetricsWriter(stage_dir)
    if int(st.step) == 0:
        writer.write(0, before)
    try:
        with sharding.activate(mesh):
            st = trainer.train_loop(
                "distill", cfg, st, lambda s, b: step(s, b, teacher_params, cache),
                lambda i: batches.batch(i, jax.process_index(), jax.process_count()),
                batches.state, ckpts, writer, mesh, cfg.steps, evaluate=eval_fn,
                real_tokens=lambda b: float(b["weights_BxL"].sum()))
            final = eval_fn(st.params)
    finally:  # also on NaN / Ctrl-C: let in-flight saves of good checkpoints commit
        ckpts.close()
    writer.write(int(st.step), final)
    writer.close()
    return _finish(cfg, stage_dir, st, mcfg, final, before, data_report, dict(
        teacher=teacher_path, prompt_file=prompt_path, prompt_tokens=len(prompt_Q),
        top_k=cfg.top_k, lr=lr, train_windows=len(batches.windows_NxL),
        heldout_windows=len(eval_NxL)))


def _prompt(cfg: ConfigDict, tok, tmcfg: ModelConfig) -> tuple[str, np.ndarray]:
    """The prompt file's path and tokens; checks top_k and warns past the teacher's context."""
    path = cfg.get("prompt_file") or DEFAULT_PROMPT
    prompt_Q = np.asarray(tok.encode(load_prompt(path)), np.int32)
    if not 0 < cfg.top_k <= tmcfg.vocab_size:
        raise ValueError(f"distill: top_k={cfg.top_k} must be in 1..{tmcfg.vocab_size}")
    if len(prompt_Q) + cfg.seq_len > tmcfg.max_len:
        print(f"[distill] warning: prompt {len(prompt_Q)} + text {cfg.seq_len} tokens exceed "
              f"the teacher's context ({tmcfg.max_len}); it reads positions it may not have "
              f"been trained on", flush=True)
    return path, prompt_Q


def _jit_steps(model, tmodel, optimizer, k: int, st_sh, t_sh, mesh):
    """The train step (state donated; teacher params and prompt cache as frozen arguments)
    and the eval step, jitted once with explicit shardings."""
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, k=k,
                                     teacher_model=tmodel),
                   in_shardings=(st_sh, batch_sh, t_sh, repl), out_shardings=(st_sh, None),
                   donate_argnums=0)
    ev = jax.jit(functools.partial(eval_step, model=model, teacher_model=tmodel, k=k),
                 in_shardings=(st_sh.params, t_sh, repl, batch_sh))
    return step, ev


def _before(cfg, teacher_path, teacher_params, tmodel, model, eval_fn, mesh) -> dict:
    """Held-out numbers of the student's starting params (the init_from export): recomputed
    from the export, so a resumed run reports the same ones."""
    if teacher_path == cfg.init_from and tmodel.cfg == model.cfg:
        params = teacher_params
    else:
        params, _ = _import(cfg.init_from, model, mesh)
    with sharding.activate(mesh):
        out = eval_fn(params)
    return {k.replace("eval/", "eval_before/"): v for k, v in out.items()}


def _finish(cfg, stage_dir, st, mcfg, final, before, data_report, info) -> dict:
    export_dir = os.path.join(stage_dir, "params")
    checkpoint.export_params(export_dir, st.params, {
        "stage": "distill", "step": int(st.step), "model": dataclasses.asdict(mcfg),
        "tokenizer": checkpoint.copy_tokenizer(cfg.init_from, export_dir),
        "teacher": info["teacher"], "prompt_file": info["prompt_file"],
        "prompt_tokens": info["prompt_tokens"], "top_k": info["top_k"]})
    summary = {**final, **before, **info, "steps": int(st.step),
               "params": int(sum(x.size for x in jax.tree_util.tree_leaves(st.params))),
               "data": data_report}
    metrics.write_summary(stage_dir, summary)
    print(f"[distill] held-out distill KL {before['eval_before/distill_kl']:.4f} → "
          f"{final['eval/distill_kl']:.4f}; student perplexity "
          f"{before['eval_before/perplexity']:.2f} → {final['eval/perplexity']:.2f} (prompted "
          f"teacher {final['eval/teacher_perplexity']:.2f}) after {int(st.step)} steps",
          flush=True)
    return summary
