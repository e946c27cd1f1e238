"""Parity of an exported GGUF file with the model it came from: greedy generation in transformers and llama.cpp.

For each prompt (a run's held-out prompts, or given ones), transformers generates greedily from the
exported weights (a merge at float32, a saved model in its own dtype) and llama.cpp does the same
from the file, each stopping at what it treats as the end of a turn. Recorded:

- ``token_agreement``: of transformers' generated tokens, the share llama.cpp picks too when it is fed
  the same prefix (teacher forcing: one early near-tie does not count as every later token wrong);
- ``identical_continuations``: prompts whose two free-running greedy continuations are the same;
- ``stopped_at_end_of_turn``: how many continuations each stopped at an end-of-turn token;
- ``prompt_tokens_identical``: whether llama.cpp tokenized every prompt as transformers did.

The check fails when the agreement is below the quant's tolerance, a prompt is tokenized differently,
or one side stops at the end of a turn where the other, having generated the same tokens, goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The least token agreement each tensor type is expected to keep. f32 computes what transformers computes
# to ~1e-5 of the logit scale, so only an exact tie could differ. 16- and 8-bit weights move logits by
# ~1e-2 of their scale (see tests/test_gguf_llama_cpp.py): a flip needs a near-tie, which a long answer of a
# real model meets now and then; one token in twenty is allowed. K-quants and q4_0 lose more; the figures
# (0.9 at 6 bits, 0.85 at 5, 0.8 at 4) are a floor under which answers visibly change, not a measurement.
MIN_AGREEMENT = {"f32": 1.0, "f16": 0.95, "bf16": 0.95, "q8_0": 0.95, "q6_k": 0.9, "q5_k_m": 0.85,
                 "q4_k_m": 0.8, "q4_0": 0.8}
DEFAULT_PROMPTS = ["Hello! Who are you?", "Write one sentence about the sea.", "What is 2 + 2?"]


@dataclass
class Request:
    """What to check a file with: ``prompts`` as they are, or as user messages put through the chat template."""

    prompts: list[str]
    user_messages: bool = False
    max_new_tokens: int = 24
    min_agreement: float | None = None
    source: str = "given"   # where the prompts come from: given, run (its held-out prompts), built-in


def stop_ids(tokenizer: Any, model: Any) -> set[int]:
    """Tokens that end generation in transformers: EOS, the generation config's, and the turn-end token."""
    from ftcore_plugins.exporters.gguf.modelfile import turn_end_token

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    end = turn_end_token(tokenizer)
    if end is not None:
        ids.add(tokenizer.convert_tokens_to_ids(end))
    return ids


def render(prompts: list[str], tokenizer: Any) -> list[str]:
    """Given prompts are user messages: rendered through the chat template when the model has one."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def strip_bos(text: str, tokenizer: Any) -> str:
    """A prompt as llama.cpp is given it: without the BOS both tokenizers add themselves."""
    bos = getattr(tokenizer, "bos_token", None)
    adds = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds and text.startswith(bos) else text


def transformers_greedy(model: Any, tokenizer: Any, prompt: str, stops: set[int], max_new_tokens: int
                        ) -> tuple[list[int], list[int], bool]:
    """(prompt ids, generated ids, stopped at a stop token) from transformers, greedily."""
    import torch

    ids = tokenizer(prompt)["input_ids"]
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, repetition_penalty=None, eos_token_id=sorted(stops) or None,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    new = out[0, len(ids):].tolist()
    return ids, new, bool(new) and new[-1] in stops


def check(gguf_file: Path, model: Any, tokenizer: Any, prompts: list[str], quant: str, *, max_new_tokens: int = 24,
          min_agreement: float | None = None, lora: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compare ``gguf_file`` (with the adapter file ``lora``) against ``model``; return what was found."""
    from ftcore_plugins.exporters.gguf.llama_cpp_worker import run

    stops = stop_ids(tokenizer, model)
    texts = [strip_bos(p, tokenizer) for p in prompts]
    log(f"gguf-export: checking {gguf_file.name} against transformers on {len(texts)} prompt(s)")
    reference = [transformers_greedy(model, tokenizer, t, stops, max_new_tokens) for t in texts]
    answer = run({"op": "generate", "model": str(gguf_file), "lora": str(lora) if lora else None, "prompts": texts,
                  "max_new_tokens": max_new_tokens, "forced": [new for _, new, _ in reference],
                  "n_ctx": max(len(ids) for ids, _, _ in reference) + max_new_tokens + 8})
    return judge(reference, answer["outputs"], quant, min_agreement, gguf_file, lora)


def judge(reference: list[tuple[list[int], list[int], bool]], outputs: list[dict[str, Any]], quant: str,
          min_agreement: float | None, gguf_file: Path, lora: Path | None) -> dict[str, Any]:
    """The record of one parity check (JSON-able), with ``passed`` and the ``problems`` found."""
    agreed = total = identical = 0
    problems: list[str] = []
    prompts_same = True
    stopped = {"transformers": 0, "llama_cpp": 0}
    for i, ((ids, new, hf_stopped), got) in enumerate(zip(reference, outputs)):
        agreed += sum(a == b for a, b in zip(new, got["forced_choices"]))
        total += len(new)
        identical += got["tokens"] == new
        stopped["transformers"] += hf_stopped
        stopped["llama_cpp"] += got["stopped"]
        if got["prompt_ids"] != ids:
            prompts_same = False
            problems.append(f"prompt {i + 1} is tokenized differently by llama.cpp")
        same_until = min(len(new), len(got["tokens"]))
        if new[:same_until] == got["tokens"][:same_until] and hf_stopped != got["stopped"]:
            ends = "llama.cpp" if got["stopped"] else "transformers"
            problems.append(f"prompt {i + 1}: {ends} stops at the end of the turn and the other goes on")
    agreement = agreed / total if total else 1.0
    floor = MIN_AGREEMENT.get(quant, 0.8) if min_agreement is None else min_agreement
    if agreement < floor:
        problems.append(f"token agreement {agreement:.1%} is below {floor:.0%} for {quant}")
    return {"file": str(gguf_file), **({"adapter": str(lora)} if lora else {}), "quant": quant,
            "prompts": len(reference), "token_agreement": round(agreement, 4), "min_agreement": floor,
            "identical_continuations": f"{identical}/{len(reference)}", "prompt_tokens_identical": prompts_same,
            "stopped_at_end_of_turn": stopped, "passed": not problems, "problems": problems}
