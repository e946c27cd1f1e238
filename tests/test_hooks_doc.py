"""The hooks are documented, typed and tested: every spec has a heading in docs/hooks.md with its real
signature and calling convention, typed arguments and return value, ``ctx`` (but the one declaration
hook), and a test of its own named ``test_hook_<name>`` (as datasette's meta-tests do)."""

from __future__ import annotations

import inspect
import re

import pytest
from conftest import REPO

from ftcore import hookspecs

DOC = REPO / "docs" / "hooks.md"
HEADING = re.compile(r"^### `(?P<name>ftcore_\w+)\((?P<args>[^)]*)\)`\s*$", re.M)
DECLARATIONS = {"ftcore_config_schema"}   # read before any run context exists


def _specs() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(hookspecs).items()
            if name.startswith("ftcore_") and callable(fn) and hasattr(fn, "ftcore_spec")}


def _documented() -> dict[str, tuple[list[str], str]]:
    text = DOC.read_text(encoding="utf-8")
    found = {}
    matches = list(HEADING.finditer(text))
    for i, m in enumerate(matches):
        body = text[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        args = [a.strip() for a in m.group("args").split(",") if a.strip()]
        assert m.group("name") not in found, f"{m.group('name')} is documented twice"
        found[m.group("name")] = (args, body)
    return found


def _tests_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "tests").rglob("test_*.py")))


def test_the_hookspecs_module_is_what_the_test_reads():
    assert len(_specs()) >= 17 and "ftcore_format_record" in _specs()


@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_is_documented_with_its_real_signature(name):
    documented = _documented()
    assert name in documented, f"docs/hooks.md has no '### `{name}(...)`' heading"
    args, body = documented[name]
    real = list(_specs()[name].parameters)
    assert args == real, f"docs/hooks.md documents {name}({', '.join(args)}) but the spec is {name}({', '.join(real)})"
    firstresult = getattr(hookspecs, name).ftcore_spec.get("firstresult", False)
    called = re.search(r"\*Called:\* (first result|every plugin)", body)
    assert called, f"{name}: say how it is called (*Called:* first result / every plugin)"
    assert (called.group(1) == "first result") == firstresult, f"{name}: firstresult={firstresult} in the spec"


@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_is_typed_and_gets_the_context(name):
    signature = _specs()[name]
    fn = getattr(hookspecs, name)
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Signature.empty, f"{name}: argument {param.name} has no type"
    assert (fn.__doc__ or "").strip(), f"{name} has no docstring"
    if name not in DECLARATIONS:
        assert "ctx" in signature.parameters, f"{name} does not get ctx"


@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_has_a_test_of_its_own(name):
    assert f"def test_hook_{name}(" in _tests_source(), f"no test named test_hook_{name} in tests/"


@pytest.mark.parametrize("kind,hook", sorted(hookspecs.KIND_HOOKS.items()))
def test_every_kind_hook_is_documented_as_one(kind, hook):
    _, body = _documented()[hook]
    assert f"Kind hook: *{kind}*" in body


def test_no_documented_hook_is_missing_from_the_specs():
    extra = set(_documented()) - set(_specs())
    assert not extra, f"docs/hooks.md documents hooks that do not exist: {sorted(extra)}"
