"""VILA-1.5's legacy conversation formats, which VILA picks by checkpoint name instead of the
tokenizer's chat template (NVlabs/VILA ``llava/conversation.py``: ``conv_vicuna_v1``, ``llama_3_chat``,
``hermes_2`` and ``Conversation.get_prompt``; ``llava/utils/tokenizer.py``: ``tokenize_conversation_legacy``;
``llava/mm_utils.py``: ``tokenizer_image_token``).

A conversation renders as ``system + sep``, then each turn, then the assistant's role for the answer:

- ``two`` (vicuna_v1): ``"USER: " + text + " "`` and ``"ASSISTANT: " + answer + "</s>"``; the answer
  prompt is ``"ASSISTANT:"`` (no trailing space).
- ``mpt`` (hermes-2): ``role + text + "<|im_end|>"`` with ChatML role headers and no newline between turns.
- ``llama_3``: ``role header + text + "<|eot_id|>"``; the system text opens with ``<|begin_of_text|>``.

Tokenization follows VILA too: the prompt is cut at each ``<image>``, every piece is tokenized on its
own with the tokenizer's special tokens (a Llama tokenizer's BOS), and the BOS that opens every piece
but the first is dropped. So a llama_3 prompt starts with two ``<|begin_of_text|>`` tokens, the
tokenizer's and the template's, as VILA trained and runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

STYLES = ("two", "mpt", "llama_3")


@dataclass(frozen=True)
class LegacyFormat:
    """One VILA conversation format. ``system_head + system`` opens the prompt; a system message in the
    conversation replaces ``system``. ``end`` is the text that closes an answer (a stop token)."""

    name: str
    style: str
    system_head: str
    system: str
    user: str
    assistant: str
    sep: str
    end: str

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r} is not one of {STYLES}")

    def render(self, messages: Sequence[Dict[str, str]]) -> str:
        """The prompt for ``messages`` (an optional system message, then user and assistant turns in
        turn, the last one the user's), ending where the assistant's answer starts."""
        messages = list(messages)
        system = self.system
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"the {self.name!r} format needs user and assistant turns in turn, starting "
                                 f"with the user's; message {i} is from {m['role']!r}")
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"the {self.name!r} format renders a prompt for an answer: the last message must "
                             "be the user's")
        out = self.system_head + system + self.sep
        for m in messages:
            if self.style == "two":
                role, close = (self.user, self.sep) if m["role"] == "user" else (self.assistant, self.end)
                out += f"{role}: {m['content']}{close}"
            else:
                out += (self.user if m["role"] == "user" else self.assistant) + m["content"] + self.sep
        return out + (self.assistant + ":" if self.style == "two" else self.assistant)


LEGACY_FORMATS = {
    f.name: f for f in (
        LegacyFormat(
            name="vicuna_v1", style="two", system_head="",
            system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            user="USER", assistant="ASSISTANT", sep=" ", end="</s>"),
        LegacyFormat(
            name="llama_3", style="llama_3",
            system_head="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
            system="You are a helpful language and vision assistant. You are able to understand the visual "
                   "content that the user provides, and assist the user with a variety of tasks using natural "
                   "language.",
            user="<|start_header_id|>user<|end_header_id|>\n\n",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", sep="<|eot_id|>", end="<|eot_id|>"),
        LegacyFormat(
            name="hermes-2", style="mpt", system_head="<|im_start|>system\n", system="Answer the questions.",
            user="<|im_start|>user\n", assistant="<|im_start|>assistant\n", sep="<|im_end|>", end="<|im_end|>"),
    )
}


def tokenize_pieces(tokenizer, text: str, marker: str) -> List[List[int]]:
    """Token ids of ``text`` cut at each ``marker``, each piece tokenized on its own with the
    tokenizer's special tokens; when the first piece opens with BOS, the BOS opening each later piece
    is dropped (the ids between two markers are the piece's own). VILA drops each later piece's first
    token whatever it is; the two differ only where the first piece's BOS comes from the template's
    text and the tokenizer adds none, where VILA would drop real tokens."""
    pieces = [list(tokenizer(chunk).input_ids) for chunk in text.split(marker)]
    bos = tokenizer.bos_token_id
    if bos is not None and pieces[0][:1] == [bos]:
        pieces[1:] = [p[1:] if p[:1] == [bos] else p for p in pieces[1:]]
    return pieces
