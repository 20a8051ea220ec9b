"""evals/loglik.py: a choice's log-likelihood equals the sum of a full forward's token
log-probs of that choice after its context (tiny random model)."""

import functools

import jax
import numpy as np
import pytest

from hh_jax import chat
from hh_jax.evals import loglik
from hh_jax.model import SIZES, Transformer
from hh_jax.tokenizer import ByteTokenizer
from tests.model_helpers import jit, random_params

CFG = SIZES["test"].replace(max_len=64, attention_chunk=16)


@pytest.fixture(scope="module")
def model_params():
    return Transformer(CFG), random_params(CFG, seed=3)


@functools.partial(jit, static_argnames="model")
def _full_logp(params, ids, mask, model):
    return jax.nn.log_softmax(model.apply(params, ids, mask_BxL=mask)["logits_BxLxV"], -1)


def reference(model, params, context, choice):
    """log P(choice | context) token by token, one full forward of context + choice."""
    row = list(context) + list(choice)  # padded at the end to one shape: one compile
    ids = np.zeros((1, CFG.max_len), np.int32)
    ids[0, :len(row)] = row
    logp = np.asarray(_full_logp(params, ids, ids > 0, model=model)[0])
    n = len(context)
    return np.array([logp[n - 1 + t, tok] for t, tok in enumerate(choice)])


@pytest.mark.parametrize("head_chunk", [64, 4])  # 4: the LM head in chunks (lax.map)
def test_branches_equal_separate_forwards(model_params, head_chunk, monkeypatch):
    monkeypatch.setattr(loglik, "HEAD_CHUNK", head_chunk)
    model, params = model_params
    rng = np.random.default_rng(0)
    reqs = [loglik.Request(tuple(rng.integers(4, 500, n_ctx)),
                           tuple(tuple(rng.integers(4, 500, k)) for k in ks))
            for n_ctx, ks in ((5, (3, 1, 4)), (17, (2, 6)), (1, (5,)), (9, (1, 1, 2, 7)))]
    scorer = loglik.Scorer(model, params, batch_size=2, min_bucket=16)
    got = scorer(reqs)
    for req, per_choice in zip(reqs, got, strict=True):
        for choice, lp in zip(req.choices, per_choice, strict=True):
            np.testing.assert_allclose(lp, reference(model, params, req.context, choice),
                                       rtol=1e-5, atol=1e-5)
    # 4 requests fit in 2 batches of one bucket each: no compile per item
    assert scorer._fn._cache_size() <= 2


def test_too_long_falls_back_to_one_row_per_choice(model_params):
    model, params = model_params
    rng = np.random.default_rng(1)
    ctx = tuple(rng.integers(4, 500, 60))
    choices = (tuple(rng.integers(4, 500, 10)), tuple(rng.integers(4, 500, 12)))
    rows = loglik.pack([loglik.Request(ctx, choices)], max_len=64)
    assert len(rows) == 2 and all(len(r.tokens) == 64 for r in rows)
    got = loglik.Scorer(model, params, batch_size=2, max_len=64)([loglik.Request(ctx, choices)])
    for choice, lp in zip(choices, got[0], strict=True):
        np.testing.assert_allclose(lp, reference(model, params, ctx[-(64 - len(choice)):], choice),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no room for context"):
        loglik.pack([loglik.Request(ctx, (tuple(range(4, 70)),))], max_len=64)


def test_text_level_request_and_normalisations(model_params):
    model, params = model_params
    tok = ByteTokenizer()
    turns = [("Human", " Which is right?")]
    req = loglik.mc_request(tok, turns, ["yes", "no thanks"], chat.HH, eos=True)
    assert req.context == tuple(tok.encode("\n\nHuman: Which is right?\n\nAssistant:"))
    assert req.choices[1] == tuple(tok.encode(" no thanks")) + (tok.eos_id,)
    lps = loglik.Scorer(model, params, batch_size=1)([req])[0]
    s = loglik.summaries(lps, ["yes", "no thanks"])
    np.testing.assert_allclose(s["sum"][1], reference(model, params, req.context,
                                                      req.choices[1]).sum(), rtol=1e-5)
    np.testing.assert_allclose(s["per_token"], s["sum"] / np.array([5, 11]))
    np.testing.assert_allclose(s["per_char"], s["sum"] / np.array([3, 9]))
