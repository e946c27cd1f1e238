"""Chat records {messages: [{role, content}]}, rendered with the model's chat template or ChatML."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

import ftcore

NAME = "chatml"
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatmlConfig(ftcore.PluginConfig):
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Supervised turns: every assistant turn, every turn (system and user too), "
        "or the last assistant turn only. A supervised turn is its content and its end-of-turn marker.")
    use_tokenizer_template: bool = Field(True, description="Use the tokenizer's chat template when it has one; "
                                         "false always renders ChatML.")
    field: str = Field("messages", description="Record field holding the conversation.")


@ftcore.hookimpl
def ftcore_config_schema():
    return ChatmlConfig


@ftcore.hookimpl
def ftcore_prepare_tokenizer(tokenizer: Any, config: Any) -> list[str]:
    """Without a usable chat template, render ChatML: add its markers as special tokens if missing.

    The new tokens are returned, so the adapter plugin resizes the embeddings and trains their rows.
    """
    cfg: ChatmlConfig = config.section(NAME)
    if _uses_tokenizer_template(tokenizer, cfg):
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE   # saved with the adapter, so inference renders the same way
    return missing


def conversation(record: dict[str, Any], key: str) -> Any:
    """The record's conversation; a JSON string (as a CSV cell holds it) is decoded."""
    messages = record.get(key)
    if isinstance(messages, str) and messages.lstrip().startswith("["):
        try:
            return json.loads(messages)
        except (ValueError, RecursionError):
            return messages
    return messages


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    key = config.section(NAME).field
    messages = conversation(record, key)
    if messages is None:
        return [(key, f'missing required field "{key}" (a list of {{role, content}} messages)')]
    if not isinstance(messages, list):
        return [(key, f"expected a list of messages, got {type(messages).__name__}")]
    if not messages:
        return [(key, "is empty: a conversation needs at least one user and one assistant turn")]
    problems = []
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            problems.append((where, f"expected an object with role and content, got {type(msg).__name__}"))
            continue
        if "role" not in msg:
            problems.append((f"{where}.role", 'missing required field "role"'))
        elif msg["role"] not in ROLES:
            problems.append((f"{where}.role", f"unknown role {msg['role']!r}; expected one of {', '.join(ROLES)}"))
        if "content" not in msg:
            problems.append((f"{where}.content", 'missing required field "content"'))
        elif not isinstance(msg["content"], str):
            problems.append((f"{where}.content", f"expected a string, got {type(msg['content']).__name__}"))
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append((key, "has no assistant turn: nothing to learn"))
    return problems


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: ChatmlConfig = config.section(NAME)
    messages = [{"role": m["role"], "content": m["content"]} for m in conversation(record, cfg.field)]
    trained = _trained_turns(messages, cfg.train_on)
    if _uses_tokenizer_template(tokenizer, cfg):
        return _from_template(messages, trained, tokenizer)
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        segments.append((f"{IM_START}{m['role']}\n", False))
        segments.append((m["content"] + IM_END, i in trained))
        segments.append(("\n", False))
    return ftcore.Example.from_segments(segments)


def _uses_tokenizer_template(tokenizer: Any, cfg: ChatmlConfig) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return bool(cfg.use_tokenizer_template and template and template != CHATML_TEMPLATE)


def _trained_turns(messages: list[dict[str, str]], train_on: str) -> set[int]:
    if train_on == "all":
        return set(range(len(messages)))
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(assistant[-1:] if train_on == "last_assistant" else assistant)


def _from_template(messages: list[dict[str, str]], trained: set[int], tokenizer: Any) -> ftcore.Example:
    """Render with the tokenizer's own template; supervise each trained turn's content and end marker.

    The template is rendered once with a unique placeholder for each message's content.
    What lies between the placeholders is the template's scaffolding (role headers,
    end-of-turn markers). The real rendering is then walked piece by piece, so each
    content's character span is known exactly even when the template trims it.
    """
    text = _render(tokenizer, messages)
    marks = [f"FTCOREMSG{i}PLACEHOLDER" for i in range(len(messages))]
    scaffold = _render(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)])
    pieces, pos = [], 0
    for i, mark in enumerate(marks):
        at = scaffold.find(mark, pos)
        if at < 0:
            raise ftcore.DataError(f"the tokenizer's chat template does not render message {i} "
                                   f"({messages[i]['role']}); set chatml.use_tokenizer_template: false to use ChatML")
        pieces.append(scaffold[pos:at])
        pos = at + len(mark)
    pieces.append(scaffold[pos:])
    spans = _content_spans(text, pieces, messages)
    specials = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)
    supervised = []
    for i, (start, end) in enumerate(spans):
        if i in trained:
            supervised.append((start, end + len(_end_marker(pieces[i + 1], specials))))
    return ftcore.Example(text, supervised, add_special_tokens=False)   # the template writes BOS if any


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja's TemplateError: the template refuses this conversation
        raise ftcore.DataError(f"the tokenizer's chat template refused this conversation: {exc}") from None


def _content_spans(text: str, pieces: list[str], messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Where each message's content lies in ``text``, given the scaffolding ``pieces`` around them."""
    if text == pieces[0] + "".join(m["content"] + p for m, p in zip(messages, pieces[1:])):
        spans, pos = [], len(pieces[0])     # the template copies contents verbatim: exact positions
        for m, piece in zip(messages, pieces[1:]):
            spans.append((pos, pos + len(m["content"])))
            pos += len(m["content"]) + len(piece)
        return spans
    if not text.startswith(pieces[0]) or not text.endswith(pieces[-1]):
        raise ftcore.DataError("the tokenizer's chat template renders this conversation unexpectedly; "
                               "set chatml.use_tokenizer_template: false to use ChatML")
    spans, pos = [], len(pieces[0])          # the template transforms contents (e.g. trims them)
    for i in range(len(messages)):
        nxt = pieces[i + 1]
        end = len(text) - len(nxt) if i == len(messages) - 1 else text.find(nxt, pos)
        if end < pos or not nxt and i < len(messages) - 1:
            raise ftcore.DataError(f"cannot find message {i} in the chat template's rendering; "
                                   "set chatml.use_tokenizer_template: false to use ChatML")
        spans.append((pos, end))
        pos = end + len(nxt)
    return spans


def _end_marker(after: str, specials: list[str]) -> str:
    """The end-of-turn marker right after a content (spaces before it included), or '' when none."""
    stripped = after.lstrip(" ")
    marker = next((s for s in specials if s and stripped.startswith(s)), "")
    return after[: len(after) - len(stripped)] + marker if marker else ""
