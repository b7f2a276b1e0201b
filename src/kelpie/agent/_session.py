"""AgentSession: one VM's connection to its guest agent, kept ready across agent restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kelpie.agent._client import AgentClient
from kelpie.agent._errors import AgentClientError, AgentDisconnected, AgentRestarted
from kelpie.agent._tasks import cancel_and_wait
from kelpie.agent._types import AgentInfo, ClientState

logger = logging.getLogger(__name__)

AGENT_RETURN_TIMEOUT = 60.0
"""Seconds a restarted (or unreachable) agent has to answer a new hello, and a busy agent
to answer a probe, before it is reported lost. The guest's init restarts a dead agent at
once (after 1 s if it ran for less than 2 s); Python starts in ~1.5 s under TCG."""
PROBE_INTERVAL = 5.0
"""Seconds between pings while requests are open: over virtio-serial a dead agent is
silent, and only a request answered by its successor reveals that it died."""

Connect = Callable[[float], Awaitable[AgentClient]]
"""Opens a new byte stream to the agent within the given seconds (the backend's part)."""


class AgentSession:
    """Keeps one ready connection to a guest agent: connects, says hello, says it again to
    an agent that restarted, and probes a busy agent so requests to a dead one do not hang."""

    def __init__(
        self,
        connect: Connect,
        *,
        may_probe: Callable[[], bool] = lambda: True,
        return_timeout: float = AGENT_RETURN_TIMEOUT,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self._connect = connect
        self._may_probe = may_probe
        self.return_timeout = return_timeout
        self.probe_interval = probe_interval
        self.client: AgentClient | None = None
        self._greeted_pid: int | None = None
        """The pid of the last agent that answered a hello: a later one is a restart."""
        self.restarts = 0
        """How many times a new agent was found and greeted."""
        self._handshake = asyncio.Lock()
        self._probe: asyncio.Task[None] | None = None

    @property
    def info(self) -> AgentInfo | None:
        """The hello reply of the agent the connection talks to now (None before a hello,
        and once that agent is known to have been replaced, until the next hello)."""
        return self.client.info if self.client is not None else None

    @property
    def ready(self) -> bool:
        """Whether the connection is open and has said hello to the agent now running."""
        return self.client is not None and self.client.state is ClientState.READY

    async def connect(self, timeout: float) -> AgentClient:
        """Open a new connection (no hello yet), closing any earlier one."""
        await self.close()
        self.use(await self._connect(timeout))
        assert self.client is not None
        return self.client

    def use(self, client: AgentClient) -> None:
        """Adopt a connected client (hello not said yet); probe it while requests are open."""
        self.client = client
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_while_open(client), name="kelpie-agent-probe"
        )

    async def hello(self, timeout: float | None = None) -> AgentInfo:
        """Say hello on the current connection; its reply lists the agent's execs."""
        if self.client is None:
            raise AgentDisconnected("hello: there is no connection to the agent")
        async with self._handshake:
            info = await self.client.hello(timeout=timeout)
        self._greeted_pid = info.agent_pid
        return info

    async def ready_client(self) -> AgentClient:
        """The client, after a new hello (on a new connection if the old one ended) when
        the agent restarted; :class:`AgentDisconnected` if it does not come back in time."""
        client = self.client
        if client is not None and client.state is ClientState.READY:
            return client
        async with self._handshake:
            client = self.client
            if client is not None and client.state is ClientState.READY:
                return client
            was = self._greeted_pid
            try:
                async with asyncio.timeout(self.return_timeout):
                    if client is None or client.state is ClientState.CLOSED:
                        await self._stop_probe()
                        client = await self._connect(self.return_timeout)
                        self.use(client)
                    info = await client.hello()
            except TimeoutError:
                raise AgentDisconnected(
                    f"the guest agent did not answer a new hello within "
                    f"{self.return_timeout:g}s after its connection or session ended; it is "
                    f"lost (is the guest's init still restarting it? see the console log)"
                ) from None
            except AgentClientError as exc:
                raise AgentDisconnected(f"the guest agent is lost: {exc}") from exc
            self._greeted_pid = info.agent_pid
        if was is not None and was != info.agent_pid:  # not just a new connection
            self.restarts += 1
            logger.warning("said hello to a new guest agent (pid %s, was %s)", info.agent_pid, was)
        return client

    async def close(self) -> None:
        """Close the connection; its open requests fail with AgentDisconnected."""
        await self._stop_probe()
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    async def _stop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            await cancel_and_wait(probe)

    async def _probe_while_open(self, client: AgentClient) -> None:
        """Ping while requests are open: a new agent answers 'send hello first', which fails
        the old agent's requests (see AgentClient); silence past the bound gives it up."""
        while client.state is not ClientState.CLOSED:
            await asyncio.sleep(self.probe_interval)
            if client.state is not ClientState.READY or not client.open_requests:
                continue
            if not self._may_probe():
                continue
            try:
                async with asyncio.timeout(self.return_timeout):
                    await client.ping()
            except AgentRestarted:
                continue  # the client failed the old agent's requests; next call says hello
            except AgentClientError:
                return
            except TimeoutError:
                if self._may_probe():  # not paused meanwhile: the agent is silent
                    client.abort(
                        f"the guest agent did not answer a ping within "
                        f"{self.return_timeout:g}s while requests were open: it is lost"
                    )
                    return
