"""The memory estimator: from a model's config alone, checked against real peaks and the recipe's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl
from distributions import install

import ftcore
from ftcore.cli import main
from ftcore.errors import PluginError
from ftcore.tools.estimate import MemoryProfile, OptimizerProfile, estimate, estimate_profiles, load_config, model_shape

# Llama-2-7B's architecture, as in its config.json.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# ftcore:tiny-llama's architecture.
TINY = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 384, "vocab_size": 1024,
        "tie_word_embeddings": False}
GB = 1e9


@pytest.fixture
def tiny(tmp_path) -> str:
    """A folder holding TINY's config.json and nothing else (no weights: the builtin need not be built)."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path / "tiny")


def test_llama2_7b_lands_in_the_reference_recipes_ranges():
    """The recipe's settings: batch 4 x 2048 tokens, bf16, gradient checkpointing (as it advises), AdamW."""
    result = estimate(LLAMA2_7B, seq_len=2048, batch=4, gradient_checkpointing=True, precision="bf16")
    assert result["params"] == 6_738_415_616
    totals = {r["method"]: r["total"] / GB for r in result["methods"]}
    assert totals["full"] >= 120
    assert 16 <= totals["lora"] <= 24
    assert 8 <= totals["qlora"] <= 12
    lora = next(r for r in result["methods"] if r["method"] == "lora")
    assert lora["trainable_params"] == 32 * 4 * 16 * (4096 + 4096)        # r=16 on q/k/v/o, as PEFT counts
    full = next(r for r in result["methods"] if r["method"] == "full")
    assert full["gradients"] == 4 * 6_738_415_616 and full["optimizer"] == 8 * 6_738_415_616


def test_options_move_the_figures_the_right_way():
    base = {r["method"]: r for r in estimate(LLAMA2_7B)["methods"]}
    ckpt = {r["method"]: r for r in estimate(LLAMA2_7B, gradient_checkpointing=True)["methods"]}
    assert ckpt["lora"]["activations"] < base["lora"]["activations"] / 4
    assert ckpt["qlora"]["activations"] == base["qlora"]["activations"]       # qlora always checkpoints
    longer = {r["method"]: r for r in estimate(LLAMA2_7B, seq_len=4096)["methods"]}
    assert longer["lora"]["activations"] == pytest.approx(2 * base["lora"]["activations"], rel=1e-9)
    eight = {r["method"]: r for r in estimate(LLAMA2_7B, plugins=["full", "paged-adamw-8bit"])["methods"]}
    assert list(eight) == ["full", "lora", "qlora"]                         # all three, always
    assert [m for m, r in eight.items() if r["selected"]] == ["full"]       # the one named is marked
    assert eight["full"]["optimizer"] < base["full"]["optimizer"] / 3.9
    wide = {r["method"]: r for r in estimate(LLAMA2_7B, plugins=["lora"],
                                              settings={"lora": {"r": 8, "target_modules": "all-linear"}})["methods"]}
    assert wide["lora"]["trainable_params"] == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    assert wide["qlora"]["trainable_params"] == wide["lora"]["trainable_params"]   # qlora reads the lora section
    assert (wide["lora"]["adapter_rank"], wide["lora"]["adapter_targets"]) == (8, "all-linear")
    assert wide["full"]["adapter_rank"] is None


def test_set_reaches_each_plugins_own_section_and_the_training_keys(tiny):
    """--set replaces the old LoRA-only flags: each plugin reads its own section, as in a run."""
    runner = CliRunner()
    out = runner.invoke(main, ["estimate", "-m", tiny, "--json", "--set", "lora.r=8",
                               "--set", "lora.target_modules=[q_proj,v_proj]", "--set", "training.batch_size=2",
                               "--set", "qlora.gradient_checkpointing=false"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    rows = {r["method"]: r for r in result["methods"]}
    assert result["batch"] == 2
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] == 4 * 8 * ((128 + 128) + (128 + 64))
    assert not rows["qlora"]["gradient_checkpointing"]     # the qlora section turns its own checkpointing off
    assert any("gradient checkpointing as training.gradient_checkpointing" in a for a in result["assumptions"])
    for option in ("--lora-r", "--lora-targets"):            # the core names no plugin: no per-plugin flags
        assert option not in runner.invoke(main, ["estimate", "--help"]).output


def test_cli_reads_a_folder_without_weights_a_config_path_or_a_builtin(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))        # a config and nothing else: no weights
    runner = CliRunner()
    by_folder = runner.invoke(main, ["estimate", "--model", str(folder), "--json"])
    by_file = runner.invoke(main, ["estimate", "--model", str(folder / "config.json"), "--json",
                                   "--plugins", "qlora", "--seq-len", "1024", "--batch", "2",
                                   "--gradient-checkpointing"])
    assert by_folder.exit_code == 0 and by_file.exit_code == 0, by_folder.output + by_file.output
    rows = json.loads(by_folder.output)["methods"]
    assert [r["method"] for r in rows] == ["full", "lora", "qlora"]
    assert all(set(r) >= {"weights", "gradients", "optimizer", "activations", "total"} for r in rows)
    picked = json.loads(by_file.output)
    # `--plugins qlora` still shows every method (the recipe's table), with qlora marked as the chosen one
    assert [r["method"] for r in picked["methods"]] == ["full", "lora", "qlora"] and picked["seq_len"] == 1024
    assert picked["selected"] == ["qlora"] and [r["selected"] for r in picked["methods"]] == [False, False, True]
    assert all(r["gradient_checkpointing"] for r in picked["methods"])
    assert picked["assumptions"]
    table = runner.invoke(main, ["estimate", "-m", "ftcore:tiny-llama", "--precision", "fp32"])
    assert table.exit_code == 0, table.output
    for word in ("weights", "gradients", "optimizer", "activations", "full", "lora", "qlora", "Assumptions"):
        assert word in table.output
    assert "*" not in table.output        # nothing named with --plugins: no method marked
    marked = runner.invoke(main, ["estimate", "-m", str(folder), "--plugins", "qlora,chatml"])
    assert marked.exit_code == 0, marked.output
    assert "* qlora" in marked.output and "* lora" not in marked.output and "full" in marked.output


@pytest.mark.parametrize("args, expect", [
    (["--model", "/no/such/model"], "no such model folder"),
    (["--model", "ftcore:tiny-llama", "--plugins", "qlorra"], 'Did you mean "qlora"'),
    (["--model", "ftcore:tiny-llama", "--set", "lora.target_modules=[nothing_proj]"],
     'plugin "lora": no linear layer of the model matches its adapter targets'),
    (["--model", "ftcore:tiny-llama", "--set", "lora.rr=8"], 'Did you mean "r"'),
    (["--model", "ftcore:tiny-llama", "--set", "training.precision=auto"], "training precision"),
    (["--model", "ftcore:tiny-llama", "--batch", "0"], "must be positive"),
])
def test_bad_input_is_a_clear_error(args, expect):
    result = CliRunner().invoke(main, ["estimate", *args])
    assert result.exit_code == 2 and expect in result.output and "Traceback" not in result.output


# -- the core works from the plugins' profiles -------------------------------------------

# The figures `ftcore estimate` gave before the method knowledge moved from a table in the core to
# the plugins' ftcore_memory_profile hooks (commit 379d053), per method: weights, gradients,
# optimizer, activations (bytes), trainable params, gradient checkpointing. They must not move.
BEFORE_THE_HOOK = [
    (TINY, {}, "AdamW", ["full", "lora", "qlora"], {
        "full": [6298368, 4198912, 8397824, 285212672, 1049728, False],
        "lora": [2328832, 229376, 458752, 289406976, 57344, False],
        "qlora": [1688272, 229376, 458752, 156237824, 57344, True]}),
    (TINY, {"plugins": ["qlora", "paged-adamw-8bit"], "seq_len": 128, "batch": 2, "gradient_checkpointing": True,
            "precision": "fp32"}, "8-bit AdamW", ["qlora"], {
        "full": [4198912, 4198912, 2132264, 6553600, 1049728, True],
        "lora": [4428288, 229376, 458752, 6619136, 57344, True],
        "qlora": [1688272, 229376, 458752, 6619136, 57344, True]}),
    (TINY, {"plugins": ["lora"], "precision": "fp16", "settings": {"lora": {"r": 8, "target_modules": "all-linear"}}},
     "AdamW", ["lora"], {
        "full": [6298368, 4198912, 8397824, 285212672, 1049728, False],
        "lora": [2410752, 311296, 622592, 330825728, 77824, False],
        "qlora": [1770192, 311296, 622592, 166592512, 77824, True]}),
    (LLAMA2_7B, {"gradient_checkpointing": True}, "AdamW", ["full", "lora", "qlora"], {
        "full": [40430493696, 26953662464, 53907324928, 6752829440, 6738415616, True],
        "lora": [13543940096, 67108864, 134217728, 6774849536, 16777216, True],
        "qlora": [4457521152, 67108864, 134217728, 6774849536, 16777216, True]}),
    (LLAMA2_7B, {"plugins": ["full", "paged-adamw-8bit"],
                 "settings": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}}, "8-bit AdamW", ["full"], {
        "full": [40430493696, 26953662464, 13687406720, 49853497344, 6738415616, False],
        "lora": [13485219840, 8388608, 4259840, 46233812992, 2097152, False],
        "qlora": [4398800896, 8388608, 4259840, 6639714304, 2097152, True]}),
]
FIELDS = ("weights", "gradients", "optimizer", "activations", "trainable_params", "gradient_checkpointing")


@pytest.mark.parametrize("model, kwargs, optimizer, selected, rows", BEFORE_THE_HOOK)
def test_the_figures_are_those_of_the_table_the_plugins_replaced(model, kwargs, optimizer, selected, rows):
    result = estimate(model, **kwargs)
    assert result["optimizer"] == optimizer and result["selected"] == selected
    assert {r["method"]: [r[f] for f in FIELDS] for r in result["methods"]} == rows
    assert [r["method"] for r in result["methods"]] == ["full", "lora", "qlora"]


def test_the_core_estimates_from_profiles_alone_without_any_plugin():
    shape = model_shape(load_config(TINY))
    adapters = MemoryProfile(trains="adapters", base_storage="compute", adapter_rank=16,
                             adapter_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    eight_bit = OptimizerProfile(label="8-bit", state_bytes=2, block_size=256, block_bytes=8, min_size=4096)
    rows = estimate_profiles(shape, {"a": MemoryProfile(), "b": adapters, "c": MemoryProfile(base_storage="4bit",
                             trains="adapters", adapter_rank=16, adapter_targets=adapters.adapter_targets,
                             always_checkpointing=True)}, seq_len=128, batch=2, gradient_checkpointing=True,
                             precision="fp32", optimizer=eight_bit)
    by_name = {r.method: [getattr(r, f) for f in FIELDS] for r in rows}
    assert by_name == {n: BEFORE_THE_HOOK[1][4][m] for n, m in zip("abc", ("full", "lora", "qlora"))}
    with pytest.raises(ValueError, match="adapter_rank"):
        MemoryProfile(trains="adapters")


class MlpAdapter:
    """A third party's adapter method: rank-r adapters on the MLP, rank from its own section."""

    name = "mlp-adapter"

    class Settings(ftcore.PluginConfig):
        rank: int = 4

    @ftcore.hookimpl
    def ftcore_config_schema(self):
        return {"mlp-adapter": self.Settings}

    @ftcore.hookimpl
    def ftcore_load_model(self, model_path, tokenizer, config, ctx):
        raise NotImplementedError("never called by the estimate")

    @ftcore.hookimpl
    def ftcore_memory_profile(self, config):
        return ftcore.MemoryProfile(trains="adapters", base_storage="compute",
                                    adapter_rank=config.section("mlp-adapter").rank,
                                    adapter_targets=("gate_proj", "up_proj", "down_proj"),
                                    assumptions="adapters on the MLP only.")


MLP_ADAPTER_MODULE = '''
    """A third party's adapter method, installed as a package: rank-r adapters on the MLP."""
    import ftcore


    class Settings(ftcore.PluginConfig):
        rank: int = 4


    @ftcore.hookimpl
    def ftcore_config_schema():
        return {"mlp-adapter": Settings}


    @ftcore.hookimpl
    def ftcore_load_model(model_path, tokenizer, config, ctx):
        raise NotImplementedError("never called by the estimate")


    @ftcore.hookimpl
    def ftcore_memory_profile(config):
        return ftcore.MemoryProfile(trains="adapters", base_storage="compute",
                                    adapter_rank=config.section("mlp-adapter").rank,
                                    adapter_targets=("gate_proj", "up_proj", "down_proj"),
                                    assumptions="adapters on the MLP only.")
'''


def test_a_third_party_adapter_that_describes_its_memory_gets_its_own_row(monkeypatch, tiny, tmp_path):
    mlp = 4 * 2 * 3 * (128 + 384)                       # rank 2 on gate, up and down in 4 layers
    passed = estimate(TINY, plugin_objects=[MlpAdapter()], settings={"mlp-adapter": {"rank": 2}})
    rows = {r["method"]: r for r in passed["methods"]}
    assert list(rows) == ["full", "lora", "qlora", "mlp-adapter"] and passed["selected"] == ["mlp-adapter"]
    assert rows["mlp-adapter"]["trainable_params"] == mlp
    assert "mlp-adapter: adapters on the MLP only." in passed["assumptions"]

    install(tmp_path / "site", monkeypatch, "ftcore-mlp-adapter", "0.2", {"mlp-adapter": "ftcore_test_mlp_adapter"},
            {"ftcore_test_mlp_adapter.py": MLP_ADAPTER_MODULE})
    out = CliRunner().invoke(main, ["estimate", "-m", tiny, "--plugins", "mlp-adapter", "--json",
                                    "--set", "mlp-adapter.rank=2"])
    assert out.exit_code == 0, out.output
    installed = json.loads(out.output)
    assert [r["method"] for r in installed["methods"]] == ["full", "lora", "mlp-adapter", "qlora"]
    assert installed["selected"] == ["mlp-adapter"]
    assert next(r for r in installed["methods"] if r["method"] == "mlp-adapter")["trainable_params"] == mlp


def test_a_plugin_that_fails_to_import_does_not_break_the_estimate_unless_named(monkeypatch, tiny, tmp_path):
    install(tmp_path / "site", monkeypatch, "ftcore-broken", "0.1", {"broken": "ftcore_no_such_module_xyz"})
    runner = CliRunner()
    out = runner.invoke(main, ["estimate", "-m", tiny])
    assert out.exit_code == 0, out.output
    assert 'plugin "broken"' in out.output and "full" in out.output and "qlora" in out.output
    named = runner.invoke(main, ["estimate", "-m", tiny, "--plugins", "broken"])
    assert named.exit_code == 2 and "failed to import" in named.output and "Traceback" not in named.output


def test_a_profile_of_the_wrong_type_names_the_plugin():
    class Wrong:
        name = "wrong"

        @ftcore.hookimpl
        def ftcore_memory_profile(self, config):
            return {"trains": "all"}

    with pytest.raises(PluginError, match='plugin "wrong".*expected an ftcore.MemoryProfile'):
        estimate(TINY, plugin_objects=[Wrong()])


# -- against reality -------------------------------------------------------------------

SEQ, BATCH = 128, 4


def _run_config(model: Path, data: Path, out: Path, method: str, steps: int, batch: int, length: int) -> dict:
    return {"plugins": [method, "alpaca"], "model": str(model), "output_dir": str(out),
            "alpaca": {"train_on_inputs": True},
            "data": {"datasets": [str(data)], "max_length": length, "val_size": 0, "packing": False, "cache": False},
            "training": {"max_steps": steps, "batch_size": batch, "gradient_accumulation": 1, "save_strategy": "no",
                         "eval_strategy": "no", "logging_steps": 1, "gradient_checkpointing": True}}


@pytest.mark.slow
def test_estimate_is_within_35_percent_of_measured_peaks(tmp_path):
    """Two real steps per method, every sequence SEQ tokens, in a fresh process (tests/memory_probe.py)."""
    import torch

    from ftcore.testing import build_model, build_tokenizer

    model = build_model(tmp_path / "model", build_tokenizer(), hidden_size=256, layers=4, heads=4, kv_heads=2,
                        intermediate_size=688)
    words = " ".join(f"word{i} and more" for i in range(SEQ))          # longer than SEQ tokens: truncated to it
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": words, "output": words}] * (2 * BATCH))
    methods = ["full", "lora", "qlora"]
    spec = {"warmup": _run_config(model, data, tmp_path / "warmup", "lora", 1, 1, 32),
            "runs": [_run_config(model, data, tmp_path / m, m, 2, BATCH, SEQ) for m in methods]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")   # freed tensors go back to the system at once
    probe = Path(__file__).with_name("memory_probe.py")
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path / "spec.json")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    on_gpu = measured[0]["device"] == "cuda"
    precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    for method, got in zip(methods, measured):
        rows = estimate(str(model), [method], seq_len=SEQ, batch=BATCH, gradient_checkpointing=True,
                        precision=precision)["methods"]
        est = next(r for r in rows if r["method"] == method)
        ratio = est["total"] / got["peak"]
        assert 0.65 <= ratio <= 1.35, f"{method}: estimate {est['total'] / 1e6:.1f} MB, measured " \
                                      f"{got['peak'] / 1e6:.1f} MB ({got})"
