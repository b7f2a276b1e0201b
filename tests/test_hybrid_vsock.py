"""Reaching the guest agent through a VMM's hybrid vsock (Firecracker's ``CONNECT``/``OK``).

A bridge here plays the VMM's side of the unix socket: it reads ``CONNECT <port>``, answers
``OK <n>`` and carries the bytes to the real guest agent (run on the host, listening on a
unix socket); or, as a VMM does while the guest boots, closes the connection because nothing
listens on the port yet; or refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kelpie.agent import AgentClient, AgentConnectError
from test_agent import AgentProcess

PORT = 1024


@contextlib.asynccontextmanager
async def bridge(path: Path, agent: Path | None, *, boot_closes: int = 0,
                 answer: bytes | None = None) -> AsyncIterator[list[bytes]]:
    """The VMM's side: ``boot_closes`` connections closed first (the guest still boots),
    then ``answer`` (default ``OK``) and, after OK, the agent's socket. Yields the CONNECT
    lines received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readline())
        if len(received) <= boot_closes or agent is None:
            writer.close()
            return
        if answer is not None:
            writer.write(answer)
            await writer.drain()
            writer.close()
            return
        inner_reader, inner_writer = await asyncio.open_unix_connection(str(agent))
        writer.write(b"OK 1073741824\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))

    server = await asyncio.start_unix_server(serve, str(path))
    async with server:
        yield received


@pytest.fixture
def agent(tmp_path: Path) -> AgentProcess:
    process = AgentProcess(tmp_path / "agent.sock")
    yield process  # type: ignore[misc]
    process.stop()


async def test_the_agent_answers_through_connect_and_ok(tmp_path: Path,
                                                        agent: AgentProcess) -> None:
    async with bridge(tmp_path / "v.sock", agent.sock, boot_closes=2) as received:
        client = await AgentClient.connect_hybrid_vsock(str(tmp_path / "v.sock"), PORT,
                                                        timeout=10)
        info = await client.hello(timeout=10)
        assert info.agent_pid == agent.proc.pid
        await client.close()
    assert received == [f"CONNECT {PORT}\n".encode()] * 3  # two while it "booted"


async def test_a_refusal_is_reported_at_once(tmp_path: Path) -> None:
    async with bridge(tmp_path / "v.sock", tmp_path / "none", answer=b"NOPE\n") as received:
        with pytest.raises(AgentConnectError, match=r"answered CONNECT 1024 with b'NOPE\\n'"):
            await AgentClient.connect_hybrid_vsock(str(tmp_path / "v.sock"), PORT, timeout=10)
    assert len(received) == 1


async def test_nothing_listening_times_out_naming_the_socket_and_port(tmp_path: Path) -> None:
    async with bridge(tmp_path / "v.sock", None):
        with pytest.raises(AgentConnectError, match=r"vsock port 1024 through .*v\.sock"):
            await AgentClient.connect_hybrid_vsock(str(tmp_path / "v.sock"), PORT,
                                                   timeout=0.5)
    with pytest.raises(AgentConnectError, match="FileNotFoundError"):
        await AgentClient.connect_hybrid_vsock(str(tmp_path / "absent.sock"), PORT,
                                               timeout=0.3)
