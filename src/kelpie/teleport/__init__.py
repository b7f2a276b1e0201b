"""Teleport: move a running sandbox to another host, with nothing lost.

The source's coordinator (:class:`Teleporter`) and the target's receiver
(:class:`TeleportReceiver`) each record every step in a :class:`TeleportJournal` before they
act, and talk only through a :class:`TeleportPeer` (another daemon's REST API, or a
simulated link in the DST). :func:`choose_mode` decides, before anything pauses, which
mode the pair of hosts supports. See :mod:`kelpie.teleport._journal` for the steps and the
commit point.
"""

from kelpie.teleport._host import JOURNAL_FILENAME, TeleportHost
from kelpie.teleport._journal import (
    Incoming,
    Outgoing,
    SourcePhase,
    TargetPhase,
    TeleportJournal,
)
from kelpie.teleport._local import LocalPeer
from kelpie.teleport._modes import ModeChoice, choose_mode
from kelpie.teleport._peer import DaemonPeer, TeleportPeer
from kelpie.teleport._relay import Channel, pipe, relayed, unix_channel
from kelpie.teleport._source import Teleporter
from kelpie.teleport._target import (
    DEFAULT_IDLE,
    DEFAULT_LEASE,
    TeleportReceiver,
    unbindable_ports,
)

__all__ = [
    "DEFAULT_IDLE",
    "DEFAULT_LEASE",
    "JOURNAL_FILENAME",
    "Channel",
    "DaemonPeer",
    "Incoming",
    "LocalPeer",
    "ModeChoice",
    "Outgoing",
    "SourcePhase",
    "TargetPhase",
    "TeleportHost",
    "TeleportJournal",
    "TeleportPeer",
    "TeleportReceiver",
    "Teleporter",
    "choose_mode",
    "pipe",
    "relayed",
    "unbindable_ports",
    "unix_channel",
]
