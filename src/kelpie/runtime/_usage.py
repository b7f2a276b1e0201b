"""What sandboxes use: samples of the host's and the guest's counters, the guest's processes."""

from __future__ import annotations

import asyncio
import builtins

from kelpie.api import (
    GuestProcessInfo,
    GuestUsageStats,
    HostUsageStats,
    ProcessList,
    SandboxStats,
)
from kelpie.runtime._arguments import label
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._errors import SandboxStateError
from kelpie.runtime._info import SandboxInfo
from kelpie.vm import GuestUsage, HostUsage, KelpieError, VmInstance, VmState

GUEST_TIMEOUT_SECONDS = 5.0
"""How long a sample waits for the guest's counters (a busy TCG guest answers slowly)."""
FULL_BELOW_BYTES = 1 << 20


class Usage:
    """Samples what each sandbox uses, and lists its guest's processes."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self._ctx = ctx

    async def stats(self, info: SandboxInfo) -> SandboxStats:
        """One sample of a sandbox (host figures from its VMM, guest figures from its
        agent; either is None when it cannot be had, and ``guest_error`` says why)."""
        vm = self._ctx.vms.get(info.id)
        host: HostUsage | None = None
        guest: GuestUsage | None = None
        error: str | None = f"the sandbox is {info.state.value}"
        if vm is not None and vm.state in (VmState.RUNNING, VmState.PAUSED):
            # /proc reads and a walk of the VM directory: off the event loop
            host = await asyncio.to_thread(vm.host_usage)
        if vm is not None and vm.state is VmState.RUNNING:
            guest, error = await self._guest(vm)
        config = info.config
        return SandboxStats(
            id=info.id, name=info.name, state=info.state.value, at=self._ctx.clock(),
            memory_limit_bytes=config.memory_mib << 20,
            disk_limit_bytes=None if config.disk_mib is None else config.disk_mib << 20,
            disk_full=guest is not None and guest.disk_available < FULL_BELOW_BYTES,
            host=None if host is None else HostUsageStats(
                cpu_seconds=host.cpu_seconds, memory_bytes=host.memory, disk_bytes=host.disk),
            guest=None if guest is None else GuestUsageStats(
                cpu_seconds=guest.cpu_seconds, cpus=guest.cpus,
                memory_used_bytes=guest.memory_used, memory_total_bytes=guest.memory_total,
                disk_used_bytes=guest.disk_used, disk_total_bytes=guest.disk_total,
                disk_available_bytes=guest.disk_available, net_rx_bytes=guest.net_rx,
                net_tx_bytes=guest.net_tx, processes=guest.processes,
                uptime_seconds=guest.uptime),
            guest_error=error,
        )

    async def stats_all(self, infos: builtins.list[SandboxInfo]) -> builtins.list[SandboxStats]:
        """A sample of each sandbox, taken together (one slow guest delays only itself)."""
        return list(await asyncio.gather(*(self.stats(info) for info in infos)))

    async def _guest(self, vm: VmInstance) -> tuple[GuestUsage | None, str | None]:
        try:
            async with asyncio.timeout(GUEST_TIMEOUT_SECONDS):
                return await vm.guest_usage(), None
        except TimeoutError:
            return None, f"the guest did not answer within {GUEST_TIMEOUT_SECONDS:g} s"
        except KelpieError as exc:
            return None, str(exc)

    async def processes(self, info: SandboxInfo) -> ProcessList:
        """The guest's processes, their start times on the host's clock."""
        vm = self._ctx.vms.get(info.id)
        if vm is None or vm.state is not VmState.RUNNING:
            raise SandboxStateError(label(info), "list processes", info.state, [VmState.RUNNING],
                                    f"; start it first (kelpie start {info.name})")
        listing = await vm.guest_processes()
        booted = self._ctx.clock() - listing.uptime
        return ProcessList(sandbox_id=info.id, truncated=listing.truncated, processes=[
            GuestProcessInfo(pid=p.pid, ppid=p.ppid, uid=p.uid, state=p.state,
                             cpu_seconds=p.cpu_seconds, memory_bytes=p.memory,
                             started_at=booted + p.started, command=list(p.argv))
            for p in listing.processes])

    async def disk_full(self, info: SandboxInfo) -> str | None:
        """A warning when the sandbox's root file system is full (None: it is not, or
        that cannot be told now)."""
        vm = self._ctx.vms.get(info.id)
        if vm is None or vm.state is not VmState.RUNNING or info.config.disk_mib is None:
            return None
        guest, _ = await self._guest(vm)
        if guest is None or guest.disk_available >= FULL_BELOW_BYTES:
            return None
        return (f"the root disk of sandbox {label(info)} is full ({guest.disk_used >> 20} MiB "
                f"used of {guest.disk_total >> 20} MiB): writes fail with 'No space left on "
                "device'; free space in it, or give a new sandbox a larger --disk")
