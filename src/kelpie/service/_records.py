"""Records in the REST API's wire form, from either side of the service.

The runtime answers with its own dataclasses, a daemon's client with the API's models; the
daemon serialises the former, and the SDK hands every caller the latter whichever side it
talks to. The API models sit below the runtime and cannot know its types, so the
conversions live here, above both.
"""

from __future__ import annotations

from typing import TypeVar

from kelpie.api import Event, Port, Sandbox, Snapshot, Volume
from kelpie.runtime import SandboxEvent, SandboxInfo, SnapshotInfo
from kelpie.service._protocol import EventView, SandboxView, SnapshotView

T = TypeVar("T")


def sandbox_record(view: SandboxView) -> Sandbox:
    """A sandbox as the API shows it."""
    if isinstance(view, Sandbox):
        return view
    info = _expect(view, SandboxInfo)
    config = info.config
    return Sandbox(
        id=info.id, short_id=info.short_id, name=info.name, backend=info.backend,
        arch=config.arch or "", state=info.state.value, image=info.image,
        image_digest=info.image_digest,
        cpus=config.vcpus, memory_mib=config.memory_mib, disk_mib=config.disk_mib,
        network=config.network.value,
        allow=[str(r) for r in config.egress.allow], deny=[str(r) for r in config.egress.deny],
        env=dict(config.env),
        volumes=[Volume(host_path=str(m.host_path), guest_path=m.guest_path,
                        read_only=m.read_only) for m in config.mounts],
        ports=[Port(host_ip=p.host_ip, host_port=p.host_port, guest_port=p.guest_port,
                    protocol=p.protocol) for p in config.ports],
        workdir=info.workdir, user=info.user,
        command=None if info.command is None else list(info.command),
        image_command=None if info.image_command is None else list(info.image_command),
        image_entrypoint=list(info.image_entrypoint),
        main_exit_code=info.main_exit_code, restart=str(info.restart),
        restart_count=info.restart_count, stop_timeout=info.stop_timeout,
        expires_at=info.expires_at, on_timeout=info.on_timeout,
        crash_reason=info.crash_reason,
        last_error=info.last_error, labels=dict(info.labels),
        created_at=info.created_at, updated_at=info.updated_at,
    )


def event_record(view: EventView) -> Event:
    """A recorded state change as the API shows it."""
    if isinstance(view, Event):
        return view
    event = _expect(view, SandboxEvent)
    return Event(at=event.at, state=event.state.value, reason=event.reason, seq=event.seq,
                 sandbox_id=event.sandbox_id, name=event.name, kind=event.kind.value)


def snapshot_record(view: SnapshotView) -> Snapshot:
    """A snapshot (or template) as the API shows it."""
    if isinstance(view, Snapshot):
        return view
    info = _expect(view, SnapshotInfo)
    return Snapshot(id=info.id, short_id=info.short_id, name=info.name, kind=info.kind.value,
                    template=info.template, backend=info.backend, sandbox_id=info.sandbox_id,
                    sandbox_name=info.sandbox_name, image=info.image,
                    image_digest=info.image_digest, cpus=info.sandbox.config.vcpus,
                    memory_mib=info.sandbox.config.memory_mib, size=info.size,
                    created_at=info.created_at)


def _expect(view: object, kind: type[T]) -> T:
    if not isinstance(view, kind):
        raise TypeError(f"{type(view).__name__} is not a record this module knows; expected "
                        f"the runtime's {kind.__name__} or the API's model")
    return view
