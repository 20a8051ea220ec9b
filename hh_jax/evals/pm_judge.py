"""A PM export as a judge: score (dialogue, response) pairs, batched and jitted.

The PM reads its score at the end-of-context token after `context + response`, the text
in the raw HH format it was trained on (PAPER.md §3; data loaders: context + response
+ EOC, left-truncated to the PM's max_len so the end survives).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from hh_jax import chat, checkpoint, reward
from hh_jax.policy import Frozen
from hh_jax.tokenizer import load_tokenizer


class PMJudge:
    """`judge(texts) -> scores_N`, texts being full HH transcripts ending in a response."""

    def __init__(self, params_dir: str, *, batch_size: int = 16, max_len: int | None = None,
                 progress: bool = False):
        stage = checkpoint.read_meta(params_dir).get("stage")
        if stage not in ("pm", "pmp"):  # before loading any params
            raise ValueError(f"{params_dir}: a {stage!r} export, not a PM")
        pm = Frozen(params_dir, None, "pm")  # no mesh: the params load as saved
        self.cfg, self.params = pm.cfg, pm.params
        self.tok = load_tokenizer(checkpoint.tokenizer_spec(params_dir))
        self.max_len = min(max_len or pm.meta.get("max_len", 512), self.cfg.max_len)
        self.batch_size, self.progress = batch_size, progress
        self._fn = jax.jit(lambda p, t, n: reward.pm_scores(p, t, n, model=pm.model)[0])

    def tokens(self, text: str) -> list[int]:
        return (self.tok.encode(text) + [self.tok.eoc_id])[-self.max_len:]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        rows = [self.tokens(t) for t in texts]
        order = np.argsort([len(r) for r in rows], kind="stable")
        out = np.empty(len(rows))
        b, t0 = self.batch_size, time.time()
        for s in range(0, len(rows), b):
            idx = order[s:s + b]
            length = max(32, 1 << (max(len(rows[i]) for i in idx) - 1).bit_length())
            toks = np.zeros((b, min(length, self.max_len)), np.int32)
            lens = np.ones(b, np.int32)  # padding rows read their first token
            for k, i in enumerate(idx):
                toks[k, :len(rows[i])], lens[k] = rows[i], len(rows[i])
            out[idx] = np.asarray(self._fn(self.params, toks, lens))[:len(idx)]
            if self.progress and (s // b) % 10 == 9:
                print(f"  PM scored {s + len(idx)}/{len(rows)}, {time.time() - t0:.0f}s",
                      file=sys.stderr, flush=True)
        return out


def transcript(turns, response: str) -> str:
    """The HH text a PM scores: the dialogue up to "\\n\\nAssistant:", then the response
    with one leading space (as the HH data write it)."""
    return chat.render(list(turns), chat.HH, add_generation_prompt=True) + " " + response.strip()
