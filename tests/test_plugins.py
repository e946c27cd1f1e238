"""Discovery through real entry points, selection errors, kinds, plugin identity, listing, tracing."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner
from distributions import install

import ftcore
from ftcore.cli import main
from ftcore.errors import PluginError
from ftcore.registry import discovery
from ftcore.registry.selection import select

BUNDLED = {"alpaca": "format", "chatml": "format", "text": "format", "lora": "adapter", "full": "adapter", "qlora": "adapter",
           "paged-adamw-8bit": "optimizer", "deepspeed-zero": "strategy", "fsdp": "strategy", "gguf-export": "exporter",
           "merge": "exporter", "hub-push": "exporter"}


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


def test_broken_plugin_is_listed_with_its_error_and_other_commands_still_work(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "ftcore-broken", "0.1", {"broken": "ftcore_no_such_module_xyz"})
    rows = {r.name: r for r in discovery.describe_installed()}
    assert "No module named" in rows["broken"].error
    assert rows["broken"].distribution == "ftcore-broken" and rows["broken"].version == "0.1"
    assert rows["lora"].error is None
    config, chosen = ftcore.resolve({"model": "m", "data": {"datasets": ["x.jsonl"]}}, log=lambda m: None)
    assert "broken" not in chosen.names()


def test_selecting_a_broken_plugin_names_it_and_its_package(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "ftcore-broken", "0.1", {"broken": "ftcore_no_such_module_xyz"})
    with pytest.raises(PluginError, match='plugin "broken" \\(package ftcore-broken 0.1.*failed to import.*No module named'):
        select(["broken"])


def test_unknown_plugin_lists_installed_and_suggests_closest():
    with pytest.raises(PluginError) as err:
        select(["lorra"])
    msg = str(err.value)
    assert 'unknown plugin "lorra"' in msg and 'Did you mean "lora"' in msg
    for name in BUNDLED:
        assert name in msg


def test_two_adapters_is_an_error_naming_both():
    with pytest.raises(PluginError, match="'lora' and 'full'.*adapter"):
        select(["lora", "full"])


def test_two_formats_for_one_dataset_is_an_error_naming_both(tmp_path):
    from ftcore.config.schema import DatasetSpec
    from ftcore.config.checks import resolve_format

    with pytest.raises(ftcore.DataError, match="alpaca and chatml"):
        resolve_format(DatasetSpec(path="x.jsonl"), ["alpaca", "chatml"])


def test_only_selected_plugins_and_defaults_are_imported():
    code = (
        "import sys\nfrom ftcore.registry.selection import select\n"
        "s = select(['chatml'])\n"
        "print(sorted(s.names()))\n"
        "print(sorted(m for m in sys.modules if m.startswith('ftcore_plugins.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "['chatml', 'lora']"          # chatml named; lora is the default adapter
    imported = eval(out[1])
    assert "ftcore_plugins.formats.chatml" in imported and "ftcore_plugins.adapters.lora" in imported
    assert "ftcore_plugins.formats.alpaca" not in imported and "ftcore_plugins.adapters.full" not in imported


def test_defaults_fill_missing_kinds_but_never_a_named_kind():
    chosen = select(["full"])
    assert chosen.names("adapter") == ["full"]
    assert chosen.names("format") == ["alpaca"]


# -- kinds ---------------------------------------------------------------------------------

def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(mod, hook_name, ftcore.hookimpl(fn))
    return mod


def test_kind_is_set_by_the_one_kind_hook_a_plugin_implements():
    assert discovery.kind_of(_module("myexport", ftcore_export=lambda run_dir, model_dir: [])) == "exporter"
    assert discovery.kind_of(_module("mylaunch", ftcore_launch=lambda argv: None)) == "strategy"
    assert discovery.kind_of(types.ModuleType("empty")) == "extension"


def test_adjustment_and_lifecycle_hooks_make_no_kind():
    tracker = _module("tracker", ftcore_training_arguments=lambda args: None,
                      ftcore_trainer_callbacks=lambda ctx: [], ftcore_run_finished=lambda result: None)
    assert discovery.kind_of(tracker) == "extension"


def test_two_kind_hooks_in_one_plugin_is_an_error_naming_both():
    both = _module("both", ftcore_load_model=lambda model_path: None, ftcore_export=lambda run_dir: [])
    with pytest.raises(PluginError, match='"both" implements ftcore_load_model and ftcore_export.*adapter and exporter'):
        select([], [both])


def test_an_extension_that_adjusts_training_arguments_runs_beside_deepspeed_zero(tmp_path):
    seen = {}

    class Tracker:
        name = "my-tracker"

        @ftcore.hookimpl
        def ftcore_training_arguments(self, args, ctx):
            args["run_name"] = "tracked"
            seen["args"] = dict(args)

    config, chosen = ftcore.resolve({"model": "m", "plugins": ["deepspeed-zero", "lora"],
                                     "output_dir": str(tmp_path / "out")}, plugin_objects=[Tracker()],
                                    log=lambda m: None)
    assert chosen.kind("my-tracker") == "extension" and chosen.names("strategy") == ["deepspeed-zero"]
    ctx = ftcore.RunContext(config=config, plugins=chosen, output_dir=tmp_path / "out")
    ctx.state["deepspeed_config"] = {"zero_optimization": {"stage": 2}}
    args = {}
    chosen.hook.ftcore_training_arguments(args=args, config=config, ctx=ctx)
    assert seen["args"]["run_name"] == "tracked" and args["deepspeed"]["zero_optimization"]["stage"] == 2


# -- registration -----------------------------------------------------------------------------

def test_misspelled_hook_argument_is_rejected_at_registration_with_a_suggestion():
    class Bad:
        @ftcore.hookimpl
        def ftcore_export(self, run_dirr):
            return []

    with pytest.raises(PluginError, match='(?s)invalid.*Did you mean "run_dir"'):
        select([], [Bad()])


def test_misspelled_hook_name_gets_a_suggestion():
    class Typo:
        @ftcore.hookimpl
        def ftcore_formt_record(self, record):
            return None

    with pytest.raises(PluginError, match='unknown hook .ftcore_formt_record.*Did you mean "ftcore_format_record"'):
        select([], [Typo()])


# -- identity of plugins passed as objects ------------------------------------------------------

PLUGIN_SOURCE = '''
    """An installed extension plugin."""
    import ftcore

    @ftcore.hookimpl
    def ftcore_run_finished(result, ctx):
        pass
'''


def test_an_installed_plugin_passed_as_an_object_keeps_its_name_distribution_and_version(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "ftcore-notes", "2.3.4", {"notes": "ftcore_notes_mod"},
            {"ftcore_notes_mod.py": PLUGIN_SOURCE})
    import ftcore_notes_mod

    chosen = select([], [ftcore_notes_mod])
    assert chosen.names("extension") == ["notes"]
    row = next(r for r in chosen.versions() if r["name"] == "notes")
    assert row == {"name": "notes", "kind": "extension", "distribution": "ftcore-notes", "version": "2.3.4"}


def test_a_plugin_object_is_named_by_its_declared_name():
    class Mine:
        name = "mine"

        @ftcore.hookimpl
        def ftcore_run_finished(self, result):
            pass

    assert select([], [Mine()]).names("extension") == ["mine"]


def test_the_same_plugin_named_and_passed_is_a_clear_error(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "ftcore-notes", "2.3.4", {"notes": "ftcore_notes_mod2"},
            {"ftcore_notes_mod2.py": PLUGIN_SOURCE})
    import ftcore_notes_mod2

    with pytest.raises(PluginError, match='plugin "notes" is both named .* and passed as an object'):
        ftcore.resolve({"model": "m", "plugins": ["notes"]}, plugin_objects=[ftcore_notes_mod2], log=lambda m: None)


def test_one_module_under_two_entry_point_names_is_a_clear_error_from_the_cli(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "ftcore-twice", "1.0", {"once": "ftcore_twice_mod", "again": "ftcore_twice_mod"},
            {"ftcore_twice_mod.py": PLUGIN_SOURCE})
    result = CliRunner().invoke(main, ["run", "--plugins", "once,again", "--model", "m", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert 'plugin "again" is the same plugin as "once"' in result.output and "Traceback" not in result.output


def test_trace_prints_each_hook_call_with_the_answering_plugin(monkeypatch, capsys):
    monkeypatch.setenv("FTCORE_TRACE_PLUGINS", "1")
    chosen = select(["alpaca"])
    chosen.call_one("alpaca", "ftcore_validate_record", record={"instruction": "x", "output": "y"}, config=None,
                    ctx=None)
    err = capsys.readouterr().err
    assert "[ftcore trace] ftcore_validate_record -> alpaca" in err
    assert "ftcore_validate_record <- alpaca returned []" in err


def test_two_selections_do_not_share_a_plugin_manager():
    a = select(["chatml"])
    b = select(["alpaca"])
    assert a.pm is not b.pm
    assert "chatml" not in b.names()
