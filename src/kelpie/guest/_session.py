"""The host's session: hello opens it, requests run in it, a lost host ends it."""

from __future__ import annotations

import os
import time

from ._common import FT, OpError, ProtocolError, log, protocol
from ._exec import Exec
from ._system import read_boot_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from ._common import Handler
    from ._execs import ExecManager
    from ._files import Download, FileService, Upload
    from ._link import HostLink


class Session:
    """Routes the host's frames to their handlers and tracks the requests in flight.

    Nothing but hello is served before hello opens the session; every failed
    request becomes an ERROR frame. When the host goes away (or says hello
    again) the session ends: file transfers are aborted and execs detach.
    """

    def __init__(
        self,
        link: HostLink,
        requests: dict[int, Exec | Upload | Download],
        execs: ExecManager,
        files: FileService,
        root: str,
        handlers: Mapping[str, Handler],
    ) -> None:
        self.link = link
        self.requests = requests
        self.execs = execs
        self.files = files
        self.root = root
        self.open = False
        self.handlers: dict[str, Handler] = {
            "hello": self.op_hello,
            "ping": self.op_ping,
            "cancel": self.op_cancel,
            **handlers,
        }

    def on_frame(self, frame: protocol.Frame) -> None:
        """Dispatch one frame from the host."""
        if frame.ftype == FT.REQUEST:
            self.on_request(frame)
        elif frame.ftype == FT.STDIN:
            self.execs.on_stdin(frame)
        elif frame.ftype == FT.FILE_DATA:
            self.files.on_file_data(frame)
        else:
            kind = FT.name(frame.ftype)
            self.link.send_error(
                0, "EPROTO", f"{kind} frame (request {frame.request_id}) only flows agent -> host"
            )

    def on_request(self, frame: protocol.Frame) -> None:
        """Validate and run one request; every failure becomes an ERROR frame."""
        rid = frame.request_id
        try:
            if rid == 0:
                raise ProtocolError("request id 0 is reserved for connection-level errors")
            if rid in self.requests:
                raise ProtocolError(f"request id {rid} is already in use", "EBUSY")
            op, fields = protocol.parse_request(frame.json())
            if op != "hello" and not self.open:
                raise ProtocolError(f"{op}: send hello first to open a session")
            reply = self.handlers[op](rid, fields)
        except ProtocolError as exc:
            self.link.send_error(rid, exc.code, exc.message)
        except OpError as exc:
            self.link.send_error(rid, exc.code, exc.message)
        except OSError as exc:
            err = OpError.from_os(exc, "request failed")
            self.link.send_error(rid, err.code, err.message)
        except Exception as exc:  # a bug must cost one request, not the agent
            log(f"internal error in request {rid}: {exc!r}")
            self.link.send_error(rid, "EIO", f"internal agent error: {exc!r}")
        else:
            if reply is not None:
                self.link.send_json(FT.REPLY, rid, reply)

    def end(self) -> None:
        """Close the session's requests; its execs keep running, detached."""
        self.open = False
        for req in self.requests.values():
            if isinstance(req, Exec):
                self.execs.detach(req)
            else:
                req.abort()
        self.requests.clear()
        self.execs.evict_finished()

    # -- ops -------------------------------------------------------------------

    def op_hello(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Open a session (ending any previous one) and describe the agent."""
        if f["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                f"host speaks protocol version {f['version']}, this agent speaks version "
                f"{protocol.PROTOCOL_VERSION}: install the agent that ships with the host's "
                "kelpie (protocol.py and the guest/ package) into the guest image",
                "EPROTONOSUPPORT",
            )
        if self.open:
            self.end()
        self.link.discard_queued()
        self.open = True
        return {
            "version": protocol.PROTOCOL_VERSION,
            "agent_pid": os.getpid(),
            "boot_id": read_boot_id(),
            "hostname": os.uname().nodename,
            "root": self.root,
            "time_ns": time.time_ns(),
            "execs": self.execs.infos(),
        }

    def op_ping(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Liveness check."""
        return {"time_ns": time.time_ns()}

    def op_cancel(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Abort a file transfer, or kill an exec (its exit status still follows)."""
        req = self.requests.get(f["target"])
        if req is None:
            return {"cancelled": False}
        if isinstance(req, Exec):
            req.kill_group()
        else:
            req.abort()
            del self.requests[req.request_id]
            self.link.send_error(req.request_id, "ECANCELED", "cancelled by the host")
        return {"cancelled": True}
