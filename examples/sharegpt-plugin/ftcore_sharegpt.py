"""ShareGPT conversations {conversations: [{from, value}]}, rendered Vicuna-style, replies supervised."""

from __future__ import annotations

from typing import Any

from pydantic import Field

import ftcore

NAME = "sharegpt"
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class ShareGPTConfig(ftcore.PluginConfig):
    field: str = Field("conversations", description="Record field holding the turns.")
    system_prompt: str = Field(VICUNA_SYSTEM, description="Used when a conversation has no system turn.")
    user_label: str = Field("USER:", description="Written before each human turn.")
    assistant_label: str = Field("ASSISTANT:", description="Written before each gpt turn.")


@ftcore.hookimpl
def ftcore_config_schema():
    # Name the section explicitly: a plugin passed as an object (in tests) is otherwise named after its module.
    return {NAME: ShareGPTConfig}


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    key = config.section(NAME).field
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else f"{type(turns).__name__} {turns!r:.40}"
        return [(key, f"expected a non-empty list of {{from, value}} turns, got {got}")]
    problems = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append((f"{key}[{i}]", f"expected an object with from and value, got {type(turn).__name__}"))
            continue
        if turn.get("from") not in SPEAKERS:
            problems.append((f"{key}[{i}].from", f"unknown speaker {turn.get('from')!r}; "
                                                 f"expected one of {', '.join(SPEAKERS)}"))
        if not isinstance(turn.get("value"), str):
            problems.append((f"{key}[{i}].value", f"expected a string, got {type(turn.get('value')).__name__}"))
    if not problems and not any(SPEAKERS[t["from"]] == "assistant" for t in turns):
        problems.append((key, "has no gpt turn: nothing to learn"))
    return problems


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: ShareGPTConfig = config.section(NAME)
    turns = [(SPEAKERS[t["from"]], t["value"]) for t in record[cfg.field]]
    system = next((text for role, text in turns if role == "system"), cfg.system_prompt)
    segments = [(system, False)]
    for role, text in turns:
        if role == "user":
            segments.append((f" {cfg.user_label} {text}", False))
        elif role == "assistant":
            # The label is not trained on; the reply (with the space before it) and EOS are.
            segments.append((f" {cfg.assistant_label}", False))
            segments.append((f" {text}{tokenizer.eos_token}", True))
    return ftcore.Example.from_segments(segments, add_special_tokens=True)
