"""Trying a model from the terminal: ``ftcore generate`` (one completion) and ``ftcore chat`` (a conversation).

A model is a base or merged transformers folder, an adapter folder (its base is read from
``adapter_config.json`` or given with ``--model``), or a run's output directory. Adapters are
merged by the adapter plugin that knows them (the ``ftcore_merge_adapter`` hook), so the
core names no adapter method.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ftcore.errors import ConfigError, PluginError

RUN_MARKER = "ftcore-run.json"


# -- loading ---------------------------------------------------------------------------

def locate(model: str, adapter: str | None = None) -> tuple[Path, Path | None]:
    """``(base_or_merged_dir, adapter_dir)`` from what the user passed."""
    model_dir = Path(model).expanduser()
    if not model_dir.exists():
        raise ConfigError(f"--model {model_dir}: no such folder.")
    if (model_dir / RUN_MARKER).exists():
        found = next((model_dir / n for n in ("model", "merged", "adapter") if (model_dir / n).is_dir()), None)
        if found is None:
            raise ConfigError(f"--model {model_dir} is an ftcore run without a saved model or adapter "
                              f"(did it finish?).")
        model_dir = found
    if (model_dir / "adapter_config.json").exists():
        if adapter is not None:
            raise ConfigError(f"--model {model_dir} is an adapter; pass the base model as --model and the "
                              f"adapter as --adapter.")
        return _adapter_base(model_dir), model_dir
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"--model {model_dir} is not a transformers model folder (no config.json) "
                          f"nor an adapter (no adapter_config.json).")
    adapter_dir = Path(adapter).expanduser() if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {adapter_dir} has no adapter_config.json: it is not an adapter folder.")
    return model_dir, adapter_dir


def _adapter_base(adapter_dir: Path) -> Path:
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise ConfigError(f"adapter {adapter_dir} names base model {base!r}, which is not a folder here: "
                          f"pass the base model folder with --model and the adapter with --adapter.")
    return Path(base)


def pick_dtype(dtype: str = "auto") -> str:
    import torch

    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load(model: str, adapter: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a model (merging an adapter through its plugin) and its tokenizer, ready to generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcore._quiet import quiet_libraries

    quiet_libraries()
    base_dir, adapter_dir = locate(model, adapter)
    dtype = pick_dtype(dtype)
    if adapter_dir is not None:
        net, tok = merge_with_plugin(adapter_dir, base_dir, dtype)
    else:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        net = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype), use_safetensors=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    net.config.use_cache = True
    net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return net, tok


def merge_with_plugin(adapter_dir: Path, base_dir: Path, dtype: str) -> tuple[Any, Any]:
    """Ask the adapter plugins (the run's own first, else every installed one) to merge the adapter."""
    from transformers import AutoTokenizer

    plugins = _merge_plugins(adapter_dir)
    got = plugins.hook.ftcore_merge_adapter(adapter_dir=str(adapter_dir), base_path=str(base_dir), dtype=dtype,
                                            ctx=None)
    if got is None:
        raise PluginError(f"no installed adapter plugin could load the adapter in {adapter_dir} "
                          f"(tried: {', '.join(plugins.names()) or 'none'}).")
    if isinstance(got, tuple):
        return got[0], got[1]
    return got, AutoTokenizer.from_pretrained(str(adapter_dir))


def _merge_plugins(adapter_dir: Path) -> Any:
    from ftcore.plugins import PluginSet, hooks_of, installed_entry_points, load_entry_point

    installed = installed_entry_points()
    preferred: list[str] = []
    record = adapter_dir.parent / "plugins.json"
    if record.exists():
        preferred = [p["name"] for p in json.loads(record.read_text()) if p.get("kind") == "adapter"]
    names = [n for n in preferred if n in installed] or list(installed)
    chosen = PluginSet()
    for name in names:
        try:
            obj = load_entry_point(name, installed[name])
        except PluginError:
            continue   # an unrelated broken plugin must not stop us trying the model
        if "ftcore_merge_adapter" in hooks_of(obj):
            chosen.add(name, obj)
    return chosen


# -- generating --------------------------------------------------------------------------

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


# -- commands ----------------------------------------------------------------------------

def _model_options(fn: Any) -> Any:
    options = [
        click.option("--model", "-m", required=True, help="Base or merged model folder, an adapter folder, or a run's "
                     "output directory."),
        click.option("--adapter", "-a", help="Adapter folder to apply on top of --model."),
        click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1)),
        click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0),
                     help="0: greedy (deterministic)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _prepare(model: str, adapter: str | None, dtype: str, seed: int) -> tuple[Any, Any]:
    from transformers import set_seed

    set_seed(seed)
    return load(model, adapter, dtype)


@click.command("generate")
@_model_options
@click.option("--chat-template", "use_template", is_flag=True,
              help="Wrap the prompt as one user message with the tokenizer's chat template.")
@click.argument("prompt", required=False)
def generate_cmd(model: str, adapter: str | None, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, dtype: str, use_template: bool, prompt: str | None) -> None:
    """Print the model's continuation of PROMPT (read from stdin when PROMPT is - or missing)."""
    from ftcore.cli import user_errors

    @user_errors
    def body() -> None:
        text = prompt if prompt not in (None, "-") else sys.stdin.read()
        if not text.strip():
            raise ConfigError("no prompt: pass it as an argument or on stdin.")
        net, tok = _prepare(model, adapter, dtype, seed)
        if use_template:
            session = ChatSession(net, tok, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            click.echo(session.reply(text.strip()))
        else:
            click.echo(complete(net, tok, text, max_new_tokens, temperature=temperature, top_p=top_p))

    body()


@click.command("chat")
@_model_options
@click.option("--system", "-s", help="A system message that starts the conversation.")
def chat_cmd(model: str, adapter: str | None, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, dtype: str, system: str | None) -> None:
    """Talk to a model with its chat template. One message per line; /reset starts over, /exit or Ctrl-D ends."""
    from ftcore.cli import user_errors

    @user_errors
    def body() -> None:
        net, tok = _prepare(model, adapter, dtype, seed)
        session = ChatSession(net, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p)
        interactive = sys.stdin.isatty()
        if interactive:
            click.echo("ftcore chat: one message per line; /reset starts over, /exit or Ctrl-D ends.", err=True)
        while True:
            if interactive:
                click.echo(click.style("you> ", bold=True), nl=False)
            line = sys.stdin.readline()
            if not line:
                break
            message = line.strip()
            if not message:
                continue
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                session.reset()
                click.echo("(conversation reset)", err=True)
                continue
            answer = session.reply(message)
            click.echo((click.style("model> ", bold=True) if interactive else "") + answer)

    try:
        body()
    except KeyboardInterrupt:
        click.echo("", err=True)
