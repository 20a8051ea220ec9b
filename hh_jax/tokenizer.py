"""One tokenizer interface for every stage.

Implementations:
  * `ByteTokenizer`: UTF-8 bytes + a few specials; no training, for tests.
  * `SentencePieceTokenizer`: trained here on the shipped dialogues (the CPU default) or
    loaded from any sentencepiece `.model` file.

Every tokenizer exposes the ids the stages need explicitly: `pad_id` (never attended to),
`bos_id`, `eos_id` (ends a response; the sampler stops on it) and `eoc_id`, the
end-of-context token the PM reads its score on (PAPER.md §3, "append a special
end-of-context token").
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    eoc_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by the number of specials: pad 0, bos 1, eos 2, eoc 3."""

    pad_id, bos_id, eos_id, eoc_id = 0, 1, 2, 3
    _offset = 4
    vocab_size = 256 + _offset

    def encode(self, text: str) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - self._offset for i in ids if int(i) >= self._offset)
        return data.decode("utf-8", errors="replace")


# sentencepiece ids: 0 pad, 1 unk, 2 bos, 3 eos, then the user symbol <eoc>.
_SP_SPECIALS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)
EOC_PIECE = "<eoc>"


class SentencePieceTokenizer:
    """A sentencepiece model; `train()` builds one from text, `__init__` loads a file."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(model_path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: sentencepiece model not found")
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        eoc = int(self._sp.piece_to_id(EOC_PIECE))
        # piece_to_id returns unk for unknown pieces; fall back to EOS as the PM token.
        self.eoc_id = self.eos_id if eoc == self._sp.unk_id() else eoc
        if min(self.pad_id, self.eos_id) < 0:
            raise ValueError(f"{self.path}: the model needs pad and eos ids (got "
                             f"pad={self.pad_id}, eos={self.eos_id})")

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int,
              seed: int = 0) -> SentencePieceTokenizer:  # seed: kept for API symmetry
        """Trains a BPE sentencepiece model on `texts`; writes `<prefix>.model`."""
        import sentencepiece as spm

        sentences = [t for t in texts if t]
        if not sentences:
            raise ValueError("cannot train a tokenizer on no text")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=True,
            split_digits=True, user_defined_symbols=[EOC_PIECE],
            # Dialogues are long; keep the whole line and let the trainer sample.
            max_sentence_length=1 << 16, input_sentence_size=len(sentences),
            shuffle_input_sentence=False, num_threads=2,  # no sampling: deterministic
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, minloglevel=2, **_SP_SPECIALS,
        )
        path = f"{model_prefix}.model"
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, path)  # atomic: a killed run never leaves half a model
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        return self._sp.decode(keep)


def unigram_perplexity(train_ids: list[np.ndarray], eval_ids: list[np.ndarray],
                       vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on train tokens, on eval tokens.

    The baseline the LM must beat: it knows token frequencies and nothing about context.
    """
    counts = np.ones(vocab_size, np.float64)
    for ids in train_ids:
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total = sum(len(ids) for ids in eval_ids)
    nll = -sum(logp[ids].sum() for ids in eval_ids) / max(total, 1)
    return float(np.exp(nll))


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` or a path to a sentencepiece `.model`."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte' or a path to a .model file")
