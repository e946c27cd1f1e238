"""The layout is the architecture: layers import only downwards, nothing imports in a cycle, and the
bundled plugins use the public API alone (docs/architecture.md).

The sources are read, not imported, and every import counts, including those inside functions;
only imports under ``if TYPE_CHECKING:`` (annotations, never executed) are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

import ftcore

CORE = REPO / "ftcore"
PLUGINS = REPO / "ftcore_plugins"

# Lowest first. A module may import from its own layer and the ones before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("ftcore.errors", "ftcore.files", "ftcore.version", "ftcore.quiet")),
    ("contracts", ("ftcore.types", "ftcore.hookspecs", "ftcore.runfolder")),
    ("config", ("ftcore.config",)),
    ("registry", ("ftcore.registry",)),
    ("models", ("ftcore.models",)),
    ("data", ("ftcore.data",)),
    ("reporting", ("ftcore.reporting",)),
    ("training", ("ftcore.training",)),
    ("tools", ("ftcore.tools",)),
    ("cli", ("ftcore.cli",)),
    ("api", ("ftcore",)),   # ftcore/__init__.py: the public API, at the top
]
TESTING = "ftcore.testing"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


CORE_MODULES = modules(CORE)


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import in the file, at any depth, but TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def targets(imported: str, names: list[str]) -> list[str]:
    """The ftcore modules an import statement loads: ``from ftcore.x import y`` is ftcore.x.y when that is a module."""
    if not (imported == "ftcore" or imported.startswith("ftcore.")):
        return []
    out = []
    for name in names or [""]:
        candidate = f"{imported}.{name}" if name else imported
        out.append(candidate if candidate in CORE_MODULES else imported)
    return out


def core_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in CORE_MODULES}
    for module, path in CORE_MODULES.items():
        for imported, names, _ in imports(path, module):
            graph[module].update(t for t in targets(imported, names) if t != module)
    return graph


def test_every_core_module_has_a_layer():
    for module in CORE_MODULES:
        if module != TESTING:
            layer_of(module)


def test_no_core_module_imports_upwards():
    wrong = []
    for module, path in CORE_MODULES.items():
        if module == TESTING:
            continue
        for imported, names, line in imports(path, module):
            for target in targets(imported, names):
                if target == TESTING:
                    continue   # checked on its own below
                if layer_of(target) > layer_of(module):
                    wrong.append(f"{path.relative_to(REPO)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) imports "
                                 f"{target} ({LAYERS[layer_of(target)][0]}), a higher layer")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = core_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_production_code_never_imports_the_testing_helpers():
    users = [m for m, p in CORE_MODULES.items() if m != TESTING
             for imported, names, _ in imports(p, m) if TESTING in targets(imported, names)]
    users += [m for m, p in modules(PLUGINS).items()
              for imported, names, _ in imports(p, m) if imported.startswith(TESTING)]
    assert not users, f"ftcore.testing is for tests; imported by {sorted(set(users))}"


def test_click_is_used_by_the_cli_package_alone():
    users = [m for m, p in CORE_MODULES.items() if not m.startswith("ftcore.cli")
             for imported, _, _ in imports(p, m) if imported.split(".")[0] == "click"]
    assert not users, f"click outside ftcore.cli: {users}"


@pytest.mark.parametrize("root", [PLUGINS, REPO / "examples" / "sharegpt-plugin"], ids=["bundled", "sharegpt"])
def test_plugins_use_the_public_api_alone(root):
    public = set(ftcore.__all__)
    wrong = []
    for module, path in modules(root).items():
        for imported, names, line in imports(path, module):
            where = f"{path.relative_to(REPO)}:{line}"
            if imported == TESTING and "tests" in path.relative_to(root).parts:
                continue   # a plugin's own tests use ftcore.testing, the helpers for plugin authors
            if imported.startswith("ftcore."):
                wrong.append(f"{where}: imports {imported}, an internal module; use `import ftcore` (the public API)")
            elif imported == "ftcore":
                wrong += [f"{where}: `from ftcore import {n}`, which is not in ftcore.__all__" for n in names
                          if n not in public]
    assert not wrong, "\n".join(wrong)


def test_the_public_api_exports_what_plugins_need():
    for name in ("hookimpl", "PluginConfig", "RunContext", "RunResult", "Example", "MemoryProfile",
                 "OptimizerProfile", "write_text_atomic", "write_json_atomic", "atomic_folder", "merge_adapter",
                 "merge_peft_adapter", "load_base_model", "resolve_model_path", "ConfigError", "PluginError"):
        assert name in ftcore.__all__ and getattr(ftcore, name) is not None, name
    for field in ("model_path", "output_dir", "rank", "world_size", "is_main_process", "export_output", "result",
                  "merged_dir", "base_model_license"):
        assert field in ftcore.RunContext.__dataclass_fields__ or hasattr(ftcore.RunContext, field), field


def test_the_architecture_page_names_every_layer():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            shown = prefix.replace("ftcore.", "ftcore/").replace(".", "/")
            assert f"`{shown}" in page, f"docs/architecture.md does not show {prefix} (layer {name})"


def test_every_public_name_is_documented_and_every_documented_name_exported():
    page = (REPO / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(\w+)[`(]", page))
    missing = [n for n in ftcore.__all__ if n not in documented]
    assert not missing, f"docs/reference/api.md does not document {missing}"
    for name in ftcore.__all__:
        assert hasattr(ftcore, name), name



def test_the_run_folders_file_names_are_spelled_in_runfolder_alone():
    """A run folder's layout has one home (ftcore/runfolder.py): no other module spells its files' names."""
    from ftcore import runfolder

    names = {runfolder.MARKER, runfolder.CONFIG, runfolder.PLUGINS, runfolder.METRICS, runfolder.SUMMARY,
             runfolder.REPORT}
    spelled = []
    for root in (CORE, PLUGINS):
        for path in sorted(root.rglob("*.py")):
            if path == CORE / "runfolder.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in names:
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert spelled == [], "use ftcore.runfolder's names instead:\n" + "\n".join(spelled)
