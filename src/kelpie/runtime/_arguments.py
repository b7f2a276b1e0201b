"""Turning the runtime's call arguments into checked values (mounts, ports, commands, enums)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from kelpie.images import NoDefaultCommand, StoredImage
from kelpie.images._rootfs_build import BuildProgress
from kelpie.runtime._info import ON_TIMEOUT_ACTIONS, SandboxInfo
from kelpie.runtime._restart import RestartPolicy
from kelpie.vm import ConfigError, Mount, NetworkMode, PortMapping, SnapshotKind

E = TypeVar("E", bound=enum.StrEnum)

Progress = Callable[[str], None]
"""Receives one line of progress text per step of a long operation (on the event loop)."""


def mount(volume: Mount | str) -> Mount:
    """A :class:`Mount` from itself or from ``HOST:GUEST[:ro|rw]``."""
    if isinstance(volume, Mount):
        return volume
    host, sep, rest = volume.partition(":")
    guest, _, mode = rest.partition(":")
    if not sep or not host or not guest or mode not in ("", "ro", "rw"):
        raise ConfigError([f"volume {volume!r}: expected HOST:GUEST or HOST:GUEST:ro|rw"],
                          what="volume")
    return Mount(Path(host).resolve(), guest, read_only=mode == "ro")


def port(mapping: PortMapping | str) -> PortMapping:
    """A :class:`PortMapping` from itself or from ``[IP:]HOST:GUEST[/tcp|udp]``."""
    return mapping if isinstance(mapping, PortMapping) else PortMapping.parse(mapping)


@dataclasses.dataclass(frozen=True)
class CommandDefaults:
    """Where and as whom a sandbox's commands run and what runs by default: the image's
    settings, or what the sandbox was created with instead (Docker's ``--workdir``,
    ``--user``, ``--entrypoint``; a new entrypoint drops the image's ``Cmd``, as there)."""

    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    image: bool = False

    @classmethod
    def of(cls, stored: StoredImage | None, *, workdir: str | None = None,
           user: str | None = None, entrypoint: Sequence[str] | None = None,
           ) -> CommandDefaults:
        """The image's defaults with the overrides given (None: keep the image's)."""
        config = stored.config if stored is not None else None
        if workdir is not None and not workdir.startswith("/"):
            raise ConfigError([f"workdir {workdir!r} must be an absolute guest path"],
                              what="sandbox")
        return cls(
            workdir=workdir or (config.working_dir or None if config else None),
            user=user or (config.exec_user() if config else None),
            entrypoint=tuple(entrypoint) if entrypoint is not None else
            tuple(config.entrypoint) if config else (),
            cmd=() if entrypoint is not None or config is None else tuple(config.cmd),
            image=stored is not None,
        )

    @classmethod
    def of_sandbox(cls, info: SandboxInfo) -> CommandDefaults:
        """A sandbox's own (a fork or a restore keeps them)."""
        full = info.image_command or ()
        entrypoint = tuple(info.image_entrypoint)
        return cls(info.workdir, info.user, entrypoint, tuple(full[len(entrypoint):]),
                   image=info.image_digest is not None)

    @property
    def image_command(self) -> tuple[str, ...] | None:
        """What runs when no command is given, or None when nothing does."""
        return (*self.entrypoint, *self.cmd) or None

    def main_command(self, command: Sequence[str] | None) -> tuple[str, ...] | None:
        """The main command to record: None for none; else Docker's rule, the entrypoint +
        the command, or + the default command when the command is empty."""
        if command is None:
            return None
        argv = (*self.entrypoint, *(command or self.cmd))
        if not argv:
            if self.image:
                raise NoDefaultCommand()
            raise ConfigError(["an empty main command needs an image with a default command; "
                               "give a command"], what="sandbox command")
        return argv


def build_reporter(progress: Progress | None) -> Callable[[BuildProgress], None] | None:
    """Turn root-disk build steps (reported on a worker thread) into progress lines."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(step: BuildProgress) -> None:
        if step.stage == "layer" and step.current < step.total:
            line = f"unpacking layer {step.current + 1}/{step.total}"
        elif step.stage == "ext4" and step.current == 0:
            line = "building the ext4 root disk"
        else:
            return
        loop.call_soon_threadsafe(progress, line)

    return report


MAX_STOP_TIMEOUT_SECONDS = 3600.0


def stop_timeout(seconds: object) -> float | None:
    """A checked stop timeout: None (the backend's default) or 0 to an hour in seconds."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not 0 <= seconds <= MAX_STOP_TIMEOUT_SECONDS:
        raise ConfigError([f"stop timeout {seconds!r} must be a number of seconds from 0 to "
                           f"{MAX_STOP_TIMEOUT_SECONDS:g}"], what="sandbox")
    return float(seconds)


MAX_TIMEOUT_SECONDS = 30 * 24 * 3600.0


def timeout_seconds(seconds: object) -> float | None:
    """A checked timeout: None (none) or more than 0, up to 30 days, in seconds."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ConfigError([f"timeout {seconds!r} must be a number of seconds above 0 and at "
                           f"most {MAX_TIMEOUT_SECONDS:g} (30 days), or none"], what="sandbox")
    return float(seconds)


def on_timeout_action(action: object) -> str:
    """A checked ``on_timeout``: what happens to a sandbox when its timeout passes."""
    if action not in ON_TIMEOUT_ACTIONS:
        raise ConfigError([f"on_timeout {action!r} must be one of: "
                           f"{', '.join(ON_TIMEOUT_ACTIONS)}"], what="sandbox")
    assert isinstance(action, str)
    return action


def restart_policy(policy: RestartPolicy | str | None) -> RestartPolicy:
    """A :class:`RestartPolicy` from itself or its text (None: ``no``)."""
    if isinstance(policy, RestartPolicy):
        return policy
    return RestartPolicy.parse(policy or "no")


def network(mode: NetworkMode | str) -> NetworkMode:
    return member(NetworkMode, mode, "network", "sandbox network")


def snapshot_kind(kind: SnapshotKind | str) -> SnapshotKind:
    return member(SnapshotKind, kind, "snapshot kind", "snapshot")


def member(kind: type[E], value: E | str, field: str, what: str) -> E:
    """``value`` as a member of the string enum ``kind``; a ConfigError lists the allowed."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ConfigError([f"{field} {value!r} is not known; allowed: {allowed}"],
                          what=what) from None


def image_label(image: StoredImage) -> str:
    """How a sandbox records its image: ``name@digest`` when tagged, else the digest."""
    if not image.tags:
        return image.digest
    return f"{image.tags[0].rpartition(':')[0]}@{image.digest}"


def workspace_of(info: SandboxInfo) -> str:
    """The directory a checkpoint keeps by default: the image's working directory."""
    return info.workdir if info.workdir and info.workdir != "/" else "/workspace"


def label(info: SandboxInfo) -> str:
    """How errors name a sandbox: ``name (short id)``."""
    return f"{info.name} ({info.short_id})"
