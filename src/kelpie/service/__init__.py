"""The sandbox service: the one typed set of calls every front end uses.

:class:`SandboxService` is implemented by :class:`~kelpie.runtime.Runtime` (in-process)
and :class:`~kelpie.client.DaemonClient` (a daemon over REST); mypy proves both conform.
The view protocols describe the records both return; :func:`sandbox_record` and friends
turn either side's record into the REST API's model.
"""

from kelpie.service._protocol import (
    EventView,
    ImageView,
    PushView,
    SandboxService,
    SandboxView,
    SnapshotView,
)
from kelpie.service._records import event_record, sandbox_record, snapshot_record

__all__ = [
    "EventView",
    "ImageView",
    "PushView",
    "SandboxService",
    "SandboxView",
    "SnapshotView",
    "event_record",
    "sandbox_record",
    "snapshot_record",
]
