"""The one registry shape: lazy "module:attr" entries, decorator registration, aliases, clear errors."""

import ast
import subprocess
import sys

import pytest

from mergeflow.errors import RecipeError
from mergeflow.methods.base import BUILTIN_METHODS
from mergeflow.registry import Registry, import_entry


def test_lazy_entry_is_imported_on_first_use_only():
    reg: Registry[object] = Registry("thing", {"join": "os.path:join"})
    assert "join" in reg and len(reg) == 1
    assert reg._lazy == {"join"}  # not imported yet
    import os.path

    assert reg.lookup("join") is os.path.join
    assert not reg._lazy


def test_decorator_and_call_registration_and_aliases():
    reg: Registry[object] = Registry("thing")

    @reg.register("f", aliases=("g",))
    def f() -> int:
        return 1

    obj = object()
    assert reg.register("o", obj) is obj
    assert reg["f"] is reg["g"] is f
    assert sorted(reg) == ["f", "g", "o"]
    assert reg.unique() == [f, obj]


def test_registering_twice_is_an_error_but_filling_a_lazy_entry_is_not():
    reg: Registry[object] = Registry("thing", {"x": "os:sep"})
    first = object()
    reg.register("x", first)  # what the module named by the lazy entry does when imported
    assert reg["x"] is first
    reg.register("x", first)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match="thing 'x' registered twice"):
        reg.register("x", object())


def test_unknown_name_lists_the_known_ones():
    reg: Registry[object] = Registry("thing", {"a": "os:sep"})
    with pytest.raises(KeyError, match="unknown thing 'b'; known: a"):
        reg.lookup("b")
    custom: Registry[object] = Registry("thing", unknown=lambda name, known: RecipeError(f"no {name} in {known}"))
    with pytest.raises(RecipeError, match=r"no b in \[\]"):
        custom.lookup("b")


def test_bad_entry_names_the_entry():
    with pytest.raises(ImportError, match="registry entry 'os:no_such_thing'"):
        import_entry("os:no_such_thing")


def test_monkeypatch_setitem_swaps_and_restores(monkeypatch: pytest.MonkeyPatch):
    reg: Registry[object] = Registry("thing", {"sep": "os:sep"})
    monkeypatch.setitem(reg, "sep", "patched")
    monkeypatch.setitem(reg, "new", "added")
    assert reg["sep"] == "patched" and reg["new"] == "added"
    monkeypatch.undo()
    assert "new" not in reg
    import os

    assert reg["sep"] == os.sep


def test_builtin_methods_and_estimators_resolve_and_are_listed_once():
    from mergeflow.importance.base import BUILTIN_ESTIMATORS, all_estimators, get_estimator
    from mergeflow.methods.base import BUILTIN_METHODS, all_methods, get_method

    for name in BUILTIN_METHODS:
        assert name == get_method(name).name or name == "weight_average"
    assert get_method("weight_average") is get_method("linear")
    assert sorted(m.name for m in all_methods()) == sorted(set(BUILTIN_METHODS) - {"weight_average"})
    for name in BUILTIN_ESTIMATORS:
        assert get_estimator(name).name == name
    assert [e.name for e in all_estimators()] == sorted(BUILTIN_ESTIMATORS)
    with pytest.raises(RecipeError, match="merge_method: unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(RecipeError, match=r"importance\.estimator: unknown estimator 'nope'"):
        get_estimator("nope")


def test_asking_for_one_method_imports_only_its_module():
    code = ("import sys; from mergeflow.methods import get_method; get_method('slerp'); "
            "print(sorted(m for m in sys.modules if m.startswith('mergeflow.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported = set(ast.literal_eval(out.strip()))
    kernels = {spec.partition(":")[0] for spec in BUILTIN_METHODS.values()}
    assert "mergeflow.methods.slerp" in imported and not (kernels - {"mergeflow.methods.slerp"}) & imported


def test_cli_methods_lists_methods_aliases_and_estimators():
    from click.testing import CliRunner

    from mergeflow.cli import main

    runner = CliRunner()
    listing = runner.invoke(main, ["methods"])
    assert listing.exit_code == 0, listing.output
    assert "\nlinear  [" not in listing.output and "linear  (also: weight_average)" in listing.output
    assert "Importance estimators" in listing.output and "\napl  [base model, out-of-domain]" in listing.output
    assert "needs the importance estimator regmean" in listing.output
    one = runner.invoke(main, ["methods", "sens"])
    assert one.exit_code == 0 and one.output.startswith("sens") and "temperature" in one.output
    bad = runner.invoke(main, ["methods", "nope"])
    assert bad.exit_code == 2 and "neither a merge method" in bad.output
