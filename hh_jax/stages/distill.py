"""Stage `distill`: context distillation of an HHH prompt into the weights → π0.

PAPER.md §5 [P A.1]: the teacher is the LM with an HHH prompt prepended; the student, which
sees the text without the prompt, is trained to match the teacher's next-token distribution
reduced to its top-k tokens plus one "rest" bucket (top-50: a 51-way distribution), with LR
0.05× the pretraining LR decayed linearly to 0. Teacher and student start from the same LM
export; the teacher is frozen (a separate jit argument, never in the optimizer).

The text is the LM stage's: HH train-split dialogues packed into rows by the segment-aware
packer (hh_jax/data/loaders.py), so no document attends to another and positions restart
in each. The prompt is prefilled once into a KV cache (batch 1, broadcast to the batch),
so it costs nothing per step: the teacher reads each document of a row after the cached
prompt (positions continuing after it, the other documents masked); the student reads
the same rows without it. The KL counts every position whose next token belongs to the
same document (every real token but a document's closing EOS).

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
from hh_jax.policy import Frozen
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
                   model: Transformer, segment_ids_BxL: jax.Array | None = None,
                   positions_BxL: jax.Array | None = None, mask_BxL: jax.Array | None = None
                   ) -> jax.Array:
    """The teacher's logits_BxLxV on the text, reading it after the cached prompt.

    Packed rows (the loader's `segment_ids_BxL`, `positions_BxL`, `mask_BxL`): each
    document sees the prompt and itself, at positions continuing after the prompt, as if
    it were alone after the prompt. Without them the row is one text."""
    b, length = tokens_BxL.shape
    n, _, s, g, kd = prompt_cache["k"].shape
    if s < length:
        raise ValueError(f"prompt cache has {s} slots, fewer than the text length {length}")
    cache = {"k": jnp.broadcast_to(prompt_cache["k"], (n, b, s, g, kd)),
             "v": jnp.broadcast_to(prompt_cache["v"], (n, b, s, g, kd)),
             "index": prompt_cache["index"]}
    if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(jnp.arange(length), (b, length))
    kv_valid_BxS = jnp.ones((b, s), bool)
    if mask_BxL is not None:  # padding is never attended to
        kv_valid_BxS = jax.lax.dynamic_update_slice(kv_valid_BxS, mask_BxL.astype(bool),
                                                    (0, prompt_cache["index"]))
    out = model.apply(teacher_params, tokens_BxL, positions_BxL=prompt_cache["index"]
                      + positions_BxL, segment_ids_BxL=segment_ids_BxL, cache=cache,
                      kv_valid_BxS=kv_valid_BxS)
    return out["logits_BxLxV"]


def _teacher(teacher_params, batch: dict, prompt_cache: dict, model: Transformer) -> jax.Array:
    return teacher_logits(teacher_params, batch["tokens_BxL"], prompt_cache, model=model,
                          segment_ids_BxL=batch.get("segment_ids_BxL"),
                          positions_BxL=batch.get("positions_BxL"), mask_BxL=batch["mask_BxL"])


def _student(params, batch: dict, model: Transformer) -> jax.Array:
    """The student's logits on the same (packed) rows, documents kept apart."""
    return model.apply(params, batch["tokens_BxL"], mask_BxL=batch["mask_BxL"],
                       segment_ids_BxL=batch.get("segment_ids_BxL"),
                       positions_BxL=batch.get("positions_BxL"))["logits_BxLxV"]


# ------------------------------------------------------------------------------ steps
def train_step(st: state.TrainState, batch, teacher_params, prompt_cache, *, model: Transformer,
               optimizer: optax.GradientTransformation, k: int,
               teacher_model: Transformer | None = None):
    """One optimizer step of the student on the top-k + rest KL to the prompted teacher,
    over the positions `batch["kl_weights_BxL"]` weighs."""
    t_logits = _teacher(teacher_params, batch, prompt_cache, teacher_model or model)
    ids, probs, rest = jax.lax.stop_gradient(topk_rest_targets(t_logits, k))
    w = batch["kl_weights_BxL"].astype(jnp.float32)

    def objective(params):
        return distill_loss(_student(params, batch, model), ids, probs, rest, w)

    loss, grads = jax.value_and_grad(objective)(st.params)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    out = {"train/loss": loss, "train/positions": w.sum(),
           "train/grad_norm": optax.global_norm(grads),
           "train/teacher_rest_mass": (rest * w).sum() / jnp.maximum(w.sum(), 1.0)}
    return st.replace(step=st.step + 1, params=params, opt_state=opt_state), out


def eval_step(params, teacher_params, prompt_cache, batch, *, model: Transformer,
              teacher_model: Transformer, k: int) -> dict:
    """Sums over a batch: the KL (over `kl_weights_BxL`), the student's and the prompted
    teacher's next-token NLL (over the targets `weights_BxL`, as the LM stage scores)."""
    tokens, w = batch["tokens_BxL"], batch["weights_BxL"].astype(jnp.float32)
    kl_w = batch["kl_weights_BxL"].astype(jnp.float32)
    t_logits = _teacher(teacher_params, batch, prompt_cache, teacher_model)
    s_logits = _student(params, batch, model)
    kl_BxL = distill_kl_BxL(s_logits, *topk_rest_targets(t_logits, k))
    nll, count = losses.next_token_xent(s_logits, tokens, w)
    t_nll, _ = losses.next_token_xent(t_logits, tokens, w)
    return {"kl": (kl_BxL * kl_w).sum(), "positions": kl_w.sum(), "nll": nll, "tokens": count,
            "teacher_nll": t_nll}


def inputs(batch: dict, eos_id: int) -> dict:
    """An `lm_dataset` batch → the step's inputs: `loaders.lm_inputs` and the KL's
    positions, every real token but EOS (whose next token starts another document)."""
    x = loaders.lm_inputs(batch)
    x["kl_weights_BxL"] = (x["mask_BxL"] & (x["tokens_BxL"] != eos_id)).astype(np.float32)
    return x


def evaluate(eval_fn, params, batches: list[dict], mesh) -> dict:
    """Held-out distillation KL and perplexities over fixed batches (exact averages)."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = eval_fn(params, sharding.put_batch(batch, mesh))
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
    mcfg = ModelConfig(**s_meta["model"]).replace(**_overrides(cfg))
    tmcfg = ModelConfig(**t_meta["model"]).replace(**_overrides(cfg))
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
    """The packed train batches (grain: resumable), fixed held-out batches, the data report,
    the number of train dialogues."""
    texts, report = loaders.dialogue_texts(cfg.data.hh_dir, list(cfg.data.subsets) or None,
                                           cfg.data.skip_invalid)
    train = loaders.lm_dataset(texts["train"], tok, seq_len=cfg.seq_len,
                               global_batch=cfg.batch_size, seed=cfg.seed)
    held = [inputs(b, tok.eos_id) for b in loaders.heldout_batches(
        texts["heldout"], tok, seq_len=cfg.seq_len, global_batch=cfg.batch_size,
        max_tokens=cfg.eval_tokens)]
    return train, held, report, len(texts["train"])


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Runs the distill stage into `stage_dir`; returns its summary."""
    os.makedirs(stage_dir, exist_ok=True)
    mcfg, tmcfg, tok, teacher_path = _models(cfg)
    prompt_path, prompt_Q = _prompt(cfg, tok, tmcfg)
    train_ds, eval_batches, data_report, n_train = _data(cfg, tok)
    mesh = sharding.make_mesh(cfg.mesh)
    model = Transformer(mcfg)
    lr = cfg.base_lr * cfg.lr_ratio  # PAPER.md §5: 0.05× the pretraining LR, linear to 0
    optimizer = make_optimizer(cfg.optim, cfg.steps, lr=lr)
    st, st_sh, ckpts, data_state, how = trainer.resume_or_init(
        cfg, stage_dir, state.lm_init(model, cfg.seed), optimizer, mesh)
    it = iter(train_ds)
    if data_state is not None:  # the grain iterator's position, saved with the model
        it.set_state(data_state["iterator"])
    teacher = Frozen(teacher_path, mesh, None, _overrides(cfg))
    with sharding.activate(mesh):  # the prompt's KV cache, once (batch 1, replicated)
        cache = jax.jit(functools.partial(prefill_prompt, model=teacher.model,
                                          text_len=cfg.seq_len),
                        out_shardings=sharding.replicated(mesh))(
            teacher.params, jnp.asarray(prompt_Q)[None])
    step, ev = _jit_steps(model, teacher.model, optimizer, cfg.top_k, st_sh, teacher.shardings,
                          mesh)
    eval_fn = lambda params: evaluate(  # noqa: E731
        lambda p, b: ev(p, teacher.params, cache, b), params, eval_batches, mesh)
    print(f"[distill] {mcfg.n_layers}L d{mcfg.d_model}, teacher {teacher_path}, prompt "
          f"{prompt_path} ({len(prompt_Q)} tokens), top-{cfg.top_k} + rest, lr {lr:.2e}, "
          f"{n_train} train dialogues packed in rows of {cfg.seq_len}, {how}", flush=True)
    before = _before(cfg, teacher_path, teacher, model, eval_fn, mesh)
    writer = metrics.MetricsWriter(stage_dir)
    if int(st.step) == 0:
        writer.write(0, before)
    try:
        with sharding.activate(mesh):
            st = trainer.train_loop(
                "distill", cfg, st, lambda s, b: step(s, b, teacher.params, cache),
                lambda _: inputs(next(it), tok.eos_id), lambda _: {"iterator": it.get_state()},
                ckpts, writer, mesh, cfg.steps, evaluate=lambda s, _: eval_fn(s.params),
                real_tokens=lambda b: float(b["kl_weights_BxL"].sum()))
            final = eval_fn(st.params)
    finally:  # also on NaN / Ctrl-C: let in-flight saves of good checkpoints commit
        ckpts.close()
    writer.write(int(st.step), final)
    writer.close()
    return _finish(cfg, stage_dir, st, mcfg, final, before, data_report, dict(
        teacher=teacher_path, prompt_file=prompt_path, prompt_tokens=len(prompt_Q),
        top_k=cfg.top_k, lr=lr, train_dialogues=n_train,
        heldout_rows=len(eval_batches) * cfg.batch_size))


def _overrides(cfg: ConfigDict) -> dict:
    """Compute-only model overrides (dtype, remat, attention_impl): both models take them."""
    return dict(cfg.get("model_overrides", {}) or {})


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


def _before(cfg, teacher_path, teacher: Frozen, model, eval_fn, mesh) -> dict:
    """Held-out numbers of the student's starting params (the init_from export): recomputed
    from the export, so a resumed run reports the same ones."""
    if teacher_path == cfg.init_from and teacher.cfg == model.cfg:
        params = teacher.params
    else:
        params = Frozen(cfg.init_from, mesh, None, _overrides(cfg)).params
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
