"""The docs: the configuration reference matches the schemas, and the site builds with warnings as errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ftcore.cli import main
from ftcore.config.schema import RunConfig, TrainingConfig
from ftcore.tools.reference import REPO_DOC, config_reference, config_reference_text

REPO = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_up_to_date():
    assert REPO_DOC == REPO / "docs" / "reference" / "configuration.md"
    assert REPO_DOC.read_text(encoding="utf-8") == config_reference_text(), (
        "docs/reference/configuration.md is out of date: run `python -m ftcore.tools.reference` and commit the result.")


def test_reference_lists_every_key_with_its_default(tmp_path):
    written = config_reference(tmp_path / "configuration.md")
    text = written.read_text()
    for name, field in TrainingConfig.model_fields.items():
        assert re.search(rf"^\| `{name}` \|", text, re.M), name
    assert "| `early_stopping_patience` | int &#124; null | `null` |" in text
    assert '| `learning_rate` | float | `0.0002` |' in text
    for section in RunConfig.model_fields:
        assert f"`{section}`" in text
    for plugin in ("lora", "alpaca", "chatml", "text", "full"):   # bundled plugins' sections
        assert f"### `{plugin}`" in text


def test_mkdocs_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for page in ("index.html", "quickstart/index.html", "reference/configuration/index.html",
                 "recipes/qlora-7b-24gb/index.html", "recipes/embedding/index.html"):
        assert (tmp_path / "site" / page).exists(), page


def _nav_pages(entries) -> list[tuple[str, str]]:
    out = []
    for entry in entries:
        for title, value in entry.items():
            out += _nav_pages(value) if isinstance(value, list) else [(title, value)]
    return out


def test_every_use_has_a_recipe_in_the_nav():
    """Quickstart, the generated reference and one page per use the project promises, all reachable from the nav."""
    import yaml

    nav = dict(_nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]))
    wanted = {"Quickstart": "quickstart.md", "Configuration": "reference/configuration.md",
              "QLoRA on a 7B model on one 24 GB GPU": "recipes/qlora-7b-24gb.md",
              "Multi-GPU and multi-node with DeepSpeed": "recipes/multi-gpu-deepspeed.md",
              "QLoRA across several GPUs with FSDP": "recipes/multi-gpu-fsdp.md",
              "Exporting to llama.cpp and Ollama": "recipes/llama-cpp-and-ollama.md",
              "From a Hub id to a published adapter": "recipes/hub.md",
              "Embedding ftcore in an application": "recipes/embedding.md", "Writing a plugin": "plugins.md"}
    for title, page in wanted.items():
        assert nav.get(title) == page, title
    for page in nav.values():
        assert (REPO / "docs" / page).is_file(), page
    words = {"recipes/qlora-7b-24gb.md": ("24 GB", "qlora"), "recipes/multi-gpu-deepspeed.md": ("--num-machines",),
             "recipes/multi-gpu-fsdp.md": ("--plugins fsdp,qlora", "quant_storage", "ZeRO-3"),
             "recipes/llama-cpp-and-ollama.md": ("ollama", "gguf"), "recipes/embedding.md": ("ftcore.run(",),
             "recipes/hub.md": ("hub-push", "HF_TOKEN", "model.revision", "base_model:"),
             "plugins.md": ("hookimpl", "entry-points")}
    for page, needed in words.items():
        text = (REPO / "docs" / page).read_text(encoding="utf-8").lower()
        assert all(w.lower() in text for w in needed), page


def test_documented_flags_and_commands_exist():
    runner = CliRunner()
    run_help = runner.invoke(main, ["run", "--help"]).output
    for flag in ("--no-progress", "--quiet", "--log-format"):
        assert flag in run_help and flag in (REPO / "docs" / "watching-runs.md").read_text()
    for command in ("generate", "chat", "init"):
        assert runner.invoke(main, [command, "--help"]).exit_code == 0
    trying = (REPO / "docs" / "trying-models.md").read_text()
    for option in ("--max-new-tokens", "--temperature", "--top-p", "--seed", "--dtype", "--chat-template", "--system"):
        assert option in trying
        assert option in runner.invoke(main, ["generate", "--help"]).output + runner.invoke(main, ["chat", "--help"]).output


def test_readme_shows_the_latest_benchmark_tables_and_command():
    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Produced by `([^`]+)`", results).group(1)
    assert f"`{command}`" in readme
    training = results.split("## Data preparation", 1)[0]
    if "## Summary" in training:   # two cases, each: the trainers (header, separator, four) and ftcore's ratios (two)
        training, expected = training.split("## Summary", 1)[1].split("## Details", 1)[0], 2 * ((2 + 4) + (2 + 2))
    else:   # the previous script's tables (three trainers, two ratios), until the current one's first full run
        expected = 2 + 3 + 2 + 2
    rows = [line for line in training.splitlines() if line.startswith("|")]
    assert len(rows) == expected
    for line in rows:
        assert line in readme.splitlines(), f"README.md does not show the latest benchmark row: {line}"
    preparation = results.split("## Data preparation", 1)[1]
    prep_rows = [line for line in preparation.splitlines() if line.startswith("|")]
    assert len(prep_rows) == 2 + 3             # tokenizer, its backend, ftcore prepare
    for line in prep_rows:
        assert line in readme.splitlines(), f"README.md does not show the latest data-preparation row: {line}"


def test_no_section_of_the_configuration_reference_appears_twice():
    headings = [line for line in config_reference_text().splitlines() if line.startswith("#")]
    assert len(headings) > 10
    assert sorted(h for h in set(headings) if headings.count(h) > 1) == []
