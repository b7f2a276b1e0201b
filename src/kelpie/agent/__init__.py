"""The host side of the guest agent, shared by every backend whose guest runs it.

* :class:`AgentClient` speaks :mod:`kelpie.protocol` over one byte stream to one agent;
  :class:`AgentSession` keeps a VM's client ready (hello, a new hello after the agent
  restarted, probes while requests are open).
* :class:`AgentVm` implements every guest operation of :class:`~kelpie.vm.VmInstance`
  through it; a backend supplies the stream, its VMM lifecycle and its snapshots.
* :class:`ProcessVm` adds a VMM that is one detached host process in a VM directory
  (:func:`spawn_in_new_session`, :class:`ProcessWatch`, the ``config.json`` record, the
  re-attach skeleton).

The client's errors derive from :class:`kelpie.AgentError` (see :mod:`._errors`); its exit
status (:class:`ExitStatus`) is the agent's report, which :class:`AgentProcess` turns into
:class:`kelpie.vm.ExecExit`.
"""

from kelpie.agent._client import AgentClient
from kelpie.agent._connection import NO_SESSION, AgentConnection, is_no_session
from kelpie.agent._errors import (
    AgentClientError,
    AgentConnectError,
    AgentDisconnected,
    AgentProtocolError,
    AgentRemoteError,
    AgentRestarted,
    AgentVersionError,
)
from kelpie.agent._handle import ExecHandle
from kelpie.agent._process import AgentProcess, FinishedProcess
from kelpie.agent._session import AGENT_RETURN_TIMEOUT, PROBE_INTERVAL, AgentSession
from kelpie.agent._supervised import BootTimedOut, ProcessVm, VmmGone
from kelpie.agent._types import (
    AgentInfo,
    ClientState,
    DirEntry,
    ExecInfo,
    ExitStatus,
    FileStat,
    HandleEvent,
    ResyncResult,
)
from kelpie.agent._vm import AgentVm
from kelpie.agent._vmdir import (
    VM_ID_PATTERN,
    check_vm_id,
    launch_record,
    log_tail,
    read_vm_record,
    write_vm_record,
)
from kelpie.agent._vmm import ProcessWatch, spawn_in_new_session

__all__ = [
    "AGENT_RETURN_TIMEOUT",
    "NO_SESSION",
    "PROBE_INTERVAL",
    "VM_ID_PATTERN",
    "AgentClient",
    "AgentClientError",
    "AgentConnectError",
    "AgentConnection",
    "AgentDisconnected",
    "AgentInfo",
    "AgentProcess",
    "AgentProtocolError",
    "AgentRemoteError",
    "AgentRestarted",
    "AgentSession",
    "AgentVersionError",
    "AgentVm",
    "BootTimedOut",
    "ClientState",
    "DirEntry",
    "ExecHandle",
    "ExecInfo",
    "ExitStatus",
    "FileStat",
    "FinishedProcess",
    "HandleEvent",
    "ProcessVm",
    "ProcessWatch",
    "ResyncResult",
    "VmmGone",
    "check_vm_id",
    "is_no_session",
    "launch_record",
    "log_tail",
    "read_vm_record",
    "spawn_in_new_session",
    "write_vm_record",
]
