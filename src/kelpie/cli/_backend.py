"""``kelpie backend``: what backends exist and which of them run on this host."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from kelpie.vm import DEFAULT_REGISTRY


@click.group()
def backend() -> None:
    """Inspect VM backends."""


@backend.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_backends(as_json: bool) -> int:
    """List backends, whether each runs here, why, and what it can do.

    "picked auto": chosen when no backend is named (the best available one, by priority);
    "by name": only with --backend or KELPIE_BACKEND."""
    rows = []
    for name in DEFAULT_REGISTRY.names():
        spec = DEFAULT_REGISTRY.get(name)
        probe = DEFAULT_REGISTRY.probe(name)
        rows.append({
            "name": name,
            "available": probe.available,
            "reason": probe.reason,
            "details": dict(probe.details),
            "real": spec.real,
            "auto_selected": spec.real and spec.auto_selected,
            "capabilities": spec.capabilities.names(),
            "description": spec.description,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    table = Table("backend", "available", "picked", "why", "capabilities")
    for row in rows:
        table.add_row(
            str(row["name"]),
            "yes" if row["available"] else "no",
            "auto" if row["auto_selected"] else "by name",
            str(row["reason"]),
            ", ".join(row["capabilities"]),  # type: ignore[arg-type]
        )
    Console().print(table)
    return 0
