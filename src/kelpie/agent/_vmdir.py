"""A VM directory's record (``config.json``) and log tail: what re-attaching reads back.

Each VM owns one directory (see DESIGN.md); ``config.json`` names the VM, its backend, its
configuration and how it was launched, so that another process can attach to it later.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kelpie.vm import ConfigError, VmConfig, VmError

RECORD = "config.json"
CONSOLE_TAIL = 2000
VM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_vm_id(vm_id: str) -> None:
    """:class:`ConfigError` unless ``vm_id`` can name a VM directory."""
    if not VM_ID_PATTERN.fullmatch(vm_id):
        raise ConfigError([f"VM id {vm_id!r} is not a Kelpie VM id (letters, digits, _.-)"])


def write_vm_record(
    directory: Path, vm_id: str, backend: str, config: VmConfig, launch: Mapping[str, Any]
) -> None:
    """Write ``config.json``: the VM's config and how it was launched (for attach, snapshots)."""
    record = {"id": vm_id, "backend": backend, "config": config.to_dict(), "launch": dict(launch)}
    (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_vm_record(directory: Path, vm_id: str, backend: str) -> VmConfig:
    """The configuration saved in a VM directory's ``config.json`` when the VM started."""
    record_file = directory / RECORD
    try:
        record = json.loads(record_file.read_text())
    except FileNotFoundError:
        raise VmError(
            f"no Kelpie VM {vm_id!r} in {directory}: there is no {RECORD} (it is written "
            f"when a VM starts); check the id and KELPIE_STATE_DIR"
        ) from None
    except (OSError, ValueError) as exc:
        raise VmError(f"{record_file} is not a Kelpie VM record: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise VmError(f"{record_file} is not a Kelpie VM record: no \"config\" object")
    if record.get("id") != vm_id or record.get("backend") != backend:
        raise VmError(
            f"{record_file} describes {record.get('backend')!r} VM {record.get('id')!r}, "
            f"expected {backend!r} VM {vm_id!r}"
        )
    try:
        return VmConfig.from_dict(record["config"])
    except (ConfigError, TypeError) as exc:
        raise VmError(f"{record_file} holds an invalid VM configuration: {exc}") from exc


def launch_record(directory: Path) -> dict[str, Any]:
    """The ``launch`` part of ``config.json`` (empty when absent or unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        launch = json.loads((directory / RECORD).read_text()).get("launch")
        if isinstance(launch, dict):
            return launch
    return {}


def log_tail(directory: Path, names: Sequence[str], limit: int = CONSOLE_TAIL) -> str:
    """The last ``limit`` characters of each named log file of the VM directory."""
    parts = []
    for name in names:
        with contextlib.suppress(OSError):
            text = (directory / name).read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {name} ---\n{text[-limit:]}")
    return "\n".join(parts) or "(no console output)"
