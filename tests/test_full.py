"""The full plugin: every weight trains unless frozen by name or layer; a whole model is saved."""

from __future__ import annotations

import torch
from capture_plugin import Capture
from conftest import tiny_config
from safetensors.torch import load_file

import ftcore


def test_full_trains_all_weights_and_saves_a_safetensors_model(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["full", "alpaca"]
    result = ftcore.run(cfg, plugins=[cap], log=lambda m: None)
    assert all(p.requires_grad for p in cap.model.parameters())
    assert result.model_dir == tmp_path / "out" / "model"
    assert list(result.model_dir.glob("*.safetensors")) and not list(result.model_dir.glob("*.bin"))   # no pickle
    assert (result.model_dir / "tokenizer.json").exists()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(result.model_dir / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base), "some weights did not train"
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model_dir)).eval()
    from capture_plugin import probe_ids

    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids(len(cap.model.get_input_embeddings().weight))).logits
    torch.testing.assert_close(logits, cap.logits, atol=1e-5, rtol=1e-5)


def test_freeze_modules_and_first_layers_stay_unchanged(tiny_model_dir, alpaca_file, tmp_path):
    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["full", "alpaca"]
    cfg["full"] = {"freeze_modules": [r"embed_tokens", r"\.mlp\.down_proj\."], "freeze_layers": 1}
    result = ftcore.run(cfg, plugins=[cap], log=lambda m: None)

    def frozen(name: str) -> bool:
        return "embed_tokens" in name or ".mlp.down_proj." in name or ".layers.0." in name

    grads = {n: p.requires_grad for n, p in cap.model.named_parameters()}
    assert any(frozen(n) for n in grads) and any(not frozen(n) for n in grads)
    assert all(grads[n] == (not frozen(n)) for n in grads), grads
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(result.model_dir / "model.safetensors"))
    for name in base:
        if frozen(name):
            assert torch.equal(base[name], trained[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(base[name], trained[name]), f"trainable {name} did not change"


def test_added_tokens_grow_a_full_models_vocabulary_to_a_multiple_of_64_that_consumers_load(tiny_model_dir,
                                                                                            tmp_path):
    """ChatML adds two tokens: the embeddings grow to a multiple of 64 rows (GPU matrix kernels run faster on
    such shapes), the saved model says so in its config, and transformers and llama.cpp's GGUF loader take it."""
    from conftest import write_jsonl
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(12)]
    data = write_jsonl(tmp_path / "chat.jsonl", chat)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-3, max_steps=2)
    cfg["plugins"] = ["full", "chatml", "gguf-export"]
    result = ftcore.run(cfg, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(result.model_dir))
    base_vocab = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).config.vocab_size
    model = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) > base_vocab and rows % 64 == 0 and len(tok) <= rows < len(tok) + 64
    assert model.config.vocab_size == rows
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    gguf_file = next(p for p in result.exports if p.suffix == ".gguf")
    fields = GGUFReader(str(gguf_file)).fields
    assert len(fields["tokenizer.ggml.tokens"].data) == rows   # the vocabulary padded to the embedding rows
    assert result.export_details["gguf-export"]["passed"] is True   # llama.cpp generates as transformers does
