"""The distill stage: the top-k + rest KL against numpy, the prompt-cached teacher, a tiny run."""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics
from hh_jax.model import SIZES, Transformer
from hh_jax.optim import make_optimizer
from hh_jax.stages import distill
from hh_jax.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ the loss
def _np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_distill(teacher, student, weights, k):
    """Explicit loops: the teacher's k most likely tokens + one bucket for the rest."""
    b, length, _ = teacher.shape
    lp, lq = _np_log_softmax(teacher), _np_log_softmax(student)
    total = 0.0
    for i in range(b):
        for t in range(length):
            top = np.argsort(-lp[i, t], kind="stable")[:k]
            rest = np.setdiff1d(np.arange(teacher.shape[-1]), top)
            p = np.append(np.exp(lp[i, t, top]), np.exp(lp[i, t, rest]).sum())
            q = np.append(np.exp(lq[i, t, top]), np.exp(lq[i, t, rest]).sum())
            kl = sum(pj * (np.log(pj) - np.log(qj)) for pj, qj in zip(p, q, strict=True) if pj > 0)
            total += kl * weights[i, t]
    return total / weights.sum()


@pytest.mark.parametrize("k, scale", [(4, 3.0), (1, 3.0), (11, 3.0), (4, 30.0)])
def test_distill_loss_matches_numpy_including_the_rest_bucket(k, scale):
    # k = V leaves an empty rest bucket; scale 30 puts ~all mass in the top-k (the case
    # where log(1 − Σ p) would cancel).
    rng = np.random.default_rng(k)
    b, length, v = 2, 5, 11
    teacher = (scale * rng.normal(size=(b, length, v))).astype(np.float32)
    student = (scale * rng.normal(size=(b, length, v))).astype(np.float32)
    weights = (rng.random((b, length)) < 0.7).astype(np.float32)
    weights[0, 0] = 1.0
    ids, probs, rest = distill.topk_rest_targets(jnp.asarray(teacher), k)
    np.testing.assert_allclose(np.asarray(probs.sum(-1) + rest), 1.0, atol=1e-5)
    loss = distill.distill_loss(jnp.asarray(student), ids, probs, rest, jnp.asarray(weights))
    np.testing.assert_allclose(float(loss), _np_distill(teacher, student, weights, k),
                               rtol=1e-4, atol=1e-5)
    grads = jax.grad(lambda s: distill.distill_loss(s, ids, probs, rest, jnp.asarray(weights)))(
        jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_distill_loss_is_zero_for_identical_distributions_and_rest_matches_numpy():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 4, 17)), jnp.float32)
    ids, probs, rest = distill.topk_rest_targets(logits, 5)
    assert abs(float(distill.distill_loss(logits, ids, probs, rest, jnp.ones((3, 4))))) < 1e-6
    lp = _np_log_softmax(np.asarray(logits))
    expected_rest = 1.0 - np.sort(np.exp(lp), axis=-1)[..., -5:].sum(-1)
    np.testing.assert_allclose(np.asarray(rest), expected_rest, atol=1e-6)


# ------------------------------------------------------------------------------ the teacher
@pytest.fixture(scope="module")
def tiny():
    cfg = SIZES["test"].replace(vocab_size=64, n_layers=1)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(0),
                                                 jnp.zeros((2, 8), jnp.int32)))())
    rng = np.random.default_rng(0)
    prompt_1xQ = jnp.asarray(rng.integers(4, 64, (1, 7)), jnp.int32)
    text_BxL = jnp.asarray(rng.integers(4, 64, (2, 9)), jnp.int32)
    prefill = jax.jit(functools.partial(distill.prefill_prompt, model=model, text_len=9))
    teacher = jax.jit(functools.partial(distill.teacher_logits, model=model))
    student = jax.jit(lambda p, x: model.apply(p, x)["logits_BxLxV"])
    return dict(model=model, params=params, prompt=prompt_1xQ, text=text_BxL, prefill=prefill,
                teacher=teacher, student=student)


def test_prompt_cached_teacher_equals_teacher_on_prompt_plus_text(tiny):
    p, prompt, text = tiny["params"], tiny["prompt"], tiny["text"]
    cached = tiny["teacher"](p, text, tiny["prefill"](p, prompt))
    whole = jnp.concatenate([jnp.broadcast_to(prompt, (2, prompt.shape[1])), text], axis=1)
    direct = tiny["student"](p, whole)[:, prompt.shape[1]:]
    np.testing.assert_allclose(np.asarray(cached), np.asarray(direct), atol=1e-4)


def test_loss_is_zero_without_a_prompt_and_positive_with_one(tiny):
    p, text = tiny["params"], tiny["text"]
    student = tiny["student"](p, text)
    w = jnp.ones(text.shape)
    for prompt, zero in ((tiny["prompt"][:, :0], True), (tiny["prompt"], False)):
        targets = distill.topk_rest_targets(tiny["teacher"](p, text, tiny["prefill"](p, prompt)),
                                            50)
        loss = float(distill.distill_loss(student, *targets, w))
        assert (abs(loss) < 1e-6) if zero else (loss > 1e-3), (prompt.shape, loss)


def test_train_step_lowers_the_loss_and_leaves_the_teacher_alone(tiny):
    model, p = tiny["model"], tiny["params"]
    optimizer = make_optimizer(ConfigDict(dict(lr=3e-3, warmup_steps=0, schedule="constant")), 8)
    student = jax.tree_util.tree_map(jnp.copy, p)
    st = TrainState(step=jnp.zeros((), jnp.int32), params=student,
                    opt_state=optimizer.init(student))
    cache = tiny["prefill"](p, tiny["prompt"])
    text = tiny["text"]
    batch = {"tokens_BxL": text, "mask_BxL": jnp.ones(text.shape, bool),
             "kl_weights_BxL": jnp.ones(text.shape)}
    step = jax.jit(functools.partial(distill.train_step, model=model, optimizer=optimizer, k=50))
    teacher_before = jax.tree_util.tree_map(np.asarray, p)
    losses = []
    for _ in range(8):
        st, m = step(st, batch, p, cache)
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    for a, b in zip(jax.tree_util.tree_leaves(teacher_before), jax.tree_util.tree_leaves(p),
                    strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_packed_rows_equal_each_document_alone(tiny):
    """Two documents packed into one row (the loader's segments and positions): the
    teacher reads each after the cached prompt, the student each from position 0, exactly
    as if each were alone; padding changes nothing."""
    from hh_jax.data import loaders
    from hh_jax.tokenizer import ByteTokenizer

    model, p, prompt = tiny["model"], tiny["params"], tiny["prompt"]
    tok = ByteTokenizer()
    docs = ["ab", "cdefg"]  # + EOS each: 3 + 6 tokens, one row of 12 with 3 padding
    batch = next(iter(loaders.lm_dataset(docs, tok, seq_len=12, global_batch=1, seed=0,
                                         num_epochs=1, process_index=0, process_count=1)))
    x = distill.inputs(batch, tok.eos_id)
    x["tokens_BxL"] = x["tokens_BxL"] % 64  # the tiny model's vocab
    assert list(x["segment_ids_BxL"][0]) == [1] * 3 + [2] * 6 + [0] * 3
    cache = jax.jit(functools.partial(distill.prefill_prompt, model=model, text_len=12))(
        p, prompt)
    packed_t = distill._teacher(p, x, cache, model)
    packed_s = distill._student(p, x, model)
    for seg in (1, 2):
        cols = np.flatnonzero(x["segment_ids_BxL"][0] == seg)
        alone = jnp.asarray(x["tokens_BxL"][:, cols])
        t = distill.teacher_logits(p, alone, jax.jit(functools.partial(
            distill.prefill_prompt, model=model, text_len=len(cols)))(p, prompt), model=model)
        np.testing.assert_allclose(np.asarray(packed_t[:, cols]), np.asarray(t), atol=1e-4)
        np.testing.assert_allclose(np.asarray(packed_s[:, cols]),
                                   np.asarray(tiny["student"](p, alone)), atol=1e-4)
    # the KL counts every real token but EOS; the NLL the LM stage's targets
    np.testing.assert_array_equal(x["kl_weights_BxL"][0], [1, 1, 0] + [1] * 5 + [0] * 4)
    np.testing.assert_array_equal(x["weights_BxL"][0], [0, 1, 1, 0] + [1] * 5 + [0] * 3)


# ------------------------------------------------------------------------------ the stage
def _lm_export(path):
    """A params export of the "test" model (random init, byte tokenizer) to distill from."""
    cfg = SIZES["test"].replace(vocab_size=260, n_layers=1, max_len=2048)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(1),
                                                 jnp.zeros((2, 8), jnp.int32)))())
    checkpoint.export_params(path, params, {"stage": "lm", "step": 0, "tokenizer": "byte",
                                            "model": dataclasses.asdict(cfg)})


def _stage_config(tmp_path, **kw):
    import sys
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from common import distill_config

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Below is a talk.\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n")
    c = distill_config(init_from=str(tmp_path / "lm"), prompt_file=str(prompt), seq_len=32,
                       batch_size=8, steps=6, eval_tokens=256, log_every=2, eval_every=4,
                       ckpt_every=2, base_lr=0.3)
    c.data.subsets = ("harmless-base",)
    c.update(kw)
    return c


@pytest.mark.slow
def test_tiny_stage_run_lowers_the_heldout_distillation_loss(tmp_path):
    _lm_export(tmp_path / "lm")
    summary = distill.train_and_evaluate(_stage_config(tmp_path), str(tmp_path / "distill"))
    assert summary["eval/distill_kl"] < 0.8 * summary["eval_before/distill_kl"], summary
    assert summary["steps"] == 6 and summary["prompt_tokens"] > 0
    assert metrics.read_summary(tmp_path / "distill")["eval/distill_kl"] == summary[
        "eval/distill_kl"]
    meta = checkpoint.read_meta(tmp_path / "distill" / "params")
    assert meta["stage"] == "distill" and meta["tokenizer"] == "byte"
    assert meta["model"]["vocab_size"] == 260


def test_the_default_prompt_ships_and_bad_prompt_files_are_named(tmp_path):
    text = distill.load_prompt(distill.DEFAULT_PROMPT)
    assert text.count("\n\nHuman: ") >= 3 and text.count("\n\nAssistant: ") >= 3
    assert 150 <= len(text.split()) <= 350
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: the prompt file is empty"):
        distill.load_prompt(str(empty))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        distill.load_prompt(str(tmp_path / "nope.txt"))


@pytest.mark.slow
def test_nan_stops_the_stage_and_a_resumed_run_ends_bitwise_identical(tmp_path, monkeypatch,
                                                                       capsys):
    _lm_export(tmp_path / "lm")
    cfg = _stage_config(tmp_path, steps=4, eval_every=100)
    distill.train_and_evaluate(cfg, str(tmp_path / "straight"))
    real_step = distill.train_step

    def poisoned(st, batch, *args, **kw):  # the loss turns NaN from the 3rd step on
        st, m = real_step(st, batch, *args, **kw)
        m["train/loss"] = jnp.where(st.step >= 3, jnp.nan, m["train/loss"])
        return st, m

    monkeypatch.setattr(distill, "train_step", poisoned)
    with pytest.raises(metrics.NonFiniteError, match="train/loss = nan at step 3"):
        distill.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
    monkeypatch.setattr(distill, "train_step", real_step)
    distill.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    assert "resumed at step 2" in capsys.readouterr().out
    a, b = (jax.device_get(checkpoint.import_params(tmp_path / d / "params"))
            for d in ("straight", "resumed"))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_evaluate_sums_exactly_over_batches():
    """Averages over held-out batches are exact sums over every batch, not means of
    per-batch means (a per-batch statistic reveals any drop or double count)."""
    from hh_jax import sharding

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = [{"tokens_BxL": rng.integers(0, 9, (2, 6)).astype(np.int32),
                "weights_BxL": (rng.random((2, 6)) < p).astype(np.float32),
                "kl_weights_BxL": np.ones((2, 6), np.float32)} for p in (0.2, 0.9, 0.5)]

    def fake_eval(params, batch):  # sums that differ from batch to batch
        w, t = batch["weights_BxL"], batch["tokens_BxL"].astype(jnp.float32)
        return {"kl": (batch["kl_weights_BxL"] * t).sum(),
                "positions": batch["kl_weights_BxL"].sum(), "nll": (w * t).sum(),
                "tokens": w.sum(), "teacher_nll": (w * t * 0.5).sum()}

    got = distill.evaluate(jax.jit(fake_eval), None, batches, mesh)
    t = np.concatenate([b["tokens_BxL"] for b in batches]).astype(np.float64)
    w = np.concatenate([b["weights_BxL"] for b in batches])
    assert got["eval/tokens"] == w.sum()
    np.testing.assert_allclose(got["eval/distill_kl"], t.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["eval/loss"], (w * t).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(got["eval/teacher_loss"], 0.5 * (w * t).sum() / w.sum(),
                               rtol=1e-6)
