"""QemuVm: a real micro-VM under QEMU (``microvm`` machine, KVM when proven, else TCG).

The guest's commands and files go through the guest agent (:class:`kelpie.agent.AgentVm`);
QEMU's own parts are split by concern: the process, its launch and QMP
(:mod:`._machine`), re-attaching and undoing an interrupted snapshot (:mod:`._attach`),
snapshots (:mod:`._save`) and restores (:mod:`._restore`).
"""

from __future__ import annotations

from typing import Any

from kelpie.agent import ProcessWatch, log_tail
from kelpie.agent import read_vm_record as _read_record
from kelpie.backends.qemu._attach import QemuAttach
from kelpie.backends.qemu._host import qemu_version as _qemu_version
from kelpie.backends.qemu._host import start_failure_reason
from kelpie.backends.qemu._machine import SNAPSHOT_MARKER, QemuMachine
from kelpie.backends.qemu._restore import QemuRestores
from kelpie.backends.qemu._save import QemuSnapshots
from kelpie.vm import VmConfig

__all__ = [
    "SNAPSHOT_MARKER",
    "ProcessWatch",
    "QemuVm",
    "_qemu_version",
    "console_tail",
    "make_qemu",
    "read_vm_record",
    "start_failure_reason",
]


class QemuVm(QemuAttach, QemuSnapshots, QemuRestores):
    """A micro-VM run by QEMU: boot, attach, snapshots and restores; guest work via its agent."""


def read_vm_record(directory: Any, vm_id: str) -> VmConfig:
    """The configuration saved in a QEMU VM directory's ``config.json``."""
    return _read_record(directory, vm_id, QemuMachine.backend_name)


def console_tail(workdir: Any) -> str:
    """The last lines of the guest console and QEMU's own log."""
    return log_tail(workdir, QemuMachine.vmm_logs)


def make_qemu(config: VmConfig, **options: Any) -> QemuVm:
    """Factory hook for the backend registry."""
    return QemuVm(config, **options)
