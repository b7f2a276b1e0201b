"""The QEMU command line for a VmConfig: one function, no I/O, easy to test.

No ``vmgenid`` device: QEMU 7.2 accepts ``-device vmgenid`` on the ``microvm`` machine,
but microvm's ACPI tables (hw/i386/acpi-microvm.c) never describe it, so the guest kernel
finds no VM generation ID and nothing reseeds on a restore (checked: no ``QEMUVGID``
device in the guest's /sys/bus/acpi/devices). A restore therefore has the guest agent's
``resync`` do what VMGenID would: mix in fresh host entropy and reseed the kernel CRNG.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kelpie.guestkit import AGENT_PORT_NAME, GuestNetwork, GuestShare, kernel_cmdline
from kelpie.vm import ConfigError, Mount, NetworkMode, PortMapping, VmConfig

USER_NET = GuestNetwork("10.0.2.15/24", "10.0.2.2", "10.0.2.3")  # QEMU user networking
ISOLATED_NET = GuestNetwork(USER_NET.address)
"""The guest's set-up with network ``none`` and published ports: an address, no route out."""
GUEST_ADDRESS = USER_NET.address.split("/")[0]
"""Where QEMU's ``hostfwd`` rules deliver published ports."""

ROOT_DRIVE = "root"
"""The root disk's drive id: QMP commands (resize, mirror, NBD export) name it."""


@dataclasses.dataclass(frozen=True)
class QemuLaunch:
    """Everything the command line depends on."""

    qemu: str
    config: VmConfig
    kernel: Path
    initrd: Path
    workdir: Path
    accel: str
    hostname: str
    overlay: Path | None = None
    incoming: bool = False
    """Start paused, waiting for the VM state from QMP ``migrate-incoming`` (a restore)."""
    prefix: tuple[str, ...] = ()
    """What runs QEMU (``ip netns exec NAME``: in the sandbox's network namespace)."""
    forward_from: str | None = None
    """The address published ports are forwarded from (in the namespace; the host's relay
    listens where the user asked); None: each port's own host address."""
    arch: str = "x86_64"
    """The guest's architecture: x86_64 on QEMU's ``microvm``, aarch64 on ``virt``."""
    ram: Path | None = None
    """A file holding the guest's RAM (``memory-backend-file``), or None: anonymous memory.
    Shared (``share=on``: the file is the RAM, so a capture can copy it), or a private
    copy-on-write mapping of a snapshot's RAM file (clones sharing its pages)."""
    ram_shared: bool = True
    arat: bool = True
    """Under TCG, tell an x86_64 guest its APIC timer always runs (``-cpu qemu64,+arat``;
    TCG's does). Without it Linux keeps a periodic tick on every vCPU (no high-res timers
    or tickless idle: its LAPIC timer would need a broadcast timer ``microvm`` lacks), and
    an idle VM costs ~6.5% of a host core instead of ~0.5%. False restores a snapshot of a
    guest booted without it (its device signature has no ``-cpu``)."""


MACHINES = {"x86_64": "microvm", "aarch64": "virt"}
TCG_CPUS = {"x86_64": "qemu64", "aarch64": "cortex-a72"}
"""The CPU each architecture's guest sees under TCG (under KVM: the host's)."""
CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}


def cpu_model(arch: str, accel: str) -> str:
    """The guest CPU model QEMU gives a guest of ``arch``: the host's under KVM."""
    return "host" if accel == "kvm" else TCG_CPUS[arch]


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def guest_network(config: VmConfig) -> GuestNetwork | None:
    """How init sets up the guest's eth0, or None when the VM has no NIC."""
    if config.network is not NetworkMode.NONE:
        return USER_NET
    return ISOLATED_NET if config.ports else None


def netdev_arg(config: VmConfig, forward_from: str | None = None) -> str | None:
    """The ``-netdev`` value of the VM's user-mode NIC, or None when it has none.

    Network ``none`` with published ports gets ``restrict=on``: the guest can reach
    neither the host nor the outside, but the ``hostfwd`` rules still forward inbound
    connections to it. ``nat`` and ``policy`` run QEMU in the sandbox's namespace, whose
    rules decide where the guest's connections may go; their ports are forwarded from
    ``forward_from`` (the namespace's address).
    """
    if config.network is NetworkMode.NONE and not config.ports:
        return None
    parts = ["user", "id=net0"]
    if config.network is NetworkMode.NONE:
        parts.append("restrict=on")
    parts += [
        f"hostfwd={p.protocol}:{forward_from or p.host_ip}:{p.host_port}-"
        f"{GUEST_ADDRESS}:{p.guest_port}"
        for p in config.ports
    ]
    return ",".join(parts)


def kernel_args(launch: QemuLaunch) -> str:
    """The guest kit's kernel command line for this VM (init.sh reads the settings)."""
    config = launch.config
    shares = [
        GuestShare(config.mount_tag(i), m.guest_path, m.read_only)
        for i, m in enumerate(config.mounts)
    ]
    try:
        return kernel_cmdline(
            hostname=launch.hostname,
            root_device="/dev/vda" if launch.overlay is not None else None,
            shares=shares,
            network=guest_network(config),
            console=CONSOLES[launch.arch],
            tsc_khz=None if launch.arch == "x86_64" else 0,  # the TSC is x86's
            extra=config.kernel_args,
        )
    except ValueError as exc:
        raise ConfigError([f"cannot pass this configuration to the guest: {exc}"]) from exc


def build_command(launch: QemuLaunch) -> list[str]:
    """The full argv that starts this VM."""
    config, workdir = launch.config, launch.workdir
    memory = [] if launch.ram is None else [
        "-object", f"memory-backend-file,id=ram,size={config.memory_mib}M,"
                   f"mem-path={_opt(launch.ram)},share={'on' if launch.ram_shared else 'off'}"]
    command = [
        *launch.prefix,
        launch.qemu,
        "-M", f"{MACHINES[launch.arch]},accel={launch.accel}"
              + (",memory-backend=ram" if launch.ram is not None else ""),
        *_cpu_option(launch),
        *memory,
        "-m", str(config.memory_mib),
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(launch.kernel),
        "-initrd", str(launch.initrd),
        "-append", kernel_args(launch),
        "-serial", f"file:{_opt(workdir / 'console.log')}",
        "-qmp", f"unix:{_opt(workdir / 'qmp.sock')},server=on,wait=off",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={_opt(workdir / 'agent.sock')},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-device,rng=rng0",
    ]  # fmt: skip
    if launch.overlay is not None:
        command += [
            "-drive", f"file={_opt(launch.overlay)},if=none,id={ROOT_DRIVE},format=qcow2",
            "-device", f"virtio-blk-device,drive={ROOT_DRIVE}",
        ]  # fmt: skip
    for i, mount in enumerate(config.mounts):
        readonly = ",readonly=on" if mount.read_only else ""
        command += [
            "-fsdev",
            f"local,id=fs{i},path={_opt(mount.host_path)},security_model=none{readonly}",
            "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={config.mount_tag(i)}",
        ]  # fmt: skip
    netdev = netdev_arg(config, launch.forward_from)
    if netdev is not None:
        command += ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]
    if launch.incoming:
        command += ["-S", "-incoming", "defer"]
    return command


def _cpu_option(launch: QemuLaunch) -> list[str]:
    if launch.accel == "kvm":
        return ["-cpu", "host"]
    if launch.arch == "x86_64":
        return ["-cpu", f"{TCG_CPUS['x86_64']},+arat"] if launch.arat else []  # qemu64: default
    return ["-cpu", TCG_CPUS[launch.arch]]


def device_signature(launch: QemuLaunch) -> list[str]:
    """The command line of ``launch`` with every host-specific value replaced.

    Two launches with equal signatures create the same machine and devices, which is what
    restoring a migration stream needs; paths, the host name, the kernel command line and
    the host side of published ports may differ. A full snapshot records it, and a
    restore compares it with its own, so a Kelpie whose command lines changed refuses the
    snapshot instead of QEMU failing halfway through loading it.
    """
    config = launch.config.evolve(
        hostname=None,
        env={},
        ports=(PortMapping(1, 1),) if launch.config.ports else (),
        mounts=tuple(
            Mount(Path(f"/share{i}"), m.guest_path, m.read_only, launch.config.mount_tag(i))
            for i, m in enumerate(launch.config.mounts)
        ),
    )
    canonical = dataclasses.replace(
        launch, qemu=f"qemu-system-{launch.arch}", config=config, kernel=Path("/kernel"),
        initrd=Path("/initrd"), workdir=Path("/vm"), hostname="guest",
        overlay=None if launch.overlay is None else Path("/vm/overlay.qcow2"), incoming=False,
        prefix=(), forward_from=None, ram=None if launch.ram is None else Path("/ram"),
        ram_shared=True,
    )
    command = build_command(canonical)
    append = command.index("-append")
    return command[:append] + command[append + 2 :]
