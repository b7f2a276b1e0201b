"""The fleet's client, from any Ray task or actor or any process that can join the cluster:
:class:`Fleet` (blocking) and :class:`AsyncFleet`. A sandbox it hands out is the SDK's own
:class:`~kelpie.sdk.Sandbox` (or :class:`~kelpie.sdk.AsyncSandbox`), bound to the daemon of
the host the sandbox is on."""

from __future__ import annotations

import builtins
from typing import Any, NoReturn, Self

import ray

from kelpie.api import SandboxCreate
from kelpie.fleet._coordinator import DEFAULT_LOST_AFTER, FleetError
from kelpie.fleet._model import FleetEvent, FleetHost, FleetSandbox
from kelpie.fleet._ray import (
    DEFAULT_INTERVAL,
    DEFAULT_PORT,
    connect_ray,
    controller,
    start_controller,
)
from kelpie.sdk import AsyncSandbox, Sandbox


class AsyncFleet:
    """The fleet, driven with ``await``. Get one with :meth:`connect` (or :meth:`up`)."""

    def __init__(self, handle: Any, token: str) -> None:
        self._controller = handle
        self._token = token

    @classmethod
    async def connect(cls, address: str | None = None) -> Self:
        """The fleet of the Ray cluster at ``address`` (None: this process's, or ``auto``)."""
        connect_ray(address)
        handle = controller()
        return cls(handle, await handle.token.remote())

    @classmethod
    async def up(cls, address: str | None = None, *, port: int = DEFAULT_PORT,
                 interval: float = DEFAULT_INTERVAL, lost_after: float = DEFAULT_LOST_AFTER,
                 memory_mib: int | None = None) -> Self:
        """Start the fleet (a no-op if it runs): its controller, and a host agent and
        daemon (TCP ``port``) on every node with the ``kelpie_host`` resource."""
        connect_ray(address)
        handle = start_controller(port=port, interval=interval, lost_after=lost_after,
                                  memory_mib=memory_mib)
        await handle.start.remote()
        return cls(handle, await handle.token.remote())

    async def create(self, image: str | None = None, **options: Any) -> AsyncSandbox:
        """Place a sandbox on a host and create it there; ``options`` are
        :class:`~kelpie.api.SandboxCreate`'s fields (template, name, memory_mib, cpus...)."""
        placed: FleetSandbox = await self._controller.create.remote(
            SandboxCreate(image=image, **options))
        return await self._attach(placed)

    async def get(self, ref: str) -> AsyncSandbox:
        """A sandbox of the fleet by name or id, on whichever host it is now."""
        return await self._attach(await self.info(ref))

    async def info(self, ref: str) -> FleetSandbox:
        """Where a sandbox is and how it stands."""
        found: FleetSandbox = await self._controller.get.remote(ref)
        return found

    async def list(self) -> builtins.list[FleetSandbox]:
        """Every sandbox of the fleet."""
        found: builtins.list[FleetSandbox] = await self._controller.sandboxes.remote()
        return found

    async def hosts(self) -> builtins.list[FleetHost]:
        """Every host, with its capacity and status."""
        found: builtins.list[FleetHost] = await self._controller.hosts.remote()
        return found

    async def events(self) -> builtins.list[FleetEvent]:
        """What the fleet did and saw, oldest first."""
        found: builtins.list[FleetEvent] = await self._controller.events.remote()
        return found

    async def remove(self, ref: str) -> None:
        """Remove a sandbox from its host and the fleet."""
        await self._controller.remove.remote(ref)

    async def drain(self, host: str) -> builtins.list[FleetSandbox]:
        """Stop placing on ``host`` and teleport its sandboxes to other hosts."""
        moved: builtins.list[FleetSandbox] = await self._controller.drain.remote(host)
        return moved

    async def undrain(self, host: str) -> None:
        """Place on ``host`` again."""
        await self._controller.undrain.remote(host)

    async def _attach(self, placed: FleetSandbox) -> AsyncSandbox:
        if placed.id is None or placed.address is None:
            raise_not_ready(placed)
        return await AsyncSandbox.attach(placed.id, daemon=placed.address, token=self._token)


class Fleet:
    """The fleet with blocking methods (the same as :class:`AsyncFleet`'s); usable in Ray
    tasks and actors. Get one with ``Fleet()`` (the cluster this process is in) or
    :meth:`up`."""

    def __init__(self, address: str | None = None) -> None:
        connect_ray(address)
        self._controller = controller()
        self._token: str = ray.get(self._controller.token.remote())

    @classmethod
    def up(cls, address: str | None = None, *, port: int = DEFAULT_PORT,
           interval: float = DEFAULT_INTERVAL, lost_after: float = DEFAULT_LOST_AFTER,
           memory_mib: int | None = None) -> Fleet:
        """Start the fleet (see :meth:`AsyncFleet.up`)."""
        connect_ray(address)
        handle = start_controller(port=port, interval=interval, lost_after=lost_after,
                                  memory_mib=memory_mib)
        ray.get(handle.start.remote())
        return cls(address)

    def create(self, image: str | None = None, **options: Any) -> Sandbox:
        """Place and create a sandbox (see :meth:`AsyncFleet.create`)."""
        placed = ray.get(self._controller.create.remote(SandboxCreate(image=image, **options)))
        return self._attach(placed)

    def get(self, ref: str) -> Sandbox:
        """A sandbox of the fleet by name or id, on whichever host it is now."""
        return self._attach(self.info(ref))

    def info(self, ref: str) -> FleetSandbox:
        """Where a sandbox is and how it stands."""
        found: FleetSandbox = ray.get(self._controller.get.remote(ref))
        return found

    def list(self) -> builtins.list[FleetSandbox]:
        """Every sandbox of the fleet."""
        found: builtins.list[FleetSandbox] = ray.get(self._controller.sandboxes.remote())
        return found

    def hosts(self) -> builtins.list[FleetHost]:
        """Every host, with its capacity and status."""
        found: builtins.list[FleetHost] = ray.get(self._controller.hosts.remote())
        return found

    def problems(self) -> dict[str, str]:
        """Nodes whose host agent could not start, with why."""
        found: dict[str, str] = ray.get(self._controller.problems.remote())
        return found

    def events(self) -> builtins.list[FleetEvent]:
        """What the fleet did and saw, oldest first."""
        found: builtins.list[FleetEvent] = ray.get(self._controller.events.remote())
        return found

    def refresh(self) -> builtins.list[FleetHost]:
        """Look for hosts and ask each for a report now; the hosts after."""
        found: builtins.list[FleetHost] = ray.get(self._controller.refresh.remote())
        return found

    def remove(self, ref: str) -> None:
        """Remove a sandbox from its host and the fleet."""
        ray.get(self._controller.remove.remote(ref))

    def drain(self, host: str) -> builtins.list[FleetSandbox]:
        """Stop placing on ``host`` and teleport its sandboxes to other hosts."""
        moved: builtins.list[FleetSandbox] = ray.get(self._controller.drain.remote(host))
        return moved

    def undrain(self, host: str) -> None:
        """Place on ``host`` again."""
        ray.get(self._controller.undrain.remote(host))

    def _attach(self, placed: FleetSandbox) -> Sandbox:
        if placed.id is None or placed.address is None:
            raise_not_ready(placed)
        return Sandbox.attach(placed.id, daemon=placed.address, token=self._token)


def raise_not_ready(placed: FleetSandbox) -> NoReturn:
    raise FleetError(f"sandbox {placed.name} is {placed.status.value} on host {placed.host}"
                     f"{': ' + placed.reason if placed.reason else ''}; it has no handle yet")
