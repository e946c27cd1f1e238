"""Discovery through real entry points, selection errors, listing, tracing."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

import ftcore
from ftcore import plugins as plugins_mod
from ftcore.cli import main
from ftcore.errors import PluginError

BUNDLED = {"alpaca": "format", "chatml": "format", "lora": "adapter", "full": "adapter", "qlora": "adapter",
           "paged-adamw-8bit": "optimizer", "deepspeed-zero": "strategy", "gguf-export": "exporter",
           "merge": "exporter"}


def test_bundled_plugins_are_real_entry_points_of_the_installed_package():
    eps = {ep.name: ep for ep in md.entry_points(group="ftcore.plugins")}
    for name in BUNDLED:
        assert name in eps, f"{name} is not declared in the ftcore.plugins entry-point group"
        assert eps[name].dist.metadata["Name"] == "ftcore"


def test_plugins_command_lists_name_kind_package_version_description_as_json():
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name, kind in BUNDLED.items():
        assert rows[name]["kind"] == kind
        assert rows[name]["distribution"] == "ftcore"
        assert rows[name]["version"] == ftcore.__version__
        assert rows[name]["description"]
        assert rows[name]["error"] is None


def test_plugins_command_prints_a_table():
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0
    for name in BUNDLED:
        assert name in result.output
    assert "adapter" in result.output and "format" in result.output


def _fake_entry_point(monkeypatch, name: str, value: str):
    """Add an entry point (as an installed package would) for the duration of a test."""
    real = plugins_mod.installed_entry_points

    def fake():
        found = dict(real())
        found[name] = md.EntryPoint(name=name, value=value, group="ftcore.plugins")
        return dict(sorted(found.items()))

    monkeypatch.setattr(plugins_mod, "installed_entry_points", fake)


def test_broken_plugin_is_listed_with_its_error_and_other_commands_still_work(monkeypatch):
    _fake_entry_point(monkeypatch, "broken", "ftcore_no_such_module_xyz")
    rows = {r.name: r for r in plugins_mod.describe_installed()}
    assert "No module named" in rows["broken"].error
    assert rows["lora"].error is None
    config, chosen = ftcore.resolve({"model": "m", "data": {"datasets": ["x.jsonl"]}}, log=lambda m: None)
    assert "broken" not in chosen.names()


def test_selecting_a_broken_plugin_names_it_and_its_package(monkeypatch):
    _fake_entry_point(monkeypatch, "broken", "ftcore_no_such_module_xyz")
    with pytest.raises(PluginError, match='plugin "broken".*failed to import.*No module named'):
        plugins_mod.select(["broken"])


def test_unknown_plugin_lists_installed_and_suggests_closest():
    with pytest.raises(PluginError) as err:
        plugins_mod.select(["lorra"])
    msg = str(err.value)
    assert 'unknown plugin "lorra"' in msg and 'Did you mean "lora"' in msg
    for name in BUNDLED:
        assert name in msg


def test_two_adapters_is_an_error_naming_both():
    with pytest.raises(PluginError, match="'lora' and 'full'.*adapter"):
        plugins_mod.select(["lora", "full"])


def test_two_formats_for_one_dataset_is_an_error_naming_both(tmp_path):
    from ftcore import data as data_mod
    from ftcore.config import DatasetSpec

    with pytest.raises(ftcore.DataError, match="alpaca and chatml"):
        data_mod.resolve_format(DatasetSpec(path="x.jsonl"), ["alpaca", "chatml"])


def test_only_selected_plugins_and_defaults_are_imported():
    code = (
        "import sys, ftcore.plugins as p\n"
        "s = p.select(['chatml'])\n"
        "print(sorted(s.names()))\n"
        "print(sorted(m for m in sys.modules if m.startswith('ftcore_plugins.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "['chatml', 'lora']"          # chatml named; lora is the default adapter
    imported = eval(out[1])
    assert "ftcore_plugins.alpaca" not in imported and "ftcore_plugins.full" not in imported


def test_defaults_fill_missing_kinds_but_never_a_named_kind():
    chosen = plugins_mod.select(["full"])
    assert chosen.names("adapter") == ["full"]
    assert chosen.names("format") == ["alpaca"]


def test_kind_follows_the_hooks_a_plugin_implements():
    mod = types.ModuleType("myexport")

    @ftcore.hookimpl
    def ftcore_export(run_dir, model_dir):
        return []

    mod.ftcore_export = ftcore_export
    assert plugins_mod.kind_of(mod) == "exporter"
    assert plugins_mod.kind_of(types.ModuleType("empty")) == "extension"


def test_misspelled_hook_argument_is_rejected_at_registration():
    class Bad:
        @ftcore.hookimpl
        def ftcore_export(self, run_dirr):
            return []

    with pytest.raises(PluginError, match="invalid"):
        plugins_mod.select([], [Bad()])


def test_trace_prints_each_hook_call_with_the_answering_plugin(monkeypatch, capsys):
    monkeypatch.setenv("FTCORE_TRACE_PLUGINS", "1")
    chosen = plugins_mod.select(["alpaca"])
    chosen.call_one("alpaca", "ftcore_validate_record", record={"instruction": "x", "output": "y"}, config=None)
    err = capsys.readouterr().err
    assert "[ftcore trace] ftcore_validate_record -> alpaca" in err
    assert "ftcore_validate_record <- alpaca returned []" in err


def test_two_selections_do_not_share_a_plugin_manager():
    a = plugins_mod.select(["chatml"])
    b = plugins_mod.select(["alpaca"])
    assert a.pm is not b.pm
    assert "chatml" not in b.names()
