"""Chat records {messages: [{role, content}]}, rendered with the model's chat template or ChatML.

The conversation field, the role and content keys and the role names are settings, so ShareGPT-style
records (``conversations: [{from: human, value: ...}]``) load without code. Conversations may carry
tool calling: a record's ``tools`` (JSON schemas), assistant messages with ``tool_calls`` and ``tool``
messages with the results, rendered by a chat template that supports tools; the assistant's turns
(tool calls included) are supervised, tool results never are.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

import ftcore

NAME = "chatml"
ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatmlConfig(ftcore.PluginConfig):
    EXAMPLES: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("ShareGPT-style records `{conversations: [{from: human, value: ...}, {from: gpt, value: ...}]}`, "
         "with settings alone",
         {"field": "conversations", "role_key": "from", "content_key": "value",
          "roles": {"human": "user", "gpt": "assistant", "system": "system"}}),
    ]
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Supervised turns: every assistant turn, every turn (system and user too), "
        "or the last assistant turn only. A supervised turn is its content and its end-of-turn marker. Tool "
        "results (`tool` messages) are never supervised.")
    use_tokenizer_template: bool = Field(True, description="Use the tokenizer's chat template when it has one; "
                                         "false always renders ChatML.")
    field: str = Field("messages", min_length=1, description="Record field holding the conversation "
                       "(ShareGPT: `conversations`).")
    role_key: str = Field("role", min_length=1, description="Key of a message's role (ShareGPT: `from`).")
    content_key: str = Field("content", min_length=1, description="Key of a message's text (ShareGPT: `value`).")
    roles: dict[str, str] = Field(
        default_factory=dict, description="Role names of the data mapped to system, user, assistant or tool "
        "(ShareGPT: `{human: user, gpt: assistant, system: system}`); roles not listed are taken as they are.")
    tools_field: str = Field("tools", min_length=1, description="Record field holding the tools the conversation "
                             "may call: a list of JSON schemas (`{type: function, function: {name, description, "
                             "parameters}}`), passed to the chat template.")

    @field_validator("roles")
    @classmethod
    def _known_targets(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if target not in ROLES:
                raise ValueError(f"{source!r} is mapped to {target!r}; roles map to one of {', '.join(ROLES)}")
        return value


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
    return _decoded(record.get(key), "[")


def _decoded(value: Any, opener: str) -> Any:
    if isinstance(value, str) and value.lstrip().startswith(opener):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    cfg: ChatmlConfig = config.section(NAME)
    key, role_key, content_key = cfg.field, cfg.role_key, cfg.content_key
    messages = conversation(record, key)
    if messages is None:
        return [(key, f'missing required field "{key}" (a list of {{{role_key}, {content_key}}} messages); the '
                      f'record has {_keys(record)}. Set chatml.field to the field holding the conversation.')]
    if not isinstance(messages, list):
        return [(key, f"expected a list of messages, got {type(messages).__name__}")]
    if not messages:
        return [(key, "is empty: a conversation needs at least one user and one assistant turn")]
    problems = []
    roles: list[str | None] = []
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        roles.append(None)
        if not isinstance(msg, dict):
            problems.append((where, f"expected an object with {role_key} and {content_key}, got "
                                    f"{type(msg).__name__}"))
            continue
        role = msg.get(role_key)
        if role_key not in msg:
            problems.append((f"{where}.{role_key}", f'missing required field "{role_key}" (set chatml.role_key to '
                                                    f"the key your messages use; this one has {_keys(msg)})"))
        elif not isinstance(role, str) or cfg.roles.get(role, role) not in ROLES:
            mapped = f" (mapped to {cfg.roles[role]!r})" if isinstance(role, str) and role in cfg.roles else ""
            problems.append((f"{where}.{role_key}", f"unknown role {role!r}{mapped}; expected one of "
                                                    f"{', '.join(ROLES)}, or map it with chatml.roles "
                                                    f"(e.g. roles: {{human: user, gpt: assistant}})"))
        else:
            roles[i] = cfg.roles.get(role, role)
        calls = msg.get("tool_calls")
        if calls is not None and roles[i] is not None:
            problems += _check_tool_calls(calls, f"{where}.tool_calls", roles[i])
        content = msg.get(content_key)
        if content_key not in msg or content is None:
            if not (roles[i] == "assistant" and calls):   # an assistant turn may be only tool calls
                problems.append((f"{where}.{content_key}", f'missing required field "{content_key}" (set '
                                                           f"chatml.content_key to the key your messages use)"))
        elif not isinstance(content, str) and not (roles[i] == "tool" and isinstance(content, (dict, list))):
            problems.append((f"{where}.{content_key}", f"expected a string, got {type(content).__name__}"))
        if roles[i] == "tool" and not any(r == "assistant" and isinstance(m, dict) and m.get("tool_calls")
                                          for r, m in zip(roles[:i], messages[:i])):
            problems.append((f"{where}.{role_key}", "a tool result without a tool call before it: a tool message "
                                                    "must follow an assistant message with tool_calls"))
    tools = _decoded(record.get(cfg.tools_field), "[")
    if tools is not None:
        problems += _check_tools(tools, cfg.tools_field)
    if not problems and "assistant" not in roles:
        problems.append((key, "has no assistant turn: nothing to learn"))
    return problems


def _keys(record: dict[str, Any]) -> str:
    names = [str(k) for k in record][:8]
    return "fields " + ", ".join(names) + (", ..." if len(record) > 8 else "") if names else "no fields"


def _check_tools(tools: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(tools, list):
        return [(where, f"expected a list of tool schemas, got {type(tools).__name__}")]
    problems = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            problems.append((f"{where}[{i}]", "expected a JSON schema of a tool: {type: function, function: "
                                              "{name, description, parameters}}, with a name"))
    return problems


def _check_tool_calls(calls: Any, where: str, role: str) -> list[tuple[str, str]]:
    if role != "assistant":
        return [(where, f"only assistant messages make tool calls; this is a {role} message")]
    if not isinstance(calls, list):
        return [(where, f"expected a list of tool calls, got {type(calls).__name__}")]
    problems = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            problems.append((f"{where}[{i}]", f"expected an object {{type: function, function: {{name, arguments}}}}, "
                                              f"got {type(call).__name__}"))
            continue
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append((f"{where}[{i}].name", "missing or not a string: a tool call names its function"))
        args = _decoded(fn.get("arguments", {}), "{")
        if not isinstance(args, dict):
            problems.append((f"{where}[{i}].arguments", "expected an object of arguments (or a JSON string of "
                                                        f"one), got {type(fn.get('arguments')).__name__}"))
    return problems


def messages_of(record: dict[str, Any], cfg: ChatmlConfig) -> list[dict[str, Any]]:
    """The record's conversation as the chat template expects it: role and content keys, mapped role names,
    tool calls as ``{type: function, function: {name, arguments: {...}}}``, tool results as text."""
    out = []
    for m in conversation(record, cfg.field):
        role = cfg.roles.get(m[cfg.role_key], m[cfg.role_key])
        content = m.get(cfg.content_key)
        if role == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        msg: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
        for extra in ("tool_call_id", "name"):
            if role == "tool" and isinstance(m.get(extra), str):
                msg[extra] = m[extra]
        out.append(msg)
    return out


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", call)
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"],
                                                            "arguments": _decoded(fn.get("arguments", {}), "{")}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _uses_tools(record: dict[str, Any], messages: list[dict[str, Any]], cfg: ChatmlConfig) -> bool:
    return bool(record.get(cfg.tools_field)) or any(m["role"] == "tool" or "tool_calls" in m for m in messages)


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: ChatmlConfig = config.section(NAME)
    messages = messages_of(record, cfg)
    trained = _trained_turns(messages, cfg.train_on)
    if _uses_tools(record, messages, cfg):
        tools = _decoded(record.get(cfg.tools_field), "[") or None
        if not _uses_tokenizer_template(tokenizer, cfg):
            raise ftcore.DataError(
                "this conversation calls tools, and ChatML as ftcore renders it has no tool calls: train a model "
                "whose chat template supports tools (Qwen2.5, Llama 3.1, ...) with chatml.use_tokenizer_template: "
                "true, or drop the tool calls from the data")
        return _from_template_with_tools(messages, tools, trained, tokenizer)
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


def _trained_turns(messages: list[dict[str, Any]], train_on: str) -> set[int]:
    if train_on == "all":
        return {i for i, m in enumerate(messages) if m["role"] != "tool"}
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


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None,
            generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's TemplateError: the template refuses this conversation
        raise ftcore.DataError(f"the tokenizer's chat template refused this conversation: {exc}") from None


def _from_template_with_tools(messages: list[dict[str, Any]], tools: list[Any] | None, trained: set[int],
                              tokenizer: Any) -> ftcore.Example:
    """Render a tool-calling conversation with the tokenizer's template; supervise each trained turn.

    A turn's text is what the template adds when the conversation grows by that message: the rendering of
    the messages before it (with the generation prompt, for an assistant turn) is a prefix of the rendering
    with it. Tool calls are rendered by the template from their structure, so they are found this way,
    not by searching for a content. The turn is supervised up to its end-of-turn marker (trailing
    whitespace after it is not).
    """
    text = _render(tokenizer, messages, tools)
    _check_tool_rendering(text, messages, tools, tokenizer)
    spans = []
    for i in sorted(trained):
        try:
            after = _render(tokenizer, messages[: i + 1], tools)
            before = _render(tokenizer, messages[:i], tools, generation_prompt=messages[i]["role"] == "assistant") \
                if i else ""
        except ftcore.DataError as exc:
            raise ftcore.DataError(f"to find turn {i} ({messages[i]['role']}), the conversation is rendered up to it, "
                                   f"and the chat template refuses that ({exc}); supervise assistant turns only "
                                   f"(chatml.train_on: assistant)") from None
        if not text.startswith(after):
            raise ftcore.DataError(f"the tokenizer's chat template renders this conversation differently when it "
                                   f"ends at message {i} ({messages[i]['role']}), so its turns cannot be masked "
                                   f"exactly; set chatml.train_on: last_assistant, or use another template")
        start = 0
        while start < min(len(before), len(after)) and before[start] == after[start]:
            start += 1
        if messages[i]["role"] != "assistant":   # train_on: all: from the content on, not the role header
            at = after.find(messages[i]["content"].strip(), start) if messages[i]["content"].strip() else -1
            start = at if at >= 0 else start
        end = len(after.rstrip())
        if end <= start:
            raise ftcore.DataError(f"the tokenizer's chat template renders nothing for message {i} "
                                   f"({messages[i]['role']})")
        spans.append((start, end))
    return ftcore.Example(text, spans, add_special_tokens=False)   # the template writes BOS if any


def _check_tool_rendering(text: str, messages: list[dict[str, Any]], tools: list[Any] | None, tokenizer: Any
                          ) -> None:
    """A template without tool support drops tools, tool calls or results silently: refuse that, naming what."""
    lacking = []
    for tool in tools or []:
        name = tool.get("function", tool).get("name", "")
        if name and name not in text:
            lacking.append(f"the tool {name!r} of the record's tools")
    for i, m in enumerate(messages):
        for call in m.get("tool_calls", ()):
            if call["function"]["name"] not in text:
                lacking.append(f"the tool call to {call['function']['name']!r} in message {i}")
    results = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    if results:   # a result may be re-encoded (e.g. as a JSON string): look for a marker in its place
        marked = _render(tokenizer, [{**m, "content": f"FTCORETOOLRESULT{i}"} if i in results else m
                                     for i, m in enumerate(messages)], tools)
        lacking += [f"the tool result in message {i}" for i in results if f"FTCORETOOLRESULT{i}" not in marked]
    if lacking:
        raise ftcore.DataError(f"the model's chat template does not support tool calling: its rendering leaves out "
                               f"{'; '.join(lacking[:3])}. Train a model whose chat template renders tools "
                               f"(Qwen2.5, Llama 3.1, ...), or drop the tool calls from the data")


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
