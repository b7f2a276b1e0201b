"""The fleet's client, from any Ray task or actor or any process that can join the cluster:
:class:`Fleet` (blocking) and :class:`AsyncFleet`. A sandbox it hands out is the SDK's own
:class:`~kelpie.sdk.Sandbox` (or :class:`~kelpie.sdk.AsyncSandbox`), bound to the daemon of
the host the sandbox is on."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, NoReturn, Self

from kelpie._units import optional_mib
from kelpie.api import SandboxCreate, TemplateCreate
from kelpie.fleet._coordinator import DEFAULT_LOST_AFTER, FleetError
from kelpie.fleet._model import FleetEvent, FleetHost, FleetSandbox, Recovery
from kelpie.fleet._ray import (
    DEFAULT_INTERVAL,
    DEFAULT_PORT,
    answer,
    connect_ray,
    controller,
    get,
    start_controller,
)
from kelpie.fleet._store import StoreConfig
from kelpie.sdk import AsyncSandbox, Sandbox

CONTROLLER_NAME = "the fleet's controller"


class AsyncFleet:
    """The fleet, driven with ``await``. Get one with :meth:`connect` (or :meth:`up`)."""

    def __init__(self, handle: Any, token: str) -> None:
        self._controller = handle
        self._token = token

    async def _ask(self, method: str, *args: Any) -> Any:
        return await answer(getattr(self._controller, method).remote(*args), CONTROLLER_NAME)

    @classmethod
    async def connect(cls, address: str | None = None) -> Self:
        """The fleet of the Ray cluster at ``address`` (None: this process's, or ``auto``)."""
        connect_ray(address)
        handle = controller()
        return cls(handle, await answer(handle.token.remote(), CONTROLLER_NAME))

    @classmethod
    async def up(cls, address: str | None = None, *, port: int = DEFAULT_PORT,
                 interval: float = DEFAULT_INTERVAL, lost_after: float = DEFAULT_LOST_AFTER,
                 memory_mib: int | None = None, store: StoreConfig | None = None,
                 insecure_registries: Sequence[str] = ()) -> Self:
        """Start the fleet (a no-op if it runs): its controller, and a host agent and
        daemon (TCP ``port``) on every node with the ``kelpie_host`` resource. ``store``:
        the S3-compatible store templates (:meth:`share_template`) and saved states go
        through; ``insecure_registries``: registries (HOST:PORT) a host may pull a
        template's image from over plain HTTP."""
        connect_ray(address)
        handle = start_controller(port=port, interval=interval, lost_after=lost_after,
                                  memory_mib=memory_mib, store=store,
                                  insecure_registries=insecure_registries)
        await answer(handle.start.remote(), CONTROLLER_NAME)
        return cls(handle, await answer(handle.token.remote(), CONTROLLER_NAME))

    async def create(self, image: str | None = None, *, host: str | None = None,
                     recover: str | None = None, recover_interval: float = 60.0,
                     **options: Any) -> AsyncSandbox:
        """Place a sandbox on a host (``host``: that one) and create it there; ``options``
        are :class:`~kelpie.api.SandboxCreate`'s fields (template, name, memory_mib...).

        ``recover``: ``"checkpoint"`` (its workspace and env) or ``"snapshot"`` (its whole
        running state) saved to the shared store every ``recover_interval`` seconds; when
        its host is lost, it comes back on another host from the latest one."""
        placed: FleetSandbox = await self._ask(
            "create", SandboxCreate(image=image, **options), host,
            _recovery(recover, recover_interval))
        return await self._attach(placed)

    async def create_template(self, name: str, image: str | None = None, *,
                              memory: int | str | None = None, **options: Any,
                              ) -> list[str]:
        """Make template ``name`` on every up host (``options``: :class:`TemplateCreate`'s
        fields); the hosts that have it. FleetError naming each host where it failed."""
        request = TemplateCreate(name=name, image=image,
                                 memory_mib=optional_mib(memory, "memory"), **options)
        return _made(await self._ask("create_template", request), name)

    async def share_template(self, name: str) -> builtins.list[str]:
        """Push template ``name`` from a host holding it to the shared store and pull it
        (sha256-verified) onto every other host; the hosts that have it."""
        return _made(await self._ask("share_template", name), name)

    async def pull_template(self, name: str) -> builtins.list[str]:
        """Pull template ``name`` as the shared store has it onto every host lacking it."""
        return _made(await self._ask("pull_template", name), name)

    async def get(self, ref: str) -> AsyncSandbox:
        """A sandbox of the fleet by name or id, on whichever host it is now."""
        return await self._attach(await self.info(ref))

    async def info(self, ref: str) -> FleetSandbox:
        """Where a sandbox is and how it stands."""
        found: FleetSandbox = await self._ask("get", ref)
        return found

    async def list(self) -> builtins.list[FleetSandbox]:
        """Every sandbox of the fleet."""
        found: builtins.list[FleetSandbox] = await self._ask("sandboxes")
        return found

    async def hosts(self) -> builtins.list[FleetHost]:
        """Every host, with its capacity and status."""
        found: builtins.list[FleetHost] = await self._ask("hosts")
        return found

    async def events(self) -> builtins.list[FleetEvent]:
        """What the fleet did and saw, oldest first."""
        found: builtins.list[FleetEvent] = await self._ask("events")
        return found

    async def remove(self, ref: str) -> None:
        """Remove a sandbox from its host and the fleet."""
        await self._ask("remove", ref)

    async def drain(self, host: str) -> builtins.list[FleetSandbox]:
        """Stop placing on ``host`` and teleport its sandboxes to other hosts."""
        moved: builtins.list[FleetSandbox] = await self._ask("drain", host)
        return moved

    async def undrain(self, host: str) -> None:
        """Place on ``host`` again."""
        await self._ask("undrain", host)

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
        self._token: str = self._ask("token")

    def _ask(self, method: str, *args: Any) -> Any:
        return get(getattr(self._controller, method).remote(*args))

    @classmethod
    def up(cls, address: str | None = None, *, port: int = DEFAULT_PORT,
           interval: float = DEFAULT_INTERVAL, lost_after: float = DEFAULT_LOST_AFTER,
           memory_mib: int | None = None, store: StoreConfig | None = None,
           insecure_registries: Sequence[str] = ()) -> Fleet:
        """Start the fleet (see :meth:`AsyncFleet.up`)."""
        connect_ray(address)
        handle = start_controller(port=port, interval=interval, lost_after=lost_after,
                                  memory_mib=memory_mib, store=store,
                                  insecure_registries=insecure_registries)
        get(handle.start.remote())
        return cls(address)

    def create(self, image: str | None = None, *, host: str | None = None,
               recover: str | None = None, recover_interval: float = 60.0,
               **options: Any) -> Sandbox:
        """Place and create a sandbox (see :meth:`AsyncFleet.create`)."""
        placed = self._ask("create", SandboxCreate(image=image, **options), host,
                           _recovery(recover, recover_interval))
        return self._attach(placed)

    def create_template(self, name: str, image: str | None = None, *,
                        memory: int | str | None = None, **options: Any) -> list[str]:
        """Make template ``name`` on every host (see :meth:`AsyncFleet.create_template`)."""
        request = TemplateCreate(name=name, image=image,
                                 memory_mib=optional_mib(memory, "memory"), **options)
        return _made(self._ask("create_template", request), name)

    def share_template(self, name: str) -> builtins.list[str]:
        """Share template ``name`` with every host (see :meth:`AsyncFleet.share_template`)."""
        return _made(self._ask("share_template", name), name)

    def pull_template(self, name: str) -> builtins.list[str]:
        """Pull template ``name`` as the store has it (see :meth:`AsyncFleet.pull_template`)."""
        return _made(self._ask("pull_template", name), name)

    def get(self, ref: str) -> Sandbox:
        """A sandbox of the fleet by name or id, on whichever host it is now."""
        return self._attach(self.info(ref))

    def info(self, ref: str) -> FleetSandbox:
        """Where a sandbox is and how it stands."""
        found: FleetSandbox = self._ask("get", ref)
        return found

    def list(self) -> builtins.list[FleetSandbox]:
        """Every sandbox of the fleet."""
        found: builtins.list[FleetSandbox] = self._ask("sandboxes")
        return found

    def hosts(self) -> builtins.list[FleetHost]:
        """Every host, with its capacity and status."""
        found: builtins.list[FleetHost] = self._ask("hosts")
        return found

    def problems(self) -> dict[str, str]:
        """Nodes whose host agent could not start, with why."""
        found: dict[str, str] = self._ask("problems")
        return found

    def events(self) -> builtins.list[FleetEvent]:
        """What the fleet did and saw, oldest first."""
        found: builtins.list[FleetEvent] = self._ask("events")
        return found

    def refresh(self) -> builtins.list[FleetHost]:
        """Look for hosts and ask each for a report now; the hosts after."""
        found: builtins.list[FleetHost] = self._ask("refresh")
        return found

    def remove(self, ref: str) -> None:
        """Remove a sandbox from its host and the fleet."""
        self._ask("remove", ref)

    def drain(self, host: str) -> builtins.list[FleetSandbox]:
        """Stop placing on ``host`` and teleport its sandboxes to other hosts."""
        moved: builtins.list[FleetSandbox] = self._ask("drain", host)
        return moved

    def undrain(self, host: str) -> None:
        """Place on ``host`` again."""
        self._ask("undrain", host)

    def _attach(self, placed: FleetSandbox) -> Sandbox:
        if placed.id is None or placed.address is None:
            raise_not_ready(placed)
        return Sandbox.attach(placed.id, daemon=placed.address, token=self._token)


def _recovery(kind: str | None, interval: float) -> Recovery | None:
    return None if kind is None else Recovery(kind, interval)  # type: ignore[arg-type]


def _made(outcomes: dict[str, str | None], name: str) -> list[str]:
    failed = {host: why for host, why in outcomes.items() if why is not None}
    if failed or not outcomes:
        raise FleetError(f"template {name!r} could not be made on every host: " + (
            "; ".join(f"{host}: {why}" for host, why in sorted(failed.items()))
            or "no host is up"))
    return sorted(outcomes)


def raise_not_ready(placed: FleetSandbox) -> NoReturn:
    raise FleetError(f"sandbox {placed.name} is {placed.status.value} on host {placed.host}"
                     f"{': ' + placed.reason if placed.reason else ''}; it has no handle yet")
