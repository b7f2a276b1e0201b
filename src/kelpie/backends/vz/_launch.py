"""What one Virtualization.framework VM is built from: plain data, and its kernel command line.

:class:`VzLaunch` holds everything :func:`~kelpie.backends.vz._bridge.build_configuration`
turns into framework objects; nothing here touches the framework, so it is tested as data.

The guest kit's init reads its settings from the kernel command line (see
``kelpie/guestkit/init.sh``). Under Virtualization.framework the guest differs from QEMU's
in three ways the command line says:

* ``kelpie.vsock=PORT``: the agent listens on vsock port PORT (there is no virtio-serial
  port to serve);
* ``console=hvc0``: the serial console is a virtio console (the last ``console=`` wins);
* ``kelpie.sharefs=virtiofs``: shares (``kelpie.mounts``, same syntax) are virtio-fs tags,
  mounted with ``mount -t virtiofs TAG PATH`` instead of 9p.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kelpie.guestkit import GuestShare, kernel_cmdline
from kelpie.vm import ConfigError, VmConfig

AGENT_VSOCK_PORT = 1024
"""The vsock port the guest agent listens on (passed to init as ``kelpie.vsock``)."""
CONSOLE_ARG = "console=hvc0"
SHARE_FS_ARG = "kelpie.sharefs=virtiofs"
ROOT_DEVICE = "/dev/vda"
"""The writable root disk is the first (and only) virtio block device."""


@dataclasses.dataclass(frozen=True)
class VzLaunch:
    """One VM's machine, as data: the bridge builds the framework's configuration from it."""

    config: VmConfig
    kernel: Path
    initrd: Path
    hostname: str
    console_log: Path
    disk: Path | None = None
    """The VM's own writable copy of ``config.root_disk`` (never the base image itself)."""
    agent_port: int = AGENT_VSOCK_PORT
    machine_id: bytes | None = None
    """The generic platform's machine identifier (its data representation): a saved state
    restores only into a machine with the identifier it was saved from. None: a new one."""
    mac_address: str | None = None
    """The NIC's MAC address (a restore reuses the saved one); None: a random one."""
    command_line: str | None = None
    """The kernel command line to use as it is (a restore reuses the saved one); None:
    :func:`command_line` of this launch."""

    def kernel_command_line(self) -> str:
        return self.command_line if self.command_line is not None else command_line(self)

    def shares(self) -> list[GuestShare]:
        """The virtio-fs shares, one per mount, by tag."""
        return [GuestShare(self.config.mount_tag(i), m.guest_path, m.read_only)
                for i, m in enumerate(self.config.mounts)]


def command_line(launch: VzLaunch) -> str:
    """The guest kit's kernel command line for this VM (init.sh reads the settings)."""
    config = launch.config
    extra = [CONSOLE_ARG]
    if config.mounts:
        extra.append(SHARE_FS_ARG)
    try:
        return kernel_cmdline(
            hostname=launch.hostname,
            root_device=ROOT_DEVICE if launch.disk is not None else None,
            shares=launch.shares(),
            # The NAT attachment hands out addresses by DHCP on a subnet macOS chooses, so
            # no static kelpie.net can be right; init configures eth0 by DHCP (see the
            # backend's notes), and nothing at all with network none.
            network=None,
            tsc_khz=0,  # the TSC arguments work around QEMU TCG; this guest runs on the CPU
            agent_vsock_port=launch.agent_port,
            extra=[*extra, *config.kernel_args],
        )
    except ValueError as exc:
        raise ConfigError([f"cannot pass this configuration to the guest: {exc}"]) from exc


def refusals(config: VmConfig) -> list[str]:
    """What this backend cannot do of ``config`` (empty: nothing): checked when a VM is
    created, before anything runs."""
    problems = []
    if config.ports:
        problems.append(
            "ports: Virtualization.framework's NAT gives the guest an address on a host-only "
            "subnet but forwards no host port to it; publish no ports with this backend "
            "(reach the guest through exec), or use the qemu backend"
        )
    return problems
