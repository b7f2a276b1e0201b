"""The agent client's errors: Kelpie :class:`~kelpie.AgentError`\\ s, named by what went wrong.

::

    AgentError (kelpie._exceptions)
     +-- AgentClientError         raised by AgentClient; AgentVm adds the VM and translates
          +-- AgentConnectError   the agent socket could not be reached in time
          +-- AgentDisconnected   the stream ended; every pending request fails
          |    +-- AgentRestarted a new agent answers: the old one's requests are lost
          +-- AgentProtocolError  the peer broke the protocol, or misuse
          |    +-- AgentVersionError
          +-- AgentRemoteError    the agent refused a request (.code: "ENOENT"...)
"""

from __future__ import annotations

from kelpie._exceptions import AgentError


class AgentClientError(AgentError):
    """Base of the errors :class:`~kelpie.agent.AgentClient` raises."""


class AgentConnectError(AgentClientError):
    """The agent's socket could not be connected to (or did not answer) in time."""


class AgentDisconnected(AgentClientError):
    """The connection to the agent ended; the request's outcome is unknown."""


class AgentRestarted(AgentDisconnected):
    """The agent at the other end is not the one the session said hello to (it was killed
    and the guest's init started a new one).

    ``refused`` is true for a request the new agent refused (it never ran: safe to send
    again after a new hello); false for one the old agent had taken (its outcome is lost).
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class AgentProtocolError(AgentClientError):
    """The agent sent something the protocol does not allow, or the client was misused."""


class AgentVersionError(AgentProtocolError):
    """Host and guest agent speak different protocol versions."""


class AgentRemoteError(AgentClientError):
    """The agent refused or failed a request.

    ``code`` is an errno-style name (``ENOENT``, ``EACCES``, ``EISDIR``...,
    or ``EPROTO`` for a malformed request), ``message`` the agent's words.
    """

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message
