"""Chat records {messages: [{role, content}]}, rendered with the model's chat template or ChatML."""

from __future__ import annotations

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
        "assistant", description="Which turns are supervised.")
    use_tokenizer_template: bool = Field(True, description="Use the tokenizer's chat template when it has one.")
    field: str = Field("messages", description="Record field holding the conversation.")


@ftcore.hookimpl
def ftcore_config_schema():
    return ChatmlConfig


@ftcore.hookimpl
def ftcore_prepare_tokenizer(tokenizer: Any, config: Any) -> list[str]:
    cfg: ChatmlConfig = config.section(NAME)
    if cfg.use_tokenizer_template and getattr(tokenizer, "chat_template", None):
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return missing


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    key = config.section(NAME).field
    messages = record.get(key)
    if messages is None:
        return [(key, f'missing required field "{key}" (a list of {{role, content}})')]
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
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"))
        if not isinstance(content, str):
            problems.append((f"{where}.content", f"expected a string, got {type(content).__name__}"))
    if not problems and not any(m.get("role") == "assistant" for m in messages):
        problems.append((key, "has no assistant turn: nothing to learn"))
    return problems


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: ChatmlConfig = config.section(NAME)
    messages = [{"role": m["role"], "content": m["content"]} for m in record[cfg.field]]
    trained = _trained_turns(messages, cfg.train_on)
    if getattr(tokenizer, "chat_template", None) and tokenizer.chat_template != CHATML_TEMPLATE:
        return _from_template(messages, trained, tokenizer)
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        segments.append((f"{IM_START}{m['role']}\n", cfg.train_on == "all"))
        segments.append((m["content"] + IM_END, i in trained))
        segments.append(("\n", False))
    return ftcore.Example.from_segments(segments)


def _trained_turns(messages: list[dict[str, str]], train_on: str) -> set[int]:
    if train_on == "all":
        return set(range(len(messages)))
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(assistant[-1:] if train_on == "last_assistant" else assistant)


def _from_template(messages: list[dict[str, str]], trained: set[int], tokenizer: Any) -> ftcore.Example:
    """Render with the tokenizer's template; supervise each trained turn's content and its end marker."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        start = text.find(m["content"], cursor) if m["content"] else cursor
        if start < 0:
            raise ftcore.DataError(f"the chat template does not render message {i} verbatim; "
                                   f"set chatml.use_tokenizer_template: false")
        end = start + len(m["content"])
        marker = next((s for s in specials if s and text.startswith(s, end)), "")
        end += len(marker)
        if i in trained:
            spans.append((start, end))
        cursor = end
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return ftcore.Example(text, spans, add_special_tokens=False if has_bos else False)
