"""Templates across the fleet: made on every host at once, or pushed from one host to the
shared store and pulled (verified) onto the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from kelpie.api import TemplateCreate
from kelpie.fleet._coordinator import FleetCoordinator, FleetError, HostLink, describe


class FleetTemplates:
    """The templates of a coordinator's hosts: each operation returns host -> None (the
    host has it) or why not."""

    def __init__(self, coordinator: FleetCoordinator) -> None:
        self._coordinator = coordinator

    async def create(self, request: TemplateCreate) -> dict[str, str | None]:
        """Make a template on every reachable host at once."""
        links = [link for link, _ in self._coordinator.reachable()]
        outcomes = await asyncio.gather(*(
            _outcome(link.create_template(request), self._coordinator.create_timeout)
            for link in links))
        return {link.host: outcome for link, outcome in zip(links, outcomes, strict=True)}

    async def share(self, name: str) -> dict[str, str | None]:
        """Push template ``name`` from a host that holds it to the shared store, then pull
        it onto every other reachable host."""
        holders = self._holders(name)
        if not holders:
            raise FleetError(f"no host that is up holds template {name!r}; make it on one "
                             "(or on all: create_template)")
        await asyncio.wait_for(holders[0].push_template(name), self._coordinator.move_timeout)
        return await self.pull(name)

    async def pull(self, name: str) -> dict[str, str | None]:
        """Pull template ``name`` as the shared store has it onto every reachable host that
        lacks it."""
        holders = self._holders(name)
        others = [link for link, _ in self._coordinator.reachable() if link not in holders]
        outcomes = await asyncio.gather(*(
            _outcome(link.pull_template(name), self._coordinator.move_timeout)
            for link in others))
        shared: dict[str, str | None] = {link.host: None for link in holders}
        shared.update({link.host: outcome for link, outcome in zip(others, outcomes,
                                                                   strict=True)})
        return shared

    def _holders(self, template: str) -> list[HostLink]:
        return [link for link, report in self._coordinator.reachable()
                if report is not None and template in report.templates]


async def _outcome(call: Awaitable[object], timeout: float) -> str | None:
    """None when ``call`` succeeds within ``timeout``, else why it did not."""
    try:
        await asyncio.wait_for(call, timeout)
    except (Exception, TimeoutError) as exc:
        return describe(exc)
    return None
