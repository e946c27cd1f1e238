"""End to end with the real huggingface_hub client and a local Hub: a base model and a dataset by id, a
fine-tune, the adapter pushed with its card, loaded back by id with plain PEFT; the run repeated offline from
its config.yaml; and a run's pinned commit surviving a moved branch."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import yaml
from conftest import REPO, write_jsonl
from hub_server import TOKEN

import ftcore

RECORDS = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(24)]


@pytest.fixture
def base_and_data(hub, tiny_model_dir, tmp_path):
    """acme/tiny (the tiny model with an apache-2.0 card) and acme/facts (alpaca records) on the local Hub."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "upload-model")
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    data = tmp_path / "upload-data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", RECORDS)
    return hub.add_folder("acme/tiny", model), hub.add_folder("acme/facts", data, kind="dataset")


def config(out, max_steps=4, **extra):
    return {"model": "acme/tiny", "plugins": ["lora", "alpaca"], "output_dir": str(out),
            "data": {"datasets": ["acme/facts"], "max_length": 128, "val_size": 4},
            "training": {"max_steps": max_steps, "batch_size": 4, "gradient_accumulation": 1, "logging_steps": 1,
                         "save_strategy": "no", "eval_strategy": "no"},
            "report": {"samples": 0}, **extra}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_from_a_hub_id_to_a_pushed_adapter_that_peft_loads_by_id_then_repeated_offline(hub, base_and_data,
                                                                                      tmp_path, monkeypatch):
    from huggingface_hub import metadata_load
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base_commit, data_commit = base_and_data
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    lines = []
    out = tmp_path / "run"
    result = ftcore.run(config(out, plugins=["lora", "alpaca", "hub-push"],
                               **{"hub-push": {"repo_id": "alice/tiny-facts"}}), log=lines.append)
    assert any(line.startswith("downloading acme/tiny") for line in lines)         # the download is shown
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["path"] == "acme/tiny" and saved["model"]["revision"] == base_commit.oid

    (tmp_path / "card.md").write_bytes(hub.file("alice/tiny-facts", "README.md"))
    card = metadata_load(tmp_path / "card.md")
    assert card["base_model"] == "acme/tiny" and card["datasets"] == ["acme/facts"]
    assert card["license"] == "apache-2.0" and card["library_name"] == "peft" and "lora" in card["tags"]
    metric = card["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "loss" and metric["value"] == round(result.metrics["eval_loss"], 4)
    assert hub.head("alice/tiny-facts").message == "ftcore run run"
    leaked = [str(f) for f in out.rglob("*") if f.is_file() and TOKEN.encode() in f.read_bytes()]
    assert leaked == []                    # config.yaml, summary.json, report.html, the log, the card: no token
    assert TOKEN not in "\n".join(lines)

    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    base = AutoModelForCausalLM.from_pretrained("acme/tiny", revision=base_commit.oid)   # plain transformers, by id
    pushed = PeftModel.from_pretrained(base, "alice/tiny-facts").eval()                   # plain PEFT, by id
    local_base = AutoModelForCausalLM.from_pretrained("acme/tiny", revision=base_commit.oid)
    local = PeftModel.from_pretrained(local_base, str(out / "adapter")).eval()
    assert torch.equal(logits(pushed, ids), logits(local, ids))
    assert not torch.equal(logits(pushed, ids), logits(AutoModelForCausalLM.from_pretrained(
        "acme/tiny", revision=base_commit.oid), ids))                                    # the adapter does something
    by_id_alone = AutoPeftModelForCausalLM.from_pretrained("alice/tiny-facts").eval()    # base found by its card's id
    assert torch.equal(logits(by_id_alone, ids), logits(local, ids))
    scope = {}
    exec(re.search(r"```python\n(.*?)```", hub.file("alice/tiny-facts", "README.md").decode(), re.S).group(1), scope)
    assert torch.equal(logits(scope["model"].eval(), ids), logits(local, ids))           # the card's example, as written

    # The same run again, offline, from its config.yaml: everything comes from the caches, nothing from the Hub.
    hub.go_offline()
    hub.requests.clear()
    saved.pop("hub-push")
    saved.update(plugins=["lora", "alpaca"], output_dir=str(tmp_path / "again"))
    again = ftcore.run(saved, log=lambda m: None)
    assert hub.requests == []
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["model"]["revision"] == base_commit.oid
    repeated = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("acme/tiny", revision=base_commit.oid),
                                         str(again.model_dir)).eval()
    # Same weights, data and seed on the same CPU: training repeats exactly.
    assert torch.equal(logits(repeated, ids), logits(local, ids))
    assert again.metrics["eval_loss"] == result.metrics["eval_loss"]


@pytest.mark.slow
def test_a_runs_config_yaml_repeats_it_with_the_same_weights_after_the_branch_moved(hub, base_and_data, tmp_path):
    from ftcore.testing import build_model

    base_commit, _ = base_and_data
    first = ftcore.run(config(tmp_path / "first", max_steps=1), log=lambda m: None)
    from transformers import AutoTokenizer

    newer = build_model(tmp_path / "newer", AutoTokenizer.from_pretrained(str(tmp_path / "upload-model")), seed=7)
    moved = hub.add_folder("acme/tiny", newer, message="new weights").oid
    assert moved != base_commit.oid

    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    lines = []
    repeat = ftcore.run({**saved, "output_dir": str(tmp_path / "repeat")}, log=lines.append)
    assert yaml.safe_load((tmp_path / "repeat" / "config.yaml").read_text())["model"]["revision"] == base_commit.oid
    assert any(f"acme/tiny (commit {base_commit.oid[:12]})" in line for line in lines)
    assert repeat.metrics["eval_loss"] == first.metrics["eval_loss"]           # the same weights, data and seed

    latest = ftcore.run(config(tmp_path / "latest", max_steps=1), log=lambda m: None)
    assert yaml.safe_load((tmp_path / "latest" / "config.yaml").read_text())["model"]["revision"] == moved
    assert latest.metrics["eval_loss"] != first.metrics["eval_loss"]            # the branch now has other weights


@pytest.mark.slow
def test_the_recipe_a_pushed_adapter_with_its_gguf_file_then_the_merged_model(hub, base_and_data, tmp_path,
                                                                              monkeypatch):
    """docs/recipes/hub.md: the adapter and the GGUF file in one push, the card saying how to run both; then
    the merged model pushed from the finished run with `ftcore export`."""
    from click.testing import CliRunner
    from huggingface_hub import metadata_load
    from transformers import AutoModelForCausalLM

    from ftcore.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "run"
    ftcore.run(config(out, plugins=["lora", "alpaca", "gguf-export", "hub-push"],
                      **{"gguf-export": {"quant": "f32"}, "hub-push": {"repo_id": "alice/tiny-facts"}}),
               log=lambda m: None)
    files = sorted(hub.head("alice/tiny-facts").files)
    assert {"run-f32.gguf", "Modelfile", "README.md", "training_loss.png", "adapter_model.safetensors"} <= set(files)
    assert hub.file("alice/tiny-facts", "run-f32.gguf") == (out / "gguf" / "run-f32.gguf").read_bytes()
    card = hub.file("alice/tiny-facts", "README.md").decode()
    assert card == (out / "adapter" / "README.md").read_text()          # the card the run keeps is the one pushed
    assert "llama-cli --hf-repo alice/tiny-facts --hf-file run-f32.gguf" in card
    assert "ollama run hf.co/alice/tiny-facts:F32" in card
    (tmp_path / "card.md").write_text(card)
    assert "gguf" in metadata_load(tmp_path / "card.md")["tags"]
    recipe = (REPO / "docs" / "recipes" / "hub.md").read_text()
    shown = recipe.split("```markdown", 1)[1].split("```\n", 1)[0]
    for heading in [line for line in shown.splitlines() if line.startswith("## ")]:
        assert heading in card, f"docs/recipes/hub.md shows {heading!r}, which the card does not have"

    result = CliRunner().invoke(main, ["export", "--model", str(out), "--plugins", "merge,hub-push",
                                       "--set", "hub-push.upload=merged", "--set", "hub-push.repo_id=alice/tiny-merged"])
    assert result.exit_code == 0, result.output
    merged_card = hub.file("alice/tiny-merged", "README.md").decode()
    assert "library_name: transformers" in merged_card and 'from_pretrained("alice/tiny-merged")' in merged_card
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    pushed = AutoModelForCausalLM.from_pretrained("alice/tiny-merged").eval()
    local = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert torch.equal(logits(pushed, ids), logits(local, ids))

    # The adapter names its base by id and commit: merging and trying it need no --base.
    assert CliRunner().invoke(main, ["merge", "--adapter", str(out / "adapter"), "--output",
                                     str(tmp_path / "merged-again")]).exit_code == 0
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-again")).eval()
    assert torch.equal(logits(again, ids), logits(local, ids))
    result = CliRunner().invoke(main, ["generate", "--model", str(out / "adapter"), "-n", "3", "Add 1 and 2."])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["generate", "--model", "acme/tiny", "-n", "3", "Add 1 and 2."])
    assert result.exit_code == 0, result.output
    # The base named by id on the command line, as a user merging someone else's adapter would.
    assert CliRunner().invoke(main, ["merge", "--adapter", str(out / "adapter"), "--base", "acme/tiny", "--output",
                                     str(tmp_path / "merged-by-id")]).exit_code == 0
    by_id = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-by-id")).eval()
    assert torch.equal(logits(by_id, ids), logits(local, ids))
    # chat resolves the id as every command does; this base has no chat template, and chat says what to do.
    result = CliRunner().invoke(main, ["chat", "--model", "acme/tiny", "-n", "3"], input="Add 1 and 2.\n/exit\n")
    assert "base model acme/tiny (commit " in result.output and "in the Hugging Face cache" in result.output
    assert result.exit_code == 2 and "has no chat template" in result.output and "ftcore generate" in result.output
    assert "Traceback" not in result.output
