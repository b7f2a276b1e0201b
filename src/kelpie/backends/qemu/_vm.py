"""QemuVm: a real micro-VM under QEMU (``microvm`` machine, KVM when proven, else TCG).

The guest's commands and files go through the guest agent (:class:`kelpie.agent.AgentVm`);
QEMU's own parts are split by concern, one class per module, each a :class:`QemuMachine`:

* :mod:`._machine`: the QEMU process, its launch and QMP channel, pause, resume and stop
  (and the VM directory's layout);
* :mod:`._attach`: finding a QEMU another process started, and undoing the full snapshot
  that process was taking when it died;
* :mod:`._save`: full (QMP migration to a file) and disk (overlay) snapshots;
* :mod:`._restore`: restoring full, disk and checkpoint snapshots;
* :mod:`._host`, :mod:`._cmdline`, :mod:`._migration`, :mod:`._snapshot`: what the classes
  use (QEMU's version and identity, its command line, the QMP sequences, the snapshot
  record).
"""

from __future__ import annotations

from kelpie.backends.qemu._attach import QemuAttach
from kelpie.backends.qemu._restore import QemuRestores
from kelpie.backends.qemu._save import QemuSnapshots


class QemuVm(QemuAttach, QemuSnapshots, QemuRestores):
    """A micro-VM run by QEMU: boot, attach, snapshots and restores; guest work via its agent."""
