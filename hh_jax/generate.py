"""Sampling from a params export: load meta + tokenizer + params, render, decode."""

from __future__ import annotations

import functools
import os

import jax

from hh_jax import checkpoint, sampling
from hh_jax.model import ModelConfig, Transformer
from hh_jax.tokenizer import load_tokenizer

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def load_export(path: str):
    """(model, params, tokenizer) from a stage's `params/` export."""
    meta = checkpoint.read_meta(path)
    cfg = ModelConfig(**meta["model"])
    tok_spec = meta["tokenizer"]
    if tok_spec.endswith(".model") and not os.path.isabs(tok_spec):
        tok_spec = os.path.join(os.path.abspath(path), tok_spec)
    params = checkpoint.import_params(path)
    return Transformer(cfg), params, load_tokenizer(tok_spec)


def render_prompt(prompt: str) -> str:
    """One Human turn in the HH format, ending where the Assistant speaks."""
    if prompt.lstrip().startswith("Human:") or prompt.startswith(HUMAN):
        text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt.lstrip()
    else:
        text = f"{HUMAN} {prompt.strip()}"
    return text if text.rstrip().endswith("Assistant:") else text + ASSISTANT


def sample_from_export(path: str, prompts: list[str], *, max_new_tokens: int = 64,
                       temperature: float = 0.7, top_k: int = 0, top_p: float = 0.95,
                       seed: int = 0, raw: bool = False) -> list[str]:
    model, params, tok = load_export(path)
    texts = prompts if raw else [render_prompt(p) for p in prompts]
    ids = [tok.encode(t) for t in texts]  # the LM stage trains without BOS
    room = model.cfg.max_len - max_new_tokens
    tokens, mask = sampling.pad_prompts([i[-room:] for i in ids], tok.pad_id)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p)
    fn = jax.jit(functools.partial(sampling.sample, model=model, cfg=cfg, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id))
    out = jax.device_get(fn(params, tokens, mask, jax.random.key(seed)))
    results = []
    for text, row, n in zip(texts, out["tokens_BxR"], out["lengths_B"], strict=True):
        reply = tok.decode(row[:n])
        if not raw:  # the model may go on to write the next Human turn itself: cut there
            reply = reply.split(HUMAN)[0].split("Human:")[0].rstrip()
        results.append(text + reply)
    return results
