"""What one libkrun VM is launched with: the file the parent writes and the child reads.

The parent (:class:`~kelpie.backends.libkrun._vm.LibkrunVm`) writes ``launch.json`` into
the VM directory; the child process (:mod:`._child`) turns it into ``krun_*`` calls. The
guest's layout, as libkrun's own init hands over to the program set by ``krun_set_exec``:

* its root (virtio-fs tag ``/dev/root``, read-only) is the guest kit's tree: busybox,
  Python and the guest agent, shared by every VM;
* the VM's own root directory (tag ``kelpie-root``, writable) is mounted at
  :data:`GUEST_ROOT`, and the agent runs every command chrooted there (``--root``), as the
  QEMU guest does with its root disk; the VM's volumes are mounted below it;
* the agent listens on vsock port :data:`AGENT_PORT`; libkrun listens on the unix socket
  ``agent.sock`` of the VM directory and forwards each connection to that port.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kelpie.vm import VmConfig

AGENT_PORT = 1024
"""The vsock port the guest agent listens on."""
ROOT_TAG = "kelpie-root"
"""The virtio-fs tag of the VM's own root directory."""
KRUN_FS_ROOT_TAG = "/dev/root"
"""libkrun.h: the virtio-fs tag of the guest's root filesystem."""
RESERVED_TAGS = (ROOT_TAG, KRUN_FS_ROOT_TAG)
"""Virtio-fs tags a volume cannot have."""
GUEST_ROOT = "/run/kelpie/root"
"""Where the guest mounts the VM's root directory (the agent's ``--root``)."""
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL = "/bin/sh"
"""The guest kit's busybox shell, which runs :func:`guest_init_script`."""


@dataclasses.dataclass(frozen=True)
class Share:
    """A host directory shared with the guest over virtio-fs, mounted at ``guest_path``."""

    tag: str
    host_path: str
    guest_path: str
    read_only: bool


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything the child process needs to configure and enter one libkrun VM."""

    library: str
    vcpus: int
    memory_mib: int
    kit_root: str
    vm_root: str
    agent_socket: str
    console: str
    hostname: str
    shares: tuple[Share, ...] = ()
    guest_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    vmm_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Extra environment of the child process itself (libkrun's, e.g. ``RUST_LOG``)."""

    def exec_args(self) -> list[str]:
        """The arguments of :data:`SHELL` (without its own name, as ``krun_set_exec``
        takes them): the guest's init script."""
        return ["-c", guest_init_script(self.shares)]

    def exec_env(self) -> list[str]:
        """The ``NAME=value`` environment of the guest's init (and so of its agent)."""
        env = {"PATH": GUEST_PATH, "HOME": "/root", **self.guest_env}
        return [f"{name}={value}" for name, value in env.items()]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Launch:
        data: dict[str, Any] = json.loads(text)
        data["shares"] = tuple(Share(**share) for share in data.get("shares", ()))
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> Launch:
        return cls.from_json(path.read_text())


def shares_of(config: VmConfig) -> tuple[Share, ...]:
    """The virtio-fs shares of ``config``'s volumes (host paths made absolute)."""
    return tuple(Share(config.mount_tag(i), os.path.abspath(mount.host_path), mount.guest_path,
                       mount.read_only) for i, mount in enumerate(config.mounts))


def guest_init_script(shares: Sequence[Share]) -> str:
    """The shell script libkrun's init runs in the guest kit's tree: mounts, then the agent.

    Every step that fails ends the script with a message on the console (``console.log``):
    without the agent the VM is of no use, and its exit ends the VM, which the host
    reports with that log.
    """
    root = shlex.quote(GUEST_ROOT)
    lines = [
        'fail() { echo "kelpie-init: $*" >&2; exit 125; }',
        'mounted() { mountpoint -q "$1"; }',
        "mounted /proc || mount -t proc -o nosuid,nodev,noexec proc /proc || fail proc",
        "mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail sysfs",
        "mounted /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail devtmpfs",
        "mkdir -p /dev/pts",
        "mounted /dev/pts || mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 "
        "devpts /dev/pts || fail devpts",
        # the kit's tree is read-only: what init and the agent write goes to memory
        "mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail /run",
        "mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail /tmp",
        f"mkdir -p {root} || fail {root}",
        f"mount -t virtiofs {ROOT_TAG} {root} || fail 'the VM root (virtio-fs {ROOT_TAG})'",
    ]
    for directory in ("proc", "sys", "dev", "dev/pts", "tmp"):
        lines.append(f"mkdir -p {root}/{directory} && mount -o bind /{directory} "
                     f"{root}/{directory} || fail 'bind /{directory}'")
    for share in shares:
        where = shlex.quote(GUEST_ROOT + share.guest_path)
        options = "-o ro " if share.read_only else ""
        lines.append(f"mkdir -p {where} && mount -t virtiofs {options}{shlex.quote(share.tag)} "
                     f"{where} || fail 'volume {share.tag} at {share.guest_path}'")
    lines.append(f"exec python3 -E -S /kelpie/guest/agent.pyc --listen-vsock {AGENT_PORT} "
                 f"--root {root}")
    return "\n".join(lines) + "\n"
