"""``kelpie fleet``: start the fleet on a Ray cluster, see its hosts and sandboxes, drain."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from kelpie.fleet import Fleet

_ADDRESS = click.option(
    "--address", envvar="RAY_ADDRESS", metavar="HOST:PORT",
    help="The Ray cluster (default: RAY_ADDRESS, else the one this machine runs).")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _fleet(address: str | None) -> Fleet:
    from kelpie.fleet import Fleet

    return Fleet(address)


@click.group()
def fleet() -> None:
    """Many hosts as one pool, on Ray: every node started with the resource kelpie_host
    (ray start --resources '{"kelpie_host": 1}') runs a host agent and a daemon.

    \b
    kelpie fleet up                  # on any node of the cluster
    kelpie fleet status
    kelpie fleet ls
    kelpie fleet share TEMPLATE      # to every host, through the S3 store
    kelpie fleet drain 10.0.0.12     # teleport its sandboxes elsewhere
    """


@fleet.command("up")
@_ADDRESS
@click.option("--port", type=click.IntRange(1, 65535), default=7075, show_default=True,
              help="TCP port of each host's daemon (on the node's Ray address).")
@click.option("--lost-after", type=click.FloatRange(min=1), default=120.0, show_default=True,
              metavar="SECONDS",
              help="A host silent this long is declared dead (Ray reports a dead node sooner).")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              metavar="SECONDS", help="How often every host is asked for a report.")
@click.option("--memory", "memory_mib", type=click.IntRange(min=256), default=None,
              metavar="MIB", help="Memory the fleet may place on each host (default: what "
                                  "the host has free).")
@click.option("--store-endpoint", metavar="URL",
              help="An S3-compatible store to share templates through (credentials from "
                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).")
@click.option("--store-bucket", metavar="NAME", default="kelpie", show_default=True,
              help="Its bucket (it must exist).")
@click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST:PORT",
              help="A registry hosts may pull a shared template's image from over plain "
                   "HTTP (repeatable).")
def up(address: str | None, port: int, lost_after: float, interval: float,
       memory_mib: int | None, store_endpoint: str | None, store_bucket: str,
       insecure_registries: tuple[str, ...]) -> int:
    """Start the fleet's controller and a host agent on every kelpie_host node (a no-op
    for what already runs)."""
    import os

    from kelpie.fleet import Fleet, StoreConfig

    store = None
    if store_endpoint:
        keys = [os.environ.get(n) for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        if not all(keys):
            raise click.UsageError("--store-endpoint needs the store's credentials in "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        store = StoreConfig(store_endpoint, store_bucket, str(keys[0]), str(keys[1]))
    started = Fleet.up(address, port=port, lost_after=lost_after, interval=interval,
                       memory_mib=memory_mib, store=store,
                       insecure_registries=insecure_registries)
    _show_hosts(started, as_json=False)
    return 0


@fleet.command("status")
@_ADDRESS
@_JSON
def status(address: str | None, as_json: bool) -> int:
    """The hosts: status, arches, backends, free memory, sandboxes; then recent events."""
    _show_hosts(_fleet(address), as_json=as_json)
    return 0


@fleet.command("ls")
@_ADDRESS
@_JSON
def ls(address: str | None, as_json: bool) -> int:
    """The fleet's sandboxes and where they are."""
    sandboxes = _fleet(address).list()
    if as_json:
        click.echo(json.dumps([_plain(s) for s in sandboxes], indent=2))
        return 0
    click.echo(f"{'NAME':<24} {'ID':<12} {'HOST':<16} {'STATUS':<10} {'STATE':<9} "
               f"{'MEMORY':>7}  {'RECOVER':<16} REASON")
    for s in sandboxes:
        recover = "-" if s.recover is None else s.recover.label() + (
            f" (saved g{s.saved.generation})" if s.saved else " (none saved)")
        click.echo(f"{s.name:<24} {(s.id or '-')[:12]:<12} {s.host:<16} {s.status.value:<10} "
                   f"{s.state or '-':<9} {s.memory_mib:>4} MiB  {recover:<16} {s.reason or ''}")
    return 0


@fleet.command("share")
@_ADDRESS
@click.option("--no-push", is_flag=True,
              help="Only pull what the store holds onto the hosts lacking it.")
@click.argument("template")
def share(address: str | None, no_push: bool, template: str) -> int:
    """Push TEMPLATE from a host that holds it to the shared store and pull it (sha256
    verified) onto every other host."""
    current = _fleet(address)
    hosts = current.pull_template(template) if no_push else current.share_template(template)
    click.echo(f"template {template} is on {len(hosts)} hosts: {', '.join(hosts)}")
    return 0


@fleet.command("drain")
@_ADDRESS
@click.option("--undo", is_flag=True, help="Place on the host again instead.")
@click.argument("host")
def drain(address: str | None, undo: bool, host: str) -> int:
    """Stop placing on HOST and teleport its sandboxes to other hosts (exit 1 if any
    stayed)."""
    current = _fleet(address)
    if undo:
        current.undrain(host)
        click.echo(f"placing on {host} again")
        return 0
    moved = current.drain(host)
    stayed = [s for s in moved if s.host == host]
    for s in moved:
        where = f"stayed: {s.reason}" if s.host == host else f"-> {s.host}"
        click.echo(f"{s.name} {where}")
    click.echo(f"drained {host}: {len(moved) - len(stayed)} moved, {len(stayed)} stayed")
    return 1 if stayed else 0


def _show_hosts(current: Fleet, *, as_json: bool) -> None:
    hosts = current.hosts()
    problems = current.problems()
    if as_json:
        click.echo(json.dumps({"hosts": [_plain(h) for h in hosts], "problems": problems,
                               "events": [_plain(e) for e in current.events()[-20:]]},
                              indent=2))
        return
    click.echo(f"{'HOST':<16} {'STATUS':<9} {'ARCHES':<16} {'BACKENDS':<12} {'FREE MEM':>9} "
               f"{'SANDBOXES':>9}  NOTE")
    now = time.monotonic()
    for h in hosts:
        report = h.report
        arches = ",".join(report.arches) if report else "-"
        backends = ",".join(report.backends) if report else "-"
        free = f"{report.free_memory_mib} MiB" if report else "-"
        note = h.reason or (f"seen {now - h.last_seen:.0f} s ago" if h.last_seen else "")
        click.echo(f"{h.host:<16} {h.status.value:<9} {arches:<16} {backends:<12} {free:>9} "
                   f"{h.sandboxes:>9}  {note}")
    for ip, problem in sorted(problems.items()):
        click.echo(f"{ip:<16} {'failed':<9} {problem}")
    if not hosts and not problems:
        click.echo("no host yet: start Ray nodes with --resources '{\"kelpie_host\": 1}'")


def _plain(value: Any) -> Any:
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, frozenset | set | tuple | list):
        items = [_plain(v) for v in value]
        return sorted(items) if isinstance(value, frozenset | set) else items
    return value
