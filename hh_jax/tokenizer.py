"""One tokenizer interface for every stage.

Implementations:
  * `ByteTokenizer`: UTF-8 bytes + a few specials; no training, for tests.
  * `SentencePieceTokenizer`: trained here on the shipped dialogues (the CPU default) or
    loaded from any sentencepiece `.model` file (SP-based pretrained checkpoints).
  * `BPETokenizer`: a pretrained checkpoint's tokenizer as a `tokenizers` object: the
    GPT-2-style byte-level BPE stored in a GGUF file's metadata, or an HF tokenizer.json.

Every tokenizer exposes the ids the stages need explicitly: `pad_id` (never attended to),
`bos_id`, `eos_id` (ends a response; the sampler stops on it) and `eoc_id`, the
end-of-context token the PM reads its score on (PAPER.md §3, "append a special
end-of-context token"). Pretrained tokenizers have no token of their own for that: their
`eoc_id` is their EOS, which closes every rendered response anyway (hh_jax/chat.py).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from hh_jax.pretrained import gguf_file, registry


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

    def __init__(self, model_path: str | os.PathLike, pad_id: int | None = None):
        """`pad_id`: used only if the model defines none (e.g. Llama-2's tokenizer.model)."""
        import sentencepiece as spm

        self.path = str(model_path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: sentencepiece model not found")
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        if self.pad_id < 0 and pad_id is not None:
            self.pad_id = int(pad_id)
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
            # no dummy "▁" prefix: encode(a) + encode(b) must decode to a + b, since
            # prompts and responses are tokenized separately by PM and PPO
            add_dummy_prefix=False,
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

# llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp) → whether digits are split one by
# one before the GPT-2 regex (the StarCoder family, SmolLM included) or not (GPT-2 proper).
_GGUF_PRE_DIGITS = {"gpt-2": False, "default": False, "mpt": False, "olmo": False, "jais": False,
                    "smollm": True, "starcoder": True, "refact": True, "command-r": True,
                    "codeshell": True, "exaone": True, "minerva": True}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


class BPETokenizer:
    """A pretrained `tokenizers.Tokenizer` (byte-level BPE from GGUF, or any tokenizer.json).

    Special tokens written in the text (ChatML's `<|im_start|>`) encode to their ids, as
    in `transformers`; decode drops special tokens. No BOS is added by `encode`:
    `add_bos` tells hh_jax/chat.py whether a dialogue starts with one.
    """

    def __init__(self, tok, *, eos_id: int | None, bos_id: int | None = None,
                 pad_id: int | None = None, eoc_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, source: str = ""):
        if eos_id is None:
            raise ValueError(f"{source}: the tokenizer names no EOS token")
        self._tok, self.source = tok, source
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos_id)
        self.bos_id = self.eos_id if bos_id is None else int(bos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.eoc_id = self.eos_id if eoc_id is None else int(eoc_id)
        self.add_bos, self.chat_template = bool(add_bos), chat_template

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "") -> BPETokenizer:
        """From a GGUF file's `tokenizer.ggml.*` metadata (pretrained/gguf_file.read_gguf)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _GGUF_PRE_DIGITS:
            raise ValueError(f"{source}: GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is "
                             f"not supported (only 'gpt2' BPE with {sorted(_GGUF_PRE_DIGITS)}); "
                             "use the checkpoint's tokenizer.json or tokenizer.model")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if _GGUF_PRE_DIGITS[pre] else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True)
                                if ty == _GGUF_CONTROL])
        tok.add_tokens([AddedToken(t, normalized=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == _GGUF_USER_DEFINED])
        get = meta.get
        return cls(tok, eos_id=get("tokenizer.ggml.eos_token_id"),
                   bos_id=get("tokenizer.ggml.bos_token_id"),
                   pad_id=get("tokenizer.ggml.padding_token_id"),
                   add_bos=get("tokenizer.ggml.add_bos_token", False),
                   chat_template=get("tokenizer.chat_template"), source=source)

    @classmethod
    def from_file(cls, path: str, eos_id: int | None = None, bos_id: int | None = None
                  ) -> BPETokenizer:
        """An HF tokenizer.json; special tokens and the chat template from the
        tokenizer_config.json beside it, else the ids given (from config.json)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        folder = os.path.dirname(os.path.abspath(path))
        conf = _read_json(os.path.join(folder, "tokenizer_config.json"))
        template = conf.get("chat_template")
        if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
            with open(os.path.join(folder, "chat_template.jinja")) as f:
                template = f.read()

        def token_id(key, default):
            text = conf.get(key)
            text = text.get("content") if isinstance(text, dict) else text
            found = tok.token_to_id(text) if text else None
            return default if found is None else found

        return cls(tok, eos_id=token_id("eos_token", eos_id), bos_id=token_id("bos_token", bos_id),
                   pad_id=token_id("pad_token", None), eoc_id=token_id("hh_jax_eoc_token", None),
                   add_bos=conf.get("add_bos_token", False), chat_template=template,
                   source=path)

    def save(self, directory: str) -> str:
        """tokenizer.json + tokenizer_config.json (HF layout); returns the .json path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        self._tok.save(path)
        name = self._tok.id_to_token
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(self.eos_id),
                "bos_token": name(self.bos_id), "pad_token": name(self.pad_id),
                "hh_jax_eoc_token": name(self.eoc_id), "add_bos_token": self.add_bos,
                "chat_template": self.chat_template}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(conf, f, indent=1)
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))


def load_hf_tokenizer(path: str, config: dict | None = None) -> Tokenizer:
    """An HF checkpoint dir's tokenizer.json (any `tokenizers` model) or tokenizer.model
    (sentencepiece); `config` (config.json, read if None) supplies eos/bos ids."""
    config = _read_json(os.path.join(path, "config.json")) if config is None else config
    first = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731 (Llama-3 lists EOS ids)
    eos, bos = first(config.get("eos_token_id")), first(config.get("bos_token_id"))
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return BPETokenizer.from_file(os.path.join(path, "tokenizer.json"), eos_id=eos, bos_id=bos)
    if os.path.exists(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"), pad_id=eos)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
    """`"byte"`, a sentencepiece `.model`, an HF `tokenizer.json`, or a pretrained
    checkpoint's tokenizer: a `.gguf` file, an HF checkpoint dir, a name ("smollm2-135m")."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith(".json"):
        return BPETokenizer.from_file(spec)
    if spec in registry.PRETRAINED:
        spec = registry.pretrained_path(spec)
    if spec.endswith(".gguf"):  # the metadata only; no weights are read
        return BPETokenizer.from_gguf_metadata(gguf_file.read_gguf(spec).metadata, source=spec)
    if os.path.isdir(spec):
        return load_hf_tokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte', a .model or tokenizer.json "
                     f"file, a .gguf file, an HF checkpoint dir or one of "
                     f"{sorted(registry.PRETRAINED)}")
