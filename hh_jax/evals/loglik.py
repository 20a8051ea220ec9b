"""Conditional log-likelihood of choices given a context, with any hh_jax Transformer.

One row per item: the context once, then every choice as its own branch (model.py's
`branch_ids`: 1 = the shared context, 2, 3, … = choices that see the context but not each
other), each branch's positions continuing from the end of the context. So a 2-choice
HHH item or a 13-choice TruthfulQA MC2 item costs one copy of its context, and a choice's
log-likelihood is exactly the one a forward over `context + choice` alone would give.
An item too long for `max_len` falls back to one row per choice, the context cut from
the left.

Rows are padded to power-of-two buckets (length L, scored tokens T) and a fixed batch, so
the jitted scorer compiles once per bucket, never per item. The LM head runs only at the
T positions that predict a choice token.

Shapes in names: B batch, L length, T scored tokens, D model, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hh_jax import chat
from hh_jax.model import Transformer, lm_head_logits

HEAD_CHUNK = 64  # positions whose V-wide logits exist at once (B·64·V floats)


@dataclasses.dataclass(frozen=True)
class Request:
    """Score each of `choices` (token ids) after `context` (token ids, non-empty)."""

    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]


@dataclasses.dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    branch: list[int]
    pred: list[int]  # index of the position whose output predicts each scored token
    target: list[int]
    owner: list[tuple[int, int]]  # (request, choice) of each scored token


def _bucket(n: int, lo: int) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _row(req_i: int, context: Sequence[int], choices: Sequence[tuple[int, Sequence[int]]]
         ) -> _Row:
    ctx = list(context)
    r = _Row(ctx[:], list(range(len(ctx))), [1] * len(ctx), [], [], [])
    for b, (ci, choice) in enumerate(choices):
        start = len(r.tokens)
        for t, tok in enumerate(choice):
            r.pred.append(len(ctx) - 1 if t == 0 else start + t - 1)
            r.target.append(int(tok))
            r.owner.append((req_i, ci))
        r.tokens += list(choice)
        r.positions += list(range(len(ctx), len(ctx) + len(choice)))
        r.branch += [b + 2] * len(choice)
    return r


def pack(requests: Sequence[Request], max_len: int) -> list[_Row]:
    """Rows for `requests`: one per request if it fits in max_len, else one per choice
    with the context left-truncated (a choice longer than max_len − 1 is an error)."""
    rows = []
    for i, req in enumerate(requests):
        if not req.context:
            raise ValueError(f"request {i}: empty context (start it with BOS)")
        if not req.choices or any(len(c) == 0 for c in req.choices):
            raise ValueError(f"request {i}: no choices, or an empty choice")
        if len(req.context) + sum(map(len, req.choices)) <= max_len:
            rows.append(_row(i, req.context, list(enumerate(req.choices))))
            continue
        for ci, c in enumerate(req.choices):
            room = max_len - len(c)
            if room < 1:
                raise ValueError(f"request {i}: choice {ci} has {len(c)} tokens, max_len "
                                 f"{max_len} leaves no room for context")
            rows.append(_row(i, req.context[-room:], [(ci, c)]))
    return rows


def _token_logprobs(params, tokens_BxL, mask_BxL, positions_BxL, branch_BxL, pred_BxT,
                    target_BxT, *, model: Transformer):
    out = model.apply(params, tokens_BxL, positions_BxL=positions_BxL, mask_BxL=mask_BxL,
                      branch_ids_BxL=branch_BxL, with_logits=False)
    hidden_BxTxD = jnp.take_along_axis(out["hidden_BxLxD"], pred_BxT[:, :, None], axis=1)

    def head(args):  # log P(target) at C positions: the V-wide logits of C positions only
        h_BxCxD, t_BxC = args
        logp_BxCxV = jax.nn.log_softmax(lm_head_logits(params, h_BxCxD, model.cfg), axis=-1)
        return jnp.take_along_axis(logp_BxCxV, t_BxC[:, :, None], axis=-1)[..., 0]

    b, t = target_BxT.shape
    c = min(t, HEAD_CHUNK)  # T and HEAD_CHUNK are powers of two
    if c == t:
        return head((hidden_BxTxD, target_BxT))
    h_NxBxCxD = hidden_BxTxD.reshape(b, t // c, c, -1).transpose(1, 0, 2, 3)
    t_NxBxC = target_BxT.reshape(b, t // c, c).transpose(1, 0, 2)
    return jax.lax.map(head, (h_NxBxCxD, t_NxBxC)).transpose(1, 0, 2).reshape(b, t)


class Scorer:
    """`scorer(requests) -> [[logprobs_of_each_token of choice c] for each request]`.

    One jitted function per (model); XLA compiles once per (L, T) bucket."""

    def __init__(self, model: Transformer, params, *, batch_size: int = 8,
                 max_len: int | None = None, min_bucket: int = 32, progress: bool = False):
        self.model, self.params = model, params
        self.batch_size, self.min_bucket, self.progress = batch_size, min_bucket, progress
        self.max_len = min(max_len or model.cfg.max_len, model.cfg.max_len)
        self._fn = jax.jit(functools.partial(_token_logprobs, model=model))
        self.shapes_seen: set[tuple[int, int, int]] = set()

    def _batch(self, rows: list[_Row]):
        b = self.batch_size
        length = min(_bucket(max(len(r.tokens) for r in rows), self.min_bucket), self.max_len)
        n_t = _bucket(max(len(r.target) for r in rows), 8)
        arr = {k: np.zeros((b, n), np.int32) for k, n in
               (("tokens", length), ("positions", length), ("branch", length),
                ("pred", n_t), ("target", n_t))}
        mask = np.zeros((b, length), bool)
        for i, r in enumerate(rows):
            n = len(r.tokens)
            for k in ("tokens", "positions", "branch"):
                arr[k][i, :n] = getattr(r, k)
            mask[i, :n] = True
            arr["pred"][i, :len(r.pred)] = r.pred
            arr["target"][i, :len(r.target)] = r.target
        self.shapes_seen.add((b, length, n_t))
        return (arr["tokens"], mask, arr["positions"], arr["branch"], arr["pred"],
                arr["target"])

    def __call__(self, requests: Sequence[Request]) -> list[list[np.ndarray]]:
        rows = pack(requests, self.max_len)
        out = [[[] for _ in r.choices] for r in requests]
        order = sorted(range(len(rows)), key=lambda k: len(rows[k].tokens))
        t0, n_batches = time.time(), -(-len(order) // self.batch_size)
        for bi, s in enumerate(range(0, len(order), self.batch_size)):
            batch = [rows[k] for k in order[s:s + self.batch_size]]
            lp_BxT = np.asarray(jax.device_get(self._fn(self.params, *self._batch(batch))))
            for i, r in enumerate(batch):
                for t, (ri, ci) in enumerate(r.owner):
                    out[ri][ci].append(float(lp_BxT[i, t]))
            if self.progress and (bi + 1) % max(1, n_batches // 20) == 0:
                el = time.time() - t0
                print(f"  scored {bi + 1}/{n_batches} batches, {el:.0f}s elapsed, "
                      f"~{el / (bi + 1) * (n_batches - bi - 1):.0f}s left",
                      file=sys.stderr, flush=True)
        return [[np.asarray(c, np.float64) for c in r] for r in out]


# ----------------------------------------------------------------------------- text level


def choice_text(choice: str, fmt: chat.ChatFormat) -> str:
    """A choice as the Assistant's reply in `fmt` (hh: one leading space; chatml: stripped)."""
    return chat.reply_text(" " + choice.strip(), fmt)


def mc_request(tok, turns, choices: Sequence[str], fmt: chat.ChatFormat, *,
               eos: bool = False) -> Request:
    """The context up to where the Assistant speaks, and each choice as its reply (with
    the EOS that ends a reply when `eos`); prompt and reply tokenized apart as chat.py does."""
    ctx = chat.prompt_ids(tok, list(turns), fmt)
    tail = [tok.eos_id] if eos else []
    return Request(tuple(ctx), tuple(tuple(tok.encode(choice_text(c, fmt)) + tail)
                                     for c in choices))


def text_request(tok, context: str, continuations: Sequence[str]) -> Request:
    """Raw text, no chat template (BOS first iff the tokenizer adds one)."""
    bos = [tok.bos_id] if getattr(tok, "add_bos", False) else []
    ctx = bos + tok.encode(context)
    if not ctx:
        ctx = [tok.bos_id]
    return Request(tuple(ctx), tuple(tuple(tok.encode(c)) for c in continuations))


NORMS = ("sum", "per_token", "per_char")


def summaries(logprobs: Sequence[np.ndarray], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per choice: "sum" (log P(choice | context)), "per_token" (sum / tokens) and
    "per_char" (sum / characters of the choice's text)."""
    s = np.array([float(lp.sum()) for lp in logprobs])
    n_tok = np.array([max(len(lp), 1) for lp in logprobs], np.float64)
    n_chr = np.array([max(len(t), 1) for t in texts], np.float64)
    return {"sum": s, "per_token": s / n_tok, "per_char": s / n_chr}


def score_items(scorer: Scorer, tok, fmt: chat.ChatFormat, items, *, eos: bool = False
                ) -> list[dict[str, np.ndarray]]:
    """Per item: summaries of its choices ({"sum", "per_token", "per_char"})."""
    reqs = [mc_request(tok, it.turns, it.choices, fmt, eos=eos) for it in items]
    out = scorer(reqs)
    return [summaries(lp, [choice_text(c, fmt) for c in it.choices])
            for it, lp in zip(items, out, strict=True)]


def predictions(scores: Sequence[dict], norm: str) -> np.ndarray:
    return np.array([int(np.argmax(s[norm])) for s in scores])


# ----------------------------------------------------------------------------- models


def load_model(spec: str):
    """(model, params, tokenizer, ChatFormat) of a params export directory or a pretrained
    name / .gguf / HF dir ("smollm2-135m")."""
    import os

    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "meta.json")):
        from hh_jax import generate

        return generate.load_export_with_format(spec)
    from hh_jax.pretrained import convert
    cfg, params, tok = convert.load_pretrained(spec)
    return Transformer(cfg), params, tok, chat.format_for(tok)
