"""gguf-export proven by its consumer: llama.cpp (llama-cpp-python) loads what we write and agrees with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf_models import (
    ARCH_MODELS,
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    SAMPLES,
    build,
    build_arch,
    chat_tokenizer,
    gemma_tokenizer,
    split_tokenizer,
    spm_tokenizer,
)
from llama_cpp_probe import probe

import ftcore
import ftcore.tools.export
from ftcore_plugins.exporters.gguf import export_gguf

# llama.cpp (llama-cpp-python, in the test extra) runs only in child processes: see llama_cpp_probe.py.
QUIET = {"log": lambda m: None}
SPECIAL_SAMPLES = ["<s>Hello</s> world</s>", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"]


def llama_cpp_logits(path: Path, id_lists: list[list[int]]) -> list[np.ndarray]:
    return probe(path, [{"op": "logits", "ids": ids} for ids in id_lists])


def transformers_logits(model_dir: Path, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            out.append((ids, model(torch.tensor([ids])).logits[0].numpy()))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One tiny model per supported architecture, each with its family's tokenizer and chat template."""
    root = tmp_path_factory.mktemp("gguf-models")
    return {arch: build_arch(root / arch, arch) for arch in ARCH_MODELS}


# Tolerances on the largest absolute logit difference, relative to the largest logit (about 9 here).
# A Q/K row-order mistake gives differences of the size of the logits themselves (checked by hand: ~10).
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "bf16": 8e-2}
# ggml's CPU GELU (Gemma's activation) rounds its f32 input to f16 and looks the result up in a table
# (GGML_GELU_FP16 in ggml-cpu/vec.h), so even an f32 Gemma file is off by ~1.4e-3 of the logit scale
# (measured); a wrong rope base or a missing norm offset is off by the size of the logits (~15, checked by hand).
GELU_F32_TOLERANCE = 3e-3
GELU_ARCHS = ("gemma2", "gemma3_text")


def tolerance(arch: str, quant: str) -> float:
    if quant == "f32":
        return GELU_F32_TOLERANCE if arch in GELU_ARCHS else TOLERANCE[quant]
    # 16-bit rounding compounds through the layers: the Gemma 3 model has six, the others two (f16: 1.1e-2 measured)
    return TOLERANCE[quant] * (2 if arch == "gemma3_text" else 1)


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16"])
def test_llama_cpp_logits_match_transformers(tiny_models, tmp_path, arch, quant):
    model_dir = tiny_models[arch]
    out = tmp_path / f"{arch}-{quant}.gguf"
    export_gguf(model_dir, out, quant=quant, **QUIET)
    # The first text is longer than the Gemma models' sliding window (6 tokens), so windowed layers count.
    references = transformers_logits(model_dir, [SAMPLES[0] + " " + SAMPLES[1], SAMPLES[2], SPECIAL_SAMPLES[0]])
    results = llama_cpp_logits(out, [ids for ids, _ in references])
    for (ids, expected), got in zip(references, results):
        assert got.shape == expected.shape
        scale = float(np.abs(expected).max())
        assert scale > 1.0   # logits far from zero: the comparison can tell layouts apart
        assert float(np.abs(got - expected).max()) <= tolerance(arch, quant) * scale
        if quant == "f32":   # (16-bit rounding may flip near-ties)
            assert (got.argmax(-1) == expected.argmax(-1)).all()


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Café, 3.14?"}]


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_llama_cpp_renders_and_tokenizes_the_chat_template_as_transformers(tiny_models, tmp_path, arch):
    """The chat template travels in the file: llama-cpp-python's chat formatting, which reads it from the
    GGUF, builds the prompt transformers builds, and llama.cpp tokenizes it into the same ids."""
    from transformers import AutoTokenizer

    out = tmp_path / f"{arch}.gguf"
    export_gguf(tiny_models[arch], out, quant="f16", modelfile=False, **QUIET)
    hf = AutoTokenizer.from_pretrained(str(tiny_models[arch]))
    messages = CONVERSATION if arch != "mistral" else CONVERSATION[1:]   # its template has no system turn
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    [(prompt, ids)] = probe(out, [{"op": "chat", "messages": messages}], vocab_only=True)
    assert prompt == expected
    assert ids == hf(expected, add_special_tokens=False)["input_ids"]


def test_tied_embeddings_export_without_an_output_matrix(tmp_path):
    model_dir = build(tmp_path / "model", chat_tokenizer(), "qwen2", tie=True)
    out = tmp_path / "tied.gguf"
    export_gguf(model_dir, out, quant="f32", modelfile=False, **QUIET)
    assert "output.weight" not in {t.name for t in GGUFReader(out).tensors}   # llama.cpp reuses token_embd
    references = transformers_logits(model_dir, SAMPLES[:2])
    for (ids, expected), got in zip(references, llama_cpp_logits(out, [ids for ids, _ in references])):
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * float(np.abs(expected).max())


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model_dir = build(tmp_path / "model", chat_tokenizer(), "llama", rope_parameters=rope)
    out = tmp_path / "rope.gguf"
    export_gguf(model_dir, out, quant="f32", modelfile=False, **QUIET)
    [(ids, expected)] = transformers_logits(model_dir, [SAMPLES[0] + " " + SAMPLES[1]])
    [got] = llama_cpp_logits(out, [ids])
    # without the rope_freqs factors the difference is of the size of the logits (checked by hand)
    assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * float(np.abs(expected).max())


@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe", "qwen2", "sentencepiece", "gemma"])
def test_llama_cpp_tokenizes_like_transformers(tmp_path, kind):
    from transformers import AutoTokenizer

    tokenizer = {"gpt-2": chat_tokenizer, "sentencepiece": spm_tokenizer, "gemma": gemma_tokenizer,
                 "llama-bpe": lambda: split_tokenizer(LLAMA3_SPLIT),
                 "qwen2": lambda: split_tokenizer(QWEN2_SPLIT)}[kind]()
    model_dir = build(tmp_path / "model", tokenizer, "llama", hidden=32, layers=1, heads=2, kv_heads=1)
    out = tmp_path / "vocab.gguf"
    export_gguf(model_dir, out, quant="f16", modelfile=False, **QUIET)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    texts = SAMPLES + SPECIAL_SAMPLES + ["", "x", "  "]
    expected = [hf(text)["input_ids"] for text in texts]
    ops = [{"op": "tokenize", "text": t} for t in texts] + [{"op": "detokenize", "ids": e[1:]} for e in expected]
    results = probe(out, ops, vocab_only=True)
    for text, ids, got, decoded in zip(texts, expected, results[:len(texts)], results[len(texts):]):
        assert got == ids, text
        if kind == "sentencepiece":   # llama.cpp keeps the space SentencePiece prepends; HF strips it
            decoded = decoded.removeprefix(" ")
        assert decoded == hf.decode(ids[1:]), text


@pytest.fixture(scope="session")
def memorizing_run(tmp_path_factory):
    """A full fine-tune that learns three answers by heart, exported to q8_0 inside the run."""
    root = tmp_path_factory.mktemp("gguf-full")
    base = build(root / "base", chat_tokenizer(), "llama", std=0.02)
    facts = [("Count to eight.", "one two three four five six seven eight"),
             ("Name the capital of France.", "Paris is the capital of France."),
             ("Say hello.", "Hello! The quick brown fox says hello.")]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "input": "", "output": o}) + "\n" for i, o in facts * 8))
    config = {"plugins": ["full", "alpaca", "gguf-export"], "model": str(base),
              "data": {"datasets": [str(data)], "max_length": 64, "val_size": 0},
              "training": {"epochs": 10, "batch_size": 4, "gradient_accumulation": 1, "learning_rate": 5e-3,
                           "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 10,
                           "save_strategy": "no", "eval_strategy": "no"},
              "gguf-export": {"quant": "q8_0"}, "output_dir": str(root / "run")}
    result = ftcore.run(config, **QUIET)
    prompts = [f"### Instruction:\n{i}\n\n### Response:\n" for i, _ in facts]
    return result, prompts


# Prompts the memorizing run never saw: what the exported model does off its training data.
HELD_OUT = [f"### Instruction:\n{i}\n\n### Response:\n" for i in
            ("Count to five.", "Name the capital of Spain.", "Say goodbye to the fox.")]


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    """The share of greedy tokens llama.cpp produced as transformers did, each continuation up to its first
    difference (after which the two continue from different text)."""
    same = total = 0
    for a, b in zip(expected, got):
        total += len(a)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / total


def transformers_greedy(model_dir: Path, prompt: str, n: int) -> tuple[list[int], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    return ids, out[0, len(ids):].tolist()


def test_full_finetune_run_exports_q8_0_that_generates_like_transformers(memorizing_run):
    """On held-out prompts (not the memorized ones): q8_0 keeps every greedy token of the tiny model."""
    result, prompts = memorizing_run
    gguf_file, modelfile = result.exports
    assert result.model_dir.name == "model" and gguf_file == result.output_dir / "gguf" / "run-q8_0.gguf"
    assert modelfile.name == "Modelfile" and f"FROM ./{gguf_file.name}" in modelfile.read_text()
    references = [transformers_greedy(result.model_dir, prompt, 10) for prompt in HELD_OUT]
    results = probe(gguf_file, [{"op": "greedy", "ids": ids, "n": 10} for ids, _ in references])
    assert agreement([e for _, e in references], results) == 1.0


Q4_0_FLOOR = 0.75   # measured: 100% (24/24 tokens) on this tiny model. q4_0 rounds coarsely, and one early
#                     divergence costs every token after it, so the floor allows a late divergence in each prompt


def test_q4_0_export_of_a_trained_model_generates_like_transformers(memorizing_run, tmp_path):
    result, prompts = memorizing_run
    out = tmp_path / "q4.gguf"
    export_gguf(result.model_dir, out, quant="q4_0", modelfile=False, **QUIET)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"   # kept finer, as llama.cpp does
    assert types["blk.0.attn_norm.weight"] == "F32"
    references = [transformers_greedy(result.model_dir, prompt, 8) for prompt in HELD_OUT]
    results = probe(out, [{"op": "greedy", "ids": ids, "n": 8} for ids, _ in references])
    share = agreement([e for _, e in references], results)
    print(f"q4_0 greedy agreement with transformers on held-out prompts: {share:.0%}")
    assert share >= Q4_0_FLOOR, f"q4_0 agrees on {share:.0%} of greedy tokens (floor {Q4_0_FLOOR:.0%})"


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_models):
    """A LoRA run with gguf-export at f32: the adapter is merged into the base before export."""
    root = tmp_path_factory.mktemp("gguf-lora")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {a} and {a + 1}.", "input": "",
                                        "output": str(2 * a + 1)}) + "\n" for a in range(16)))
    config = {"plugins": ["lora", "alpaca", "gguf-export"], "model": str(tiny_models["llama"]),
              "data": {"datasets": [str(data)], "max_length": 64, "val_size": 0},
              "training": {"epochs": 1, "batch_size": 4, "gradient_accumulation": 1, "learning_rate": 2e-2,
                           "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no"},
              "lora": {"r": 8, "target_modules": "all-linear"},
              "gguf-export": {"quant": "f32"}, "output_dir": str(root / "run")}
    return ftcore.run(config, **QUIET)


def merged_reference(result, texts):
    from transformers import AutoTokenizer

    from ftcore.models.peft_merge import merge_peft_adapter

    merged = merge_peft_adapter(str(result.model_dir), None, "float32")   # the hook's contract: the model
    tok = AutoTokenizer.from_pretrained(str(result.model_dir))
    folder = result.output_dir.parent / "merged-reference"
    if not folder.exists():
        merged.save_pretrained(folder)
        tok.save_pretrained(folder)
    return transformers_logits(folder, texts)


def test_lora_run_exports_the_merged_model(lora_run, tiny_models):
    gguf_file = lora_run.exports[0]
    assert lora_run.model_dir.name == "adapter" and gguf_file.suffix == ".gguf"
    texts = SAMPLES[:2]
    merged = merged_reference(lora_run, texts)
    base = transformers_logits(tiny_models["llama"], texts)
    results = llama_cpp_logits(gguf_file, [ids for ids, _ in merged])
    for (ids, expected), (_, before), got in zip(merged, base, results):
        scale = float(np.abs(expected).max())
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * scale
        # ... and the adapter did change the model, so the merge is what is being compared
        assert float(np.abs(got - before).max()) > 100 * TOLERANCE["f32"] * scale


def test_ftcore_export_command_merges_an_adapter_on_its_own(lora_run, tmp_path):
    from click.testing import CliRunner

    from ftcore.cli import main

    out = tmp_path / "exported" / "standalone.gguf"
    result = CliRunner().invoke(main, ["export", "--plugins", "gguf-export", "--model", str(lora_run.model_dir),
                                       "--output", str(out), "--set", "gguf-export.quant=f32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(out), str(out.parent / "Modelfile")]
    assert "merged adapter" in result.stderr     # lora was taken from the run's plugins.json
    texts = SAMPLES[2:4]
    references = merged_reference(lora_run, texts)
    standalone = llama_cpp_logits(out, [ids for ids, _ in references])
    in_run = llama_cpp_logits(lora_run.exports[0], [ids for ids, _ in references])
    for (ids, expected), got, same in zip(references, standalone, in_run):
        assert np.array_equal(got, same)
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * float(np.abs(expected).max())


def save_updated_adapter(peft_model, base_dir: Path, folder: Path, seed: int) -> Path:
    """Save ``peft_model``'s adapter (with the base's tokenizer) after a random non-zero update, as if trained."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(folder)
    return folder


def test_qlora_adapter_is_merged_into_the_unquantized_base(tiny_models, tmp_path):
    """An adapter trained on 4-bit NF4 weights is merged into the float32 base, never into 4-bit weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base_dir = tiny_models["llama"]
    quantized = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                              bnb_4bit_compute_dtype=torch.float32))
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = save_updated_adapter(peft_model, base_dir, tmp_path / "adapter", seed=1)

    out = tmp_path / "qlora.gguf"
    written = ftcore.tools.export.export(str(adapter), str(out), ["lora", "gguf-export"], base=str(base_dir),
                                   sets={"gguf-export": {"quant": "f32"}}, **QUIET)
    assert written[0] == out

    from ftcore.models.peft_merge import merge_peft_adapter

    merged = merge_peft_adapter(str(adapter), str(base_dir), "float32")   # float32 base + adapter
    tok = AutoTokenizer.from_pretrained(str(adapter))
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    references = transformers_logits(tmp_path / "merged", SAMPLES[:2])
    for (ids, expected), got in zip(references, llama_cpp_logits(out, [ids for ids, _ in references])):
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * float(np.abs(expected).max())


def test_an_adapter_is_merged_in_its_bf16_bases_own_dtype_not_float32(tiny_models, tmp_path):
    """A 7B base merged in float32 would hold 28 GB of host memory for the export; in its own bf16, 14 GB."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.bfloat16).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(str(tiny_models["llama"])).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = save_updated_adapter(peft_model, base_dir, tmp_path / "adapter", seed=2)
    out, lines = tmp_path / "bf16.gguf", []
    export_gguf(adapter, out, quant="f16", base=str(base_dir), log=lines.append)
    assert any("merged adapter" in line and "(bfloat16, the base's own dtype)" in line for line in lines), lines

    from ftcore.models.peft_merge import merge_peft_adapter

    merged = merge_peft_adapter(str(adapter), str(base_dir), "auto")
    assert merged.dtype == torch.bfloat16
    merged.float().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(tmp_path / "merged")
    references = transformers_logits(tmp_path / "merged", SAMPLES[:2])
    for (ids, expected), got in zip(references, llama_cpp_logits(out, [ids for ids, _ in references])):
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f16"] * float(np.abs(expected).max())


def test_qlora_run_exports_the_adapter_merged_into_the_unquantized_base(tiny_models, tmp_path):
    """A real qlora run (4-bit NF4 base on this CPU) with gguf-export: the GGUF holds the fp32 base + adapter."""
    from safetensors.numpy import load_file

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {a} and {a + 1}.", "input": "",
                                        "output": str(2 * a + 1)}) + "\n" for a in range(16)))
    config = {"plugins": ["qlora", "alpaca", "gguf-export"], "model": str(tiny_models["llama"]),
              "data": {"datasets": [str(data)], "max_length": 64, "val_size": 0},
              "training": {"epochs": 1, "batch_size": 4, "gradient_accumulation": 1, "learning_rate": 2e-2,
                           "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no"},
              "lora": {"r": 8}, "gguf-export": {"quant": "f32"}, "output_dir": str(tmp_path / "run")}
    result = ftcore.run(config, **QUIET)
    gguf_file = result.exports[0]
    assert result.model_dir.name == "adapter" and gguf_file.suffix == ".gguf"
    # A layer LoRA did not touch (default targets: attention) is the base's fp32 weight, bit for bit:
    # nothing was rounded onto the 4-bit grid the adapter was trained on.
    exported = {t.name: np.array(t.data) for t in GGUFReader(gguf_file).tensors}
    base_weights = load_file(str(tiny_models["llama"] / "model.safetensors"))
    assert np.array_equal(exported["blk.0.ffn_up.weight"], base_weights["model.layers.0.mlp.up_proj.weight"])
    texts = SAMPLES[:2]
    merged = merged_reference(result, texts)
    base = transformers_logits(tiny_models["llama"], texts)
    for (ids, expected), (_, before), got in zip(merged, base, llama_cpp_logits(gguf_file, [i for i, _ in merged])):
        scale = float(np.abs(expected).max())
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * scale
        assert float(np.abs(got - before).max()) > 100 * TOLERANCE["f32"] * scale   # the adapter changed it


# -- k-quants and the parity check --------------------------------------------------------------

PROMPTS = ["Say hello.", "Count to eight.", "Name the capital of France."]


def parity_request(**kw):
    from ftcore_plugins.exporters.gguf.parity import Request

    return Request(PROMPTS, user_messages=True, **kw)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_parity_of_full_precision_and_q8_0_exports_is_exact(memorizing_run, tmp_path, quant):
    result, _ = memorizing_run
    details = {}
    export_gguf(result.model_dir, tmp_path / f"{quant}.gguf", quant=quant, modelfile=False,
                parity=parity_request(), details=details, **QUIET)
    assert details["passed"] and details["token_agreement"] == 1.0 and details["identical_continuations"] == "3/3"
    assert details["prompt_tokens_identical"] is True


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_parity_holds_for_every_architecture_through_its_chat_template(tiny_models, tmp_path, arch):
    """Prompts go through each family's chat template; llama.cpp tokenizes and continues them as transformers."""
    details = {}
    export_gguf(tiny_models[arch], tmp_path / "m.gguf", quant="f32", modelfile=False,
                parity=parity_request(max_new_tokens=12), details=details, **QUIET)
    assert details["passed"], details
    assert details["token_agreement"] == 1.0 and details["prompt_tokens_identical"] is True


@pytest.fixture(scope="session")
def model_256(tmp_path_factory):
    """Rows of 256 values: k-quants work in blocks of 256 (narrower rows fall back to other types)."""
    return build(tmp_path_factory.mktemp("gguf-256") / "model", chat_tokenizer(), "llama", hidden=256, std=0.05)


@pytest.mark.parametrize(("quant", "matrix_type"), [("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K"), ("q6_k", "Q6_K")])
def test_k_quants_are_made_by_llama_cpp_and_report_their_agreement(model_256, tmp_path, quant, matrix_type):
    out = tmp_path / f"m-{quant}.gguf"
    details = {}
    written = export_gguf(model_256, out, quant=quant, parity=parity_request(), details=details, **QUIET)
    assert written == [out, tmp_path / "Modelfile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", out.name]   # no source or partial left
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == matrix_type
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[quant]
    assert 0.0 <= details["token_agreement"] <= 1.0 and details["quant"] == quant
    assert details["min_agreement"] == {"q4_k_m": 0.8, "q5_k_m": 0.85, "q6_k": 0.9}[quant]
    assert details["passed"] == (details["token_agreement"] >= details["min_agreement"])


def test_a_bf16_model_is_k_quantized_from_a_bf16_source_not_f16(model_256, tmp_path, monkeypatch):
    """bf16 weights can exceed f16's range: llama.cpp quantizes them from a bf16 file ftcore writes."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from ftcore_plugins.exporters.gguf import kquant

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(model_256), dtype=torch.bfloat16).save_pretrained(str(bf16))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_256 / name).is_file():
            shutil.copy(model_256 / name, bf16 / name)
    sources, real = [], kquant.quantize

    def quantize(source, output, quant, log):
        sources.append({t.name: t.tensor_type.name for t in GGUFReader(source).tensors})
        return real(source, output, quant, log)

    monkeypatch.setattr(kquant, "quantize", quantize)
    out = tmp_path / "out" / "m-q4_k_m.gguf"
    out.parent.mkdir()
    details = {}
    export_gguf(bf16, out, quant="q4_k_m", modelfile=False, parity=parity_request(), details=details, **QUIET)
    assert sources and sources[0]["blk.0.attn_q.weight"] == "BF16"
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]          # the bf16 source is gone
    assert 0.0 <= details["token_agreement"] <= 1.0 and details["quant"] == "q4_k_m"


def test_k_quant_needs_llama_cpp_python_and_says_how_to_get_it(model_256, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # as if llama-cpp-python were not installed
    with pytest.raises(ftcore.PluginError, match=r"pip install llama-cpp-python"):
        export_gguf(model_256, tmp_path / "m.gguf", quant="q4_k_m", **QUIET)
    assert list(tmp_path.iterdir()) == []
    details = {}
    export_gguf(model_256, tmp_path / "m.gguf", quant="q8_0", modelfile=False, parity=parity_request(),
                details=details, **QUIET)
    assert details["passed"] is False and "llama-cpp-python is not installed" in details["skipped"]


def test_interrupted_k_quant_leaves_nothing_behind(model_256, tmp_path, monkeypatch):
    from ftcore_plugins.exporters.gguf import llama_cpp_worker

    def killed(request, timeout=None):
        raise KeyboardInterrupt   # as if the user pressed Ctrl-C while llama.cpp quantized

    monkeypatch.setattr(llama_cpp_worker, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_256, tmp_path / "m.gguf", quant="q6_k", modelfile=False, **QUIET)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def broken_rope(monkeypatch):
    """The classic conversion bug: Llama's Q/K rows left in transformers' rotary order."""
    from ftcore_plugins.exporters.gguf import arch as arch_mod

    monkeypatch.setitem(arch_mod.ARCHS, "llama", arch_mod.Arch("llama", interleave_rotary=False))


def test_a_file_that_generates_differently_is_a_warning_in_the_run(memorizing_run, tmp_path, broken_rope):
    result, _ = memorizing_run
    lines = []
    ftcore.export(str(result.output_dir), str(tmp_path / "bad.gguf"), ["gguf-export"], log=lines.append,
                  sets={"gguf-export": {"modelfile": False}})
    warning = next(line for line in lines if line.startswith("warning: gguf-export: parity check"))
    assert "token agreement" in warning and "below 95%" in warning
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["export_details"]["gguf-export"]["passed"] is False
    assert summary["export_details"]["gguf-export"]["file"] == str(tmp_path / "bad.gguf")


def test_strict_parity_makes_a_failed_check_an_error(memorizing_run, tmp_path, broken_rope):
    from click.testing import CliRunner

    from ftcore.cli import main

    result, _ = memorizing_run
    out = tmp_path / "bad.gguf"
    ran = CliRunner().invoke(main, ["export", "--plugins", "gguf-export", "--model", str(result.output_dir),
                                    "--output", str(out), "--strict-parity", "--set", "gguf-export.modelfile=false"])
    assert ran.exit_code == 2 and "parity check of bad.gguf failed" in ran.output and "Traceback" not in ran.output


def test_ftcore_run_with_strict_parity_fails_on_a_bad_file_checked_on_held_out_prompts(tmp_path, broken_rope):
    """The run's own flag, as the export command's: the model is saved, the failed check exits 2 and is recorded;
    with a held-out split the check uses its prompts, not the ones the model trained on."""
    import yaml
    from click.testing import CliRunner

    from ftcore.cli import main

    base = build(tmp_path / "base", chat_tokenizer(), "llama", std=0.02)
    records = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(20)]
    data, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:16]))
    held.write_text("".join(json.dumps(r) + "\n" for r in records[16:]))
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "plugins": ["full", "alpaca", "gguf-export"], "model": str(base),
        "data": {"datasets": [str(data)], "eval_datasets": [str(held)], "max_length": 64},
        "training": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_strategy": "no"},
        "gguf-export": {"quant": "f32", "modelfile": False}, "output_dir": str(out)}))
    ran = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml"), "--strict-parity", "--no-progress"])
    assert ran.exit_code == 2, ran.output
    assert "parity check" in ran.output and "Traceback" not in ran.output
    assert (out / "model" / "model.safetensors").is_file()                       # the trained model is kept
    summary = json.loads((out / "summary.json").read_text())
    details = summary["export_details"]["gguf-export"]
    assert details["passed"] is False and details["prompts_from"] == "run"
    assert details["prompts"] == len(summary["sample_prompts"]) >= 2
    assert set(details["stopped_at_end_of_turn"]) == {"transformers", "llama_cpp"}   # read back from the file
    assert "stopped_at_end_of_turn" in (out / "report.html").read_text()
    assert summary["export_errors"] and "parity" in summary["export_errors"][0]
    held_out = {f"### Instruction:\n{r['instruction']}\n\n### Response:\n" for r in records[16:]}
    assert set(summary["sample_prompts"]) <= held_out                           # never a prompt it trained on


def test_run_records_parity_in_summary_and_report(memorizing_run):
    result, _ = memorizing_run
    details = result.export_details["gguf-export"]
    assert details["passed"] and details["token_agreement"] == 1.0 and details["prompts"] == len(result.sample_prompts)
    assert details["prompts_from"] == "run"   # the Alpaca prompts the run trained on, as summary.json keeps them
    assert all(p.startswith("### Instruction:\n") for p in result.sample_prompts)
    assert len(set(result.sample_prompts)) == len(result.sample_prompts) >= 2
    stopped = details["stopped_at_end_of_turn"]
    assert stopped["transformers"] == stopped["llama_cpp"] >= 1   # the learned EOS ends answers on both sides
    html = result.report_path.read_text()
    assert 'id="exports"' in html and "token_agreement" in html and "identical_continuations" in html
    assert "stopped_at_end_of_turn" in html


# -- adapter-only GGUF ------------------------------------------------------------------------------

def test_lora_adapter_file_applied_by_llama_cpp_matches_the_merged_model(lora_run, tiny_models, tmp_path):
    written = ftcore.export(str(lora_run.output_dir), str(tmp_path), ["gguf-export"], log=lambda m: None,
                            sets={"gguf-export": {"adapter": True, "quant": "f32"}})
    adapter_file, base_file = tmp_path / "run-lora-f32.gguf", tmp_path / "llama-f32.gguf"
    assert written == [base_file, adapter_file, tmp_path / "Modelfile"]
    kv = {name: field.contents() for name, field in GGUFReader(adapter_file).fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 32.0
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= {t.name for t in
                                                                             GGUFReader(adapter_file).tensors}
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f"\nFROM ./{base_file.name}\nADAPTER ./{adapter_file.name}\n" in modelfile
    texts = SAMPLES[:2]
    merged = merged_reference(lora_run, texts)
    base = transformers_logits(tiny_models["llama"], texts)
    applied = probe(base_file, [{"op": "logits", "ids": ids} for ids, _ in merged], lora=adapter_file)
    for (ids, expected), (_, before), got in zip(merged, base, applied):
        scale = float(np.abs(expected).max())
        assert float(np.abs(got - expected).max()) <= TOLERANCE["f32"] * scale
        assert float(np.abs(got - before).max()) > 100 * TOLERANCE["f32"] * scale   # the adapter is applied
    summary = json.loads((lora_run.output_dir / "summary.json").read_text())
    details = summary["export_details"]["gguf-export"]
    assert details["adapter"] == str(adapter_file) and details["passed"] and details["token_agreement"] == 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_adapter_file_keeps_peft_scaling_rules(tiny_models, tmp_path, arch):
    """rsLoRA, per-module ranks and alphas: llama.cpp's single alpha/rank is corrected inside B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcore.models.peft_merge import merge_peft_adapter
    from ftcore_plugins.exporters.gguf import GgufExportConfig, export_lora_gguf

    base_dir = tiny_models[arch]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else "all-linear"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=targets,
                                                  rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}))
    adapter = save_updated_adapter(peft_model, base_dir, tmp_path / "adapter", seed=2)
    settings = GgufExportConfig(adapter=True, quant="f32", modelfile=False)
    [base_file, adapter_file] = export_lora_gguf(adapter, tmp_path / "out" / "m-f32.gguf", settings,
                                                 base=str(base_dir), **QUIET)
    merged = merge_peft_adapter(str(adapter), str(base_dir), "float32")
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(tmp_path / "merged")
    references = transformers_logits(tmp_path / "merged", SAMPLES[:2])
    got = probe(base_file, [{"op": "logits", "ids": ids} for ids, _ in references], lora=adapter_file)
    for (ids, expected), logits in zip(references, got):
        assert float(np.abs(logits - expected).max()) <= TOLERANCE["f32"] * float(np.abs(expected).max())


def test_adapter_file_is_refused_for_what_it_cannot_hold(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftcore_plugins.exporters.gguf import GgufExportConfig, export_lora_gguf

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "a")
    with pytest.raises(ftcore.ConfigError, match="DoRA"):
        export_lora_gguf(tmp_path / "a", tmp_path / "m.gguf", GgufExportConfig(adapter=True),
                         base=str(tiny_models["llama"]), **QUIET)
    assert not list(tmp_path.glob("*.gguf"))


# -- Ollama itself, where it is installed ------------------------------------------------------------

@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory):
    """`ollama serve` on a free port of 127.0.0.1 with its models in a temporary folder; skipped where ollama
    is absent (session-scoped, so that the skip comes before the fine-tune the test would use)."""
    import os
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    if shutil.which("ollama") is None:
        pytest.skip("the ollama binary is not installed here: this test creates the exported model with "
                    "`ollama create` and generates from it where it is")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path_factory.mktemp("ollama"))}
    server = subprocess.Popen(["ollama", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield env, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ollama_creates_the_exported_model_and_generates_what_transformers_does(ollama_server, memorizing_run):
    import subprocess
    import urllib.request

    env, url = ollama_server
    result, prompts = memorizing_run
    gguf_file, modelfile = result.exports[:2]
    subprocess.run(["ollama", "create", "ftcore-test", "-f", str(modelfile)], env=env, check=True,
                   cwd=modelfile.parent, capture_output=True, timeout=300)
    _, expected = transformers_greedy(result.model_dir, prompts[1], 16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(result.model_dir))
    if tok.eos_token_id in expected:   # the model learned to end its answer: Ollama stops there
        expected = expected[:expected.index(tok.eos_token_id)]
    text = tok.decode(expected, skip_special_tokens=True)
    request = json.dumps({"model": "ftcore-test", "prompt": prompts[1], "raw": True, "stream": False,
                          "options": {"temperature": 0, "num_predict": 16, "seed": 0}}).encode()
    answer = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}/api/generate", data=request, headers={"Content-Type": "application/json"}), timeout=300).read())
    assert answer["response"] == text and answer["done_reason"] == "stop"


def test_export_command_checks_with_the_prompts_it_is_given(memorizing_run, tmp_path):
    from click.testing import CliRunner

    from ftcore.cli import main

    result, _ = memorizing_run
    ran = CliRunner().invoke(main, ["export", "--plugins", "gguf-export", "--model", str(result.output_dir),
                                    "--output", str(tmp_path / "given.gguf"), "--set", "gguf-export.modelfile=false",
                                    "--set", 'gguf-export.parity_prompts=["Say hello.", "Count to eight."]',
                                    "--set", "gguf-export.parity_tokens=6", "--strict-parity"])
    assert ran.exit_code == 0, ran.output
    details = json.loads((result.output_dir / "summary.json").read_text())["export_details"]["gguf-export"]
    assert details["file"] == str(tmp_path / "given.gguf") and details["prompts"] == 2 and details["passed"]
    assert details["prompts_from"] == "given"
    ran = CliRunner().invoke(main, ["export", "--plugins", "gguf-export", "--model", str(result.output_dir),
                                    "--output", str(tmp_path / "unchecked.gguf"), "--set", "gguf-export.parity=false",
                                    "--set", "gguf-export.modelfile=false"])
    assert ran.exit_code == 0 and "checking" not in ran.output and "parity" not in ran.output
