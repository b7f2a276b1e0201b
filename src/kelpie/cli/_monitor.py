"""Watching sandboxes: ``kelpie events``, ``stats``, ``top`` and ``attach``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence

import click

from kelpie.api import Event, SandboxStats
from kelpie.cli._sandbox import _client_call
from kelpie.client import DaemonClient
from kelpie.vm import ConfigError

STATS_INTERVAL_SECONDS = 1.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
FILTER_KEYS = ("sandbox", "kind", "state")


def point_in_time(text: str, option: str, *, now: float) -> float:
    """Docker's ``--since``/``--until`` forms: Unix seconds, an RFC 3339 time (UTC when it
    names no zone), or a duration back from now (``10m``, ``1h30m``, ``2d``)."""
    with_units = text.strip()
    if _DURATION.fullmatch(with_units):
        parts = _DURATION_PART.findall(with_units)
        return now - sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    try:
        return float(with_units)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(with_units)
    except ValueError:
        raise ConfigError([f"{option} {text!r}: expected Unix seconds, a time such as "
                           "2026-12-05T10:00:00, or a duration back from now such as 10m, "
                           "1h30m"], what="time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def event_filters(filters: Sequence[str]) -> dict[str, list[str]]:
    """``KEY=VALUE`` filters grouped by key (sandbox, kind, state)."""
    grouped: dict[str, list[str]] = {key: [] for key in FILTER_KEYS}
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep or key not in grouped or not value:
            raise ConfigError([f"--filter {text!r}: expected KEY=VALUE with KEY one of "
                               f"{', '.join(FILTER_KEYS)}"], what="event filter")
        grouped[key].append(value)
    return grouped


def event_line(event: Event) -> str:
    when = datetime.datetime.fromtimestamp(event.at, datetime.UTC)
    what = event.state if event.kind == "state" else event.kind
    line = f"{when.isoformat(timespec='milliseconds')}  {what:<11} {event.name} " \
           f"({event.sandbox_id[:12]})"
    return f"{line}  {event.reason}" if event.reason else line


@click.command("events")
@click.option("--since", default=None, metavar="TIME",
              help="Start with the events since TIME: Unix seconds, 2026-12-05T10:00:00 "
                   "(UTC unless a zone is given) or a duration such as 10m (default: now).")
@click.option("--until", default=None, metavar="TIME",
              help="Stop at TIME (same forms); default: stream until interrupted.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="sandbox=NAME|ID, kind=state|main-exited|restarted|renamed|removed, "
                   "state=STATE (repeatable: values of one key widen, keys narrow).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(since: str | None, until: str | None, filters: tuple[str, ...],
           as_json: bool) -> int:
    """Every sandbox's events as they happen: state changes, main command exits and
    restarts, renames, removals (Docker's ``events``)."""
    now = time.time()
    start = None if since is None else point_in_time(since, "--since", now=now)
    end = None if until is None else point_in_time(until, "--until", now=now)
    grouped = event_filters(filters)

    async def call(client: DaemonClient) -> int:
        async for event in client.watch_events(
                since=start, until=end, sandboxes=grouped["sandbox"], kinds=grouped["kind"],
                states=grouped["state"]):
            click.echo(json.dumps(event.model_dump(mode="json")) if as_json
                       else event_line(event))
        return 0

    return _client_call(call)


# ---- stats ------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _percent(now: float | None, before: float | None, elapsed: float) -> str:
    if now is None or before is None or elapsed <= 0:
        return "--"
    return f"{max(0.0, now - before) / elapsed * 100:.1f}%"


def stats_row(now: SandboxStats, before: SandboxStats | None) -> dict[str, str]:
    """One line of ``kelpie stats``: CPU as a share of one CPU between two samples (the
    guest's own busy time over its clock, and the VMM process's over the host's)."""
    guest, host = now.guest, now.host
    old_guest = before.guest if before is not None else None
    old_host = before.host if before is not None else None
    guest_elapsed = (guest.uptime_seconds - old_guest.uptime_seconds) \
        if guest is not None and old_guest is not None else 0.0
    row = {
        "NAME": now.name, "ID": now.id[:12], "STATE": now.state,
        "CPU %": _percent(guest.cpu_seconds if guest else None,
                          old_guest.cpu_seconds if old_guest else None, guest_elapsed),
        "VMM CPU %": _percent(host.cpu_seconds if host else None,
                              old_host.cpu_seconds if old_host else None,
                              now.at - before.at if before is not None else 0.0),
        "MEM USAGE / LIMIT": "--" if guest is None else
        f"{_size(guest.memory_used_bytes)} / {_size(now.memory_limit_bytes)}",
        "VMM RSS": "--" if host is None else _size(host.memory_bytes),
        "DISK / SIZE": "--" if guest is None else
        f"{_size(guest.disk_used_bytes)} / {_size(guest.disk_total_bytes)}"
        + (" FULL" if now.disk_full else ""),
        "NET I/O": "--" if guest is None else
        f"{_size(guest.net_rx_bytes)} / {_size(guest.net_tx_bytes)}",
        "PIDS": "--" if guest is None else str(guest.processes),
    }
    return row


def _print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        click.echo("no running sandboxes")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


@click.command("stats")
@click.option("--no-stream", is_flag=True, help="Print one sample and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the raw samples (one JSON list per sample; counters, not rates).")
@click.argument("sandboxes", nargs=-1)
def stats(no_stream: bool, as_json: bool, sandboxes: tuple[str, ...]) -> int:
    """What sandboxes use, live (Docker's ``stats``): CPU from the guest's own counters
    and the host's view of the VMM process, memory, root disk, network, processes. Without
    names, every running or paused sandbox."""
    async def sample(client: DaemonClient) -> list[SandboxStats]:
        if not sandboxes:
            return await client.stats_all()
        return list(await asyncio.gather(*(client.stats(ref) for ref in sandboxes)))

    async def call(client: DaemonClient) -> int:
        before = {s.id: s for s in await sample(client)}
        while True:
            if as_json and no_stream:
                click.echo(json.dumps([s.model_dump(mode="json") for s in before.values()]))
                return 0
            await asyncio.sleep(STATS_INTERVAL_SECONDS)  # a rate needs a second sample
            now = await sample(client)
            if as_json:
                click.echo(json.dumps([s.model_dump(mode="json") for s in now]))
            else:
                if not no_stream and sys.stdout.isatty():
                    click.echo("\x1b[H\x1b[2J", nl=False)  # redraw in place, as docker does
                _print_table([stats_row(s, before.get(s.id)) for s in now])
            if no_stream:
                return 0
            before = {s.id: s for s in now}

    return _client_call(call)


# ---- top --------------------------------------------------------------------------------
@click.command("top")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("sandbox")
def top(as_json: bool, sandbox: str) -> int:
    """The processes running in a sandbox's guest (Docker's ``top``)."""
    async def call(client: DaemonClient) -> int:
        listing = await client.processes(sandbox)
        if as_json:
            click.echo(json.dumps(listing.model_dump(mode="json")))
            return 0
        rows = [{"UID": str(p.uid), "PID": str(p.pid), "PPID": str(p.ppid), "S": p.state,
                 "STIME": time.strftime("%H:%M:%S", time.localtime(p.started_at)),
                 "TIME": f"{int(p.cpu_seconds) // 60}:{p.cpu_seconds % 60:05.2f}",
                 "RSS": _size(p.memory_bytes), "CMD": " ".join(p.command)}
                for p in listing.processes]
        _print_table(rows)
        if listing.truncated:
            click.echo("kelpie: more processes run than one listing holds (4096)", err=True)
        return 0

    return _client_call(call)


# ---- attach -----------------------------------------------------------------------------
@click.command("attach")
@click.option("--sig-proxy/--no-sig-proxy", default=True, show_default=True,
              help="Forward SIGINT (Ctrl-C) and SIGTERM to the main command (Docker's "
                   "default); without, Ctrl-C detaches and leaves it running.")
@click.argument("sandbox")
def attach(sig_proxy: bool, sandbox: str) -> int:
    """Follow a sandbox's main command: its output from now on, until it ends (after any
    restarts its policy makes); exits with its exit code. Ctrl-C reaches the command as
    SIGINT (see --sig-proxy). (Kelpie runs main commands without stdin: use ``exec -i``
    to type into one.)"""
    async def call(client: DaemonClient) -> int:
        record = await client.inspect(sandbox)
        if record.command is None:
            raise ConfigError([f"sandbox {record.name} has no main command to attach to; "
                               "use `kelpie exec -it` to run one"], what="attach")
        with contextlib.ExitStack() as stack:
            if sig_proxy:
                stack.enter_context(_signals_to_main(client, record.id))
            return await _follow_main(client, record.id)

    return _client_call(call)


@contextlib.contextmanager
def _signals_to_main(client: DaemonClient, sandbox_id: str) -> Iterator[None]:
    """While attached: SIGINT and SIGTERM go to the sandbox's main command."""
    loop = asyncio.get_running_loop()
    sent: set[asyncio.Task[object]] = set()

    def forward(signum: int) -> None:
        task = loop.create_task(client.kill(sandbox_id, signal=signum))
        sent.add(task)
        task.add_done_callback(sent.discard)  # the command may have ended: nothing to do
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    forwarded = (signal.SIGINT, signal.SIGTERM)
    for signum in forwarded:
        loop.add_signal_handler(signum, forward, signum)
    try:
        yield
    finally:
        for signum in forwarded:
            loop.remove_signal_handler(signum)


async def _follow_main(client: DaemonClient, sandbox_id: str) -> int:
    """Print the main command's output from now until it ends; its exit code."""
    skip = len(await client.read_logs(sandbox_id))
    seen = 0
    progressed = asyncio.Event()

    async def pump() -> None:
        nonlocal seen
        async for chunk in client.follow_logs(sandbox_id):  # the whole log, in order
            new = chunk[max(0, skip - seen):]
            seen += len(chunk)
            if new:
                sys.stdout.buffer.write(new)
                sys.stdout.flush()
            progressed.set()

    pumping = asyncio.create_task(pump())
    try:
        code = await client.wait_main(sandbox_id)
        total = len(await client.read_logs(sandbox_id))  # final: the command has ended
        while seen < total and not pumping.done():
            progressed.clear()
            await progressed.wait()
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
    return 0 if code is None else code
