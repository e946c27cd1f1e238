"""Generating from a loaded model: greedy or sampled completions, and conversations through the chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcore.errors import ConfigError


def generate_ids(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int = 20,
                 temperature: float = 0.0, top_p: float = 1.0, stop_strings: list[str] | None = None) -> list[int]:
    """The new token ids for one prompt (greedy when temperature is 0); restores the model's train mode."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, **kwargs)
    finally:
        if was_training:
            model.train()
    return out[0, ids.shape[1]:].tolist()


def complete(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 128, **kw: Any) -> str:
    """Plain continuation of ``prompt`` (no chat template)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return tokenizer.decode(generate_ids(model, tokenizer, ids, max_new_tokens, **kw), skip_special_tokens=True)


def turn_end_marker(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant message (e.g. an end-of-turn token)."""
    probe = [{"role": "user", "content": "\x01u"}, {"role": "assistant", "content": "\x01a"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return ""
    tail = text.split("\x01a", 1)[-1] if "\x01a" in text else ""
    return tail.strip()


@dataclass
class ChatSession:
    """A conversation rendered with the tokenizer's chat template."""

    model: Any
    tokenizer: Any
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template, so `ftcore chat` cannot format a "
                              "conversation; use `ftcore generate` for plain completion, or try an adapter "
                              "trained with a chat format (its tokenizer carries the template).")
        self.marker = turn_end_marker(self.tokenizer)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reply(self, message: str) -> str:
        self.history.append({"role": "user", "content": message})
        new = generate_ids(self.model, self.tokenizer, self.prompt_ids(), self.max_new_tokens, self.temperature,
                           self.top_p, stop_strings=[self.marker] if self.marker else None)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if self.marker and self.marker in text:
            text = text.split(self.marker, 1)[0]
        text = text.strip()
        self.history.append({"role": "assistant", "content": text})
        return text
