"""The base model's licence: read from its card or config, printed at the start, recorded in the output."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from conftest import write_jsonl

from ftcore.cli import main
from ftcore.models.licence import base_model_licence, describe

CARD = """---
license: other
license_name: llama3.2
license_link: https://www.llama.com/llama3_2/license/
tags: [text-generation]
---
# A model

Some text, and a line that says license: mit (not front matter, so not read).
"""


def test_licence_from_the_cards_front_matter(tmp_path):
    (tmp_path / "README.md").write_text(CARD)
    (tmp_path / "config.json").write_text(json.dumps({"license": "apache-2.0"}))
    found = base_model_licence(tmp_path)
    assert found == {"license": "other", "license_name": "llama3.2",
                     "license_link": "https://www.llama.com/llama3_2/license/", "source": "README.md"}
    line = describe(found, tmp_path)
    assert line.startswith("base model licence: other (llama3.2, https://www.llama.com/llama3_2/license/)")


def test_licence_from_config_when_the_card_names_none(tmp_path):
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "license": "apache-2.0"}))
    assert base_model_licence(tmp_path) == {"license": "apache-2.0", "source": "config.json"}


def test_no_licence_stated_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert base_model_licence(tmp_path) is None
    assert "not stated" in describe(None, tmp_path) and "check the model's terms" in describe(None, tmp_path)


def test_the_licence_is_printed_first_and_recorded_in_the_output(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "README.md").write_text(CARD)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--model", str(model), "--data", str(data), "--output", str(out),
                                       "--set", "training.max_steps=1", "--set", "data.val_size=0",
                                       "--set", "training.save_strategy=no"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("base model licence: other (llama3.2"))
    assert first < next(i for i, line in enumerate(lines) if line.startswith("data:"))   # at the start of the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model_license"]["license_name"] == "llama3.2"
    assert json.loads((out / "ftcore-run.json").read_text())["base_model_license"]["license"] == "other"


def test_the_builtin_model_card_states_its_licence():
    from ftcore.models import builtin as models

    # the session's cache (conftest): the build is shared with the quickstart's test
    folder = models.builtin_model("tiny-llama", log=lambda m: None)
    assert base_model_licence(folder)["license"] == "apache-2.0"
