"""The MCP server's tools: sandboxes for an agent, within the operator's policy.

Every tool talks to a :class:`~kelpie.service.SandboxService` (the daemon's client, or a
runtime in process). The server acts only on sandboxes it made itself (they carry the
``kelpie.mcp`` label), so an agent cannot reach the operator's other sandboxes. Refusals
and failures come back as tool errors that say what was wrong and what is allowed.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from kelpie.api import SandboxCreate
from kelpie.mcp._policy import OWNER_LABEL, McpPolicy, PolicyError
from kelpie.service import SandboxService, SandboxView
from kelpie.vm import ExecExit, ExecOutput, KelpieError, StreamName

T = TypeVar("T")
INSTRUCTIONS = (
    "Kelpie sandboxes are hardware-isolated micro-VMs. Create one from an image or template, "
    "run commands in it (their output streams as progress), move files in and out, "
    "snapshot or fork it, and remove it when done. Only sandboxes made here can be used.")


class SandboxSummary(BaseModel):
    """A sandbox made through this server."""

    id: str
    name: str
    state: str
    image: str | None


class CommandResult(BaseModel):
    """How a command ended and what it printed."""

    exit_code: int
    stdout: str
    stderr: str
    truncated: bool = Field(description="The output was longer than the server keeps.")
    timed_out: bool = False


class FileContent(BaseModel):
    """A file read from a sandbox: UTF-8 text, or base64 for bytes that are not text."""

    path: str
    encoding: Literal["utf-8", "base64"]
    content: str
    size: int


class DirEntry(BaseModel):
    """One entry of a directory listing."""

    name: str
    type: str
    size: int
    mode: str


class SnapshotSummary(BaseModel):
    """A snapshot taken through this server."""

    id: str
    name: str


def make_server(service: SandboxService, policy: McpPolicy) -> MCPServer:
    """An MCP server whose tools act on ``service`` within ``policy``."""
    tools = _Tools(service, policy)
    server = MCPServer("kelpie", instructions=INSTRUCTIONS, log_level="WARNING")
    for tool in (tools.create_sandbox, tools.list_sandboxes, tools.run_command,
                 tools.read_file, tools.write_file, tools.list_files, tools.snapshot_sandbox,
                 tools.fork_sandbox, tools.remove_sandbox):
        server.add_tool(tool)
    return server


class _Tools:
    """The tools (methods, documented for the agent) over one service and policy."""

    def __init__(self, service: SandboxService, policy: McpPolicy) -> None:
        self._service = service
        self._policy = policy

    async def create_sandbox(self, image: str | None = None, template: str | None = None,
                             name: str | None = None, memory_mib: int | None = None,
                             env: dict[str, str] | None = None) -> SandboxSummary:
        """Create and start a sandbox from a stored image or a template (give one).
        Its network is the operator's; memory_mib is capped by the operator."""
        try:
            self._policy.check_source(image, template)
            self._policy.check_room(len(await self._owned()), 1)
            memory = self._policy.memory(memory_mib) if template is None else None
        except PolicyError as exc:
            raise ToolError(str(exc)) from None
        fields: dict[str, Any] = {
            "image": image, "template": template, "name": name, "env": dict(env or {}),
            "labels": {OWNER_LABEL: "1"}}
        if template is None:  # a template's clones keep its settings, network included
            fields.update(memory_mib=memory, network=self._policy.network,
                          allow=list(self._policy.allow))
        created = await self._call(self._service.create(SandboxCreate.from_fields(fields)))
        return _summary(created)

    async def list_sandboxes(self) -> list[SandboxSummary]:
        """The sandboxes made through this server."""
        return [_summary(s) for s in await self._owned()]

    async def run_command(self, sandbox: str, command: str | list[str], ctx: Context,
                          cwd: str | None = None, env: dict[str, str] | None = None,
                          timeout: float = 600, stdin: str | None = None) -> CommandResult:
        """Run a command in a sandbox and wait for it: a string runs under /bin/sh -c, a
        list runs as it is. ``stdin`` is text for its standard input, which then ends
        (without it, the command reads end-of-file at once). Its output streams as
        progress messages while it runs."""
        await self._check_owned(sandbox)
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv:
            raise ToolError("the command is empty")
        limit = self._policy.max_output_bytes
        out, err = bytearray(), bytearray()
        truncated, ended, chunks = False, None, 0
        try:
            async with self._service.exec_stream(sandbox, argv, cwd=cwd, env=env,
                                                 timeout=timeout) as process:
                if stdin:  # the daemon takes it whole, whenever the command reads it
                    await process.write_stdin(stdin.encode())
                await process.close_stdin()
                async for event in process:
                    if isinstance(event, ExecOutput):
                        into = out if event.stream is StreamName.STDOUT else err
                        room = limit - len(into)
                        truncated |= len(event.data) > room
                        into.extend(event.data[:max(room, 0)])
                        chunks += 1
                        await ctx.report_progress(chunks, None,
                                                  event.data.decode(errors="replace"))
                    elif isinstance(event, ExecExit):
                        ended = event
        except KelpieError as exc:
            raise ToolError(f"{shlex.join(argv)}: {exc}") from None
        if ended is None:
            raise ToolError(f"{shlex.join(argv)}: the command's end was not reported")
        return CommandResult(exit_code=ended.exit_code, stdout=out.decode(errors="replace"),
                             stderr=err.decode(errors="replace"), truncated=truncated,
                             timed_out=ended.timed_out)

    async def read_file(self, sandbox: str, path: str) -> FileContent:
        """Read a file from a sandbox (text as UTF-8, other bytes as base64)."""
        await self._check_owned(sandbox)
        data = await self._call(self._service.read_file(sandbox, path))
        if len(data) > self._policy.max_output_bytes:
            raise ToolError(f"{path} is {len(data)} bytes; this server returns files of at "
                            f"most {self._policy.max_output_bytes} bytes")
        try:
            return FileContent(path=path, encoding="utf-8", content=data.decode(),
                               size=len(data))
        except UnicodeDecodeError:
            return FileContent(path=path, encoding="base64",
                               content=base64.b64encode(data).decode(), size=len(data))

    async def write_file(self, sandbox: str, path: str, content: str,
                         encoding: Literal["utf-8", "base64"] = "utf-8",
                         mode: str = "644") -> str:
        """Write a file in a sandbox (content as UTF-8 text or base64); mode in octal."""
        await self._check_owned(sandbox)
        try:
            data = content.encode() if encoding == "utf-8" else base64.b64decode(
                content, validate=True)
            permissions = int(mode, 8)
        except ValueError as exc:
            raise ToolError(f"cannot write {path}: {exc}") from None
        await self._call(self._service.write_file(sandbox, path, data, mode=permissions))
        return f"wrote {len(data)} bytes to {path}"

    async def list_files(self, sandbox: str, path: str) -> list[DirEntry]:
        """List a directory of a sandbox."""
        await self._check_owned(sandbox)
        entries = await self._call(self._service.list_dir(sandbox, path))
        return [DirEntry(name=e.name, type=e.type, size=e.size, mode=f"{e.mode:o}")
                for e in entries]

    async def snapshot_sandbox(self, sandbox: str, name: str | None = None) -> SnapshotSummary:
        """Snapshot a running sandbox (memory and disk); it goes on running."""
        await self._check_owned(sandbox)
        made = await self._call(self._service.snapshot(sandbox, name=name))
        return SnapshotSummary(id=made.id, name=made.name)

    async def fork_sandbox(self, sandbox: str, count: int = 1) -> list[SandboxSummary]:
        """Fork a running sandbox into count copies of it as it is now (memory and disk);
        each counts toward the operator's limit."""
        await self._check_owned(sandbox)
        try:
            self._policy.check_room(len(await self._owned()), count)
        except PolicyError as exc:
            raise ToolError(str(exc)) from None
        children = await self._call(self._service.fork(sandbox, count))
        return [_summary(c) for c in children]

    async def remove_sandbox(self, sandbox: str) -> str:
        """Stop and remove a sandbox made through this server."""
        await self._check_owned(sandbox)
        await self._call(self._service.remove(sandbox, force=True))
        return f"removed {sandbox}"

    # ---- ownership --------------------------------------------------------------------

    async def _owned(self) -> Sequence[SandboxView]:
        listed = await self._call(self._service.list_sandboxes(all=True))
        return [s for s in listed if s.labels.get(OWNER_LABEL) == "1"]

    async def _check_owned(self, ref: str) -> None:
        found = await self._call(self._service.inspect(ref))
        if found.labels.get(OWNER_LABEL) != "1":
            raise ToolError(f"sandbox {ref} was not made through this MCP server; it acts "
                            "only on its own sandboxes (list_sandboxes shows them)")

    @staticmethod
    async def _call(work: Awaitable[T]) -> T:
        """Await ``work``; a Kelpie error becomes a tool error with its message."""
        try:
            return await work
        except KelpieError as exc:
            raise ToolError(str(exc)) from None


def _summary(sandbox: SandboxView) -> SandboxSummary:
    return SandboxSummary(id=sandbox.id, name=sandbox.name, state=sandbox.state,
                          image=sandbox.image)
