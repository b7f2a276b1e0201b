"""VmConfig: the immutable, validated description of a VM, and its builder."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Self

from kelpie._exceptions import ConfigError
from kelpie.vm._egress import EgressPolicy

MIN_VCPUS = 1
MAX_VCPUS = 32
DEFAULT_VCPUS = 2
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 16384
DEFAULT_MEMORY_MIB = 512
MIN_DISK_MIB = 64
MAX_DISK_MIB = 1 << 20  # 1 TiB
DEFAULT_DISK_MIB = 10240
"""The root disk of a sandbox made from an image, unless asked otherwise (sparse: its free
space costs the host nothing until written)."""
MAX_PATH_LENGTH = 4096
MAX_MOUNTS = 16
MAX_MOUNT_TAG_LENGTH = 36
MAX_ENV_VARS = 1024
MAX_HOSTNAME_LENGTH = 63
GUEST_ARCHES = ("x86_64", "aarch64")
"""Guest architectures a VmConfig may ask for (in the kernel's spelling)."""
MAX_PORTS = 64
MIN_PORT = 1
MAX_PORT = 65535
DEFAULT_PORT_HOST_IP = "127.0.0.1"
PORT_PROTOCOLS = ("tcp", "udp")
ANY_IPV4 = "0.0.0.0"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MOUNT_TAG = re.compile(r"[A-Za-z0-9_.-]+\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_PORT_NUMBER = re.compile(r"[0-9]{1,5}\Z")
_PORT_SPEC_FORMS = "HOST:GUEST or IP:HOST:GUEST, optionally with /tcp or /udp (e.g. 8080:80)"


class NetworkMode(enum.StrEnum):
    """Guest networking: ``none`` (no NIC), ``nat`` (the internet, never the host or private
    networks) or ``policy`` (nat narrowed to what the egress rules allow)."""

    NONE = "none"
    NAT = "nat"
    POLICY = "policy"


@dataclasses.dataclass(frozen=True)
class Mount:
    """A host directory shared into the guest.

    ``tag`` names the share on the transport (9p/virtiofs); when omitted it is derived from
    the mount's position (``share0``, ``share1``...).
    """

    host_path: Path
    guest_path: str
    read_only: bool = False
    tag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_path": str(self.host_path),
            "guest_path": self.guest_path,
            "read_only": self.read_only,
            "tag": self.tag,
        }


@dataclasses.dataclass(frozen=True)
class PortMapping:
    """A published port: connections to ``host_ip:host_port`` on the host reach
    ``guest_port`` in the guest (docker's ``-p [IP:]HOST:GUEST[/PROTOCOL]``).

    ``host_ip`` is the IPv4 address the host listens on: loopback only by default,
    ``0.0.0.0`` for every interface. Like :class:`Mount`, the fields are checked when the
    mapping is put in a :class:`VmConfig`; :meth:`parse` checks them at once.
    """

    host_port: int
    guest_port: int
    host_ip: str = DEFAULT_PORT_HOST_IP
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol}"

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        """A mapping from ``HOST:GUEST`` or ``IP:HOST:GUEST``, optionally ``/tcp`` or ``/udp``.

        Raises :class:`ConfigError` saying what is wrong and which forms are allowed.
        """
        what = "published port"
        if not isinstance(text, str):
            raise ConfigError(  # untyped callers
                [f"a published port must be a string, got {type(text).__name__}"], what=what
            )
        spec, slash, protocol = text.strip().partition("/")
        protocol = protocol.lower() if slash else "tcp"
        parts = spec.split(":")
        if spec.startswith("["):
            raise ConfigError(
                [f"{text!r}: IPv6 host addresses are not supported; use an IPv4 address "
                 f"({_PORT_SPEC_FORMS})"], what=what,
            )
        if len(parts) not in (2, 3):
            raise ConfigError([f"{text!r} is not a port mapping; use {_PORT_SPEC_FORMS}"],
                              what=what)
        problems = []
        host_ip = parts[0] if len(parts) == 3 else DEFAULT_PORT_HOST_IP
        ports: list[int] = []
        for name, value in (("host port", parts[-2]), ("guest port", parts[-1])):
            if _PORT_NUMBER.match(value):
                ports.append(int(value))
            else:
                shown = f"{value!r} is not a number" if value else "is missing"
                problems.append(
                    f"{text!r}: {name} {shown}; give a number in {MIN_PORT}..{MAX_PORT}"
                )
        if len(parts) == 3 and not host_ip:
            problems.append(
                f"{text!r}: the IP before the host port is empty; give an IPv4 address such "
                f"as 127.0.0.1 or 0.0.0.0, or use HOST:GUEST"
            )
        if problems:
            raise ConfigError(problems, what=what)
        mapping = cls(ports[0], ports[1], host_ip, protocol)
        problems = [f"{text!r}: {p}" for p in mapping.problems()]
        if problems:
            raise ConfigError(problems, what=what)
        return mapping

    def problems(self) -> list[str]:
        """Everything wrong with this mapping (empty when it is valid)."""
        problems = _int_problems("host port", self.host_port, MIN_PORT, MAX_PORT)
        problems += _int_problems("guest port", self.guest_port, MIN_PORT, MAX_PORT)
        if not isinstance(self.host_ip, str):
            problems.append(  # type: ignore[unreachable]  # untyped callers
                f"host IP must be a string, got {type(self.host_ip).__name__}"
            )
        else:
            try:
                ipaddress.IPv4Address(self.host_ip)
            except ValueError:
                problems.append(
                    f"host IP {self.host_ip!r} is not an IPv4 address (e.g. 127.0.0.1, or "
                    f"0.0.0.0 for every interface; IPv6 is not supported)"
                )
        if self.protocol not in PORT_PROTOCOLS:
            problems.append(
                f"protocol is {self.protocol!r}; allowed: {', '.join(PORT_PROTOCOLS)}"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": self.protocol,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PortMapping:
        """Read a dict produced by :meth:`to_dict` (not validated: :class:`VmConfig` does)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KeyError(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(
            host_port=data["host_port"],
            guest_port=data["guest_port"],
            host_ip=data.get("host_ip", DEFAULT_PORT_HOST_IP),
            protocol=data.get("protocol", "tcp"),
        )


def _path_problems(field: str, value: Path | None) -> list[str]:
    if value is None:
        return []
    text = str(value)
    problems = []
    if not text:
        problems.append(f"{field} is empty; give a path or leave it unset")
    if len(text) > MAX_PATH_LENGTH:
        problems.append(f"{field} is {len(text)} characters; at most {MAX_PATH_LENGTH} allowed")
    if "\0" in text:
        problems.append(f"{field} contains a NUL byte")
    return problems


def _guest_path_problems(field: str, value: str) -> list[str]:
    problems = []
    if not value.startswith("/"):
        problems.append(f"{field} {value!r} must be an absolute guest path (start with '/')")
    if ".." in PurePosixPath(value).parts:
        problems.append(f"{field} {value!r} must not contain '..'")
    if "\0" in value:
        problems.append(f"{field} contains a NUL byte")
    if len(value) > MAX_PATH_LENGTH:
        problems.append(f"{field} is {len(value)} characters; at most {MAX_PATH_LENGTH} allowed")
    return problems


def _int_problems(field: str, value: object, low: int, high: int) -> list[str]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [f"{field} must be an integer, got {type(value).__name__}"]
    if not low <= value <= high:
        return [f"{field} is {value}; allowed range is {low}..{high}"]
    return []


@dataclasses.dataclass(frozen=True)
class VmConfig:
    """Everything a backend needs to create a VM. Immutable and validated on construction.

    Build it with keywords (``VmConfig(vcpus=2, memory_mib=1024)``) or with
    :meth:`builder`. An invalid config raises one :class:`ConfigError` that lists every
    problem found. ``evolve(**changes)`` returns a validated copy with changes.
    """

    vcpus: int = DEFAULT_VCPUS
    memory_mib: int = DEFAULT_MEMORY_MIB
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_args: tuple[str, ...] = ()
    root_disk: Path | None = None
    image: str | None = None
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    network: NetworkMode = NetworkMode.NONE
    hostname: str | None = None
    ports: tuple[PortMapping, ...] = ()
    egress: EgressPolicy = dataclasses.field(default_factory=EgressPolicy)
    """Where the guest may connect (``nat`` and ``policy``; see :class:`EgressPolicy`)."""
    arch: str | None = None
    """The guest's architecture (``x86_64``, ``aarch64``); None: the host's. Another one
    than the host's is emulated (QEMU TCG)."""
    disk_mib: int | None = None
    """The root disk's size in MiB, its filesystem made to fill it (the runtime builds the
    image's ext4 at this size; QEMU sizes the disk to it and refuses a larger image); None:
    the size of ``root_disk``."""

    def __post_init__(self) -> None:
        # Normalise containers so the config is really immutable and hashable-free of lists.
        object.__setattr__(self, "mounts", tuple(self.mounts))
        ports: object = self.ports
        # one string is one (misplaced) mapping, reported as such, not one per character
        object.__setattr__(self, "ports", (ports,) if isinstance(ports, str) else tuple(self.ports))
        object.__setattr__(self, "kernel_args", tuple(self.kernel_args))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        for name in ("kernel", "initrd", "root_disk"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
        problems = self._problems()
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "network", NetworkMode(self.network))

    def _problems(self) -> list[str]:
        problems = _int_problems("vcpus", self.vcpus, MIN_VCPUS, MAX_VCPUS)
        problems += _int_problems("memory_mib", self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
        for field in ("kernel", "initrd", "root_disk"):
            problems += _path_problems(field, getattr(self, field))
        if self.disk_mib is not None:
            problems += _int_problems("disk_mib", self.disk_mib, MIN_DISK_MIB, MAX_DISK_MIB)
        if self.initrd is not None and self.kernel is None:
            problems.append("initrd is set but kernel is not; an initrd needs a kernel")
        if self.image is not None and not self.image.strip():
            problems.append("image is empty; give an image reference or leave it unset")
        for i, arg in enumerate(self.kernel_args):
            if not isinstance(arg, str) or not arg or "\0" in arg or "\n" in arg:
                problems.append(f"kernel_args[{i}] must be a non-empty single-line string")
        problems += self._mount_problems()
        problems += self._env_problems()
        problems += self._port_problems()
        if self.network not in NetworkMode._value2member_map_:
            allowed = ", ".join(m.value for m in NetworkMode)
            problems.append(f"network is {self.network!r}; allowed: {allowed}")
        elif not isinstance(self.egress, EgressPolicy):
            problems.append(  # type: ignore[unreachable]  # untyped callers
                f"egress must be an EgressPolicy, got {type(self.egress).__name__}")
        elif not self.egress.empty and self.network == NetworkMode.NONE:
            problems.append(f"egress rules ({self.egress}) need network nat or policy; "
                            "network none has no NIC to apply them to")
        if self.arch is not None and self.arch not in GUEST_ARCHES:
            problems.append(f"arch is {self.arch!r}; allowed: {', '.join(GUEST_ARCHES)} "
                            f"(or unset: the host's)")
        if self.hostname is not None and (
            len(self.hostname) > MAX_HOSTNAME_LENGTH or not _HOSTNAME.match(self.hostname)
        ):
            problems.append(
                f"hostname {self.hostname!r} is not a valid host name "
                f"(letters, digits and '-', at most {MAX_HOSTNAME_LENGTH} characters)"
            )
        return problems

    def _mount_problems(self) -> list[str]:
        problems = []
        if len(self.mounts) > MAX_MOUNTS:
            problems.append(f"{len(self.mounts)} mounts given; at most {MAX_MOUNTS} allowed")
        seen_tags: set[str] = set()
        seen_targets: set[str] = set()
        for i, mount in enumerate(self.mounts):
            where = f"mounts[{i}]"
            if not isinstance(mount, Mount):
                problems.append(  # type: ignore[unreachable]  # untyped callers
                    f"{where} must be a Mount, got {type(mount).__name__}"
                )
                continue
            problems += _path_problems(f"{where}.host_path", mount.host_path)
            if not Path(mount.host_path).is_absolute():
                problems.append(f"{where}.host_path {str(mount.host_path)!r} must be absolute")
            problems += _guest_path_problems(f"{where}.guest_path", mount.guest_path)
            if mount.guest_path.rstrip("/") == "":
                problems.append(f"{where}.guest_path must not be '/' (the guest's root)")
            tag = self.mount_tag(i)
            if len(tag) > MAX_MOUNT_TAG_LENGTH:
                problems.append(
                    f"{where}.tag is {len(tag)} characters; at most {MAX_MOUNT_TAG_LENGTH} allowed"
                )
            if not _MOUNT_TAG.match(tag):
                problems.append(f"{where}.tag {tag!r} may only use letters, digits, '_', '.', '-'")
            if tag in seen_tags:
                problems.append(f"{where}.tag {tag!r} is used by an earlier mount")
            if mount.guest_path in seen_targets:
                problems.append(f"{where}.guest_path {mount.guest_path!r} is mounted twice")
            seen_tags.add(tag)
            seen_targets.add(mount.guest_path)
        return problems

    def _port_problems(self) -> list[str]:
        problems = []
        if len(self.ports) > MAX_PORTS:
            problems.append(f"{len(self.ports)} ports published; at most {MAX_PORTS} allowed")
        seen: dict[tuple[str, int, str], int] = {}
        for i, port in enumerate(self.ports):
            where = f"ports[{i}]"
            if not isinstance(port, PortMapping):
                hint = (  # type: ignore[unreachable]  # untyped callers
                    f"; use PortMapping.parse({port!r})" if isinstance(port, str) else ""
                )
                problems.append(f"{where} must be a PortMapping, got {type(port).__name__}{hint}")
                continue
            own = port.problems()
            problems += [f"{where}: {p}" for p in own]
            if own:
                continue
            for (ip, number, protocol), j in seen.items():
                if number != port.host_port or protocol != port.protocol:
                    continue
                if ip == port.host_ip:
                    problems.append(
                        f"{where}: host port {port.host_ip}:{port.host_port}/{port.protocol} "
                        f"is already published by ports[{j}]"
                    )
                    break
                if ANY_IPV4 in (ip, port.host_ip):
                    problems.append(
                        f"{where}: host port {port.host_ip}:{port.host_port}/{port.protocol} "
                        f"overlaps ports[{j}] ({ip}:{number}/{protocol}); {ANY_IPV4} "
                        f"covers every address"
                    )
                    break
            seen.setdefault((port.host_ip, port.host_port, port.protocol), i)
        return problems

    def host_problems(self) -> list[str]:
        """Problems of this config on this host: each mount's host directory must exist.

        Not part of construction, so that a config saved earlier still loads when a shared
        directory has gone since; backends check it before they start a VM.
        """
        problems = []
        for i, mount in enumerate(self.mounts):
            where = f"mounts[{i}].host_path"
            path = Path(mount.host_path)
            try:
                is_dir = path.is_dir()
                exists = is_dir or path.exists()
            except OSError as exc:
                problems.append(f"{where} {str(path)!r} cannot be checked: {exc}")
                continue
            if not exists:
                problems.append(
                    f"{where} {str(path)!r} does not exist; a shared directory must exist "
                    f"on the host before the VM starts"
                )
            elif not is_dir:
                problems.append(
                    f"{where} {str(path)!r} is not a directory; only directories can be "
                    f"shared (share the directory that holds the file)"
                )
        return problems

    def _env_problems(self) -> list[str]:
        problems = []
        if len(self.env) > MAX_ENV_VARS:
            problems.append(f"{len(self.env)} env vars given; at most {MAX_ENV_VARS} allowed")
        for name, value in self.env.items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                problems.append(
                    f"env name {name!r} is invalid: use letters, digits and '_', "
                    "not starting with a digit"
                )
            if not isinstance(value, str) or "\0" in value:
                problems.append(f"env {name!s} must be a string without NUL bytes")
        return problems

    def mount_tag(self, index: int) -> str:
        """The transport tag of mount ``index`` (its own, or ``share<index>``)."""
        return self.mounts[index].tag or f"share{index}"

    def evolve(self, **changes: Any) -> VmConfig:
        """A copy with ``changes`` applied, validated like a new config."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def builder(cls) -> VmConfigBuilder:
        """Start a :class:`VmConfigBuilder` with default values."""
        return VmConfigBuilder()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "kernel": None if self.kernel is None else str(self.kernel),
            "initrd": None if self.initrd is None else str(self.initrd),
            "kernel_args": list(self.kernel_args),
            "root_disk": None if self.root_disk is None else str(self.root_disk),
            "image": self.image,
            "mounts": [m.to_dict() for m in self.mounts],
            "env": dict(self.env),
            "network": self.network.value,
            "hostname": self.hostname,
            "ports": [p.to_dict() for p in self.ports],
            "egress": self.egress.to_dict(),
            "arch": self.arch,
            "disk_mib": self.disk_mib,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmConfig:
        """Read a dict produced by :meth:`to_dict`; unknown keys are reported as problems."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"unknown field {k!r}; known: {', '.join(sorted(known))}"
                               for k in unknown])
        values = dict(data)
        problems = []
        try:
            if "mounts" in values:
                values["mounts"] = tuple(
                    Mount(
                        host_path=Path(m["host_path"]),
                        guest_path=m["guest_path"],
                        read_only=bool(m.get("read_only", False)),
                        tag=m.get("tag"),
                    )
                    for m in values["mounts"]
                )
        except (KeyError, TypeError) as exc:
            problems.append(f"mounts: malformed entry ({exc})")
        if "ports" in values:  # absent from configs saved before ports existed
            ports = []
            try:
                for i, entry in enumerate(values["ports"]):
                    try:
                        ports.append(PortMapping.from_dict(entry))
                    except (KeyError, TypeError) as exc:
                        problems.append(f"ports[{i}]: malformed entry ({exc})")
            except TypeError as exc:
                problems.append(f"ports: expected a list ({exc})")
            values["ports"] = tuple(ports)
        try:
            if "kernel_args" in values:
                values["kernel_args"] = tuple(values["kernel_args"])
        except TypeError as exc:
            problems.append(f"kernel_args: expected a list ({exc})")
        if "egress" in values:  # absent from configs saved before egress rules existed
            try:
                values["egress"] = EgressPolicy.from_dict(values["egress"])
            except ConfigError as exc:
                problems += [f"egress: {p}" for p in exc.problems]
            except (TypeError, AttributeError) as exc:
                problems.append(f"egress: expected an object with allow and deny ({exc})")
        if problems:
            raise ConfigError(problems)
        return cls(**values)


class VmConfigBuilder:
    """Fluent construction of a :class:`VmConfig`; validation happens in :meth:`build`."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._mounts: list[Mount] = []
        self._env: dict[str, str] = {}
        self._kernel_args: list[str] = []
        self._ports: list[PortMapping] = []

    def vcpus(self, count: int) -> Self:
        self._values["vcpus"] = count
        return self

    def memory_mib(self, mib: int) -> Self:
        self._values["memory_mib"] = mib
        return self

    def kernel(self, path: Path | str, *, initrd: Path | str | None = None) -> Self:
        self._values["kernel"] = Path(path)
        if initrd is not None:
            self._values["initrd"] = Path(initrd)
        return self

    def kernel_arg(self, arg: str) -> Self:
        self._kernel_args.append(arg)
        return self

    def root_disk(self, path: Path | str) -> Self:
        self._values["root_disk"] = Path(path)
        return self

    def image(self, reference: str) -> Self:
        self._values["image"] = reference
        return self

    def mount(
        self, host_path: Path | str, guest_path: str, *, read_only: bool = False,
        tag: str | None = None,
    ) -> Self:
        self._mounts.append(Mount(Path(host_path), guest_path, read_only, tag))
        return self

    def env(self, name: str, value: str) -> Self:
        self._env[name] = value
        return self

    def envs(self, values: Mapping[str, str] | Iterable[tuple[str, str]]) -> Self:
        self._env.update(values)
        return self

    def network(self, mode: NetworkMode | str) -> Self:
        self._values["network"] = mode
        return self

    def egress(self, policy: EgressPolicy) -> Self:
        self._values["egress"] = policy
        return self

    def hostname(self, name: str) -> Self:
        self._values["hostname"] = name
        return self

    def port(
        self, host_port: int, guest_port: int, *, host_ip: str = DEFAULT_PORT_HOST_IP,
        protocol: str = "tcp",
    ) -> Self:
        """Publish ``guest_port`` on the host's ``host_ip:host_port``."""
        self._ports.append(PortMapping(host_port, guest_port, host_ip, protocol))
        return self

    def publish(self, spec: PortMapping | str) -> Self:
        """Publish a port given as a :class:`PortMapping` or as docker's ``[IP:]HOST:GUEST``.

        Text is parsed at once (:meth:`PortMapping.parse` raises :class:`ConfigError`).
        """
        self._ports.append(spec if isinstance(spec, PortMapping) else PortMapping.parse(spec))
        return self

    def build(self) -> VmConfig:
        """Validate and return the config; raises :class:`ConfigError` listing all problems."""
        return VmConfig(
            **self._values,
            mounts=tuple(self._mounts),
            env=dict(self._env),
            kernel_args=tuple(self._kernel_args),
            ports=tuple(self._ports),
        )
