"""Just enough ELF64 reading for the guest kit: DT_NEEDED of binaries, `.modinfo` of modules.

The builder must learn which shared libraries the guest's Python needs and which kernel
modules depend on which, without running host tools (`ldd` executes the binary and uses the
host's libraries; `modinfo` is not installed everywhere). Both answers sit in plain ELF
tables, so we read them directly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

_MAGIC = b"\x7fELF"
_CLASS64 = 2
_LITTLE_ENDIAN = 1
_SHT_DYNAMIC = 6
_DT_NULL = 0
_DT_NEEDED = 1
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_DYN_ENTRY = struct.Struct("<qQ")


class ElfError(ValueError):
    """The file is not a little-endian ELF64 object, or its tables are malformed."""


class _Section:
    """One section header: the fields this module needs."""

    __slots__ = ("link", "name_offset", "offset", "size", "type")

    def __init__(self, raw: bytes) -> None:
        name, sh_type, _flags, _addr, offset, size, link, _info, _align, _entsize = (
            _SECTION_HEADER.unpack(raw)
        )
        self.name_offset: int = name
        self.type: int = sh_type
        self.offset: int = offset
        self.size: int = size
        self.link: int = link


def _sections(data: bytes) -> list[_Section]:
    if data[:4] != _MAGIC or data[4] != _CLASS64 or data[5] != _LITTLE_ENDIAN:
        raise ElfError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    if shentsize != _SECTION_HEADER.size or shoff + shnum * shentsize > len(data):
        raise ElfError("section header table is truncated or has an unexpected entry size")
    return [
        _Section(data[shoff + i * shentsize : shoff + (i + 1) * shentsize]) for i in range(shnum)
    ]


def _c_string(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode("utf-8", "replace")


def _section_bytes(data: bytes, section: _Section) -> bytes:
    if section.offset + section.size > len(data):
        raise ElfError("section extends past the end of the file")
    return data[section.offset : section.offset + section.size]


def needed_libraries(path: Path) -> list[str]:
    """Return the DT_NEEDED sonames of a dynamically linked ELF file, in file order.

    A statically linked file has no dynamic section and yields an empty list.
    """
    data = path.read_bytes()
    sections = _sections(data)
    needed: list[str] = []
    for section in sections:
        if section.type != _SHT_DYNAMIC:
            continue
        strings = _section_bytes(data, sections[section.link])
        table = _section_bytes(data, section)
        for tag, value in _DYN_ENTRY.iter_unpack(table[: len(table) // 16 * 16]):
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(_c_string(strings, value))
    return needed


def section_by_name(path: Path, name: str) -> bytes | None:
    """Return the raw contents of the section called `name`, or None if there is none."""
    data = path.read_bytes()
    sections = _sections(data)
    (shstrndx,) = struct.unpack_from("<H", data, 0x3E)
    if shstrndx >= len(sections):
        raise ElfError("section name table index is out of range")
    names = _section_bytes(data, sections[shstrndx])
    for section in sections:
        if _c_string(names, section.name_offset) == name:
            return _section_bytes(data, section)
    return None


def modinfo(path: Path) -> Iterator[tuple[str, str]]:
    """Yield the `key=value` pairs of a kernel module's `.modinfo` section, in order."""
    raw = section_by_name(path, ".modinfo") or b""
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            yield key, value
