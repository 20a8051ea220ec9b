"""hh_jax.chat: the two chat formats against strings written out by hand, the SmolLM2
template (rendered by jinja2 when it is installed) and the EOS/EOC conventions."""

from __future__ import annotations

import pytest

from hh_jax import chat
from hh_jax.chat import HH, ChatFormat
from hh_jax.tokenizer import ByteTokenizer

TRANSCRIPT = ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
              "\n\nHuman: For how long?  \n\nAssistant: About 8 minutes.")
CONTEXT = TRANSCRIPT[: TRANSCRIPT.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = ChatFormat("chatml", SYSTEM)
# tokenizer.chat_template of SmolLM2-135M-Instruct's GGUF, verbatim (data, not code)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_turns_of_and_hh_render_round_trip_the_transcript():
    turns = chat.turns_of(TRANSCRIPT)
    assert turns == [("Human", " How do I boil an egg?"),
                     ("Assistant", " Put it in boiling water."),
                     ("Human", " For how long?  "), ("Assistant", " About 8 minutes.")]
    assert chat.render(turns, HH) == TRANSCRIPT
    assert chat.turns_of(CONTEXT) == turns[:3]  # the empty final Assistant turn is dropped
    assert chat.render(turns[:3], HH, add_generation_prompt=True) == CONTEXT


def test_chatml_render_written_out():
    turns = chat.turns_of(TRANSCRIPT)
    assert chat.render(turns[:3], CHATML, add_generation_prompt=True) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHow do I boil an egg?<|im_end|>\n"
        "<|im_start|>assistant\nPut it in boiling water.<|im_end|>\n"
        "<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert chat.render([("", "Be brief.")] + turns[:1], CHATML) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I boil an egg?"
        "<|im_end|>\n")


def test_chatml_matches_the_smollm2_template():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(SMOLLM2_TEMPLATE)
    turns = chat.turns_of(TRANSCRIPT)
    roles = {"Human": "user", "Assistant": "assistant"}
    for n in (1, 3):
        messages = [{"role": roles[r], "content": t.strip()} for r, t in turns[:n]]
        assert chat.render(turns[:n], CHATML, add_generation_prompt=True) == \
            template.render(messages=messages, add_generation_prompt=True)


def test_format_for_reads_the_tokenizer_template():
    class Tok(ByteTokenizer):
        chat_template = SMOLLM2_TEMPLATE

    assert chat.format_for(Tok()) == CHATML
    assert chat.format_for(ByteTokenizer()) == HH
    assert ChatFormat.from_meta(CHATML.to_meta()) == CHATML
    assert ChatFormat.from_meta(None) == HH
    with pytest.raises(ValueError, match="unknown chat format 'llama3'"):
        ChatFormat("llama3")


def test_prompt_turns():
    assert chat.prompt_turns("Why is the sky blue?") == [("Human", "Why is the sky blue?")]
    assert chat.prompt_turns("Human: hi\n\nAssistant: hello\n\nHuman: bye") == [
        ("Human", " hi"), ("Assistant", " hello"), ("Human", " bye")]
    assert chat.render(chat.prompt_turns("Why?"), HH, add_generation_prompt=True) == \
        "\n\nHuman: Why?\n\nAssistant:"


@pytest.mark.parametrize("fmt", [HH, CHATML])
def test_eos_and_eoc_conventions(fmt):
    tok = ByteTokenizer()  # eos 2, eoc 3: distinct, so the PM input gets an EOC token
    turns = chat.turns_of(CONTEXT)
    prompt = chat.prompt_ids(tok, turns, fmt)
    assert prompt == tok.encode(chat.render(turns, fmt, add_generation_prompt=True))
    reply = " About 8 minutes."
    written = reply if fmt.name == "hh" else reply.strip()
    assert chat.response_ids(tok, reply, fmt) == tok.encode(written) + [tok.eos_id]
    # the PM's training layout (loaders.pm_tokens, ppo.with_eoc): EOC in place of the EOS
    assert chat.pm_ids(tok, turns, reply, fmt) == prompt + tok.encode(written) + [3]

    class EocIsEos(ByteTokenizer):
        eoc_id = 2
        add_bos = True

    assert chat.pm_ids(EocIsEos(), turns, reply, fmt) == [1] + prompt + tok.encode(written) + [2]


def test_dialogue_ids_hh_by_hand():
    tok = ByteTokenizer()
    ids, is_reply = chat.dialogue_ids(tok, chat.turns_of(TRANSCRIPT), HH)
    e = tok.encode
    want = (e("\n\nHuman: How do I boil an egg?\n\nAssistant:"),
            e(" Put it in boiling water.") + [2],
            e("\n\nHuman: For how long?  \n\nAssistant:"), e(" About 8 minutes.") + [2])
    assert ids == sum(want, [])
    assert is_reply == sum(([i % 2 == 1] * len(w) for i, w in enumerate(want)), [])


def test_dialogue_ids_chatml_by_hand():
    tok = ByteTokenizer()
    ids, is_reply = chat.dialogue_ids(tok, chat.turns_of(TRANSCRIPT), CHATML)
    e = tok.encode
    want = (e(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHow do I boil an egg?"
              "<|im_end|>\n<|im_start|>assistant\n"), e("Put it in boiling water.") + [2],
            e("\n<|im_start|>user\nFor how long?<|im_end|>\n<|im_start|>assistant\n"),
            e("About 8 minutes.") + [2])
    assert ids == sum(want, [])
    assert sum(is_reply) == len(want[1]) + len(want[3])
    # the first response is tokenized exactly as prompt_ids + response_ids would
    turns = chat.turns_of(TRANSCRIPT)
    first = chat.prompt_ids(tok, turns[:1], CHATML) + chat.response_ids(tok, turns[1][1], CHATML)
    assert ids[: len(first)] == first


def test_cut_reply():
    assert chat.cut_reply(" Paris.\n\nHuman: and Spain?", HH) == " Paris."
    assert chat.cut_reply(" Paris. Human: more", HH) == " Paris."
    assert chat.cut_reply("Paris.<|im_end|>\n<|im_start|>user", CHATML) == "Paris."
