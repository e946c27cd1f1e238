"""An Ollama Modelfile next to the GGUF file: FROM it, the chat template in Go syntax, stop tokens.

A Jinja chat template cannot be translated in general. We translate it by what it
does: render probe conversations with the tokenizer's template, read off each role's
text before and after the message content, and check that these pieces rebuild the
template's output for every probe. Templates of that shape (ChatML, Llama 3, Zephyr,
Alpaca-like, ...) become an equivalent Go template; any other (one that folds the
system prompt into the first user turn, say) is left out with a note, and Ollama
falls back to the template it reads from the GGUF file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = "# Ollama Modelfile written by ftcore gguf-export."
ROLES = ("system", "user", "assistant")
MARK = {"system": "FTCOREsys7", "user": "FTCOREusr7", "assistant": "FTCOREast7"}


@dataclass
class ChatShape:
    """A template's pieces: ``head + (prefix + content + suffix) per message``, then the generation prompt
    (or, without one, ``tail``). ``fold``: the system prompt is not a turn of its own but goes at the start
    of the first user turn, followed by ``fold`` (Gemma's templates do this)."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    tail: str = ""
    fold: str | None = None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        system = ""
        if self.fold is not None and messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"] + self.fold, messages[1:]
        text = self.head
        for m in messages:
            if m["role"] not in self.prefix:
                continue   # a template may drop system messages
            content = m["content"]
            if system and m["role"] == "user":
                content, system = system + content, ""
            text += self.prefix[m["role"]] + content + self.suffix[m["role"]]
        return text + (self.generation if add_generation_prompt else self.tail)

    def go_template(self) -> str:
        """The same pieces in Ollama's Go template syntax (text/template over .Messages)."""
        branches = []
        for role in ROLES:
            if role not in self.prefix:
                continue
            end = (f"{{{{ if not $last }}}}{self.suffix[role]}{{{{ end }}}}" if role == "assistant"
                   else self.suffix[role])
            folded = (f"{{{{ if $sys }}}}{{{{ $sys }}}}{self.fold}{{{{ $sys = \"\" }}}}{{{{ end }}}}"
                      if self.fold is not None and role == "user" else "")
            keyword = "if" if not branches else "else if"
            branches.append(f'{{{{ {keyword} eq $m.Role "{role}" }}}}{self.prefix[role]}{folded}'
                            f'{{{{ $m.Content }}}}{end}')
        system = ('{{ $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}'
                  '{{ end }}{{ end }}' if self.fold is not None else "")
        return (self.head + system + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                + "".join(branches) + "{{ end }}"
                + f'{{{{ if and $last (ne $m.Role "assistant") }}}}{self.generation}{{{{ end }}}}{{{{ end }}}}')


def chat_shape(tokenizer: Any, drop_bos: bool) -> ChatShape | None:
    """Read the template's pieces off its renderings, or None when it is not of that shape."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    roles = list(ROLES)
    try:
        render([_msg("system", 1)])
    except Exception:   # a template may refuse a system message (raise_exception in Jinja)
        roles.remove("system")
    bos = getattr(tokenizer, "bos_token", None) or ""
    try:
        shape = _read_shape(render, roles, bos)
        if shape is None or any(shape.render(p, gen) != render(p, gen) for p in _probes(roles) for gen in (0, 1)):
            return None
    except Exception:   # any template that renders our probes otherwise is simply not of this shape
        return None
    if drop_bos and shape.head == bos:
        shape.head = ""   # llama.cpp and Ollama add BOS themselves (tokenizer.ggml.add_bos_token)
    pieces = [shape.head, shape.generation, shape.fold or "", *shape.prefix.values(), *shape.suffix.values()]
    if any("{{" in p or '"""' in p for p in pieces):
        return None
    return shape


def _read_shape(render: Callable[..., str], roles: list[str], bos: str) -> ChatShape | None:
    """The pieces, read off renderings of one and two messages (to be checked on longer conversations)."""
    content = {r: _msg(r, 1)["content"] for r in ROLES}
    singles = {r: render([_msg(r, 1)]) for r in roles}
    head = bos if bos and all(s.startswith(bos) for s in singles.values()) else ""
    user_prefix, found, user_rest = singles["user"][len(head):].partition(content["user"])
    double = render([_msg("user", 1), _msg("user", 3)])[len(head) + len(user_prefix) + len(content["user"]):]
    if not found or user_prefix + _msg("user", 3)["content"] not in double:
        return None
    user_suffix = double[:double.index(user_prefix + _msg("user", 3)["content"])]
    if not user_rest.startswith(user_suffix):
        return None
    tail = user_rest[len(user_suffix):]
    shape = ChatShape(head, {"user": user_prefix}, {"user": user_suffix}, "", tail)
    for role in (r for r in roles if r != "user"):
        body = singles[role][len(head):]
        before, found, after = body.partition(content[role])
        if not found and role == "system" and body == tail:
            shape.fold = _fold(render, shape, content) if render([_msg("system", 5), _msg("user", 1)]) else None
            continue   # the template ignores system messages, or folds them into the first user turn
        if not found or not after.endswith(tail):
            return None
        shape.prefix[role], shape.suffix[role] = before, after[:len(after) - len(tail)]
    prompted = render([_msg("user", 1)], True)
    start = head + user_prefix + content["user"] + user_suffix
    if not prompted.startswith(start):
        return None
    shape.generation = prompted[len(start):]
    return shape


def _fold(render: Callable[..., str], shape: ChatShape, content: dict[str, str]) -> str | None:
    """What separates a system prompt folded into the first user turn from that turn's text, or None."""
    text = render([_msg("system", 5), _msg("user", 1)])
    opening = shape.head + shape.prefix["user"] + _msg("system", 5)["content"]
    closing = content["user"] + shape.suffix["user"] + shape.tail
    if not (text.startswith(opening) and text.endswith(closing)):
        return None
    return text[len(opening):len(text) - len(closing)]


def _msg(role: str, n: int) -> dict[str, str]:
    return {"role": role, "content": f"{MARK[role]}{n}"}


def _probes(roles: list[str]) -> list[list[dict[str, str]]]:
    chat = [_msg("user", 1), _msg("assistant", 2), _msg("user", 3)]
    probes = [chat, chat + [_msg("assistant", 4)]]
    if "system" in roles:
        probes += [[_msg("system", 5), *chat]]
    return probes


def turn_end_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes first after an assistant message (<|im_end|>, <end_of_turn>)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answer = _msg("assistant", 2)["content"]
    try:
        text = tokenizer.apply_chat_template([_msg("user", 1), _msg("assistant", 2)], tokenize=False)
    except Exception:   # a template that refuses this conversation has no turn end to find
        return None
    after = text.split(answer, 1)[1] if answer in text else ""
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
    found = sorted((after.find(s), -len(s), s) for s in specials if s and s in after)
    return found[0][2] if found else None


def stop_tokens(shape: ChatShape | None, tokenizer: Any) -> list[str]:
    """EOS plus the special tokens that end an assistant turn (e.g. <|im_end|>, <|eot_id|>)."""
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    if shape is not None:
        specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
        end = shape.suffix.get("assistant", "")
        stops += sorted(s for s in specials if s and s in end)
    return list(dict.fromkeys(stops))


def modelfile_text(gguf_file: Path, tokenizer: Any, drop_bos: bool, adapter: Path | None = None) -> str:
    """The Modelfile for ``gguf_file`` (with the GGUF LoRA ``adapter`` on top, written beside the Modelfile)."""
    shape = chat_shape(tokenizer, drop_bos)
    here = adapter.parent if adapter is not None else gguf_file.parent
    source = f"./{gguf_file.name}" if gguf_file.parent.resolve() == here.resolve() else str(gguf_file.resolve())
    lines = [HEADER, "# Create the model with:  ollama create MODEL-NAME -f Modelfile", f"FROM {source}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    if shape is not None:
        lines.append(f'TEMPLATE """{shape.go_template()}"""')
    elif getattr(tokenizer, "chat_template", None):
        lines.append("# The chat template could not be translated to Ollama's Go syntax; Ollama uses the")
        lines.append("# template stored in the GGUF file (tokenizer.chat_template) where it recognises it.")
    else:
        lines.append("# The model has no chat template: prompts are sent as they are.")
    for stop in stop_tokens(shape, tokenizer):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_ours(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
