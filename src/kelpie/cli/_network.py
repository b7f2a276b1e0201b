"""``kelpie network``: show or change where a sandbox may connect."""

from __future__ import annotations

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
