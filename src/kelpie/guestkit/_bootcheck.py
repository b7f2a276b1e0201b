"""Boot a guest kit in QEMU (microvm, TCG) and time the milestones of its start.

Used by the kit's own tests and by `benchmarks/raw_boot.py` to prove a kit boots and to
measure it; the runtime's QEMU backend builds its own command line. The flags here are the
ones measured to work on the reference host (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kelpie import protocol
from kelpie.guestkit._build import GuestKit
from kelpie.guestkit._cmdline import AGENT_PORT_NAME

_MACHINES = {"x86_64": ["-M", "microvm,accel=tcg"],
             "aarch64": ["-M", "virt,accel=tcg", "-cpu", "cortex-a72"]}
"""How QEMU emulates each guest architecture (as the qemu backend does under TCG)."""


def qemu_binary(arch: str = "x86_64") -> str | None:
    """Path of qemu-system-ARCH, or None when it is not installed."""
    return shutil.which(f"qemu-system-{arch}")


def qemu_command(
    kit: GuestKit,
    workdir: Path,
    *,
    cmdline: str,
    memory_mib: int = 512,
    vcpus: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line that boots `kit`, with its console and agent port in `workdir`.

    `cmdline` is the kernel command line (see `kernel_cmdline`).
    """
    return [
        qemu_binary(kit.arch) or f"qemu-system-{kit.arch}",
        *_MACHINES[kit.arch],
        "-m", str(memory_mib),
        "-smp", str(vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(kit.kernel),
        "-initrd", str(kit.initrd),
        "-append", cmdline,
        "-serial", f"file:{workdir / 'console.log'}",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-device,rng=rng0",
        *extra,
    ]  # fmt: skip


@dataclasses.dataclass
class BootRun:
    """A running VM: its process, work directory and, once connected, the agent socket."""

    process: subprocess.Popen[bytes]
    workdir: Path
    started: float
    agent: socket.socket | None = None

    def console(self) -> str:
        """Everything the guest wrote to its serial console so far."""
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, marker: str, timeout: float) -> float:
        """Seconds from QEMU start until `marker` appeared on the console."""
        deadline = time.monotonic() + timeout
        while marker not in self.console():
            self._check_alive(deadline, f"console marker {marker!r}")
            time.sleep(0.005)
        return time.monotonic() - self.started

    def connect_agent(self, timeout: float) -> socket.socket:
        """Connect to the agent port's host socket (QEMU listens on it)."""
        deadline = time.monotonic() + timeout
        while self.agent is None:
            self._check_alive(deadline, "the agent socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.workdir / "agent.sock"))
            except OSError:
                sock.close()
                time.sleep(0.005)
            else:
                self.agent = sock
        return self.agent

    def agent_hello(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """Say hello to the agent; seconds from QEMU start until its reply, and the reply.

        The request is sent as soon as QEMU's socket accepts a connection: QEMU holds it
        until the guest opens the port, so the reply time is when the agent is serving.
        """
        sock = self.connect_agent(timeout)
        hello = {"op": "hello", "version": protocol.PROTOCOL_VERSION}
        sock.sendall(protocol.encode_json(protocol.FrameType.REQUEST, 1, hello))
        decoder = protocol.FrameDecoder()
        deadline = time.monotonic() + timeout
        sock.settimeout(0.05)
        while True:
            self._check_alive(deadline, "the agent's hello reply")
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise RuntimeError("QEMU closed the agent socket before the agent replied")
            decoder.feed(data)
            for frame in decoder.frames():
                if isinstance(frame, protocol.Frame) and frame.request_id == 1:
                    if frame.ftype != protocol.FrameType.REPLY:
                        raise RuntimeError(f"the agent refused hello: {frame.payload!r}")
                    return time.monotonic() - self.started, frame.json()

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"QEMU exited with {self.process.returncode} while waiting for {waiting_for}; "
                f"console:\n{self.console()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out waiting for {waiting_for}; console:\n{self.console()[-3000:]}"
            )


@contextlib.contextmanager
def boot(command: Sequence[str], workdir: Path) -> Iterator[BootRun]:
    """Start QEMU with `command` (its own session) and kill it on exit from the block."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("console.log", "agent.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(workdir / name)
    with (workdir / "qemu.stderr").open("wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    run = BootRun(process, workdir, started)
    try:
        yield run
    finally:
        if run.agent is not None:
            run.agent.close()
        process.kill()
        process.wait()
