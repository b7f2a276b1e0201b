"""The fleet's coordinator: places sandboxes, keeps the directory of where each one is,
declares hosts dead, reports what they lost, saves the sandboxes that ask for it and
recovers them elsewhere when lost (fencing older copies by generation), and drains hosts by
teleport. Templates across its hosts are :mod:`kelpie.fleet._templates`.

It takes its clock, randomness and the links to the hosts as parameters: under Ray the
links are host agent actors; under the DST they are simulated hosts on virtual time, with
the same code in between. Every decision is made from state it holds; what a host says is
trusted only when the host was asked after the decision it would contradict (``changed``
before the report was requested), so a slow report never undoes a newer change.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Protocol

from kelpie._exceptions import ConfigError, KelpieError
from kelpie.api import SandboxCreate, TemplateCreate
from kelpie.fleet._model import (
    FLEET_LABEL,
    GENERATION_LABEL,
    RECOVER_LABEL,
    FleetEvent,
    FleetHost,
    FleetSandbox,
    HostedSandbox,
    HostReport,
    HostStatus,
    Placement,
    Recovery,
    SandboxStatus,
    SavedState,
)
from kelpie.fleet._placement import Random, choose_host
from kelpie.vm import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS

DEFAULT_LOST_AFTER = 120.0
"""Seconds without a good report after which a host is declared dead. Under Ray this is
the backstop: Ray itself declares a dead or partitioned node dead sooner (~15 s for a
killed raylet, ~65 s for a partition, measured here) and the controller passes that on at
once; a host merely slow to report (a busy daemon on a loaded machine: 72 s was seen with
32 sandboxes starting on 2 cores) must not be taken for dead."""
DEFAULT_CALL_TIMEOUT = 20.0
DEFAULT_CREATE_TIMEOUT = 300.0
"""A create boots a VM: under TCG, with others booting beside it, that takes a while."""
DEFAULT_MOVE_TIMEOUT = 600.0
MAX_EVENTS = 1000


class FleetError(KelpieError):
    """A fleet operation failed; the message says what the fleet did about it."""


class UnknownSandbox(FleetError, LookupError):
    """No sandbox of the fleet has that name or id."""


class HostUnreachable(FleetError):
    """A host's agent did not answer (it, or its node, died)."""


class HostLink(Protocol):
    """How the coordinator reaches one host's agent."""

    @property
    def host(self) -> str: ...

    async def report(self) -> HostReport: ...

    async def create(self, request: SandboxCreate) -> HostedSandbox:
        """Create (and start) the sandbox named ``request.name``, labels included."""
        ...

    async def remove(self, name: str, *, forget_saved: bool = False,
                     upto: int | None = None) -> None:
        """Remove the sandbox ``name`` (stopping it first); nothing to do if it is gone.
        ``forget_saved``: also delete its saved states from the shared store; ``upto``:
        only if its copy here is of that generation or older."""
        ...

    async def teleport(self, name: str, to: HostReport) -> HostedSandbox:
        """Move the sandbox ``name`` to the daemon of ``to``; its copy there."""
        ...

    async def create_template(self, request: TemplateCreate) -> None:
        """Make the template ``request.name`` on this host."""
        ...

    async def push_template(self, name: str) -> object:
        """Put this host's template ``name`` into the shared store."""
        ...

    async def pull_template(self, name: str) -> object:
        """Take template ``name`` from the shared store (verified) onto this host."""
        ...

    async def save(self, name: str, kind: str, generation: int, keep: SavedState | None,
                   ) -> SavedState:
        """Snapshot sandbox ``name`` (``kind``: checkpoint or full) into the shared store
        as generation ``generation``'s; its other saved states there, but ``keep``, are
        deleted."""
        ...

    async def recover(self, saved: SavedState, labels: dict[str, str]) -> HostedSandbox:
        """Restore sandbox ``saved.name`` here from ``saved`` (verified), with ``labels``."""
        ...


@dataclasses.dataclass
class _Record:
    name: str
    host: str
    generation: int
    status: SandboxStatus
    memory_mib: int
    cpus: int
    changed: float
    id: str | None = None
    state: str | None = None
    reason: str | None = None
    recover: Recovery | None = None
    saved: SavedState | None = None
    next_save: float = 0.0
    """When to save it next (with ``recover``)."""
    saving: bool = False
    retry_at: float = 0.0
    """When to try recovering it again after a failed attempt."""
    target: str | None = None
    """The host it is being moved to or recovered on."""
    issued: int = 1
    """The highest generation given to a copy of it: each recovery attempt takes the next,
    so a copy made by an attempt that seemed to fail is never taken for another."""


@dataclasses.dataclass
class _Host:
    link: HostLink
    added: float
    status: HostStatus = HostStatus.UP
    report: HostReport | None = None
    last_seen: float | None = None
    reason: str | None = None
    draining: bool = False


@dataclasses.dataclass
class _Doomed:
    """A sandbox the fleet no longer stands behind (removed, or its create failed): removed
    wherever ``host`` reports it, until a report asked after ``since`` shows it gone."""

    host: str
    since: float
    memory_mib: int = 0
    forget_saved: bool = False
    """Removed by request: its saved states go too."""
    upto: int | None = None
    """Only a copy of this generation or older (a fenced one: a newer copy may arrive)."""


class FleetCoordinator:
    """Placement, the directory and failure handling for a set of hosts (see the module)."""

    def __init__(self, *, clock: Callable[[], float], rng: Random,
                 lost_after: float = DEFAULT_LOST_AFTER,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT,
                 create_timeout: float = DEFAULT_CREATE_TIMEOUT,
                 move_timeout: float = DEFAULT_MOVE_TIMEOUT) -> None:
        self._clock = clock
        self._rng = rng
        self.lost_after = lost_after
        self.call_timeout = call_timeout
        self.create_timeout = create_timeout
        self.move_timeout = move_timeout
        self._hosts: dict[str, _Host] = {}
        self._records: dict[str, _Record] = {}
        self._doomed: dict[tuple[str, str], _Doomed] = {}
        """(name, host) -> a copy to remove there."""
        self._events: list[FleetEvent] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # --- hosts ---------------------------------------------------------------------------

    def add_host(self, link: HostLink) -> None:
        """Take ``link``'s host into the fleet (again: its link is replaced)."""
        known = self._hosts.get(link.host)
        if known is None:
            self._hosts[link.host] = _Host(link, added=self._clock())
        else:
            known.link = link

    def hosts(self) -> list[FleetHost]:
        """Every host with its status and last report."""
        counts: dict[str, int] = {}
        for record in self._records.values():
            counts[record.host] = counts.get(record.host, 0) + 1
        return [FleetHost(host=name, status=host.status, report=host.report,
                          last_seen=host.last_seen, reason=host.reason,
                          sandboxes=counts.get(name, 0))
                for name, host in sorted(self._hosts.items())]

    def host_died(self, host: str, reason: str) -> None:
        """Declare ``host`` dead now (Ray saw its node die): its sandboxes are lost."""
        if host in self._hosts and self._hosts[host].status is not HostStatus.DEAD:
            self._declare_dead(host, reason)

    async def refresh(self) -> None:
        """Ask every host for a report (at once, each within the call timeout), reconcile
        the directory with the answers, then declare dead the hosts silent for too long."""
        asked = self._clock()
        hosts = list(self._hosts.values())
        answers = await asyncio.gather(*(self._ask_report(host) for host in hosts))
        fresh = [(host, report) for host, report in zip(hosts, answers, strict=True)
                 if report is not None]
        for host, report in fresh:  # every report first, so a move shows on both sides
            self._take_report(host, report, asked)
        for _, report in fresh:
            for sandbox in report.sandboxes:
                self._reconcile_hosted(report.host, sandbox, asked)
        for _, report in fresh:
            self._reconcile_missing(report, asked)
        now = self._clock()
        for name, host in self._hosts.items():
            if host.status is HostStatus.DEAD:
                continue
            seen = host.last_seen if host.last_seen is not None else host.added
            if now - seen > self.lost_after:
                self._declare_dead(name, f"no report from host {name} for {now - seen:.0f} s "
                                         f"(the bound is {self.lost_after:.0f} s)")
        await self._clean_doomed()
        self._start_saves_and_recoveries()

    async def watch(self, interval: float) -> None:
        """Refresh every ``interval`` seconds, forever (run it as a task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop the saves and recoveries under way (they are retried by a new coordinator)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ask_report(self, host: _Host) -> HostReport | None:
        try:
            return await asyncio.wait_for(host.link.report(), self.call_timeout)
        except (Exception, TimeoutError) as exc:  # any failure is "no report this round"
            host.reason = f"last report failed: {describe(exc)}"
            return None

    def _take_report(self, host: _Host, report: HostReport, asked: float) -> None:
        host.report = report
        host.last_seen = asked
        host.reason = None
        if host.status is HostStatus.DEAD:
            host.status = HostStatus.DRAINING if host.draining else HostStatus.UP
            self._event("host-up", report.host, None, "reports again after being declared dead")

    def _reconcile_missing(self, report: HostReport, asked: float) -> None:
        """The directory's sandboxes on this host that it no longer reports: moved (another
        host reports them) or lost."""
        hosted = {sandbox.name for sandbox in report.sandboxes}
        for record in list(self._records.values()):
            if (record.host != report.host or record.name in hosted or record.changed >= asked
                    or record.status not in (SandboxStatus.RUNNING, SandboxStatus.LOST)):
                continue
            if not self._found_elsewhere(record) and record.status is SandboxStatus.RUNNING:
                self._lose(record, f"host {report.host} no longer has it")

    def _reconcile_hosted(self, host: str, sandbox: HostedSandbox, asked: float) -> None:
        record = self._records.get(sandbox.name)
        if record is None:
            if (sandbox.name, host) not in self._doomed:
                # the fleet's label but no record: the coordinator restarted; take it back
                recover = sandbox.recover
                self._records[sandbox.name] = _Record(
                    name=sandbox.name, host=host, generation=sandbox.generation,
                    status=SandboxStatus.RUNNING, memory_mib=sandbox.memory_mib,
                    cpus=sandbox.cpus, changed=asked, id=sandbox.id, state=sandbox.state,
                    recover=recover, next_save=asked + (recover.interval if recover else 0))
                self._event("adopted", host, sandbox.name, "reported by its host, not in "
                                                           "the directory")
            return
        if record.host != host:
            if record.changed >= asked or (sandbox.name, host) in self._doomed:
                return
            if sandbox.generation < record.generation:
                # recovered elsewhere since this copy was lost: fence it
                self._doomed[sandbox.name, host] = _Doomed(host, asked,
                                                           upto=sandbox.generation)
            elif (sandbox.generation > record.generation
                  and record.status in (SandboxStatus.RUNNING, SandboxStatus.LOST)):
                # a newer copy than the directory knows (it adopted the older one after a
                # restart): follow it; the older one is fenced when next reported
                self._event("moved", host, sandbox.name, f"generation {sandbox.generation} "
                            f"found on {host}; generation {record.generation} on "
                            f"{record.host} is older")
                record.host, record.generation, record.id = host, sandbox.generation, sandbox.id
                record.issued = max(record.issued, sandbox.generation)
                record.status, record.state = SandboxStatus.RUNNING, sandbox.state
                record.changed = asked
            return
        if record.changed >= asked:
            return
        if record.status is SandboxStatus.LOST:
            self._event("returned", host, record.name, f"lost ({record.reason}), now "
                                                        "reported by its host again")
            record.reason = f"returned after: {record.reason}"
        if record.status in (SandboxStatus.LOST, SandboxStatus.PLACING):
            record.status = SandboxStatus.RUNNING
        record.id = sandbox.id
        record.state = sandbox.state

    def _found_elsewhere(self, record: _Record) -> bool:
        """Whether another up host reported ``record`` (same generation) since it changed:
        a move that looked failed but went through. The directory follows it."""
        for name, host in self._hosts.items():
            if name == record.host or host.report is None or host.status is HostStatus.DEAD:
                continue
            if host.last_seen is None or host.last_seen <= record.changed:
                continue
            for sandbox in host.report.sandboxes:
                if sandbox.name == record.name and sandbox.generation == record.generation:
                    self._event("moved", name, record.name,
                                f"found on {name}; {record.host} no longer has it")
                    record.host, record.id, record.state = name, sandbox.id, sandbox.state
                    record.status = SandboxStatus.RUNNING
                    record.changed = self._clock()
                    return True
        return False

    def _declare_dead(self, host: str, reason: str) -> None:
        state = self._hosts[host]
        state.status = HostStatus.DEAD
        state.reason = reason
        self._event("host-dead", host, None, reason)
        for record in self._records.values():
            if record.host == host and record.status not in (SandboxStatus.LOST,
                                                             SandboxStatus.RECOVERING):
                self._lose(record, f"its host died: {reason}")

    def _lose(self, record: _Record, reason: str) -> None:
        record.status = SandboxStatus.LOST
        record.reason = reason
        record.changed = self._clock()
        self._event("lost", record.host, record.name, reason)

    async def _clean_doomed(self) -> None:
        """Remove the doomed copies that up hosts still report; forget the ones gone."""
        for key, doomed in list(self._doomed.items()):
            name = key[0]
            host = self._hosts.get(doomed.host)
            if host is None or host.status is HostStatus.DEAD or host.report is None:
                continue
            if host.last_seen is None or host.last_seen <= doomed.since:
                continue
            if not any(s.name == name and (doomed.upto is None or s.generation <= doomed.upto)
                       for s in host.report.sandboxes):
                del self._doomed[key]
                continue
            record = self._records.get(name)
            if record is not None and record.host == doomed.host:
                del self._doomed[key]  # it is the directory's copy again (a new create)
                continue
            try:
                await asyncio.wait_for(host.link.remove(name, forget_saved=doomed.forget_saved,
                                                        upto=doomed.upto), self.call_timeout)
            except (Exception, TimeoutError) as exc:
                host.reason = f"removing {name} failed: {describe(exc)}"
                continue
            self._event("fenced" if record is not None else "removed", doomed.host, name,
                        "an older copy" if record is not None else "no longer the fleet's")

    # --- sandboxes -------------------------------------------------------------------------

    async def create(self, request: SandboxCreate, *, host: str | None = None,
                     recover: Recovery | None = None) -> FleetSandbox:
        """Place and create a sandbox (its name given or made here, unique in the fleet);
        ``host``: only there; ``recover``: save it to the shared store at that interval and
        bring it back on another host from its latest saved state when it is lost.

        If the host fails to answer, the sandbox is not the fleet's: should the host have
        made it after all, the fleet removes it once the host reports it.
        """
        name = request.name or self._new_name()
        if name in self._records:
            raise FleetError(f"the fleet already has a sandbox named {name!r}; choose "
                             "another name or remove that one first")
        doomed = [host for (other, host) in self._doomed if other == name
                  and self._hosts[host].status is not HostStatus.DEAD]
        if doomed:
            raise FleetError(f"a sandbox named {name!r} is still being removed from host "
                             f"{doomed[0]}; try again after the next refresh")
        memory = request.memory_mib or self._template_memory(request.template)
        want = Placement(memory_mib=memory or DEFAULT_MEMORY_MIB,
                         cpus=request.cpus or DEFAULT_VCPUS, arch=request.arch,
                         backend=request.backend, image=request.image,
                         template=request.template)
        candidates = [r for r in self._placeable() if host is None or r.host == host]
        if host is not None and not candidates:
            raise FleetError(f"host {host!r} is not up in the fleet (or is draining); "
                             "`kelpie fleet status` lists the hosts")
        target = choose_host(candidates, want, self._rng, pending_mib=self._pending_mib())
        labels = {**request.labels, FLEET_LABEL: "1", GENERATION_LABEL: "1"}
        if recover is not None:
            labels[RECOVER_LABEL] = recover.label()
        record = _Record(name=name, host=target.host, generation=1,
                         status=SandboxStatus.PLACING, memory_mib=want.memory_mib,
                         cpus=want.cpus, changed=self._clock(), recover=recover)
        self._records[name] = record
        link = self._hosts[target.host].link
        try:
            hosted = await asyncio.wait_for(
                link.create(request.model_copy(update={"name": name, "labels": labels})),
                self.create_timeout)
        except ConfigError as exc:  # refused before anything was made
            if self._records.get(name) is record:
                del self._records[name]
            raise FleetError(f"host {target.host} refused sandbox {name!r}: {exc}") from exc
        except (Exception, TimeoutError) as exc:
            if self._records.get(name) is record:
                del self._records[name]
            self._doomed[name, target.host] = _Doomed(target.host, self._clock(),
                                                      want.memory_mib)
            self._event("abandoned", target.host, name, describe(exc))
            raise FleetError(f"creating sandbox {name!r} on host {target.host} failed: "
                             f"{describe(exc)}. If the host made it anyway, the fleet removes "
                             "it when the host next reports") from exc
        if self._records.get(name) is record:
            record.status = SandboxStatus.RUNNING
            record.id, record.state = hosted.id, hosted.state
            record.changed = self._clock()
            if recover is not None:
                record.next_save = record.changed + recover.interval
        self._event("placed", target.host, name, f"{want.memory_mib} MiB")
        return self._view(self._records.get(name, record))

    async def remove(self, ref: str) -> None:
        """Remove a sandbox; if its host is unreachable, it is removed when it reports."""
        record = self._find(ref)
        del self._records[record.name]
        forget = record.recover is not None
        now = self._clock()
        for other in self._hosts:  # an older copy, or one a failed move left, may be there
            self._doomed.setdefault((record.name, other), _Doomed(other, now))
        self._doomed[record.name, record.host] = _Doomed(record.host, now, record.memory_mib,
                                                         forget)
        host = self._hosts[record.host]
        if host.status is HostStatus.DEAD:
            return
        try:
            await asyncio.wait_for(host.link.remove(record.name, forget_saved=forget),
                                   self.call_timeout)
        except (Exception, TimeoutError) as exc:
            host.reason = f"removing {record.name} failed: {describe(exc)}"
            return
        self._event("removed", record.host, record.name, "on request")

    def sandboxes(self) -> list[FleetSandbox]:
        """Every sandbox of the fleet, by name."""
        return [self._view(record) for _, record in sorted(self._records.items())]

    def get(self, ref: str) -> FleetSandbox:
        """A sandbox by name, id or unique id prefix."""
        return self._view(self._find(ref))

    def events(self) -> list[FleetEvent]:
        """What the fleet did and saw, oldest first (the last :data:`MAX_EVENTS`)."""
        return list(self._events)

    def reachable(self) -> list[tuple[HostLink, HostReport | None]]:
        """The links of the hosts not declared dead, by name, with their last reports."""
        return [(host.link, host.report) for _, host in sorted(self._hosts.items())
                if host.status is not HostStatus.DEAD]

    # --- drain -----------------------------------------------------------------------------

    async def drain(self, host: str) -> list[FleetSandbox]:
        """Place nothing more on ``host`` and teleport its running sandboxes to others.

        Returns the sandboxes as they stand after; one that could not move stays where it
        is with the reason in ``reason`` (drain again to retry).
        """
        state = self._host(host)
        state.draining = True
        if state.status is HostStatus.UP:
            state.status = HostStatus.DRAINING
        names = [r.name for r in self._records.values()
                 if r.host == host and r.status is SandboxStatus.RUNNING]
        for name in names:
            record = self._records.get(name)
            if record is None or record.host != host or record.status is not SandboxStatus.RUNNING:
                continue
            await self._move(record, state)
        return [self._view(r) for r in self._records.values() if r.name in names]

    def undrain(self, host: str) -> None:
        """Place on ``host`` again."""
        state = self._host(host)
        state.draining = False
        if state.status is HostStatus.DRAINING:
            state.status = HostStatus.UP

    async def _move(self, record: _Record, source: _Host) -> None:
        want = Placement(memory_mib=record.memory_mib, cpus=record.cpus)
        try:
            target = choose_host([r for r in self._placeable() if r.host != record.host
                                  and (record.name, r.host) not in self._doomed],
                                 want, self._rng, pending_mib=self._pending_mib())
        except KelpieError as exc:
            record.reason = f"drain: {exc}"
            return
        record.status, record.target = SandboxStatus.MOVING, target.host
        record.changed = self._clock()
        generation = record.generation
        try:
            hosted = await asyncio.wait_for(source.link.teleport(record.name, target),
                                            self.move_timeout)
        except (Exception, TimeoutError) as exc:
            record.target = None
            if record.status is SandboxStatus.MOVING:
                # the teleport's own protocol leaves it on exactly one side; the next
                # reports say which (see _found_elsewhere)
                record.status = SandboxStatus.RUNNING
                record.changed = self._clock()
            record.reason = f"move to {target.host} failed: {describe(exc)}"
            return
        if (self._records.get(record.name) is not record or record.generation != generation
                or record.status is SandboxStatus.RECOVERING):
            # recovered (or removed) while it moved: the moved copy is an older one
            self._doomed.setdefault((record.name, target.host),
                                    _Doomed(target.host, self._clock(), upto=generation))
            return
        self._event("moved", target.host, record.name, f"from {record.host} (drain)")
        record.host, record.id, record.state = target.host, hosted.id, hosted.state
        record.status, record.target = SandboxStatus.RUNNING, None
        record.reason = f"moved from {source.link.host} by a drain"
        record.changed = self._clock()

    # --- saves and recovery ----------------------------------------------------------------

    def _start_saves_and_recoveries(self) -> None:
        """Start (in the background, so reports go on meanwhile) the saves that are due and
        the recoveries of lost sandboxes that have a saved state."""
        now = self._clock()
        for record in list(self._records.values()):
            if record.recover is None:
                continue
            host = self._hosts[record.host]
            if (record.status is SandboxStatus.RUNNING and host.status is not HostStatus.DEAD
                    and not record.saving and now >= record.next_save):
                self._spawn(self._save(record, host))
            elif (record.status is SandboxStatus.LOST and record.saved is not None
                  and record.target is None and now >= record.retry_at):
                # even with a save still under way (a save of the lost copy), but not with a
                # move (its outcome says whether it is lost)
                self._spawn(self._recover(record, record.saved))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save(self, record: _Record, host: _Host) -> None:
        assert record.recover is not None
        record.saving = True
        generation = record.generation
        try:
            saved = await asyncio.wait_for(
                host.link.save(record.name, record.recover.snapshot_kind, generation,
                               record.saved), self.move_timeout)
        except (Exception, TimeoutError) as exc:
            self._event("save-failed", host.link.host, record.name, describe(exc))
            return
        finally:
            record.saving = False
            record.next_save = self._clock() + record.recover.interval
        if (self._records.get(record.name) is record and record.generation == generation
                and record.status is not SandboxStatus.RECOVERING):
            # of the directory's copy (taken before any move or loss): its latest state; a
            # save of a copy since recovered elsewhere is not (that copy is being fenced)
            record.saved = dataclasses.replace(saved, at=self._clock())
            self._event("saved", host.link.host, record.name, f"{saved.kind}, "
                                                              f"{saved.size} bytes")

    async def _recover(self, record: _Record, saved: SavedState) -> None:
        """Restore a lost sandbox on another host from ``saved``, as the next generation.
        Only once that copy runs does the directory point at it; the lost copy, should its
        host come back, is then fenced (destroyed) on its first report."""
        assert record.recover is not None
        want = Placement(memory_mib=record.memory_mib, cpus=record.cpus, arch=saved.arch,
                         backend=saved.backend if saved.arch else None,
                         image=saved.image_digest)
        blocked = {host for (name, host) in self._doomed if name == record.name}
        candidates = [r for r in self._placeable() if r.host != record.host
                      and r.host not in blocked
                      and (saved.image_digest is None or saved.image_digest in r.images)]
        try:
            target = choose_host(candidates, want, self._rng, pending_mib=self._pending_mib())
        except KelpieError as exc:
            record.retry_at = self._clock() + record.recover.interval
            self._event("recovery-failed", record.host, record.name, f"no host for it: {exc}")
            return
        record.issued = max(record.issued, record.generation) + 1
        lost_reason, generation = record.reason, record.issued
        record.status, record.target = SandboxStatus.RECOVERING, target.host
        record.changed = self._clock()
        labels = {FLEET_LABEL: "1", GENERATION_LABEL: str(generation),
                  RECOVER_LABEL: record.recover.label()}
        try:
            hosted = await asyncio.wait_for(
                self._hosts[target.host].link.recover(saved, labels), self.create_timeout)
        except (Exception, TimeoutError) as exc:
            # the target may have made it after all: removed when it reports it
            self._doomed[record.name, target.host] = _Doomed(target.host, self._clock(),
                                                             record.memory_mib, upto=generation)
            self._event("recovery-failed", target.host, record.name, describe(exc))
            if self._records.get(record.name) is record:
                record.status, record.target = SandboxStatus.LOST, None
                record.reason = lost_reason
                record.changed = self._clock()
                record.retry_at = record.changed + record.recover.interval
            return
        if self._records.get(record.name) is not record:  # removed meanwhile
            self._doomed[record.name, target.host] = _Doomed(target.host, self._clock(),
                                                             record.memory_mib, True)
            return
        old = record.host
        record.host, record.generation, record.id, record.state = \
            target.host, generation, hosted.id, hosted.state
        record.status, record.target = SandboxStatus.RUNNING, None
        record.changed = self._clock()
        record.next_save = record.changed + record.recover.interval
        record.reason = (f"recovered on {target.host} from its {saved.kind} of "
                         f"generation {saved.generation}; lost on {old}: {lost_reason}")
        self._event("recovered", target.host, record.name,
                    f"generation {generation}, from its {saved.kind} (lost on {old})")

    # --- helpers ---------------------------------------------------------------------------

    def _host(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            raise FleetError(f"no host {host!r} in the fleet; known: "
                             f"{', '.join(sorted(self._hosts)) or 'none'}")
        return state

    def _placeable(self) -> list[HostReport]:
        return [host.report for host in self._hosts.values()
                if host.status is HostStatus.UP and host.report is not None]

    def _pending_mib(self) -> dict[str, int]:
        """Memory each host's last report cannot show yet: sandboxes being placed, moved or
        recovered there that it did not report, and those placed there since it was asked."""
        pending: dict[str, int] = {}
        in_flight = (SandboxStatus.PLACING, SandboxStatus.MOVING, SandboxStatus.RECOVERING)
        for record in self._records.values():
            # a move or recovery under way counts on its target (a move even once the
            # sandbox is lost: it may yet arrive)
            host = self._hosts.get(record.target or record.host)
            if host is None or (record.status is SandboxStatus.LOST and record.target is None):
                continue
            if record.status in in_flight or record.target is not None:
                counted = host.report is not None and any(
                    s.name == record.name for s in host.report.sandboxes)
            else:
                counted = host.last_seen is not None and record.changed < host.last_seen
            if not counted:
                pending[host.link.host] = pending.get(host.link.host, 0) + record.memory_mib
        for doomed in self._doomed.values():
            # an abandoned create the host may have made after all, not yet in its report
            host = self._hosts.get(doomed.host)
            if host is not None and (host.last_seen is None or doomed.since >= host.last_seen):
                pending[doomed.host] = pending.get(doomed.host, 0) + doomed.memory_mib
        return pending

    def _template_memory(self, template: str | None) -> int | None:
        """The memory a template's sandboxes have, as the hosts holding it report it."""
        sizes = [host.report.templates[template] for host in self._hosts.values()
                 if template and host.report and template in host.report.templates]
        return max(sizes) if sizes else None

    def _find(self, ref: str) -> _Record:
        if ref in self._records:
            return self._records[ref]
        matches = [r for r in self._records.values() if r.id and r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UnknownSandbox(f"{ref!r} is the start of several sandbox ids; give more of it")
        raise UnknownSandbox(f"the fleet has no sandbox named {ref!r} (nor an id starting "
                             "so); `kelpie fleet ls` lists them")

    def _view(self, record: _Record) -> FleetSandbox:
        host = self._hosts.get(record.host)
        address = host.report.address if host and host.report else None
        return FleetSandbox(name=record.name, id=record.id, host=record.host,
                            generation=record.generation, status=record.status,
                            state=record.state, reason=record.reason,
                            memory_mib=record.memory_mib, cpus=record.cpus, address=address,
                            recover=record.recover, saved=record.saved)

    def _new_name(self) -> str:
        while True:
            name = "fleet-" + "".join(f"{int(self._rng.random() * 16):x}" for _ in range(8))
            if name not in self._records and all(other != name for other, _ in self._doomed):
                return name

    def _event(self, kind: str, host: str, name: str | None, detail: str) -> None:
        self._events.append(FleetEvent(at=self._clock(), kind=kind, host=host, name=name,
                                       detail=detail))
        if len(self._events) > MAX_EVENTS:
            del self._events[: len(self._events) - MAX_EVENTS]


def describe(exc: BaseException) -> str:
    """What went wrong, in words (a timeout says so)."""
    if isinstance(exc, TimeoutError):
        return "no answer within the time limit"
    return str(exc) or type(exc).__name__
