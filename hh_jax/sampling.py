r"""Jitted autoregressive sampling with a KV cache.

Prefill the (left-aligned) prompt in one call, then one token per iteration inside
`lax.while_loop`: no host round-trip per token, and the loop exits as soon as every row
has ended, at EOS or at a stop string. Temperature, top-k, top-p; per-row lengths. Prompts
may be left- or right-padded (any layout: real tokens are moved to the right end, keeping
their order).

Stop strings ("\n\nHuman:" for the HH format: the model starting the next Human turn by
itself) are matched on tokens inside the loop. The host turns each string into token
sequences once (`stop_table`); the loop gets them as fixed-shape arrays (`StopTable`), so
another set of strings of the same shape runs the same compiled program. A stopped row's
response ends before the stop string: the PM never scores an invented Human turn.

Returned logprobs are those of the sampled tokens under the temperature-scaled, *not*
truncated distribution: the policy π that PPO optimises (RLHF_PRACTICE.md §2.11, and
trl#6789 for the bias top-k/top-p truncation would add to the importance ratio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import decode_step, losses
from hh_jax.model import Transformer, init_cache, lm_head_logits


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    # decode steps through `decode_step` (every layer's weights and cache apart, split once
    # before the loop; the split weights are held while sampling) instead of the model's
    # stacked layer scan. None → on off CPU for a `Transformer` (on GPU, slicing stacked
    # weights inside the loop copies them every token), off on CPU. The same computation
    # either way (tests on CPU: identical draws in float32; in bfloat16 identical greedy
    # tokens, logprobs within bf16 rounding, which XLA may apply at other places).
    split_layers: bool | None = None


def _decoder(params, model: Transformer, cfg: SamplingConfig, cache: dict):
    """(decode(tokens_Bx1, positions_Bx1, cache, kv_valid_BxS) → (logits_BxV, cache), the
    initial cache in the layout it takes)."""
    split = cfg.split_layers
    if split is None:
        split = isinstance(model, Transformer) and jax.default_backend() != "cpu"
    if split:
        rest, layers = decode_step.split_layers(params, model.cfg)
        return (lambda tokens_Bx1, positions_Bx1, c, kv_valid_BxS: decode_step.step(
            rest, layers, tokens_Bx1, positions_Bx1, c, kv_valid_BxS, model.cfg),
            decode_step.split_cache(cache, model.cfg))

    def decode(tokens_Bx1, positions_Bx1, c, kv_valid_BxS):
        out = model.apply(params, tokens_Bx1, positions_BxL=positions_Bx1, cache=c,
                          kv_valid_BxS=kv_valid_BxS)
        return out["logits_BxLxV"][:, -1], out["cache"]
    return decode, cache


# Stop strings by chat format (hh_jax/chat.py): HH text turns end where the model writes the
# next "\n\nHuman:" itself; in ChatML the turn ends at EOS (<|im_end|>), and a new
# <|im_start|> without it is a stop as well (what chat.cut_reply cuts at).
STOP_STRINGS = {"hh": ("\n\nHuman:",), "chatml": ("<|im_start|>",)}
# Text put before / after a stop string to find the tokens it becomes inside a response.
_BEFORE = ("", ".", "?", "!", ",", ")", '"', "a", "1", " ", "\n")
_AFTER = ("", " ", "\n", " a")


class StopTable(NamedTuple):
    """Stop sequences as fixed-shape arrays (a pytree: pass it to a jitted `sample`).

    Sequence s is `lengths_S[s]` tokens long (0: an unused slot). Its first token is any
    token t with `first_SxV[s, t]`; its other tokens are `ids_SxW[s]`'s right end (the
    sequence right-aligned in W slots, -1 before it; the first slot holds one of its
    first tokens, for reading only)."""

    first_SxV: np.ndarray  # bool
    ids_SxW: np.ndarray  # int32
    lengths_S: np.ndarray  # int32


def stop_table_from_ids(sequences: Sequence[Sequence[int]], vocab_size: int, *,
                        first: Sequence[Iterable[int]] | None = None, slots: int | None = None,
                        width: int | None = None) -> StopTable:
    """A `StopTable` of token sequences; `first[s]`: the ids sequence s may start with
    (default its own first id). `slots`/`width` pad to a fixed shape (S, W)."""
    seqs = [list(map(int, q)) for q in sequences]
    if any(not q for q in seqs):
        raise ValueError("empty stop sequence")
    s = len(seqs) if slots is None else slots
    w = max((len(q) for q in seqs), default=1) if width is None else width
    if len(seqs) > s or any(len(q) > w for q in seqs):
        raise ValueError(f"{len(seqs)} stop sequences of up to {max(map(len, seqs))} tokens "
                         f"do not fit {s} slots × {w} tokens")
    table = StopTable(np.zeros((s, vocab_size), bool), np.full((s, w), -1, np.int32),
                      np.zeros((s,), np.int32))
    for i, q in enumerate(seqs):
        table.ids_SxW[i, w - len(q):] = q
        table.lengths_S[i] = len(q)
        table.first_SxV[i, list(first[i]) if first is not None else q[:1]] = True
    return table


def stop_variants(tok, text: str) -> list[tuple[str | None, tuple[int, ...], tuple[int, ...]]]:
    r"""How `text` is tokenized inside a response: (lead, first ids, other ids), deduplicated.

    The tokens that cover `text` when it follows each of `_BEFORE` and precedes each of
    `_AFTER` (BPE merges across its edges: "\n\nHuman:" after "." is ['.\n\n', 'Human',
    ':'] for sentencepiece, ['.', '\n', '\n', 'Human', ':'] for byte-level BPE). `lead` is
    the part of `text` that the first token holds (its end): any token whose text ends with
    it may begin the stop; variants differing only in that token are one. None where the
    first token reaches past `text`'s end (then only the first ids listed)."""
    found: dict[tuple, set[int]] = {}
    for before in _BEFORE:
        for after in _AFTER:
            full = before + text + after
            ids = list(tok.encode(full))
            ends = [tok.decode(ids[:k + 1]) for k in range(len(ids))]
            if not ends or ends[-1] != full or not all(full.startswith(e) for e in ends):
                continue  # no clean round trip (e.g. a multi-byte character split): skip
            ends = [len(e) for e in ends]
            first = next(k for k, e in enumerate(ends) if e > len(before))
            last = next(k for k, e in enumerate(ends) if e >= len(before) + len(text))
            ids = tuple(ids[first:last + 1])
            lead = (text[:ends[first] - len(before)]
                    if ends[first] <= len(before) + len(text) else None)
            found.setdefault((lead, ids[1:] if lead is not None else ids), set()).add(ids[0])
    if not found:  # no variant round-trips: at least the string's own tokens
        ids = tuple(tok.encode(text))
        found[(None, ids)] = {ids[0]}
    return [(lead, tuple(sorted(firsts)), key[1:] if lead is None else key)
            for (lead, key), firsts in found.items()]


def stop_table(tok, strings: Sequence[str], *, vocab_size: int | None = None,
               slots: int | None = None, width: int | None = None) -> StopTable:
    r"""The `StopTable` of `strings` for tokenizer `tok` (host side, once per run).

    Each string becomes its `stop_variants`; a variant's first token is any token whose
    text ends with its lead (so ".\n\n", "?\n\n", " \n\n" … all begin "\n\nHuman:"
    for a sentencepiece model that merges punctuation with newlines). `vocab_size`: the
    model's (default the tokenizer's); `slots`/`width`: a fixed shape (S, W), so that
    another set of strings reuses the compiled sampler.

    Limitation: a stop is found only where the model emits one of these tokenizations
    (the tokenizer's own, after the usual characters); a non-canonical spelling (e.g.
    "\n" "\n" where the tokenizer has "\n\n") or one merged with the text after it in
    an unlisted way is not. Where text is decoded on the host, chat.cut_reply remains the
    exact cut."""
    vocab_size = tok.vocab_size if vocab_size is None else vocab_size
    texts = None
    seqs, firsts = [], []
    for text in dict.fromkeys(strings):
        if not text:
            raise ValueError("empty stop string")
        for lead, first_ids, rest in stop_variants(tok, text):
            allowed = set(first_ids)
            if lead is not None:
                if texts is None:
                    texts = [tok.decode([i]) for i in range(min(tok.vocab_size, vocab_size))]
                allowed |= {i for i, t in enumerate(texts) if t.endswith(lead)}
            seqs.append(first_ids[:1] + rest)
            firsts.append(sorted(allowed))
    return stop_table_from_ids(seqs, vocab_size, first=firsts, slots=slots, width=width)


def push_tail(tail_BxW: jax.Array, token_B: jax.Array) -> jax.Array:
    """The last W tokens of each row after `token_B` (oldest first)."""
    return jnp.concatenate([tail_BxW[:, 1:], token_B[:, None].astype(tail_BxW.dtype)], axis=1)


def stop_hits(tail_BxW: jax.Array, stops: StopTable) -> jax.Array:
    """Per row, the length of the longest stop sequence the tail ends with (0: none).

    `tail_BxW`: each row's last W generated tokens, -1 where there are fewer."""
    first_SxV, ids_SxW, lengths_S = stops
    n_stops, w = ids_SxW.shape
    start_S = w - lengths_S  # where each sequence's first token sits in the tail
    rest_BxS = jnp.all((tail_BxW[:, None, :] == ids_SxW[None])
                       | (jnp.arange(w)[None, :] <= start_S[:, None])[None], axis=-1)
    first_BxS = jnp.take(tail_BxW, jnp.minimum(start_S, w - 1), axis=1)
    in_class_BxS = first_SxV[jnp.arange(n_stops)[None, :],
                             jnp.clip(first_BxS, 0, first_SxV.shape[1] - 1)]
    hit_BxS = rest_BxS & in_class_BxS & (first_BxS >= 0) & (lengths_S > 0)[None]
    return jnp.max(jnp.where(hit_BxS, lengths_S[None], 0), axis=1).astype(jnp.int32)


def _device_stops(stops: StopTable, vocab_size: int) -> StopTable:
    """The table on device, its first-token masks as wide as the model's vocabulary."""
    first_SxV, ids_SxW, lengths_S = (jnp.asarray(x) for x in stops)
    v = first_SxV.shape[1]
    if v > vocab_size:
        raise ValueError(f"stop table for {v} tokens, model vocabulary {vocab_size}")
    first_SxV = jnp.pad(first_SxV, ((0, 0), (0, vocab_size - v)))
    return StopTable(first_SxV, ids_SxW.astype(jnp.int32), lengths_S.astype(jnp.int32))


def left_align(tokens_BxQ: jax.Array, mask_BxQ: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the right end (stable), padding to the left."""
    order_BxQ = jnp.argsort(mask_BxQ.astype(jnp.int32), axis=1, stable=True)
    return (jnp.take_along_axis(tokens_BxQ, order_BxQ, axis=1),
            jnp.take_along_axis(mask_BxQ, order_BxQ, axis=1))


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf."""
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                            keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg, logits_BxV)
    return logits_BxV


def draw(logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
    """One token per row from softmax(logits_BxV), by inverse CDF: one uniform per row
    (Gumbel-max, as in jax.random.categorical, draws V of them — most of a decode step's
    sampling time at V = 8192). Tokens without probability mass (filtered) are never drawn.
    """
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = jax.random.uniform(rng, cdf_BxV[:, :1].shape, cdf_BxV.dtype) * cdf_BxV[:, -1:]
    token_B = jnp.sum(cdf_BxV <= u_Bx1, axis=-1)
    # u·total may round up to total: then the last token with mass
    last_B = logits_BxV.shape[-1] - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)
    return jnp.minimum(token_B, last_B)


def _pick(logits_BxV, rng, cfg: SamplingConfig):
    """(token_B, logprob_B, entropy_B) — under the untruncated tempered distribution."""
    if cfg.temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled_BxV = logits_BxV / cfg.temperature
        logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
        token_B = draw(filter_logits(scaled_BxV, cfg.top_k, cfg.top_p), rng)
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B, losses.entropy(logp_BxV)


def sample(params, prompt_BxQ: jax.Array, prompt_mask_BxQ: jax.Array, rng: jax.Array, *,
           model: Transformer, cfg: SamplingConfig, eos_id: int, pad_id: int,
           stops: StopTable | None = None) -> dict:
    """Samples up to `cfg.max_new_tokens` per row; a row ends at EOS or at a stop sequence
    of `stops`: matched on generated tokens only; the first to complete ends the row (the
    longest of those completing at the same token); a token that is EOS ends it at EOS.

    Returns
      tokens_BxR          the drawn tokens, pad after the row's end;
      logprobs_BxR,       of the distribution each token was drawn from; 0 after the end;
      entropies_BxR
      lengths_B           the response: tokens up to and including EOS; a stopped row's
                          tokens before its stop string; else max_new_tokens;
      ended_B             the row produced EOS;
      stopped_B           the row ended at a stop string;
      stop_lengths_B      the stop string's tokens, which stay in tokens_BxR (and their
                          logprobs) right after the response: [lengths_B, lengths_B +
                          stop_lengths_B); 0 unless stopped;
    and the left-aligned prompt (prompt_BxQ, prompt_mask_BxQ). A row that ran out of
    tokens has neither ended_B nor stopped_B.
    """
    prompt_BxQ, prompt_mask_BxQ = left_align(prompt_BxQ, prompt_mask_BxQ)
    b, q = prompt_BxQ.shape
    r = cfg.max_new_tokens
    kv_valid_BxS = jnp.concatenate([prompt_mask_BxQ, jnp.zeros((b, r), bool)], axis=1)
    positions_BxQ = jnp.maximum(jnp.cumsum(prompt_mask_BxQ, axis=1) - 1, 0)
    # prefill: the LM head (V wide) only at the last prompt position, the one that is read
    out = model.apply(params, prompt_BxQ, positions_BxL=positions_BxQ,
                      cache=init_cache(model.cfg, b, q + r), kv_valid_BxS=kv_valid_BxS,
                      with_logits=False)
    logits_Bx1xV = lm_head_logits(params, out["hidden_BxLxD"][:, -1:], model.cfg)
    decode, cache = _decoder(params, model, cfg, out["cache"])
    init = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits_BxV=logits_Bx1xV[:, 0],
                kv_valid_BxS=kv_valid_BxS, pos_B=prompt_mask_BxQ.sum(axis=1).astype(jnp.int32),
                done_B=jnp.zeros((b,), bool), n_B=jnp.zeros((b,), jnp.int32),
                stop_len_B=jnp.zeros((b,), jnp.int32),
                tokens_BxR=jnp.full((b, r), pad_id, jnp.int32),
                logprobs_BxR=jnp.zeros((b, r), jnp.float32),
                entropies_BxR=jnp.zeros((b, r), jnp.float32), rng=rng)
    if stops is not None:
        stops = _device_stops(stops, model.cfg.vocab_size)
        init["tail_BxW"] = jnp.full((b, stops.ids_SxW.shape[1]), -1, jnp.int32)

    def cond(c):
        return (c["i"] < r) & ~jnp.all(c["done_B"])

    def body(c):
        rng, step_rng = jax.random.split(c["rng"])
        token_B, logp_B, entropy_B = _pick(c["logits_BxV"], step_rng, cfg)
        live_B = ~c["done_B"]
        token_B = jnp.where(live_B, token_B, pad_id)
        i = c["i"]
        kv_valid_BxS = c["kv_valid_BxS"].at[:, q + i].set(live_B)
        logits_BxV, cache = decode(token_B[:, None], c["pos_B"][:, None], c["cache"],
                                   kv_valid_BxS)
        eos_B = live_B & (token_B == eos_id)
        new = dict(i=i + 1, cache=cache, logits_BxV=logits_BxV,
                   kv_valid_BxS=kv_valid_BxS, pos_B=c["pos_B"] + 1,
                   done_B=c["done_B"] | eos_B, n_B=c["n_B"] + live_B,
                   stop_len_B=c["stop_len_B"],
                   tokens_BxR=c["tokens_BxR"].at[:, i].set(token_B),
                   logprobs_BxR=c["logprobs_BxR"].at[:, i].set(jnp.where(live_B, logp_B, 0.0)),
                   entropies_BxR=c["entropies_BxR"].at[:, i].set(
                       jnp.where(live_B, entropy_B, 0.0)),
                   rng=rng)
        if stops is not None:
            new["tail_BxW"] = push_tail(c["tail_BxW"], token_B)
            hit_B = jnp.where(live_B & ~eos_B, stop_hits(new["tail_BxW"], stops), 0)
            new["stop_len_B"] = jnp.where(hit_B > 0, hit_B, c["stop_len_B"])
            new["done_B"] = new["done_B"] | (hit_B > 0)
        return new

    c = jax.lax.while_loop(cond, body, init)
    stopped_B = c["stop_len_B"] > 0
    return {"tokens_BxR": c["tokens_BxR"], "logprobs_BxR": c["logprobs_BxR"],
            "entropies_BxR": c["entropies_BxR"], "lengths_B": c["n_B"] - c["stop_len_B"],
            "ended_B": c["done_B"] & ~stopped_B, "stopped_B": stopped_B,
            "stop_lengths_B": c["stop_len_B"], "prompt_BxQ": prompt_BxQ,
            "prompt_mask_BxQ": prompt_mask_BxQ}


def pad_prompts(token_lists: list[list[int]], pad_id: int, length: int | None = None,
                left: bool = True):
    """Host-side helper: list of id lists → (tokens_BxQ, mask_BxQ) numpy, left-padded."""
    q = length or max(len(t) for t in token_lists)
    tokens = np.full((len(token_lists), q), pad_id, np.int32)
    mask = np.zeros((len(token_lists), q), bool)
    for i, ids in enumerate(token_lists):
        ids = list(ids)[-q:]  # keep the end of an over-long prompt
        sl = slice(q - len(ids), q) if left else slice(0, len(ids))
        tokens[i, sl], mask[i, sl] = ids, True
    return tokens, mask
