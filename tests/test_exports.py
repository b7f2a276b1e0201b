"""The public face: ``__all__`` lists exactly the public names, each documented.

Sorting of ``__all__`` is enforced by ruff (RUF022).
"""

import types

import pytest

import kelpie
import kelpie.dst
import kelpie.vm


def public_names(module: types.ModuleType) -> set[str]:
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


@pytest.mark.parametrize("module", [kelpie, kelpie.vm, kelpie.dst])
def test_all_matches_public_names(module: types.ModuleType) -> None:
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__), "duplicates in __all__"
    assert exported - {"__version__"} == public_names(module)


def test_public_items_documented() -> None:
    for name in kelpie.__all__:
        item = getattr(kelpie, name)
        if isinstance(item, type) or callable(item):
            assert item.__doc__, f"kelpie.{name} has no docstring"
