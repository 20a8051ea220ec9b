"""Frozen-trunk activations of PM pairs, computed once and kept on disk.

A PM whose lower layers are frozen (the cheap way to finetune a pretrained model into a PM
on a CPU: PAPER.md §3 finetunes all of it) needs the trunk's output for each pair once;
the trainable top then runs on it every epoch. One pass of the whole model over the pairs
in the PM's shared layout (loaders.pm_shared_example: context once, both responses as
branches) writes, per pair:

- `x_TxD.npy`: the residual stream after layer `n_frozen` at every real token of the row
  (rows concatenated, float32; `rows.npz` holds each row's offset and length);
- `reads_Px2xNxD.npy`: the residual stream after every layer (1…N) at the chosen and the
  rejected end-of-context token, float16 — linear probes per layer read these;
- `rows.npz`: positions, branch ids, EOC indices, truncation flags, subset of each row.

Rows are written in the order of the given comparisons. The pass runs batches of similar
length (few padded tokens, one compile per (batch, bucket) shape) and reports progress.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import trunk
from hh_jax.data import loaders
from hh_jax.model import ModelConfig
from hh_jax.tokenizer import Tokenizer

FORMAT = 1


def pair_key(comp) -> str:
    """A comparison's identity in a cache (its texts and subset)."""
    text = "\0".join((comp.context, comp.chosen, comp.rejected, comp.subset))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def model_id(cfg: ModelConfig, params) -> str:
    """Which trunk produced a cache: the config and a digest of every layer's weights."""
    arch = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
            cfg.k, cfg.rope_theta, cfg.tie_embeddings, cfg.norm_eps)  # not max_len, dtype
    h = hashlib.sha256(repr(arch).encode())
    for leaf in jax.tree_util.tree_leaves(params["params"]["layers"]):
        h.update(np.asarray(jax.device_get(leaf[:, :2]), np.float32).tobytes())
    return h.hexdigest()[:24]


def _pass_fn(cfg: ModelConfig, n_frozen: int):
    """jitted (params, tokens, positions, branch, index_Bx2) → (x at the cut, reads)."""
    def run(params, tokens_BxL, positions_BxL, branch_BxL, index_Bx2):
        stacked = params["params"]["layers"]
        mask = trunk.mask_for(positions_BxL, branch_BxL > 0, branch_BxL.astype(jnp.int32))
        x = trunk.embed(cfg, params, tokens_BxL)
        x_cut, reads_lo = trunk.run_layers(cfg, trunk.layer_slice(stacked, 0, n_frozen), x,
                                           positions_BxL, mask, index_Bx2)
        _, reads_hi = trunk.run_layers(cfg, trunk.layer_slice(stacked, n_frozen, cfg.n_layers),
                                       x_cut, positions_BxL, mask, index_Bx2)
        reads_NxBx2xD = jnp.concatenate([reads_lo, reads_hi], axis=0)
        return x_cut, jnp.transpose(reads_NxBx2xD, (1, 2, 0, 3)).astype(jnp.float16)
    return jax.jit(run)


def bucket(n: int, step: int = 64) -> int:
    """The padded length of a row of n tokens: the next multiple of `step`."""
    return int(-(-n // step) * step)


def plan_batches(lengths: np.ndarray, batch_tokens: int, step: int = 64
                 ) -> list[tuple[int, np.ndarray]]:
    """(padded length, row indices) batches: rows sorted by length, each batch padded to a
    multiple of `step`, with batch_tokens // padded rows (the last of a bucket fewer)."""
    order = np.argsort(lengths, kind="stable")
    out, i = [], 0
    while i < len(order):
        length = bucket(int(lengths[order[i]]), step)
        rows = max(1, batch_tokens // length)
        same = order[i:i + rows]
        same = same[-(-lengths[same] // step) * step == length]  # one bucket per batch
        out.append((length, same))
        i += len(same)
    return out


def pad_rows(rows: np.ndarray, length: int, offsets: np.ndarray, lengths: np.ndarray,
             values_TxX: np.ndarray, positions_T: np.ndarray, branch_T: np.ndarray,
             fill: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values_BxLx…, positions_BxL int32, branch_BxL int8): the `rows` of a pair layout laid
    end to end (row r at offsets[r], lengths[r] tokens long) as a batch padded to `length`,
    values (tokens or activations, kept in their dtype) with `fill`, the rest with 0."""
    b = len(rows)
    values = np.full((b, length) + values_TxX.shape[1:], fill, values_TxX.dtype)
    positions, branch = np.zeros((b, length), np.int32), np.zeros((b, length), np.int8)
    for i, r in enumerate(rows):
        s, n = int(offsets[r]), int(lengths[r])
        values[i, :n], positions[i, :n] = values_TxX[s:s + n], positions_T[s:s + n]
        branch[i, :n] = branch_T[s:s + n]
    return values, positions, branch


def build(out_dir: str, comps: Sequence, tok: Tokenizer, cfg: ModelConfig, params, *,
          max_len: int, n_frozen: int, batch_tokens: int = 4096, log_every: int = 50) -> dict:
    """Writes the cache of `comps` into out_dir (see the module docstring); returns its meta.
    A directory holding a complete cache of the same settings is reused as it is."""
    meta = {"format": FORMAT, "pairs": len(comps), "max_len": max_len, "n_frozen": n_frozen,
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "model_id": model_id(cfg, params)}
    done = os.path.join(out_dir, "meta.json")
    if os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} == meta:
            return old
    if not 0 < n_frozen < cfg.n_layers:
        raise ValueError(f"n_frozen must be in [1, {cfg.n_layers - 1}], got {n_frozen}")
    os.makedirs(out_dir, exist_ok=True)
    examples = [loaders.pm_shared_example(c, tok, max_len) for c in comps]
    lengths = np.asarray([len(e["tokens"]) for e in examples])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x_TxD = np.lib.format.open_memmap(os.path.join(out_dir, "x_TxD.npy"), "w+", np.float32,
                                      (int(offsets[-1]), cfg.d_model))
    reads = np.lib.format.open_memmap(os.path.join(out_dir, "reads_Px2xNxD.npy"), "w+",
                                      np.float16, (len(comps), 2, cfg.n_layers, cfg.d_model))
    flat = {k: np.concatenate([e[k] for e in examples]) for k in ("tokens", "positions", "branch")}
    index_Px2 = np.stack([np.asarray([e["chosen_len"] - 1 for e in examples], np.int32),
                          lengths.astype(np.int32) - 1], axis=1)  # chosen, rejected EOC
    run = _pass_fn(cfg, n_frozen)
    plan = plan_batches(lengths, batch_tokens)
    t0, seen = time.time(), 0
    for b, (length, rows) in enumerate(plan):
        tokens, positions, branch = pad_rows(rows, length, offsets, lengths, flat["tokens"],
                                             flat["positions"], flat["branch"], tok.pad_id)
        x_cut, r_Bx2xNxD = jax.device_get(run(params, tokens, positions, branch, index_Px2[rows]))
        if not (np.isfinite(x_cut).all() and np.isfinite(r_Bx2xNxD).all()):
            raise FloatingPointError(f"non-finite activations in cache batch {b} of {out_dir}")
        for i, r in enumerate(rows):
            x_TxD[offsets[r]:offsets[r + 1]] = x_cut[i, :lengths[r]]
            reads[r] = r_Bx2xNxD[i]
        seen += int(lengths[rows].sum())
        if b % log_every == 0 or b == len(plan) - 1:
            rate = seen / max(time.time() - t0, 1e-9)
            print(f"[pm_cache] {out_dir}: batch {b + 1}/{len(plan)}, {seen:,}/{offsets[-1]:,} "
                  f"tokens, {rate:,.0f} tok/s, eta {(offsets[-1] - seen) / rate / 60:.1f} min",
                  flush=True)
    x_TxD.flush()
    reads.flush()
    np.savez(os.path.join(out_dir, "rows.npz"), offsets=offsets, lengths=lengths,
             positions=flat["positions"], branch=flat["branch"],
             chosen_index=index_Px2[:, 0], rejected_index=index_Px2[:, 1],
             chosen_len=np.asarray([e["chosen_len"] for e in examples], np.int32),
             rejected_len=np.asarray([e["rejected_len"] for e in examples], np.int32),
             truncated=np.asarray([e["chosen_truncated"] or e["rejected_truncated"]
                                   for e in examples]),
             subset=np.asarray([c.subset for c in comps]),
             keys=np.asarray([pair_key(c) for c in comps]))
    meta.update({"tokens": int(offsets[-1]), "seconds": round(time.time() - t0, 1),
                 "tokens_per_s": round(seen / max(time.time() - t0, 1e-9), 1)})
    with open(done + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(done + ".tmp", done)  # meta.json last: its presence marks a complete cache
    return meta


def load(out_dir: str) -> dict:
    """The cache as arrays (x and reads memory-mapped) plus its meta."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    rows = dict(np.load(os.path.join(out_dir, "rows.npz")))
    return {"meta": meta, **rows,
            "x_TxD": np.load(os.path.join(out_dir, "x_TxD.npy"), mmap_mode="r"),
            "reads_Px2xNxD": np.load(os.path.join(out_dir, "reads_Px2xNxD.npy"), mmap_mode="r")}


def find_or_build(cache_dir: str, name: str, comps: Sequence, tok: Tokenizer, cfg: ModelConfig,
                  params, *, max_len: int, n_frozen: int, **kw) -> tuple[dict, np.ndarray]:
    """(cache, row of each comparison): a complete cache in cache_dir/* from the same trunk
    and settings that holds every comparison is reused (e.g. a test PM on half the pairs
    another PM cached); else cache_dir/name is built for exactly these comparisons."""
    want = {"format": FORMAT, "max_len": max_len, "n_frozen": n_frozen,
            "model_id": model_id(cfg, params)}
    keys = [pair_key(c) for c in comps]
    for meta_path in sorted(glob.glob(os.path.join(cache_dir, "*", "meta.json"))):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} != want:
            continue
        cache = load(os.path.dirname(meta_path))
        index = {k: i for i, k in enumerate(cache["keys"])}
        if all(k in index for k in keys):
            print(f"[pm_cache] reusing {os.path.dirname(meta_path)} for {len(keys)} pairs",
                  flush=True)
            return cache, np.asarray([index[k] for k in keys], np.int64)
    out = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(out, "meta.json")):
        raise FileExistsError(f"{out} holds a cache of other pairs or settings; remove it or "
                              f"set another cache_dir")
    build(out, comps, tok, cfg, params, max_len=max_len, n_frozen=n_frozen, **kw)
    return load(out), np.arange(len(comps), dtype=np.int64)


def advance(src_dir: str, out_dir: str, cfg: ModelConfig, params, to_layer: int, *,
            batch_tokens: int = 4096, log_every: int = 50) -> dict:
    """A cache cut at `to_layer` from one cut lower: the layers in between run once over
    the cached rows (no pass over the layers below again). Rows, keys and the per-layer
    reads are the source's (hard-linked where the file system allows)."""
    src = load(src_dir)
    n0 = src["meta"]["n_frozen"]
    if not n0 < to_layer < cfg.n_layers:
        raise ValueError(f"to_layer must be in ({n0}, {cfg.n_layers}), got {to_layer}")
    if src["meta"]["model_id"] != model_id(cfg, params):
        raise ValueError(f"{src_dir}: cached from another trunk")
    os.makedirs(out_dir, exist_ok=True)
    for name in ("rows.npz", "reads_Px2xNxD.npy"):
        dst = os.path.join(out_dir, name)
        if not os.path.exists(dst):
            try:
                os.link(os.path.join(src_dir, name), dst)
            except OSError:
                shutil.copyfile(os.path.join(src_dir, name), dst)
    x_in = src["x_TxD"]
    x_out = np.lib.format.open_memmap(os.path.join(out_dir, "x_TxD.npy"), "w+", np.float32,
                                      x_in.shape)
    stacked = trunk.layer_slice(params["params"]["layers"], n0, to_layer)

    @jax.jit
    def run(stacked, x, positions, branch):
        mask = trunk.mask_for(positions, branch > 0, branch.astype(jnp.int32))
        return trunk.run_layers(cfg, stacked, x, positions, mask)[0]

    plan = plan_batches(src["lengths"], batch_tokens)
    t0 = time.time()
    for b, (length, rows) in enumerate(plan):
        x, positions, branch = pad_rows(rows, length, src["offsets"], src["lengths"], x_in,
                                        src["positions"], src["branch"])
        y = np.asarray(jax.device_get(run(stacked, x, positions, branch)))
        if not np.isfinite(y).all():
            raise FloatingPointError(f"non-finite activations in batch {b} of {out_dir}")
        for i, r in enumerate(rows):
            s, n = int(src["offsets"][r]), int(src["lengths"][r])
            x_out[s:s + n] = y[i, :n]
        if b % log_every == 0 or b == len(plan) - 1:
            print(f"[pm_cache] {out_dir}: advanced batch {b + 1}/{len(plan)} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    x_out.flush()
    meta = {**src["meta"], "n_frozen": to_layer, "advanced_from": src_dir,
            "seconds": round(time.time() - t0, 1)}
    meta.pop("tokens_per_s", None)
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta
