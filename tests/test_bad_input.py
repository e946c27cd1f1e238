"""The bad-input matrix, through the CLI: each case's exit status and message, and nothing of the
user's touched (the data file, and a previous run in the output directory given with --overwrite).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from ftcore.cli import main

GOOD = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(8)]


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under the given paths (and their siblings' names) with its bytes."""
    found: dict[str, bytes] = {}
    for root in roots:
        found[f"siblings of {root}"] = "\n".join(sorted(p.name for p in root.parent.iterdir())).encode()
        if root.is_file():
            found[str(root)] = root.read_bytes()
        elif root.is_dir():
            for f in sorted(root.rglob("*")):
                found[str(f)] = f.read_bytes() if f.is_file() else b"<dir>"
    return found


def previous_run(folder: Path) -> Path:
    """An output directory holding an earlier run's results."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "ftcore-run.json").write_text('{"ftcore_version": "0.1.0"}')
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier weights")
    (folder / "summary.json").write_text('{"metrics": {"steps": 7}}')
    return folder


def copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def no_pad_model(src: Path, dst: Path) -> Path:
    """The tiny model with a tokenizer that has no pad token (as Llama's and Mistral's)."""
    copy_model(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(dst)).pad_token is None
    return dst


# Each case: how to break the input (a function of the case's folder and the tiny model, returning
# (model, data, extra CLI args)), the exit status, and a regular expression the output must match.
def _data(name: str, content: bytes | list):
    def make(tmp: Path, model: Path):
        path = tmp / name
        if isinstance(content, list):
            write_jsonl(path, content)
        else:
            path.write_bytes(content)
        return model, path, []
    return make


def _args(*extra: str, data: list | None = None):
    def make(tmp: Path, model: Path):
        return model, write_jsonl(tmp / "train.jsonl", data or GOOD), list(extra)
    return make


def _model(build):
    def make(tmp: Path, model: Path):
        return build(tmp, model), write_jsonl(tmp / "train.jsonl", GOOD), []
    return make


GOOD_LINES = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD)
CASES = [
    pytest.param(_data("train.jsonl", GOOD_LINES[:60] + b'\n{"instruction": "Hi", "output": \n' + GOOD_LINES[60:]),
                 2, r"train\.jsonl:3: malformed JSON at column \d+", id="malformed-jsonl"),
    pytest.param(_data("train.jsonl", [*GOOD[:2], {"instruction": ["Hi"], "output": 5}, *GOOD[2:]]),
                 2, r"train\.jsonl:3: instruction: expected a string, got list", id="wrong-field-types"),
    pytest.param(_data("train.jsonl", b""), 2, r"the training data is empty", id="empty-file"),
    pytest.param(lambda tmp, model: (model, tmp / "missing.jsonl", []), 2,
                 r"data file \S*missing\.jsonl not found", id="missing-file"),
    pytest.param(_data("train.jsonl", GOOD_LINES.split(b"\n", 1)[0] + b'\n{"instruction": "caf\xe9", "output": "x"}\n'
                       + GOOD_LINES.split(b"\n", 1)[1]), 2, r"train\.jsonl:2: not UTF-8", id="non-utf8-bytes"),
    pytest.param(_args(data=[*GOOD, {"instruction": "Repeat.", "input": "", "output": "word " * 2_000_000}]),
                 0, r"1 truncated", id="10MB-line", marks=pytest.mark.slow),
    pytest.param(_args("--plugins", "lora,alpacca"), 2, r'unknown plugin "alpacca"\. Did you mean "alpaca"\?',
                 id="unknown-plugin"),
    pytest.param(_args("--plugins", "lora,full,alpaca"), 2, r"plugins 'lora' and 'full' are both of kind 'adapter'",
                 id="two-adapter-plugins"),
    pytest.param(_args("--set", "training.learnig_rate=1e-4"), 2,
                 r'unknown config key "training\.learnig_rate"\. Did you mean "learning_rate"\?', id="unknown-config-key"),
    pytest.param(_args("--set", "training.epochs=three"), 2, r'config key "training\.epochs": .*\(got \'three\'\)',
                 id="wrong-config-type"),
    pytest.param(_args("--set", "training.learning_rate=-0.0002"), 2,
                 r'config key "training\.learning_rate": Input should be greater than 0', id="negative-learning-rate"),
    pytest.param(_model(lambda tmp, model: tmp / "no-such-model"), 2, r"model path \S*no-such-model does not exist",
                 id="missing-model-path"),
    pytest.param(_model(lambda tmp, model: copy_model(model, tmp / "m", drop=("*.safetensors",))), 2,
                 r"model folder \S+ has no weights \(\*\.safetensors\)", id="model-folder-without-weights"),
    pytest.param(_model(lambda tmp, model: _pickle_only(model, tmp / "m")), 2,
                 r"weights only as pickle files .* ftcore loads safetensors only", id="pickle-only-weights"),
    pytest.param(_model(lambda tmp, model: no_pad_model(model, tmp / "m")), 0, r"trainable params",
                 id="tokenizer-without-pad-token"),
    pytest.param(_args("--set", "training.learning_rate=1e-3", "--dry-run"), 0,
                 r"warning: training\.learning_rate=0\.001 is above 0\.0005", id="learning-rate-above-5e-4"),
    pytest.param(_args("--set", "lora.rank=8"), 2, r'unknown config key "lora\.rank"\.', id="unknown-plugin-key"),
]


def _pickle_only(model: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    copy_model(model, dst, drop=("*.safetensors",))
    torch.save(load_file(str(model / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


@pytest.mark.parametrize("make, status, expected", CASES)
def test_bad_input_matrix(make, status, expected, tiny_model_dir, tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    model, data, extra = make(case, tiny_model_dir)
    out = previous_run(tmp_path / "runs" / "out")
    (tmp_path / "runs" / "keep.txt").write_text("a neighbour of the output directory")
    args = ["run", "--plugins", "lora,alpaca", "--model", str(model), "--data", str(data), "--output", str(out),
            "--overwrite", "--set", "training.max_steps=1", "--set", "training.batch_size=2",
            "--set", "training.save_strategy=no", "--set", "data.val_size=0", "--set", "data.max_length=64", *extra]
    user_data = snapshot(data) if data.exists() else {}
    earlier_run = snapshot(out)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == status, result.output
    assert re.search(expected, result.output), result.output
    assert (snapshot(data) if data.exists() else {}) == user_data      # the user's data is never written
    if status == 2:
        assert "error: " in result.output and "Traceback" not in result.output
        assert snapshot(out) == earlier_run       # the earlier run is intact, even with --overwrite
    elif "--dry-run" in extra:
        assert snapshot(out) == earlier_run       # validation only: nothing written
    else:
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != b"earlier weights"


def test_a_data_error_in_a_fresh_output_dir_leaves_nothing_behind(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": 1, "output": 2}])
    out = tmp_path / "new-run"
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--data", str(data),
                                       "--output", str(out)])
    assert result.exit_code == 2 and "train.jsonl:1: instruction" in result.output
    assert not out.exists()      # so the fixed command can be rerun as is, without --overwrite


def test_existing_output_dir_is_refused_with_how_to_replace_it(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    out = previous_run(tmp_path / "out")
    before = snapshot(out)
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)])
    assert result.exit_code == 2
    assert "already holds another run's results. Pass --overwrite to replace it" in result.output
    assert snapshot(out) == before


# -- plugins that raise ------------------------------------------------------------------

BOOM = textwrap.dedent('''
    """An extension plugin with a bug (and one that reports a user error properly)."""
    import ftcore

    @ftcore.hookimpl
    def ftcore_data_prepared(stats, ctx):
        if ctx.config.training.seed == 13:
            raise ftcore.ConfigError("boom: set a seed other than 13 (a user error the plugin reports itself)")
        raise ValueError("boom went the plugin")
''')


@pytest.fixture
def installed_boom(tmp_path, monkeypatch):
    """A real distribution (ftcore-boom 1.2.3) with an ftcore.plugins entry point, on sys.path."""
    site = tmp_path / "site"
    (site / "ftcore_boom-1.2.3.dist-info").mkdir(parents=True)
    (site / "ftcore_boom.py").write_text(BOOM)
    (site / "ftcore_boom-1.2.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ftcore-boom\nVersion: 1.2.3\n")
    (site / "ftcore_boom-1.2.3.dist-info" / "entry_points.txt").write_text("[ftcore.plugins]\nboom = ftcore_boom\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_plugin_that_raises_is_named_with_its_package(installed_boom, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--plugins", "lora,alpaca,boom", "--model", str(tiny_model_dir),
                                       "--data", str(data), "--output", str(out), "--set", "data.val_size=0"])
    assert result.exit_code == 1, result.output
    assert ('error: plugin "boom" (package ftcore-boom 1.2.3) failed in ftcore_data_prepared: '
            "ValueError: boom went the plugin") in result.output
    assert "Traceback" in result.output and "ftcore_boom.py" in result.output   # for the plugin's authors
    assert not out.exists()


def test_a_plugins_own_user_error_passes_through_unchanged(installed_boom, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    result = CliRunner().invoke(main, ["run", "--plugins", "lora,alpaca,boom", "--model", str(tiny_model_dir),
                                       "--data", str(data), "--output", str(tmp_path / "out"),
                                       "--set", "data.val_size=0", "--set", "training.seed=13"])
    assert result.exit_code == 2, result.output
    assert "error: boom: set a seed other than 13" in result.output
    assert "Traceback" not in result.output and "failed in" not in result.output


def test_an_internal_error_exits_1_with_a_traceback(tiny_model_dir, tmp_path, monkeypatch):
    import ftcore.training.engine

    def broken(*a, **k):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(ftcore.training.engine, "load_tokenizer", broken)   # stands in for a bug in the core
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--data", str(data),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ZeroDivisionError: a bug of ours" in result.output
    assert "internal error" in result.output


# -- disk full while saving ------------------------------------------------------------------

def _disk_full_run(tiny_model_dir: Path, tmp_path: Path, out: Path, extra_env: dict | None = None,
                   prelude: str = "") -> subprocess.CompletedProcess:
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    script = tmp_path / "run_cli.py"
    script.write_text(prelude + "\nfrom ftcore.cli import main\nmain()\n")
    args = [sys.executable, str(script), "run", "--model", str(tiny_model_dir), "--data", str(data),
            "--output", str(out), "--set", "training.max_steps=1", "--set", "training.batch_size=2",
            "--set", "data.val_size=0", "--set", "data.max_length=64", "--set", "training.save_strategy=steps",
            "--set", "training.save_steps=1"]
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_tiny_filesystem(tiny_model_dir, tmp_path):
    """A real full filesystem (a 1 MiB tmpfs, where this machine allows mounting one)."""
    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "1m"):
        pytest.skip("mounting a tmpfs needs root; test_disk_full_injected covers the behaviour everywhere")
    try:
        # Leave room for the run's small files and the first checkpoint's weights, not for its optimizer state.
        (fs / "filler").write_bytes(b"\0" * (1024 * 1024 - 200 * 1024))
        out = fs / "run"
        proc = _disk_full_run(tiny_model_dir, tmp_path, out)
        assert proc.returncode == 2, proc.stderr
        assert "error: no space left while writing the run's outputs in" in proc.stderr
        assert "Nothing partial was kept" in proc.stderr and "Traceback" not in proc.stderr
        assert not (out / "adapter").exists() and not (out / ".adapter.tmp").exists()
        assert not list((out / "checkpoints").glob("**/checkpoint-*")) or all(
            (c / "ftcore-checkpoint.json").exists() for c in (out / "checkpoints").glob("checkpoint-*"))
        assert not (out / "checkpoints" / ".incomplete").exists() or not any((out / "checkpoints" / ".incomplete").iterdir())
    finally:
        subprocess.run(["umount", str(fs)], check=False)


INJECT_ENOSPC = textwrap.dedent("""
    import errno, safetensors.torch
    real = safetensors.torch.save_file
    def full(tensors, filename, *a, **k):
        if ".adapter.tmp" in str(filename):   # the final adapter's save runs out of space
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)
    safetensors.torch.save_file = full
""")


def test_disk_full_injected_while_saving_the_final_adapter(tiny_model_dir, tmp_path):
    """ENOSPC raised by the final save (everywhere, without root): a message, no partial adapter."""
    out = tmp_path / "run"
    proc = _disk_full_run(tiny_model_dir, tmp_path, out, prelude=INJECT_ENOSPC)
    assert proc.returncode == 2, proc.stderr
    assert "error: no space left while writing the run's outputs in" in proc.stderr
    assert "The newest complete checkpoint is" in proc.stderr and "--resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "adapter").exists() and not (out / ".adapter.tmp").exists()
    assert (out / "checkpoints" / "checkpoint-1" / "ftcore-checkpoint.json").exists()
