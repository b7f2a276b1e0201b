"""A fleet: many hosts as one pool of sandboxes, on Ray.

:class:`FleetCoordinator` places sandboxes, keeps the directory of where each one is,
declares silent hosts dead and reports what they lost, recovers lost sandboxes from their
states saved in the shared store, and drains hosts by teleport. It
takes its clock, randomness and host links as parameters, so the DST drives the same code
over simulated hosts (:mod:`kelpie.dst`). Under Ray, each VM host runs a host agent actor
and one controller actor runs the coordinator; :class:`Fleet` is the client.
"""

from typing import TYPE_CHECKING, Any

from kelpie.fleet._coordinator import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_LOST_AFTER,
    FleetCoordinator,
    FleetError,
    HostLink,
    UnknownSandbox,
)
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
from kelpie.fleet._placement import RESERVE_MIB, PlacementError, choose_host
from kelpie.fleet._store import SharedStore, StoreConfig, StoredTemplate, StoreError
from kelpie.fleet._templates import FleetTemplates

if TYPE_CHECKING:
    from kelpie.fleet._agent import HostAgent
    from kelpie.fleet._client import AsyncFleet, Fleet

_RAY_HOMES = {"AsyncFleet": "kelpie.fleet._client", "Fleet": "kelpie.fleet._client",
              "HostAgent": "kelpie.fleet._agent"}


def __getattr__(name: str) -> Any:
    # the Ray-backed names import ray (seconds, and an optional dependency): only when used
    if name not in _RAY_HOMES:
        raise AttributeError(f"module 'kelpie.fleet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_RAY_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_LOST_AFTER",
    "FLEET_LABEL",
    "GENERATION_LABEL",
    "RECOVER_LABEL",
    "RESERVE_MIB",
    "AsyncFleet",
    "Fleet",
    "FleetCoordinator",
    "FleetError",
    "FleetEvent",
    "FleetHost",
    "FleetSandbox",
    "FleetTemplates",
    "HostAgent",
    "HostLink",
    "HostReport",
    "HostStatus",
    "HostedSandbox",
    "Placement",
    "PlacementError",
    "Recovery",
    "SandboxStatus",
    "SavedState",
    "SharedStore",
    "StoreConfig",
    "StoreError",
    "StoredTemplate",
    "UnknownSandbox",
    "choose_host",
]
