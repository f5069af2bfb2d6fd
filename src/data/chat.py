"""Conversations as tokens plus a loss mask: the tokenizer's own chat template renders them, and only
the assistant turns count (DeepSeek-V3 report section 5.1, SFT).

    template = ChatTemplate.of_tokenizer(tokenizer)           # tokenizer_config.json's chat_template
    ids, counts = encode_chat(messages, template, tokenizer)  # counts[i]: token i is an assistant token

How the mask is found: the template renders the conversation up to each assistant turn with the
generation prompt (`add_generation_prompt=True`), then with that turn; the characters in between are
the turn as the template writes it (its content and its end-of-turn token, wherever the template
puts EOS). A token counts when it starts inside such a span. A template that renders an earlier
turn otherwise once later turns follow (one that drops earlier reasoning) has no such spans and is
refused. Templates are Jinja, run in a sandbox with the globals transformers gives them.

Conversations are `{"messages": [{"role": ..., "content": ...}, ...]}` (roles system, user,
assistant, tool), or `{"prompt": ..., "completion": ...}` (one user turn, one assistant turn).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"  # where transformers saves a tokenizer's template beside its config
_GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")  # transformers' mask markers: not needed here


class ChatError(ValueError):
    """A conversation, a template or a tokenizer that cannot make chat data (the message says why)."""


@dataclass
class ChatTemplate:
    """A Jinja chat template and the special-token strings it is rendered with."""

    text: str
    source: str  # where it came from, for errors
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def of_tokenizer(cls, tokenizer, path: Optional[str] = None) -> "ChatTemplate":
        """The template of `path` (a Jinja file), else the tokenizer's own: `tokenizer_config.json`'s
        `chat_template` or `chat_template.jinja` in its folder (the byte tokenizer ships one)."""
        if path is not None:
            file = Path(path)
            if not file.is_file():
                raise ChatError(f"--chat-template {path}: no such file")
            return cls(file.read_text(encoding="utf-8"), str(file), tokenizer.bos_token, tokenizer.eos_token)
        text, source = tokenizer.chat_template()
        if text is None:
            raise ChatError(f"the tokenizer {tokenizer.name} has no chat template (no chat_template in its "
                            f"tokenizer_config.json, no {TEMPLATE_FILE}); give one with --chat-template FILE")
        return cls(text, source, tokenizer.bos_token, tokenizer.eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        """The template's text of `messages` (`where`: the conversation's FILE:LINE, for errors)."""
        try:
            return _compiled(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as err:  # a template's own raise_exception, or any Jinja error  # noqa: BLE001
            raise ChatError(f"{where}: the chat template of {self.source} failed to render it: {err}") from err


_COMPILED: dict = {}


def _compiled(text: str):
    """The template compiled as transformers compiles chat templates (sandboxed; trim_blocks,
    lstrip_blocks, loop controls; raise_exception, strftime_now and a non-ASCII tojson)."""
    if text not in _COMPILED:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        _COMPILED[text] = env.from_string(_GENERATION_TAGS.sub("", text))
    return _COMPILED[text]


def messages_of(record, where: str) -> list[dict]:
    """The messages of one JSONL record, checked: roles known, content a string, an assistant turn."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise ChatError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatError(f"{where}: \"messages\" must be a list of {{\"role\": ..., \"content\": ...}} objects")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"{where}: message {i} ({role}) has no string \"content\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: the conversation has no assistant turn, so no token of it would count")
    return messages


def assistant_spans(messages: list[dict], template: ChatTemplate, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans [start, end) of its assistant turns)."""
    text = template.render(messages, where=where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True, where=where)
        through = template.render(messages[:i + 1], where=where)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatError(f"{where}: the chat template of {template.source} renders assistant turn {i} otherwise "
                            "once later turns follow (it rewrites earlier turns), so its tokens cannot be told "
                            "apart; give a template that renders each turn the same way with --chat-template")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, counts): counts[i] is 1 where token i belongs to an assistant turn. The template
    writes BOS where it wants one: the tokenizer adds none."""
    text, spans = assistant_spans(messages, template, where)
    ids, starts = tokenizer.encode_with_offsets(text)
    counts = np.zeros(len(ids), dtype=np.uint8)
    for start, end in spans:
        counts[(starts >= start) & (starts < end)] = 1
    return ids, counts
