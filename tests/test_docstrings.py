"""Every ``>>>`` example in the package's docstrings runs and shows what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import kivigo_async


def _modules() -> list[str]:
    names = [kivigo_async.__name__]
    for info in pkgutil.walk_packages(kivigo_async.__path__, prefix=f"{kivigo_async.__name__}."):
        names.append(info.name)
    return sorted(names)


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # an optional integration's framework is not installed
        pytest.skip(f"{name}: {exc}")


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = _import(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_examples_were_found() -> None:
    # The parametrised test passes trivially for a module without examples; this
    # makes sure the finder still sees the ones the package is known to have.
    finder = doctest.DocTestFinder(exclude_empty=True)
    examples = sum(
        len(test.examples) for name in _modules() for test in finder.find(importlib.import_module(name), name)
    )
    assert examples >= 60
