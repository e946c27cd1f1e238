"""The model card every run writes (README.md and training_loss.png in adapter/ or model/): its Hub metadata,
its body, and its loading example, run as a reader would run it."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import tiny_config, write_jsonl

import ftcore
from ftcore.testing import finished_run, run_exporter

CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                       {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(16)]


def front_matter(card):
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.slow
def test_a_run_writes_its_card_and_the_loading_example_in_it_works(tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-licence\nlicense_link: LICENSE\n---\n")
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    config = {**tiny_config(base, data, tmp_path / "run", max_steps=3), "plugins": ["lora", "chatml"]}
    result = ftcore.run(config, log=lambda m: None)
    folder = result.model_dir
    card = (folder / "README.md").read_text()

    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "other" and meta["license_name"] == "tiny-licence" and meta["license_link"] == "LICENSE"
    assert {"ftcore", "lora", "chatml"} <= set(meta["tags"]) and "base_model" not in meta   # a local base: no id
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == round(result.metrics["eval_loss"], 4)
    for heading in ("## Training data", "## Training settings", "## Results", "## Loss curve", "## How to use",
                    "## Licence"):
        assert heading in card
    stats = result.data_stats
    assert f"| records | {stats['records']} (0 invalid) |" in card
    assert f"{stats['train_examples']} for training, {stats['eval_examples']} held out" in card
    assert "| batching | packed, padding-free" in card and "at most 128 tokens per example" in card
    assert "lora: rank 16, alpha 32, dropout 0.05 on k_proj, o_proj, q_proj, v_proj" in card
    assert f"| steps | {result.metrics['steps']} (" in card and "| training time |" in card
    assert str(tmp_path) not in card                                # no local path is published
    assert (folder / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # chatml added its markers to the tokenizer, so the example resizes the base's embeddings: run it as written,
    # with the run's folders where the card names them.
    code = python_block(card).replace('"path/to/base"', f'"{base}"').replace('"run/adapter"', f'"{folder}"')
    assert "resize_token_embeddings" in code
    scope = {}
    exec(code, scope)  # noqa: S102 - the card's own example, on this machine's files
    ids = torch.tensor([[1, 4, 7, 9]])
    loaded = scope["model"].eval()
    with torch.no_grad():
        assert loaded(input_ids=ids).logits.shape[-1] == len(scope["tokenizer"])


def test_ftcore_export_gives_a_finished_run_without_a_card_one(tmp_path, tiny_model_dir):
    run_dir = finished_run(tmp_path / "old", model=tiny_model_dir)
    template = (run_dir / "adapter" / "README.md").read_text()        # PEFT's own template, saved with the adapter
    assert "ftcore" not in template
    run_exporter("merge", run_dir)
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "- ftcore" in card and "## Training data" in card and (run_dir / "adapter" / "training_loss.png").is_file()
    assert "| final eval loss | 2.1000 (before training: 3.2000) |" in card         # from the run's summary.json


def test_a_full_fine_tune_card_loads_with_transformers(tmp_path, tiny_model_dir):
    run_dir = finished_run(tmp_path / "full", method="full", model=tiny_model_dir)
    run_exporter(_Noop(), run_dir)
    card = (run_dir / "model" / "README.md").read_text()
    assert front_matter(card)["library_name"] == "transformers"
    code = python_block(card).replace('"run/model"', f'"{run_dir / "model"}"')
    scope = {}
    exec(code, scope)  # noqa: S102
    assert scope["model"].config.model_type == "llama"


class _Noop:
    """An exporter that writes nothing: `ftcore export` with it only completes the run's card."""

    name = "noop-exporter"

    @ftcore.hookimpl
    def ftcore_export(self, run_dir, model_dir, config, ctx):
        return []
