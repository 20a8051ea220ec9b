"""hh_jax.tokenizer: byte and sentencepiece round trips, special ids, the unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hh_jax.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    unigram_perplexity,
)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.eoc_id}
    assert all(0 <= i < tok.vocab_size and i not in specials for i in ids)
    assert tok.decode(ids) == text
    # specials are dropped by decode wherever they occur
    assert tok.decode([tok.bos_id, *ids, tok.eoc_id, tok.eos_id, tok.pad_id]) == text


def test_byte_tokenizer_known_bytes():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3 + 4, 0xA9 + 4]
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.eoc_id}) == 4
    assert tok.vocab_size == 260
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


_CORPUS = [f"Human: What is {i} plus {i + 1}?\n\nAssistant:  It is {2 * i + 1}.   Nice\tday, "
           f"café ☕ 中文!" for i in range(150)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    return SentencePieceTokenizer.train(_CORPUS, str(prefix), vocab_size=320)


@pytest.mark.parametrize("text", [
    "a\nb  c",
    "  two leading and two trailing spaces  ",
    "Human: hi\n\nAssistant:   three spaces\n\n\nthen newlines\n",
    "tab\there",
    "unseen characters: Ω≈√ 🙂 ÿ",
    "\n",
    " ",
    "",
])
def test_sentencepiece_round_trip_exact(sp_tok, text):
    ids = sp_tok.encode(text)
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text


def test_sentencepiece_special_ids(sp_tok, tmp_path):
    ids = {sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id, sp_tok.eoc_id}
    assert len(ids) == 4, (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id, sp_tok.eoc_id)
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.vocab_size == 320
    # <eoc> is one atomic piece, never produced by ordinary text
    assert sp_tok.eoc_id in sp_tok.encode("x<eoc>")
    assert sp_tok.eoc_id not in sp_tok.encode(_CORPUS[3])
    for special in (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id):
        assert special not in sp_tok.encode(" ".join(_CORPUS[:5]))
    # decode drops pad/bos/eos
    ids = sp_tok.encode("hello there")
    assert sp_tok.decode([sp_tok.bos_id, *ids, sp_tok.eos_id, sp_tok.pad_id]) == "hello there"
    # loading the file gives the same tokenizer
    again = load_tokenizer(sp_tok.path)
    assert again.encode(_CORPUS[7]) == sp_tok.encode(_CORPUS[7])
    assert (again.pad_id, again.eos_id, again.eoc_id) == (sp_tok.pad_id, sp_tok.eos_id,
                                                          sp_tok.eoc_id)


def test_sentencepiece_train_is_deterministic(sp_tok, tmp_path):
    other = SentencePieceTokenizer.train(_CORPUS, str(tmp_path / "again"), vocab_size=320)
    with open(sp_tok.path, "rb") as a, open(other.path, "rb") as b:
        assert a.read() == b.read()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_unigram_perplexity_by_hand():
    # vocab 3; add-one counts from train [0, 0, 1] → [3, 2, 1] / 6 → p = (1/2, 1/3, 1/6).
    train = [np.array([0, 0]), np.array([1])]
    evals = [np.array([0]), np.array([2, 1])]
    nll = -(math.log(1 / 2) + math.log(1 / 6) + math.log(1 / 3)) / 3
    assert unigram_perplexity(train, evals, 3) == pytest.approx(math.exp(nll), rel=1e-12)
    # no train data: uniform, perplexity = vocab size
    assert unigram_perplexity([], evals, 7) == pytest.approx(7.0, rel=1e-12)
