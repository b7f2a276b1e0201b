"""Sandbox names: the allowed form, and readable names generated from a sandbox id."""

from __future__ import annotations

import re

from kelpie.vm import ConfigError

NAME_PATTERN = r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}"
"""A sandbox name: 1-63 letters, digits, ``_``, ``.``, ``-``; starting with a letter or digit."""

_NAME = re.compile(NAME_PATTERN + r"\Z")

_ADJECTIVES = (
    "amber", "brave", "calm", "deep", "eager", "fleet", "gentle", "hidden", "icy", "jolly",
    "keen", "lucid", "misty", "noble", "odd", "pale", "quiet", "rapid", "salty", "tidal",
    "urban", "vivid", "wild", "young", "zesty", "bold", "coral", "dusky", "foggy", "grey",
    "hazy", "lunar",
)
_NOUNS = (
    "kelpie", "otter", "seal", "heron", "tern", "puffin", "selkie", "loch", "firth", "skerry",
    "burn", "tarn", "kraken", "eel", "pike", "trout", "salmon", "gannet", "petrel", "shag",
    "wrasse", "limpet", "urchin", "whelk", "skua", "dunlin", "curlew", "plover", "oyster",
    "crab", "kelp", "wave",
)


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid sandbox name, else raise :class:`ConfigError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            [
                f"{name!r} is not a valid sandbox name: use 1-63 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit (pattern " + NAME_PATTERN + ")"
            ],
            what="sandbox name",
        )
    return name


def generated_name(sandbox_id: str) -> str:
    """A readable name derived from the id alone, e.g. ``brave-otter-42``."""
    number = int(sandbox_id, 16)
    adjective = _ADJECTIVES[number % len(_ADJECTIVES)]
    number //= len(_ADJECTIVES)
    noun = _NOUNS[number % len(_NOUNS)]
    number //= len(_NOUNS)
    return f"{adjective}-{noun}-{number % 100:02d}"
