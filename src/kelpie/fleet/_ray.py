"""The fleet on Ray: a host agent actor per VM host, one controller actor running the
coordinator, and how they find each other.

A VM host is a Ray node started with the custom resource ``kelpie_host`` (``ray start
--resources '{"kelpie_host": 1}'``). The controller (detached, named ``kelpie-fleet`` in
the ``kelpie`` namespace) looks at Ray's node table every interval: it starts a host agent
pinned to each such live node (which starts that node's daemon with a TCP listener on the
node's address and the fleet's token), and tells the coordinator at once when Ray
declares a node dead. Hosts are named by node address, so a raylet restarted on the same
machine (a new Ray node id) is the same host coming back, with the same daemon and
sandboxes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kelpie.api import FleetView, SandboxCreate, TemplateCreate
from kelpie.fleet._agent import HostAgent
from kelpie.fleet._coordinator import (
    DEFAULT_LOST_AFTER,
    FleetCoordinator,
    FleetError,
    HostUnreachable,
)
from kelpie.fleet._model import (
    FleetEvent,
    FleetHost,
    FleetSandbox,
    HostedSandbox,
    HostReport,
    Recovery,
    SavedState,
    view_of,
)
from kelpie.fleet._store import StoreConfig, StoredTemplate
from kelpie.fleet._templates import FleetTemplates

NAMESPACE = "kelpie"
CONTROLLER = "kelpie-fleet"
HOST_RESOURCE = "kelpie_host"
DEFAULT_PORT = 7075
DEFAULT_INTERVAL = 5.0
AGENT_START_TIMEOUT = 240.0
CLIENT_ATTEMPTS = 3

log = logging.getLogger("kelpie.fleet")


@ray.remote(num_cpus=0, max_restarts=0)
class HostAgentActor:
    """A :class:`HostAgent` as a Ray actor pinned to its node."""

    def __init__(self, host: str, ip: str, port: int, token: str,
                 memory_mib: int | None, store: StoreConfig | None,
                 insecure_registries: tuple[str, ...]) -> None:
        self._agent = HostAgent(host, ip, port, token, memory_mib=memory_mib, store=store,
                                insecure_registries=insecure_registries)

    async def start(self) -> str:
        return await self._agent.start()

    async def report(self) -> HostReport:
        return await self._agent.report()

    async def show(self, view: FleetView) -> None:
        await self._agent.show(view)

    async def create(self, request: SandboxCreate) -> HostedSandbox:
        return await self._agent.create(request)

    async def remove(self, name: str, forget_saved: bool, upto: int | None) -> None:
        await self._agent.remove(name, forget_saved=forget_saved, upto=upto)

    async def teleport(self, name: str, to: HostReport) -> HostedSandbox:
        return await self._agent.teleport(name, to)

    async def create_template(self, request: TemplateCreate) -> None:
        await self._agent.create_template(request)

    async def push_template(self, name: str) -> StoredTemplate:
        return await self._agent.push_template(name)

    async def pull_template(self, name: str) -> StoredTemplate:
        return await self._agent.pull_template(name)

    async def save(self, name: str, kind: str, generation: int, keep: SavedState | None,
                   ) -> SavedState:
        return await self._agent.save(name, kind, generation, keep)

    async def recover(self, saved: SavedState, labels: dict[str, str]) -> HostedSandbox:
        return await self._agent.recover(saved, labels)


async def answer(ref: Any, what: str) -> Any:
    """The result of an actor call; the actor's own exception, not Ray's wrapper, when the
    call raised; :class:`HostUnreachable` when the actor is gone."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        raise _cause(exc) from None
    except ray.exceptions.RayActorError as exc:
        raise HostUnreachable(f"{what} is gone: {exc}") from None


def get(ref: Any) -> Any:
    """:func:`answer` for blocking callers."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise _cause(exc) from None
    except ray.exceptions.RayActorError as exc:
        raise FleetError(f"the fleet's controller is gone: {exc}") from None


def _cause(exc: ray.exceptions.RayTaskError) -> BaseException:
    cause = exc.cause
    return cause if isinstance(cause, BaseException) else exc


class RayHostLink:
    """The coordinator's link to one host agent actor."""

    def __init__(self, host: str, actor: Any) -> None:
        self._host = host
        self._actor = actor
        self._what = f"the host agent of {host}"
        self.gone = False
        """Its actor died (its node may live on): the controller starts another."""

    @property
    def host(self) -> str:
        return self._host

    async def report(self) -> HostReport:
        try:
            report: HostReport = await answer(self._actor.report.remote(), self._what)
        except HostUnreachable:
            self.gone = True
            raise
        return report

    async def show(self, view: FleetView) -> None:
        await answer(self._actor.show.remote(view), self._what)

    async def create(self, request: SandboxCreate) -> HostedSandbox:
        hosted: HostedSandbox = await answer(self._actor.create.remote(request), self._what)
        return hosted

    async def remove(self, name: str, *, forget_saved: bool = False,
                     upto: int | None = None) -> None:
        await answer(self._actor.remove.remote(name, forget_saved, upto), self._what)

    async def teleport(self, name: str, to: HostReport) -> HostedSandbox:
        hosted: HostedSandbox = await answer(self._actor.teleport.remote(name, to),
                                             self._what)
        return hosted

    async def create_template(self, request: TemplateCreate) -> None:
        await answer(self._actor.create_template.remote(request), self._what)

    async def push_template(self, name: str) -> object:
        return await answer(self._actor.push_template.remote(name), self._what)

    async def pull_template(self, name: str) -> object:
        return await answer(self._actor.pull_template.remote(name), self._what)

    async def save(self, name: str, kind: str, generation: int, keep: SavedState | None,
                   ) -> SavedState:
        saved: SavedState = await answer(
            self._actor.save.remote(name, kind, generation, keep), self._what)
        return saved

    async def recover(self, saved: SavedState, labels: dict[str, str]) -> HostedSandbox:
        hosted: HostedSandbox = await answer(self._actor.recover.remote(saved, labels),
                                             self._what)
        return hosted


@ray.remote(num_cpus=0, max_restarts=-1)
class FleetController:
    """The coordinator as a detached actor, with the loop that finds hosts and refreshes."""

    def __init__(self, token: str, port: int, interval: float, lost_after: float,
                 memory_mib: int | None, store: StoreConfig | None,
                 insecure_registries: tuple[str, ...]) -> None:
        self._token = token
        self._store = store
        self._insecure_registries = insecure_registries
        self._port = port
        self._interval = interval
        self._memory_mib = memory_mib
        self._coordinator = FleetCoordinator(clock=time.monotonic, rng=random.Random(),
                                             lost_after=lost_after)
        self._templates = FleetTemplates(self._coordinator)
        self._agents: dict[str, tuple[str, RayHostLink]] = {}
        """host -> (Ray node id, the link to its agent actor)."""
        self._problems: dict[str, str] = {}
        self._loop: asyncio.Task[None] | None = None
        self._found = asyncio.Event()

    async def start(self) -> list[FleetHost]:
        """Find the hosts and start their agents now; keep doing so in the background."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._run())
        await self._found.wait()
        return self._coordinator.hosts()

    async def _run(self) -> None:
        while True:
            try:
                await self._discover()
                await self._coordinator.refresh()
                await self._show()
            except Exception:  # the loop must outlive any one bad round
                log.exception("fleet refresh failed")
            self._found.set()
            await asyncio.sleep(self._interval)

    async def _show(self) -> None:
        """Tell every live host's daemon what the fleet looks like now (its dashboard shows
        it); a host that does not take it is not this round's concern."""
        view = view_of(self._coordinator.hosts(), self._coordinator.sandboxes(), time.time())

        async def show(link: RayHostLink) -> None:
            try:
                await asyncio.wait_for(link.show(view), self._interval)
            except (Exception, TimeoutError) as exc:
                log.info("host %s did not take the fleet's view: %s", link.host, exc)

        await asyncio.gather(*(show(link) for _, link in self._agents.values()
                               if not link.gone))

    async def _discover(self) -> None:
        nodes = await asyncio.to_thread(ray.nodes)
        alive: dict[str, dict[str, Any]] = {}
        dead: dict[str, dict[str, Any]] = {}
        for node in nodes:
            ip = node["NodeManagerAddress"]
            if not node["Alive"]:
                dead[ip] = node
            elif node.get("Resources", {}).get(HOST_RESOURCE, 0) >= 1:
                alive[ip] = node
        for ip, node in dead.items():
            known = self._agents.get(ip)
            if ip not in alive and known is not None and known[0] == node["NodeID"]:
                self._coordinator.host_died(ip, f"Ray declared node {node['NodeID'][:12]} "
                                                f"({ip}) dead")
        starts = [self._start_agent(ip, node) for ip, node in alive.items()
                  if ip not in self._agents or self._agents[ip][0] != node["NodeID"]
                  or self._agents[ip][1].gone]  # a new node, or an agent that died on its own
        await asyncio.gather(*starts)

    async def _start_agent(self, ip: str, node: dict[str, Any]) -> None:
        node_id = node["NodeID"]
        actor = HostAgentActor.options(  # type: ignore[attr-defined]
            name=f"kelpie-host-{node_id[:16]}", namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, resources={HOST_RESOURCE: 1},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(ip, ip, self._port, self._token, self._memory_mib, self._store,
                 self._insecure_registries)
        try:
            await asyncio.wait_for(answer(actor.start.remote(), f"the host agent of {ip}"),
                                   AGENT_START_TIMEOUT)
        except (Exception, TimeoutError) as exc:
            self._problems[ip] = f"its host agent did not start: {exc}"
            log.warning("host %s: %s", ip, self._problems[ip])
            return
        self._problems.pop(ip, None)
        link = RayHostLink(ip, actor)
        self._agents[ip] = (node_id, link)
        self._coordinator.add_host(link)

    # --- the fleet's API (called by Fleet / AsyncFleet) ------------------------------------

    def token(self) -> str:
        return self._token

    def hosts(self) -> list[FleetHost]:
        return self._coordinator.hosts()

    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    def sandboxes(self) -> list[FleetSandbox]:
        return self._coordinator.sandboxes()

    def get(self, ref: str) -> FleetSandbox:
        return self._coordinator.get(ref)

    def events(self) -> list[FleetEvent]:
        return self._coordinator.events()

    async def create(self, request: SandboxCreate, host: str | None = None,
                     recover: Recovery | None = None) -> FleetSandbox:
        if recover is not None and self._store is None:
            raise FleetError(f"recover={recover.kind!r} saves to the shared store, and this "
                             "fleet has none: start it with one (kelpie fleet up "
                             "--store-endpoint URL --store-bucket NAME)")
        return await self._coordinator.create(request, host=host, recover=recover)

    async def remove(self, ref: str) -> None:
        await self._coordinator.remove(ref)

    async def create_template(self, request: TemplateCreate) -> dict[str, str | None]:
        outcomes = await self._templates.create(request)
        await self._coordinator.refresh()  # so placement sees the template at once
        return outcomes

    async def share_template(self, name: str) -> dict[str, str | None]:
        outcomes = await self._templates.share(name)
        await self._coordinator.refresh()
        return outcomes

    async def pull_template(self, name: str) -> dict[str, str | None]:
        outcomes = await self._templates.pull(name)
        await self._coordinator.refresh()
        return outcomes

    async def drain(self, host: str) -> list[FleetSandbox]:
        return await self._coordinator.drain(host)

    def undrain(self, host: str) -> None:
        self._coordinator.undrain(host)

    async def refresh(self) -> list[FleetHost]:
        await self._discover()
        await self._coordinator.refresh()
        return self._coordinator.hosts()


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: the one this process runs in, or
    ``auto``), unless this process already has."""
    if ray.is_initialized():
        return
    if address and address != "auto" and "://" not in address:
        _check_reachable(address)  # ray.init retries an unreachable GCS for minutes
    # The head's Ray client proxy starts a server per client and, on a loaded head, can
    # fail to ("Starting Ray client server failed"): a client connection tries again.
    attempts = CLIENT_ATTEMPTS if address and address.startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING)
            return
        except ConnectionError as exc:
            failure = exc
            if attempt == attempts or "Starting Ray client server failed" not in str(exc):
                break
    raise FleetError(f"no Ray cluster answers at {address or 'auto'} ({failure}); start "
                     "one (`ray start --head --resources '{\"kelpie_host\": 1}'`) or give "
                     "its address (--address HOST:PORT, or RAY_ADDRESS)") from None


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FleetError(f"Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise FleetError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); "
                         "start one (`ray start --head`) or give its address (--address "
                         "HOST:PORT, or RAY_ADDRESS)") from None


def controller() -> Any:
    """The fleet's controller actor; FleetError when no fleet runs in this cluster."""
    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError as exc:
        raise FleetError("no Kelpie fleet runs in this Ray cluster; start it with "
                         "`kelpie fleet up` (or kelpie.fleet.Fleet.up())") from exc


def start_controller(*, port: int = DEFAULT_PORT, interval: float = DEFAULT_INTERVAL,
                     lost_after: float = DEFAULT_LOST_AFTER,
                     memory_mib: int | None = None, store: StoreConfig | None = None,
                     insecure_registries: Sequence[str] = ()) -> Any:
    """The fleet's controller, started (detached, on the head node) if it is not running."""
    return FleetController.options(  # type: ignore[attr-defined]
        name=CONTROLLER, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
    ).remote(secrets.token_urlsafe(32), port, interval, lost_after, memory_mib, store,
             tuple(insecure_registries))
