"""Input pipelines: LM text (grain packing with segments) and PM pair batches (grain,
bucketed).

The grain pipelines are `grain.IterDataset`s; `iter(ds)` gives a `grain.DatasetIterator`
whose `get_state()` is a small JSON-able dict and `set_state(state)` resumes it exactly (the
same batches the uninterrupted iterator would yield). To checkpoint it with the model
through orbax, pass `grain.checkpoint.CheckpointSave(iterator)` /
`grain.checkpoint.CheckpointRestore(iterator)` as one item of `ocp.args.Composite`.

Order is a pure function of (data, seed): every process shuffles the same global order
and keeps elements `process_index::process_count`, so the union of the host-local batches
k is global batch k. Each process tokenizes only its own shard. `sharding.put_batch`
turns the host-local numpy batches into global `jax.Array`s sharded over the mesh's data
axes (padding PM rows to one length across processes), and
`sharding.host_rows_in_global_order` puts per-row results back into this order.

Legend: B = per-process batch (global_batch // process_count), L = sequence length.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from hh_jax.data import hh
from hh_jax.data.hh import Comparison
from hh_jax.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} must be a positive multiple of "
                         f"process_count {process_count}")
    return global_batch // process_count


def _read_options(num_threads: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(64, 8 * num_threads))


def lm_texts(comparisons: Sequence[Comparison], side: str = "chosen") -> list[str]:
    """Full dialogues `context + <side>` for LM training on comparisons (SFT-style)."""
    return [c.context + getattr(c, side) for c in comparisons]


def _as_text(item: Any) -> str:
    return item.context + item.chosen if isinstance(item, Comparison) else str(item)


def lm_dataset(texts: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch: int,
               seed: int, num_epochs: int | None = None, to_text: Callable[[Any], str] = _as_text,
               add_bos: bool = False, process_index: int | None = None,
               process_count: int | None = None, num_threads: int = 2) -> grain.IterDataset:
    """Packed LM batches: tokens of each text + EOS, concatenated, cut into seq_len windows.

    `texts` is any random-access sequence of str or Comparisons (`context + chosen`), or
    of anything `to_text` turns into a str (e.g. the records of a TFDS data source).
    Yields dicts of numpy arrays: `tokens_BxL` (int32); `mask_BxL` (float32 loss
    weights: 1 on real tokens, 0 on the zero padding of the very last window);
    `segment_ids_BxL` (int32: 1, 2, ... per document piece within a row, 0 on padding)
    and `positions_BxL` (int32: position within the piece), for attention that should
    not cross documents. A text cut at a window edge continues at position 0 of the next.
    With several processes use `num_epochs=None` (endless) and count steps: packing is
    per process, so finite epochs may end one batch apart on different hosts.
    """
    pi, pc = _process(process_index, process_count)
    local = _local_batch(global_batch, pc)
    bos = [tokenizer.bos_id] if add_bos else []

    def tokenize(item) -> dict:
        return {"tokens": np.asarray(bos + tokenizer.encode(to_text(item)) + [tokenizer.eos_id],
                                     np.int32)}

    ds = grain.MapDataset.source(texts).shuffle(seed).repeat(num_epochs)
    ds = ds[pi::pc].map(tokenize).to_iter_dataset(_read_options(num_threads))
    return _PackIterDataset(ds, seq_len).batch(local, drop_remainder=True, batch_fn=_lm_batch)


def _lm_batch(rows: Sequence[dict]) -> dict:
    seg = np.stack([r["segment_ids"] for r in rows])
    return {"tokens_BxL": np.stack([r["tokens"] for r in rows]),
            "mask_BxL": (seg > 0).astype(np.float32), "segment_ids_BxL": seg,
            "positions_BxL": np.stack([r["positions"] for r in rows])}


def heldout_batches(texts: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int,
                    global_batch: int, max_tokens: int) -> list[dict]:
    """The first `lm_dataset` batches of `texts` (one pass, in the order of seed 0), about
    `max_tokens` tokens and at least one batch: fixed, so every evaluation scores the same
    text."""
    ds = lm_dataset(texts, tokenizer, seq_len=seq_len, global_batch=global_batch, seed=0,
                    num_epochs=1)
    n = max(1, max_tokens // (seq_len * global_batch))
    return list(itertools.islice(iter(ds), n))


def lm_inputs(batch: dict) -> dict:
    """An `lm_dataset` batch → a step's inputs: `tokens_BxL`, `mask_BxL` (bool: real
    tokens), `segment_ids_BxL` and `positions_BxL` (attention stays inside a document,
    positions restart in each) and `weights_BxL`, the next-token targets.

    A document's first token is never a target: in a packed row it would be predicted from
    the previous document's EOS, across the boundary attention respects (and at the start
    of a row it has no predecessor anyway), so every scored token is predicted from its own
    document."""
    return {"tokens_BxL": batch["tokens_BxL"],
            "weights_BxL": batch["mask_BxL"] * (batch["positions_BxL"] > 0),
            "mask_BxL": batch["segment_ids_BxL"] > 0, "segment_ids_BxL": batch["segment_ids_BxL"],
            "positions_BxL": batch["positions_BxL"]}


class _PackIterDataset(grain.IterDataset):
    """Concatenate-then-split packing into rows of `seq_len` tokens (see lm_dataset).

    Written here rather than grain's ConcatThenSplitIterDataset: the same rows (tested), a
    faster loop (BENCHMARKS.md), and a state (the parent's state before the current text +
    the offset in it) that restores in O(1) instead of replaying.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len, self._doc, self._offset = seq_len, None, 0
        self._doc_state = parent.get_state()  # parent state before self._doc was read
        self._arange = np.arange(seq_len, dtype=np.int32)

    def _fetch(self) -> None:
        self._doc_state = self._parent.get_state()
        self._doc, self._offset = next(self._parent)["tokens"], 0

    def __next__(self) -> dict:
        tokens_L, segment_ids_L, positions_L = (np.zeros(self._seq_len, np.int32)
                                                for _ in range(3))
        n = piece = 0
        while n < self._seq_len:
            if self._doc is None or self._offset == len(self._doc):
                try:
                    self._fetch()
                except StopIteration:
                    self._doc = None
                    break
            take = min(self._seq_len - n, len(self._doc) - self._offset)
            tokens_L[n: n + take] = self._doc[self._offset: self._offset + take]
            piece += 1
            segment_ids_L[n: n + take] = piece
            positions_L[n: n + take] = self._arange[:take]
            n, self._offset = n + take, self._offset + take
        if n == 0:
            raise StopIteration
        return {"tokens": tokens_L, "segment_ids": segment_ids_L, "positions": positions_L}

    def get_state(self) -> dict:
        return {"parent": self._doc_state, "offset": self._offset,
                "in_doc": self._doc is not None}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc_state, self._doc, self._offset = state["parent"], None, 0
        if state["in_doc"]:
            self._doc, self._offset = next(self._parent)["tokens"], state["offset"]


# ------------------------------------------------------- LM text: the dialogues
def dialogue_texts(hh_dir: str, subsets: list[str] | None = None, skip_invalid: bool = False
                   ) -> tuple[dict[str, list[str]], dict]:
    """{"train": [...], "heldout": [...]} chosen transcripts split by the project's rule,
    and the load report's totals (rows skipped by reason when `skip_invalid`)."""
    comparisons, report = hh.load_hh_comparisons(hh_dir, subsets=subsets,
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


# ------------------------------------------------------------------ PM pairs
def length_buckets(max_len: int, step: int = 64) -> tuple[int, ...]:
    """Padded lengths a PM batch may take: every multiple of `step` below max_len, then
    max_len. With length-grouped batches (pm.length_grouped) a batch wastes less than
    `step` tokens a row; each length compiles once (max_len / step shapes).
    """
    return (*range(step, max_len, step), max_len)


def pm_tokens(text: str, tokenizer: Tokenizer, max_len: int) -> tuple[np.ndarray, bool]:
    """Tokens of `text` + the end-of-context token, left-truncated to max_len."""
    ids = tokenizer.encode(text) + [tokenizer.eoc_id]
    return np.asarray(ids[-max_len:], np.int32), len(ids) > max_len


def pm_example(comp: Comparison, tokenizer: Tokenizer, max_len: int, weight: float = 1.0) -> dict:
    """Tokenized pair: `context + response + EOC` each, keeping the last max_len tokens
    (the PM reads its score on the EOC token, PAPER.md §3, so the end must survive)."""
    chosen, chosen_cut = pm_tokens(comp.context + comp.chosen, tokenizer, max_len)
    rejected, rejected_cut = pm_tokens(comp.context + comp.rejected, tokenizer, max_len)
    return {"chosen": chosen, "rejected": rejected, "chosen_truncated": chosen_cut,
            "rejected_truncated": rejected_cut, "weight": weight, "subset": comp.subset}


def count_truncations(comparisons: Sequence[Comparison], tokenizer: Tokenizer, max_len: int
                      ) -> collections.Counter:
    """{"chosen": n, "rejected": n, "pairs": n (either side)} cut by left truncation."""
    out = collections.Counter(chosen=0, rejected=0, pairs=0)
    for comp in comparisons:
        ex = pm_example(comp, tokenizer, max_len)
        out["chosen"] += ex["chosen_truncated"]
        out["rejected"] += ex["rejected_truncated"]
        out["pairs"] += ex["chosen_truncated"] or ex["rejected_truncated"]
    return out


def pm_shared_example(comp: Comparison, tokenizer: Tokenizer, max_len: int,
                      weight: float = 1.0) -> dict:
    """One row holding `context`, then `chosen + EOC`, then `rejected + EOC` (the layout
    "shared"): the context is run once, each response sees it (branch ids 1 / 2 / 3) but not
    the other response, and both responses continue the context's positions.

    Token for token the two sequences of `pm_example` when nothing is cut. Cutting keeps one
    context for both: its last `max_len − the longer response` tokens (so each response
    sees at most max_len tokens, and both see the same context); a response longer than
    max_len alone keeps its last max_len tokens and no context.
    """
    ctx = tokenizer.encode(comp.context)
    parts, cut = {}, {}
    for side in ("chosen", "rejected"):
        response = getattr(comp, side)
        full = tokenizer.encode(comp.context + response)
        # tokenizers that merge across the context/response boundary: encode the response alone
        ids = full[len(ctx):] if full[:len(ctx)] == ctx else tokenizer.encode(response)
        ids = ids + [tokenizer.eoc_id]
        parts[side], cut[side] = ids[-max_len:], len(ids) > max_len
    keep = max(0, max_len - max(len(parts["chosen"]), len(parts["rejected"])))
    kept_ctx = ctx[len(ctx) - min(keep, len(ctx)):]
    c, rc, rr = len(kept_ctx), len(parts["chosen"]), len(parts["rejected"])
    return {"tokens": np.asarray(kept_ctx + parts["chosen"] + parts["rejected"], np.int32),
            "positions": np.concatenate([np.arange(c), c + np.arange(rc), c + np.arange(rr)]
                                        ).astype(np.int32),
            "branch": np.repeat(np.asarray([1, 2, 3], np.int8), [c, rc, rr]),
            "chosen_len": c + rc, "rejected_len": c + rr,
            "chosen_truncated": cut["chosen"] or c < len(ctx),
            "rejected_truncated": cut["rejected"] or c < len(ctx),
            "weight": weight, "subset": comp.subset}


def _pm_shared_batch(rows: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
    longest = max(len(r["tokens"]) for r in rows)
    length = next(b for b in buckets if b >= longest)
    out = {"pair_tokens_BxL": np.full((len(rows), length), pad_id, np.int32),
           "pair_positions_BxL": np.zeros((len(rows), length), np.int32),
           "pair_branch_BxL": np.zeros((len(rows), length), np.int8)}  # 0: padding
    for i, r in enumerate(rows):
        n = len(r["tokens"])
        out["pair_tokens_BxL"][i, :n] = r["tokens"]
        out["pair_positions_BxL"][i, :n] = r["positions"]
        out["pair_branch_BxL"][i, :n] = r["branch"]
    for side in ("chosen", "rejected"):
        out[f"{side}_len_B"] = np.asarray([r[f"{side}_len"] for r in rows], np.int32)
        out[f"{side}_truncated_B"] = np.asarray([r[f"{side}_truncated"] for r in rows], bool)
    # the EOC of each response: chosen ends its own part, rejected ends the row
    rc = np.asarray([r["chosen_len"] for r in rows], np.int32)
    out["chosen_index_B"] = rc - 1
    out["rejected_index_B"] = np.asarray([len(r["tokens"]) - 1 for r in rows], np.int32)
    out["weight_B"] = np.asarray([r["weight"] for r in rows], np.float32)
    out["subset_B"] = np.asarray([r["subset"] for r in rows], dtype=object)
    return out


def _pm_batch(rows: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
    longest = max(max(len(r["chosen"]), len(r["rejected"])) for r in rows)
    length = next(b for b in buckets if b >= longest)
    out = {}
    for side in ("chosen", "rejected"):
        tokens_BxL = np.full((len(rows), length), pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens_BxL[i, : len(r[side])] = r[side]
        out[f"{side}_tokens_BxL"] = tokens_BxL
        out[f"{side}_len_B"] = np.asarray([len(r[side]) for r in rows], np.int32)
        out[f"{side}_truncated_B"] = np.asarray([r[f"{side}_truncated"] for r in rows], bool)
    out["weight_B"] = np.asarray([r["weight"] for r in rows], np.float32)
    out["subset_B"] = np.asarray([r["subset"] for r in rows], dtype=object)
    return out


def pm_dataset(comparisons: Sequence[Comparison], tokenizer: Tokenizer, *, max_len: int,
               global_batch: int, seed: int, num_epochs: int | None = 1, shuffle: bool = True,
               drop_remainder: bool = True, buckets: Sequence[int] | None = None,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int = 2, layout: str = "separate") -> grain.IterDataset:
    """PM pair batches, right-padded per batch to the smallest bucket that fits.

    layout "shared" (`pm_shared_example`): one row per pair, context once, yielding
    `pair_tokens_BxL` / `pair_positions_BxL` / `pair_branch_BxL` (int8: 1 context,
    2 chosen, 3 rejected, 0 padding), `chosen_index_B` / `rejected_index_B` (each EOC),
    `chosen_len_B` / `rejected_len_B` (tokens each response sees), `*_truncated_B`,
    `weight_B`, `subset_B`; buckets default to `length_buckets(2 · max_len)`.
    layout "separate" yields `chosen_tokens_BxL` / `rejected_tokens_BxL` (int32, pad_id
    after the EOC), `chosen_len_B` / `rejected_len_B` (EOC index + 1), `*_truncated_B`
    (bool), `weight_B` (float32, 0 on padding rows) and `subset_B` (object array of subset
    names, host-only).
    `drop_remainder=False` (evaluation) pads the data to whole global batches with
    weight-0 copies, so every example is seen once and every host runs as many steps.
    """
    pi, pc = _process(process_index, process_count)
    local = _local_batch(global_batch, pc)
    if layout not in ("separate", "shared"):
        raise ValueError(f"layout must be 'separate' or 'shared', got {layout!r}")
    row_len = max_len if layout == "separate" else 2 * max_len
    buckets = tuple(buckets or length_buckets(row_len))
    if buckets[-1] < row_len:
        raise ValueError(f"the largest bucket {buckets[-1]} is below the longest row "
                         f"{row_len} (layout {layout!r}, max_len {max_len})")
    ds = grain.MapDataset.source(comparisons).map(lambda c: (c, 1.0))
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        whole = len(ds) // global_batch * global_batch
        if drop_remainder:
            if not whole:
                raise ValueError(f"{len(ds)} comparisons × epochs is less than one global "
                                 f"batch of {global_batch}")
            ds = ds[:whole]  # equal step counts on every host
        elif whole < len(ds):
            pad = ds[:1].repeat(global_batch - (len(ds) - whole)).map(lambda x: (x[0], 0.0))
            ds = grain.MapDataset.concatenate([ds, pad])
    example, collate = ((pm_example, _pm_batch) if layout == "separate" else
                        (pm_shared_example, _pm_shared_batch))
    ds = ds[pi::pc].map(lambda x: example(x[0], tokenizer, max_len, x[1]))
    ds = ds.to_iter_dataset(_read_options(num_threads))
    return ds.batch(local, drop_remainder=drop_remainder,
                    batch_fn=lambda rows: collate(rows, buckets, tokenizer.pad_id))
