"""Kernel module selection: which `.ko` files the guest needs, and in which order to load them.

Debian's kernel package ships no `modules.dep` (depmod runs at install time), so the
dependency graph is read from each module's own `.modinfo` section (`depends=` and the
`pre:` part of `softdep=`). The result is a load order per group; the guest's init loads a
group only when the matching virtio device is present.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from kelpie.guestkit._elf import modinfo

#: Modules the guest may need, by group. `core` is always loaded; the others are loaded by
#: init when a device of that kind exists (see init.sh). Dependencies are added automatically.
#: virtio_rng comes before virtio_console: the agent's Python, started as init begins,
#: waits at start for the kernel's RNG to be seeded (its hash seed, read from /dev/urandom),
#: and under TCG the virtio RNG is what seeds it.
MODULE_GROUPS: Mapping[str, tuple[str, ...]] = {
    "core": ("virtio_mmio", "virtio_rng", "virtio_console"),
    "blk": ("virtio_blk", "ext4", "crc32c_generic"),
    "9p": ("9pnet_virtio", "9p"),
    "net": ("virtio_net",),
    "vsock": ("vmw_vsock_virtio_transport",),
    "pci": ("virtio_pci",),
    "virtiofs": ("virtiofs",),
}


class ModuleError(LookupError):
    """A requested module or one of its hard dependencies is not in the kernel package."""


@dataclasses.dataclass(frozen=True)
class Module:
    """One kernel module: its name, path below the modules directory, and dependencies."""

    name: str
    path: PurePosixPath
    depends: tuple[str, ...]
    softdeps: tuple[str, ...]
    aliases: tuple[str, ...]


def _normalise(name: str) -> str:
    return name.replace("-", "_")


def _parse_softdep(value: str) -> list[str]:
    """The module names in the `pre:` part of a softdep (`pre: a b post: c` -> [a, b])."""
    names: list[str] = []
    section = ""
    for word in value.split():
        if word.endswith(":"):
            section = word[:-1]
        elif section == "pre":
            names.append(word)
    return names


class ModuleTree:
    """The modules of one unpacked kernel (`lib/modules/<release>`)."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self._paths = {
            _normalise(ko.name.removesuffix(".ko")): ko
            for ko in sorted(moddir.joinpath("kernel").rglob("*.ko"))
        }
        self._builtin = self._read_builtin()
        self._cache: dict[str, Module] = {}

    def _read_builtin(self) -> dict[str, set[str]]:
        """Built-in module names mapped to their aliases (from modules.builtin.modinfo)."""
        builtin: dict[str, set[str]] = {}
        path = self.moddir / "modules.builtin.modinfo"
        raw = path.read_bytes() if path.exists() else b""
        for record in raw.split(b"\0"):
            key, _, value = record.decode("utf-8", "replace").partition("=")
            module, _, field = key.partition(".")
            if not field:
                continue
            aliases = builtin.setdefault(_normalise(module), set())
            if field == "alias":
                aliases.add(value)
        return builtin

    def module(self, name: str) -> Module:
        """Describe the module called `name` (`-` and `_` are interchangeable)."""
        key = _normalise(name)
        if key not in self._cache:
            path = self._paths.get(key)
            if path is None:
                raise ModuleError(f"kernel module {name!r} is not in {self.moddir}")
            depends: list[str] = []
            softdeps: list[str] = []
            aliases: list[str] = []
            for field, value in modinfo(path):
                if field == "depends":
                    depends += [d for d in value.split(",") if d]
                elif field == "softdep":
                    softdeps += _parse_softdep(value)
                elif field == "alias":
                    aliases.append(value)
            self._cache[key] = Module(
                key,
                PurePosixPath(path.relative_to(self.moddir).as_posix()),
                tuple(_normalise(d) for d in depends),
                tuple(softdeps),
                tuple(aliases),
            )
        return self._cache[key]

    def is_builtin(self, name: str) -> bool:
        """True when `name` is compiled into the kernel image (nothing to load)."""
        return _normalise(name) in self._builtin

    def resolve_alias(self, alias: str) -> str | None:
        """The module providing `alias` (a softdep target such as `crypto-crc32c`).

        Returns None when the kernel has it built in or no loadable module provides it.
        Candidates are found by name (`crc32c`, `crc32c_generic`) and then confirmed
        against the candidate's own alias list; the portable `_generic` implementation is
        preferred over CPU-specific ones, which may not load on an emulated CPU.
        """
        if self.is_builtin(alias) or any(alias in a for a in self._builtin.values()):
            return None
        base = _normalise(alias.removeprefix("crypto-"))
        for candidate in (base + "_generic", base):
            if candidate in self._paths:
                module = self.module(candidate)
                if candidate == _normalise(alias) or alias in module.aliases:
                    return candidate
        return None

    def load_order(self, roots: Sequence[str], already: Sequence[str] = ()) -> list[Module]:
        """`roots` and everything they need, dependencies first, skipping `already` loaded."""
        order: list[Module] = []
        done = {_normalise(n) for n in already}
        visiting: set[str] = set()

        def visit(name: str) -> None:
            key = _normalise(name)
            if key in done or self.is_builtin(key):
                return
            if key in visiting:
                raise ModuleError(f"kernel module dependency cycle through {name!r}")
            visiting.add(key)
            module = self.module(key)
            for dep in module.depends:
                visit(dep)
            for soft in module.softdeps:
                provider = soft if _normalise(soft) in self._paths else self.resolve_alias(soft)
                if provider is not None:
                    visit(provider)
            visiting.discard(key)
            done.add(key)
            order.append(module)

        for root in roots:
            visit(root)
        return order


def plan_groups(tree: ModuleTree, groups: Mapping[str, Sequence[str]]) -> dict[str, list[Module]]:
    """Load order per group; a group never repeats modules the `core` group loads."""
    core = tree.load_order(groups.get("core", ()))
    plan = {"core": core}
    core_names = [m.name for m in core]
    for group, roots in groups.items():
        if group != "core":
            plan[group] = tree.load_order(roots, already=core_names)
    return plan
