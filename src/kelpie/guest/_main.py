"""The agent's command line: parse the options, open the channel, serve, power off."""

from __future__ import annotations

import os
import sys

from ._agent import Agent
from ._channel import Channel, DeviceChannel, ListenChannel
from ._common import log, protocol
from ._system import power_off

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

USAGE: Final = """\
usage: agent.py (--device PATH | --device-from FIFO | --listen-unix PATH |
                 --listen-vsock PORT) [--root DIR]

  --device PATH        serve a virtio-serial port (guest mode; shutdown powers off)
  --device-from FIFO   the same, its path read from FIFO: init starts the agent early and
                       writes the path once the guest is set up (start-up overlaps init)
  --listen-unix PATH   listen on a unix socket (host test mode)
  --listen-vsock PORT  listen on a vsock port
  --root DIR           run commands chrooted into DIR; file paths resolve inside it
"""


def parse_args(argv: list[str]) -> dict[str, str]:
    """Parse ``--name value`` options (argparse is kept out of the guest)."""
    known = {"--device", "--device-from", "--listen-unix", "--listen-vsock", "--root"}
    options: dict[str, str] = {}
    args = list(argv)
    while args:
        name = args.pop(0)
        if name in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if name not in known or not args:
            raise SystemExit(f"agent.py: bad argument {name!r}\n{USAGE}")
        options[name.lstrip("-")] = args.pop(0)
    modes = [m for m in ("device", "device-from", "listen-unix", "listen-vsock")
             if m in options]
    if len(modes) != 1:
        raise SystemExit(f"agent.py: give exactly one of --device, --device-from, "
                         f"--listen-unix, --listen-vsock\n{USAGE}")
    return options


def device_from(fifo: str) -> str:
    """The device path init writes to ``fifo`` when the guest is ready to be served (it
    keeps the FIFO open until this agent exits, so the line waits for a late reader)."""
    with open(fifo) as lines:
        device = lines.readline().strip()
    if not device.startswith("/dev/"):
        raise SystemExit(f"agent.py: {fifo} gave {device!r}, expected a /dev path")
    return device


def set_up_std_fds() -> None:
    """Make stdin /dev/null (the agent never reads it; commands started without stdin
    inherit it: see _spawn.NULL_STDIN) and make sure stdout and stderr are open, so that
    pipes never land on fds 0-2."""
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # lands on fd: every lower one is open


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python3 -S agent.py ...``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    set_up_std_fds()
    os.umask(0o022)
    channel: Channel
    if "device-from" in options:
        channel = DeviceChannel(device_from(options["device-from"]))
    elif "device" in options:
        channel = DeviceChannel(options["device"])
    elif "listen-unix" in options:
        channel = ListenChannel.unix(options["listen-unix"])
    else:
        channel = ListenChannel.vsock(int(options["listen-vsock"]))
    # --listen-unix is the host test mode: the agent then runs on a host, never powers it
    # off and never sets its clock. The other two modes run in a guest.
    agent = Agent(channel, options.get("root", "/"), in_guest="listen-unix" not in options)
    log(f"serving protocol v{protocol.PROTOCOL_VERSION}, root {agent.rootfs.root}")
    try:
        agent.run()
    except KeyboardInterrupt:
        return 130
    if agent.power_off_requested:
        power_off()
    return 0
