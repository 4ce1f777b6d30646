"""diffinv.inversion.registry: the one list of inversion methods, and everything that lists them agrees with it."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import diffinv
import diffinv.inversion
from diffinv.errors import DiffinvError
from diffinv.inversion import InversionMethod, OptimizingInversion, registry

REPO = Path(__file__).resolve().parents[1]
BASES = {InversionMethod, OptimizingInversion}
"""The abstract bases: no method of their own (no ``method_name``)."""


def reachable_method_classes() -> set[type]:
    """Every InversionMethod subclass defined in a module of the diffinv.inversion package."""
    found = set()
    for info in pkgutil.iter_modules(diffinv.inversion.__path__, "diffinv.inversion."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, InversionMethod) and obj.__module__.startswith("diffinv.inversion"):
                found.add(obj)
    return found


def test_every_method_class_is_registered_exactly_once():
    classes = [m.cls for m in registry.METHODS]
    assert len(classes) == len(set(classes))
    assert sorted(c.__name__ for c in reachable_method_classes() - BASES) == sorted(c.__name__ for c in classes)
    for cls in reachable_method_classes() - BASES:
        assert "method_name" in vars(cls), f"{cls.__name__} writes records under its base's method_name"


def test_names_and_labels_are_unique_and_lookups_find_them():
    assert len(set(registry.names())) == len(registry.METHODS)
    assert len({m.label for m in registry.METHODS}) == len(registry.METHODS)
    for m in registry.METHODS:
        assert registry.by_name(m.name) is m and registry.by_class(m.cls) is m and registry.by_label(m.label) is m
    with pytest.raises(DiffinvError, match="unknown inversion method 'nope'"):
        registry.by_name("nope")
    with pytest.raises(DiffinvError, match="not a registered inversion method"):
        registry.by_class(InversionMethod)

    class Mine(registry.by_name("null_text").cls):  # a user's subclass runs as its registered base does
        pass

    assert registry.by_class(Mine).run == "fit"


@pytest.mark.parametrize("m", registry.METHODS, ids=lambda m: m.name)
def test_each_line_agrees_with_its_class(m):
    assert (m.run == "fit") == issubclass(m.cls, OptimizingInversion) == m.optimizes
    assert m.proximal == ("proximal" in inspect.signature(m.cls).parameters)
    assert m.name == m.cls.method_name


def test_every_method_config_names_a_registered_class():
    configs = sorted(REPO.joinpath("configs").rglob("*.yaml"))
    named = set()
    for path in configs:
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
        path_ = model.get("class_path", "") if isinstance(model, dict) else ""
        if path_.startswith("diffinv.inversion."):
            module, name = path_.rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            assert cls in {m.cls for m in registry.METHODS}, f"{path}: {path_} is not registered"
            named.add(cls)
    assert named == {m.cls for m in registry.METHODS}, "every registered method has a config in configs/"


def test_the_packages_export_every_registered_method():
    for m in registry.METHODS:
        assert getattr(diffinv.inversion, m.cls.__name__) is m.cls
        assert getattr(diffinv, m.cls.__name__) is m.cls
        assert m.cls.__name__ in diffinv.inversion.__all__ and m.cls.__name__ in diffinv.__all__


def test_no_method_module_imports_the_registry():
    folder = Path(diffinv.inversion.__file__).parent
    for path in folder.glob("*.py"):
        if path.name not in ("registry.py", "__init__.py"):
            assert "registry" not in path.read_text(), f"{path.name} imports the registry (an import cycle)"


def test_the_browser_page_offers_the_same_methods_and_loads_every_record():
    from diffinv.app.session import METHODS, RECORD_METHODS

    assert list(METHODS) == ["DDIM", "NPI", "ProxNPI", "NTI", "latent-TOP"]
    assert set(RECORD_METHODS) == set(registry.names())
    assert all(RECORD_METHODS[m.name] is m.cls for m in registry.METHODS)


def test_the_help_text_names_every_method_under_its_subcommand():
    """``diffinv --help`` must not import torch, so its text is written out: it must name every registered method
    under the subcommand that runs it."""
    from diffinv.cli import USAGE

    sections = dict(re.findall(r"  diffinv (fit|predict) -c .*?\n(.*?)(?=\n  diffinv )", USAGE, re.S))
    assert set(sections) == {"fit", "predict"}
    for m in registry.METHODS:
        assert m.help_label in sections[m.run], f"diffinv --help does not name {m.help_label} under {m.run}"
        other = sections["predict" if m.run == "fit" else "fit"]
        assert not re.search(rf"\b{re.escape(m.help_label)}\b", other)


def test_adding_a_method_is_one_registry_line():
    doc = registry.__doc__
    assert "Adding a method" in doc and "one :class:`Method` line" in doc
