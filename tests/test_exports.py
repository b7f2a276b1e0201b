"""The public face: ``__all__`` lists exactly the public names, each documented.

Sorting of ``__all__`` is enforced by ruff (RUF022).
"""

import types

import pytest

import kelpie
import kelpie.dst
import kelpie.sdk
import kelpie.service
import kelpie.sim
import kelpie.vm


def public_names(module: types.ModuleType) -> set[str]:
    """Public non-module names; for a lazy module (``__getattr__``), every name it offers."""
    names = dir(module) if hasattr(module, "__getattr__") else list(vars(module))
    return {
        name for name in names
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }


@pytest.mark.parametrize("module", [kelpie, kelpie.vm, kelpie.sim, kelpie.dst, kelpie.sdk,
                                    kelpie.service])
def test_all_matches_public_names(module: types.ModuleType) -> None:
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__), "duplicates in __all__"
    assert exported - {"__version__"} == public_names(module)


def test_public_items_documented() -> None:
    for name in kelpie.__all__:
        item = getattr(kelpie, name)
        if isinstance(item, type) or callable(item):
            assert item.__doc__, f"kelpie.{name} has no docstring"
