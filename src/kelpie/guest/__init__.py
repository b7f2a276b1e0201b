"""Kelpie's guest agent: serves the wire protocol of ``protocol.py`` inside the VM.

Standard library only, and only modules that a trimmed guest interpreter has and imports
quickly. In the guest this package is ``/kelpie/guest/`` (imported as ``guest``) beside
``/kelpie/protocol.py``, started by ``agent.py``; on the host it is ``kelpie.guest``.

Design
------
* One thread, one ``select.poll`` loop (``Agent``). Nothing in the loop blocks on the
  host channel: outgoing frames queue in memory and are written with O_NONBLOCK
  (``HostLink``); child output pipes are not read while more than HIGH_WATER bytes wait
  to go out, so a slow host slows the children down instead of growing the agent
  without bound.
* The agent outlives host connections. On virtio-serial, POLLHUP means "no host is
  connected": the agent stops polling the port, checks again every RECHECK_INTERVAL
  and keeps running execs (``DeviceChannel``). In socket modes it accepts the next
  connection (a new connection replaces the current one; ``ListenChannel``). Execs of a
  finished ``Session`` are *detached*: they keep running (their output waits in the
  kernel pipe) until a host attaches to them or they are evicted (``ExecManager``).
* ``--root DIR``: commands run chrooted into DIR and file operations resolve paths inside
  it (symlinks are followed as if DIR were "/"; ``RootFS``). The VM is the security
  boundary; the chroot only gives images their own filesystem, so the agent itself needs
  nothing from the image (not even Python).

Modules, each one job: ``_main`` (command line), ``_agent`` (the loop), ``_channel``
(where hosts connect), ``_link`` (frames in and out), ``_session`` (hello, routing,
errors, cancel), ``_execs`` and ``_exec`` (commands), ``_spawn`` (starting them),
``_files`` (file ops), ``_rootfs`` (paths and users), ``_system`` (resync, power-off),
``_common`` (the protocol, OpError, limits), ``_lean`` (signal, partial and deque from
their C modules: the agent's imports are on every boot's path).
"""

from ._agent import Agent
from ._channel import Channel, DeviceChannel, ListenChannel
from ._common import OpError
from ._execs import ExecManager
from ._files import FileService
from ._link import HostLink
from ._main import main
from ._rootfs import RootFS
from ._session import Session
from ._spawn import SpawnPlan, spawn

__all__ = [
    "Agent",
    "Channel",
    "DeviceChannel",
    "ExecManager",
    "FileService",
    "HostLink",
    "ListenChannel",
    "OpError",
    "RootFS",
    "Session",
    "SpawnPlan",
    "main",
    "spawn",
]
