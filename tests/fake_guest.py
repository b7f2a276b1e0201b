"""The real guest agent, run on the host as a stand-in guest for VMMs that cannot boot here.

Test doubles of Firecracker, libkrun and Virtualization.framework run Kelpie's own guest
agent as a host process instead of a guest kernel, so that a backend's exec, files and
streams are driven end to end. That agent must not touch the host: it gets its own UTS
namespace (so a host name set for the guest is not the host's) and mount namespace, and its
commands run chrooted into a scratch busybox root (the agent's ``--root``, which also
confines its file operations). It dies with the process that started it, as a guest dies
with its VMM: precisely, with the *thread* that started it (``PR_SET_PDEATHSIG``), so start
it from a thread that lives as long as the stand-in VMM.

As a script: ``fake_guest.py --listen PATH --root DIR [--hostname NAME]`` sets up the
namespaces and execs the agent.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "src" / "kelpie" / "guest" / "agent.py"
APPLETS = ("sh", "cat", "echo", "ls", "mkdir", "hostname", "sleep", "head", "od", "date",
           "kill", "mv", "ln", "readlink", "mkfifo", "mknod", "chmod", "touch", "test",
           "sync", "env", "printf", "rm", "true", "false", "tty", "stty", "pwd", "dd",
           "wc", "sha256sum", "seq", "yes", "tr")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_BIND = 4096
_PR_SET_PDEATHSIG = 1


def scratch_root(where: Path) -> Path:
    """A busybox root directory for a stand-in guest (``where/root``, made once)."""
    root = where / "root"
    if root.exists():
        return root
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox (static) is needed for a stand-in guest root: "
                           "apt-get install busybox-static")
    for name in ("bin", "etc", "tmp", "root", "dev/pts", "proc", "workspace"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for device in DEVICES:
        (root / "dev" / device).touch()  # bind-mount points (see _enter)
    return root


def agent_argv(listen: Path, root: Path, hostname: str | None) -> list[str]:
    """The command that runs the guest agent on ``listen`` (a unix socket), confined to
    ``root``, with ``hostname`` in its own UTS namespace."""
    argv = [sys.executable, "-S", str(Path(__file__).resolve()), "--listen", str(listen),
            "--root", str(root)]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def _libc_call(libc: ctypes.CDLL, name: str, *args: object) -> None:
    if getattr(libc, name)(*args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def _enter(root: Path, hostname: str | None) -> None:
    """Die with the parent; own UTS and mount namespaces; the root's devices bound."""
    libc = ctypes.CDLL(None, use_errno=True)
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above: die now, as promised
        sys.exit(1)
    _libc_call(libc, "unshare", _CLONE_NEWNS | _CLONE_NEWUTS)
    _libc_call(libc, "mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    socket.sethostname(hostname or "stand-in-guest")
    bind = [(f"/dev/{d}", root / "dev" / d) for d in DEVICES]
    bind.append(("/dev/pts", root / "dev" / "pts"))  # the agent's PTYs come from the host's
    for source, target in bind:
        if os.path.exists(source) and target.exists():
            _libc_call(libc, "mount", source.encode(), os.fsencode(target), None, _MS_BIND,
                       None)


def main(argv: list[str]) -> None:
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    root = Path(options["--root"])
    _enter(root, options.get("--hostname"))
    os.execv(sys.executable, [sys.executable, "-S", str(AGENT), "--listen-unix",
                              options["--listen"], "--root", str(root)])


if __name__ == "__main__":
    main(sys.argv)
