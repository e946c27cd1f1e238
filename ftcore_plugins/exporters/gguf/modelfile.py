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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = "# Ollama Modelfile written by ftcore gguf-export."
ROLES = ("system", "user", "assistant")
MARK = {"system": "FTCOREsys7", "user": "FTCOREusr7", "assistant": "FTCOREast7"}


@dataclass
class ChatShape:
    """A template's pieces: ``head + (prefix + content + suffix) per message + generation prompt``."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        kept = [m for m in messages if m["role"] in self.prefix]   # a template may drop system messages
        text = self.head + "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in kept)
        return text + (self.generation if add_generation_prompt else "")

    def go_template(self) -> str:
        branches = []
        for role in ROLES:
            if role not in self.prefix:
                continue
            tail = (f"{{{{ if not $last }}}}{self.suffix[role]}{{{{ end }}}}" if role == "assistant"
                    else self.suffix[role])
            keyword = "if" if not branches else "else if"
            branches.append(f'{{{{ {keyword} eq $m.Role "{role}" }}}}{self.prefix[role]}{{{{ $m.Content }}}}{tail}')
        return (self.head + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
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
    try:
        singles = {r: render([_msg(r, 1)]) for r in roles}
        bos = getattr(tokenizer, "bos_token", None) or ""
        head = bos if bos and all(s.startswith(bos) for s in singles.values()) else ""
        prefix, suffix = {}, {}
        for role, text in singles.items():
            body = text[len(head):]
            before, found, after = body.partition(_msg(role, 1)["content"])
            if not found and role == "system" and not body:
                continue   # the template ignores system messages; so will the Go template
            if not found:
                return None
            prefix[role], suffix[role] = before, after
        plain = render([_msg("user", 1)])
        prompted = render([_msg("user", 1)], True)
        if not prompted.startswith(plain):
            return None
        shape = ChatShape(head, prefix, suffix, prompted[len(plain):])
        for probe in _probes(roles):
            for gen in (False, True):
                if shape.render(probe, gen) != render(probe, gen):
                    return None
    except Exception:
        return None
    if drop_bos and shape.head == bos:
        shape.head = ""   # llama.cpp and Ollama add BOS themselves (tokenizer.ggml.add_bos_token)
    pieces = [shape.head, shape.generation, *shape.prefix.values(), *shape.suffix.values()]
    if any("{{" in p or '"""' in p for p in pieces):
        return None
    return shape


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
