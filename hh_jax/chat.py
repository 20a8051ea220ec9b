"""Chat formats: how an HH dialogue becomes the text and tokens a base model sees.

`hh-jax sample`, SFT on dialogues (`dialogue_ids`) and the SmolLM2 checks go through
`render` / `prompt_ids` / `response_ids`. The HH stages trained here from scratch (lm, pm,
ppo, bon) tokenize the raw transcript directly, which is format "hh" byte for byte, and
build the PM input as `pm_ids` does (loaders.pm_tokens, ppo.with_eoc).

Formats (`ChatFormat.name`):
  "hh"      the raw HH-RLHF transcript, "\\n\\nHuman: …\\n\\nAssistant: …", byte for byte as in
            the data: the format of models trained here from scratch.
  "chatml"  ChatML, the template of instruct checkpoints such as SmolLM2-Instruct:
            "<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n…<|im_end|>\\n", with the
            template's default system message first when the dialogue has none.

End-of-context / EOS conventions (the same in both formats):
  prompt    render(context turns, add_generation_prompt=True): ends where the Assistant
            speaks ("\\n\\nAssistant:" / "<|im_start|>assistant\\n"); [BOS] first iff the
            tokenizer's `add_bos`.
  response  encode(reply) + [eos_id]. In ChatML the EOS token *is* `<|im_end|>`, the end of
            the assistant message; in "hh" EOS is a token, never text. The sampler stops on
            eos_id, so a sampled response has the same form as a training response.
  PM input  prompt + the response's text + [eoc_id]; the PM reads its score there. The
            sentencepiece tokenizers trained here have a distinct end-of-context token,
            which takes the place of the response's EOS (as in PM training); pretrained
            tokenizers use EOS as EOC (tokenizer.py), so there it is the response's EOS.
Prompt and response are tokenized separately (never across their boundary), so the prompt
tokens a response was sampled after are the ones it is trained and scored after.
"""

from __future__ import annotations

import dataclasses
import re

from hh_jax.data.hh import split_turns
from hh_jax.tokenizer import Tokenizer

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
Turn = tuple[str, str]  # (role, text): role "Human" | "Assistant" | "" (preamble)
_CHATML_ROLES = {"Human": "user", "Assistant": "assistant", "": "system", "System": "system"}
_EOS_TEXT = {"hh": "", "chatml": "<|im_end|>"}  # the text EOS stands for in the format
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    name: str = "hh"  # "hh" | "chatml"
    system: str | None = None  # chatml: system message written when a dialogue has none

    def __post_init__(self):
        if self.name not in ("hh", "chatml"):
            raise ValueError(f"unknown chat format {self.name!r}: expected 'hh' or 'chatml'")

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | str | None) -> ChatFormat:
        if meta is None:
            return HH
        return cls(meta) if isinstance(meta, str) else cls(**meta)


HH = ChatFormat("hh")


def format_for(tok: Tokenizer) -> ChatFormat:
    """The tokenizer's own chat template if it is ChatML, else the raw HH format."""
    template = getattr(tok, "chat_template", None) or ""
    if "<|im_start|>" not in template:
        return HH
    default = _DEFAULT_SYSTEM_RE.search(template)
    return ChatFormat("chatml", default.group(1) if default else None)


def turns_of(transcript: str) -> list[Turn]:
    """HH transcript → turns (hh.split_turns: text kept raw, leading space included).
    A context (ending in "\\n\\nAssistant:") ends with an empty Assistant turn: dropped."""
    turns = split_turns(transcript)
    if turns and turns[-1] == ("Assistant", ""):
        turns.pop()
    return turns


def prompt_turns(prompt: str) -> list[Turn]:
    """A user's prompt: an HH transcript if it has turn markers, else one Human turn."""
    if prompt.lstrip().startswith("Human:") or HUMAN in prompt:
        return turns_of(prompt if prompt.startswith("\n\n") else "\n\n" + prompt.lstrip())
    return [("Human", prompt)]


def _hh_text(text: str) -> str:
    return text if not text or text[0].isspace() else " " + text


def render(turns: list[Turn], fmt: ChatFormat = HH, *, add_generation_prompt: bool = False
           ) -> str:
    """The text of a dialogue; with `add_generation_prompt`, ends where the Assistant speaks."""
    if fmt.name == "hh":
        text = "".join(f"\n\n{role}:{_hh_text(t)}" if role else t for role, t in turns)
        return text + (ASSISTANT if add_generation_prompt else "")
    parts = []
    if fmt.system is not None and not (turns and _CHATML_ROLES[turns[0][0]] == "system"):
        parts.append(f"<|im_start|>system\n{fmt.system}<|im_end|>\n")
    for role, t in turns:
        parts.append(f"<|im_start|>{_CHATML_ROLES[role]}\n{t.strip()}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def reply_text(reply: str, fmt: ChatFormat = HH) -> str:
    """A response as the format writes it (hh: raw, leading space kept; chatml: stripped)."""
    return reply if fmt.name == "hh" else reply.strip()


def prompt_ids(tok: Tokenizer, turns: list[Turn], fmt: ChatFormat = HH) -> list[int]:
    """Tokens of the context up to where the Assistant speaks; BOS first iff `add_bos`."""
    bos = [tok.bos_id] if getattr(tok, "add_bos", False) else []
    return bos + tok.encode(render(turns, fmt, add_generation_prompt=True))


def response_ids(tok: Tokenizer, reply: str, fmt: ChatFormat = HH) -> list[int]:
    """Tokens of one Assistant response, ending with EOS."""
    return tok.encode(reply_text(reply, fmt)) + [tok.eos_id]


def pm_ids(tok: Tokenizer, turns: list[Turn], reply: str, fmt: ChatFormat = HH) -> list[int]:
    """What the PM scores: prompt + response text + EOC (in place of the response's EOS,
    which it is when the tokenizer uses EOS as EOC); the score is read at the end."""
    return prompt_ids(tok, turns, fmt) + response_ids(tok, reply, fmt)[:-1] + [tok.eoc_id]


def dialogue_ids(tok: Tokenizer, turns: list[Turn], fmt: ChatFormat = HH
                 ) -> tuple[list[int], list[bool]]:
    """A whole dialogue as SFT trains on it, up to its last Assistant turn: each context
    piece tokenized as `prompt_ids` would, each Assistant turn as `response_ids` (EOS
    included). Returns the ids and, per id, whether it belongs to a response."""
    ids = [tok.bos_id] if getattr(tok, "add_bos", False) else []
    is_reply = [False] * len(ids)
    done = ""  # the text covered so far (a response's EOS counted as its text in the format)
    for i, (role, text) in enumerate(turns):
        if role != "Assistant":
            continue
        prompt = render(turns[:i], fmt, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise ValueError(f"{fmt.name}: rendering is not incremental at turn {i}")
        context, reply = tok.encode(prompt[len(done):]), response_ids(tok, text, fmt)
        ids += context + reply
        is_reply += [False] * len(context) + [True] * len(reply)
        done = prompt + reply_text(text, fmt) + _EOS_TEXT[fmt.name]
    return ids, is_reply


def cut_reply(reply: str, fmt: ChatFormat = HH) -> str:
    """A decoded sample up to where the model starts the next turn by itself."""
    if fmt.name == "hh":
        return reply.split(HUMAN)[0].split("Human:")[0].rstrip()
    return reply.split("<|im_end|>")[0].split("<|im_start|>")[0].strip()
