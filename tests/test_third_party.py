"""A third-party format plugin, installed with pip like any package, found through its entry point,
tested with its own tests, and used for a real fine-tune."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl

DIST = "ftcore-sharegpt"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def _ftcore(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcore.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=dict(os.environ))


@pytest.fixture
def installed_sharegpt(tmp_path):
    """examples/sharegpt-plugin installed into this environment for the test, removed afterwards."""
    _pip("uninstall", "-y", DIST)                      # whatever an earlier run left
    source = tmp_path / "sharegpt-plugin"               # build from a copy: the repository stays clean
    shutil.copytree(REPO / "examples" / "sharegpt-plugin", source)
    proc = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield source
    finally:
        _pip("uninstall", "-y", DIST)


@pytest.mark.slow
def test_sharegpt_plugin_installs_is_listed_and_fine_tunes(installed_sharegpt, tiny_model_dir, tmp_path):
    listed = _ftcore("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["sharegpt"]["kind"] == "format" and rows["sharegpt"]["error"] is None
    assert rows["sharegpt"]["distribution"] == DIST and rows["sharegpt"]["version"] == "0.1.0"

    # the plugin's own tests pass against the installed ftcore (they use ftcore.testing)
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=installed_sharegpt, capture_output=True, text=True, timeout=300)
    assert own.returncode == 0, own.stdout + own.stderr

    chats = [{"conversations": [{"from": "human", "value": f"What is {a} plus {a}?"},
                                {"from": "gpt", "value": f"{a} plus {a} is {2 * a}."}]} for a in range(16)]
    data = write_jsonl(tmp_path / "chats.jsonl", [*chats, {"conversations": [{"from": "human", "value": "x"}]}])
    shown = _ftcore("prepare", "--plugins", "sharegpt", "--model", str(tiny_model_dir), "--data", str(data),
                    "--set", "data.on_bad_record=skip", "--show", "1", "--no-color")
    assert shown.returncode == 0, shown.stderr
    assert "ASSISTANT:[[ " in shown.stdout and "</s>]]" in shown.stdout
    assert f"{data}:17: conversations: has no gpt turn" in shown.stderr

    out = tmp_path / "run"
    run = _ftcore("run", "--plugins", "lora,sharegpt", "--model", str(tiny_model_dir), "--data", str(data),
                  "--output", str(out), "--set", "data.on_bad_record=skip", "--set", "data.val_size=4",
                  "--set", "data.max_length=256", "--set", "training.epochs=1", "--set", "training.batch_size=4",
                  "--set", "training.gradient_accumulation=1", "--set", 'sharegpt.user_label="Q:"')
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 3 and summary["data_stats"]["bad_records"] == 1
    assert {p["name"]: p["distribution"] for p in summary["plugins"]}["sharegpt"] == DIST
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# -- the guides stay true -----------------------------------------------------------------------

BLOCK = re.compile(r'^```\w+ title="(?P<title>[^"]+)"\n(?P<body>.*?)^```$', re.M | re.S)


def _titled_blocks(doc: str) -> list[tuple[str, str]]:
    return [(m.group("title"), m.group("body")) for m in BLOCK.finditer((REPO / "docs" / doc).read_text())]


def test_the_plugin_tutorial_shows_the_example_package_file_for_file():
    blocks = _titled_blocks("plugins.md")
    assert [t for t, _ in blocks] == ["pyproject.toml", "ftcore_sharegpt.py", "tests/test_sharegpt.py"]
    for title, body in blocks:
        assert body == (REPO / "examples" / "sharegpt-plugin" / title).read_text(), f"docs/plugins.md: {title} differs"


@pytest.mark.slow
def test_the_testing_guide_example_runs(tmp_path):
    code = "".join(body for title, body in _titled_blocks("testing-plugins.md") if title.startswith("test_my_format"))
    (tmp_path / "test_my_format.py").write_text(code)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_format.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout


def test_the_testing_guide_exporter_example_runs(tmp_path):
    code = "".join(body for title, body in _titled_blocks("testing-plugins.md") if title == "test_my_exporter.py")
    (tmp_path / "test_my_exporter.py").write_text(code)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_exporter.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout

