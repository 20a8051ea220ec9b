"""LM-stage text data: HH dialogues → tokenizer → packed windows → batch for a step.

The batch for step t is a pure function of (windows, seed, t): each epoch is a seeded
permutation of the windows, so a resumed run sees exactly the batches the uninterrupted
run would have, and the data position saved with a checkpoint is just the step.
"""

from __future__ import annotations

import os

import numpy as np

from hh_jax import data as hh_data
from hh_jax.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer


def dialogue_texts(hh_dir: str, subsets: list[str] | None = None, skip_invalid: bool = False
                   ) -> tuple[dict[str, list[str]], dict]:
    """{"train": [...], "heldout": [...]} chosen transcripts split by the project's rule,
    and the load report's totals (rows skipped by reason when `skip_invalid`)."""
    comparisons, report = hh_data.load_hh_comparisons(hh_dir, subsets=subsets,
                                                      skip_invalid=skip_invalid)
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for c in comparisons:
        text = c.context + c.chosen
        if text not in seen:  # chosen transcripts repeat across subsets rarely; count once
            seen.add(text)
            out[c.split].append(text)
    total = report.total.to_json()
    return out, {"rows": total["rows"], "comparisons": total["comparisons"],
                 "skipped": total["skipped"]}


def get_tokenizer(spec: str, train_texts: list[str], stage_dir: str, vocab_size: int,
                  seed: int) -> Tokenizer:
    """`"sentencepiece"` trains one on the train split (once; reused on resume),
    `"byte"` or a `.model` path loads."""
    if spec != "sentencepiece":
        return load_tokenizer(spec)
    prefix = os.path.join(stage_dir, "tokenizer")
    if os.path.exists(prefix + ".model"):
        return SentencePieceTokenizer(prefix + ".model")
    os.makedirs(stage_dir, exist_ok=True)
    return SentencePieceTokenizer.train(train_texts, prefix, vocab_size, seed=seed)


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(t), np.int32) for t in texts]


def pack(token_lists: list[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenates documents with EOS after each and cuts windows_NxL (tail dropped)."""
    stream = np.concatenate([np.append(ids, eos_id) for ids in token_lists]).astype(np.int32)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"not enough text for one window of {seq_len} tokens "
                         f"({len(stream)} tokens)")
    return stream[: n * seq_len].reshape(n, seq_len)


class PackedBatches:
    """Deterministic batches of packed windows; `batch(step)` needs no iterator state."""

    def __init__(self, windows_NxL: np.ndarray, batch_size: int, seed: int):
        if len(windows_NxL) < batch_size:
            raise ValueError(f"{len(windows_NxL)} windows < batch size {batch_size}")
        self.windows_NxL = windows_NxL
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(windows_NxL) // batch_size

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows_NxL))

    def batch(self, step: int, process_index: int = 0, process_count: int = 1
              ) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        epoch, i = divmod(step, self.per_epoch)
        rows = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        rows = np.array_split(rows, process_count)[process_index]
        tokens_BxL = self.windows_NxL[rows]
        ones = np.ones_like(tokens_BxL, dtype=np.float32)
        return {"tokens_BxL": tokens_BxL, "mask_BxL": ones.astype(bool), "weights_BxL": ones}

    def state(self, step: int) -> dict:
        return {"step": int(step), "seed": self.seed, "windows": int(len(self.windows_NxL))}

    def check_state(self, state: dict, where: str) -> None:
        mine = self.state(state.get("step", 0))
        if state != mine:
            raise ValueError(f"{where}: checkpointed data position {state} does not match this "
                             f"run's data {mine}; the data or seed changed since the checkpoint")


def eval_windows(windows_NxL: np.ndarray, max_tokens: int) -> np.ndarray:
    """The first windows up to `max_tokens` (fixed, so every eval scores the same text)."""
    n = max(1, min(len(windows_NxL), max_tokens // windows_NxL.shape[1]))
    return windows_NxL[:n]
