"""kelpie.images has one public face: ``__all__`` lists exactly its public names, documented."""

import types

import kelpie.images


def test_all_matches_public_names() -> None:
    public = {
        name for name, value in vars(kelpie.images).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert len(set(kelpie.images.__all__)) == len(kelpie.images.__all__)
    assert set(kelpie.images.__all__) == public


def test_public_items_documented() -> None:
    for name in kelpie.images.__all__:
        item = getattr(kelpie.images, name)
        if isinstance(item, type) or callable(item):
            assert item.__doc__, f"kelpie.images.{name} has no docstring"
            for attr, member in vars(item).items() if isinstance(item, type) else ():
                if callable(member) and not attr.startswith("_"):
                    assert member.__doc__, f"kelpie.images.{name}.{attr} has no docstring"


def test_errors_are_kelpie_errors() -> None:
    for name in kelpie.images.__all__:
        item = getattr(kelpie.images, name)
        if isinstance(item, type) and issubclass(item, Exception):
            assert issubclass(item, kelpie.KelpieError), name
