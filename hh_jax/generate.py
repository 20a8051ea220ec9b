"""Sampling from a params export or a pretrained model: load, render, sample, decode."""

from __future__ import annotations

import functools

import jax

from hh_jax import chat, checkpoint, sampling
from hh_jax.model import Transformer
from hh_jax.policy import Frozen
from hh_jax.pretrained import convert
from hh_jax.tokenizer import load_tokenizer


def load_export_with_format(path: str):
    """(model, params, tokenizer, ChatFormat); the format is meta["chat_format"], else the
    tokenizer's own (ChatML for a ChatML checkpoint), else "hh"."""
    export = Frozen(path, None, None)  # unsharded, as saved
    tok = load_tokenizer(checkpoint.tokenizer_spec(path))
    fmt = (chat.ChatFormat.from_meta(export.meta["chat_format"]) if "chat_format" in export.meta
           else chat.format_for(tok))
    return export.model, export.params, tok, fmt


def load_pretrained_model(name_or_path: str):
    """(model, params, tokenizer, ChatFormat) of a pretrained checkpoint (pretrained/convert.py)."""
    cfg, params, tok = convert.load_pretrained(name_or_path)
    return Transformer(cfg), params, tok, chat.format_for(tok)


def sample_texts(model: Transformer, params, tok, fmt: chat.ChatFormat, prompts: list[str], *,
                 max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 0.95, seed: int = 0, raw: bool = False) -> list[str]:
    """Continues each prompt. Not raw: the prompt is a dialogue turn in `fmt`, sampling
    stops at EOS or at the format's stop string (`sampling.STOP_STRINGS`: the model starting
    the next turn itself), and the result reads as an HH transcript ending in the
    Assistant's reply. Raw: the prompt is continued as text, up to EOS."""
    turns = [chat.prompt_turns(p) for p in prompts]
    ids = ([tok.encode(p) for p in prompts] if raw
           else [chat.prompt_ids(tok, t, fmt) for t in turns])
    room = model.cfg.max_len - max_new_tokens
    tokens, mask = sampling.pad_prompts([i[-room:] for i in ids], tok.pad_id)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p)
    stops = None if raw else sampling.stop_table(tok, sampling.STOP_STRINGS[fmt.name],
                                                 vocab_size=model.cfg.vocab_size)
    fn = jax.jit(functools.partial(sampling.sample, model=model, cfg=cfg, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id))
    out = jax.device_get(fn(params, tokens, mask, jax.random.key(seed), stops=stops))
    results = []
    for prompt, t, row, n in zip(prompts, turns, out["tokens_BxR"],
                                 out["lengths_B"] + out["stop_lengths_B"], strict=True):
        reply = tok.decode(row[:n])
        if raw:
            results.append(prompt + reply)
        else:  # decoded through the stop tokens, cut at the exact text: a stop's first
            # token may hold text of the reply (".\n\n" in sentencepiece)
            reply = chat.cut_reply(reply, fmt)
            results.append(chat.render(t + [("Assistant", reply)], chat.HH))
    return results


def sample_from_export(path: str, prompts: list[str], **kw) -> list[str]:
    """`sample_texts` with a stage's params export (keywords as `sample_texts`)."""
    model, params, tok, fmt = load_export_with_format(path)
    return sample_texts(model, params, tok, fmt, prompts, **kw)


def sample_from_pretrained(name_or_path: str, prompts: list[str], **kw) -> list[str]:
    """`sample_texts` with a pretrained model: "smollm2-135m", a .gguf, an HF dir."""
    model, params, tok, fmt = load_pretrained_model(name_or_path)
    return sample_texts(model, params, tok, fmt, prompts, **kw)
