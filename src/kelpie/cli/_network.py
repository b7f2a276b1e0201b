"""``kelpie network`` and ``kelpie timeout``: show or change where a sandbox may connect
and how long it may live."""

from __future__ import annotations

import time

import click

from kelpie.api import Sandbox
from kelpie.cli._sandbox import _client_call
from kelpie.client import DaemonClient


@click.command("network")
@click.option("--mode", type=click.Choice(["nat", "policy"]), default=None,
              help="Switch between nat and policy (a sandbox's NIC itself is fixed).")
@click.option("--allow", multiple=True, metavar="TARGET[:PORT]",
              help="Egress rule (repeatable; the rules given replace the sandbox's).")
@click.option("--deny", multiple=True, metavar="TARGET[:PORT]",
              help="Egress rule that wins over --allow (repeatable).")
@click.option("--clear", is_flag=True, help="Remove every rule.")
@click.argument("sandbox")
def network(mode: str | None, allow: tuple[str, ...], deny: tuple[str, ...], clear: bool,
            sandbox: str) -> int:
    """Show a sandbox's network mode and egress rules, or replace them: a running sandbox
    obeys new rules from its next packet.

    \b
    kelpie network box                                  # show
    kelpie network box --mode policy --allow pypi.org:443 --allow '*.pythonhosted.org'
    kelpie network box --clear                          # nat without exceptions
    """
    if clear and (allow or deny):
        raise click.UsageError("--clear removes every rule: give it without --allow/--deny")

    async def call(client: DaemonClient) -> int:
        if mode is None and not (allow or deny or clear):
            record = await client.inspect(sandbox)
        else:
            record = await client.set_network(sandbox, allow=allow, deny=deny, network=mode)
        _show(record)
        return 0

    return _client_call(call)


def _show(record: Sandbox) -> None:
    click.echo(f"{record.name}: network {record.network}")
    for kind, rules in (("allow", record.allow), ("deny", record.deny)):
        for rule in rules:
            click.echo(f"  {kind} {rule}")
    if not record.allow and not record.deny:
        click.echo("  (no rules)" if record.network != "none" else "  (no NIC)")


@click.command("timeout")
@click.option("--on-timeout", type=click.Choice(["remove", "pause", "stop"]), default=None,
              help="What happens when it passes (default: as set before; at first remove).")
@click.argument("sandbox")
@click.argument("seconds", required=False)
def timeout(on_timeout: str | None, sandbox: str, seconds: str | None) -> int:
    """Show when a sandbox's timeout passes, or give it one SECONDS from now (`none`: no
    timeout); when it passes the sandbox is removed, or paused or stopped (--on-timeout).

    \b
    kelpie timeout box              # show
    kelpie timeout box 300 --on-timeout pause
    kelpie timeout box none
    """
    limit: float | None = None
    if seconds is not None and seconds.lower() != "none":
        try:
            limit = float(seconds)
        except ValueError:
            raise click.BadParameter(f"{seconds!r} is not a number of seconds or 'none'",
                                     param_hint="SECONDS") from None

    async def call(client: DaemonClient) -> int:
        if seconds is None and on_timeout is None:
            record = await client.inspect(sandbox)
        else:
            if seconds is None:
                raise click.UsageError("give SECONDS (or none) with --on-timeout")
            record = await client.set_timeout(sandbox, limit, on_timeout=on_timeout)
        if record.expires_at is None:
            click.echo(f"{record.name}: no timeout")
        else:
            left = record.expires_at - time.time()
            click.echo(f"{record.name}: {record.on_timeout} in {max(left, 0):.0f} s")
        return 0

    return _client_call(call)
