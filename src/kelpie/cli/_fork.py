"""``kelpie fork``: one running sandbox into many, each a copy of it now."""

from __future__ import annotations

import click

from kelpie._units import optional_mib
from kelpie.cli._sandbox import _client_call
from kelpie.client import DaemonClient


@click.command("fork")
@click.option("-n", "--count", type=click.IntRange(1, 100), default=1, show_default=True,
              help="How many children.")
@click.option("--name-prefix", default=None, metavar="PREFIX",
              help="Name the children PREFIX-1 ... (default: the sandbox's name).")
@click.option("--name", "names", multiple=True,
              help="The children's names, one per child (instead of PREFIX-N).")
@click.option("--disk", default=None, metavar="SIZE",
              help="The children's root disk (as for run): at least the sandbox's; it "
                   "grows while they run (default: the sandbox's).")
@click.argument("sandbox")
def fork(count: int, name_prefix: str | None, names: tuple[str, ...], disk: str | None,
         sandbox: str) -> int:
    """Fork a running SANDBOX into children that go on from this moment: its memory,
    processes and files, each with its own id, host name, RNG and disk (no published
    ports). The sandbox pauses only while it is captured; children share its memory
    copy-on-write where the backend can (QEMU). Prints the children's names.

    \b
    kelpie fork agent -n 4              # agent-1 ... agent-4
    kelpie fork agent --name try-a --name try-b
    kelpie fork agent -n 2 --disk 20g   # children with a bigger disk
    """
    if names and count not in (1, len(names)):
        raise click.UsageError(f"-n {count} with {len(names)} --name: give one or the other")

    async def call(client: DaemonClient) -> int:
        children = await client.fork(sandbox, len(names) or count, name_prefix=name_prefix,
                                     names=list(names) or None,
                                     disk_mib=optional_mib(disk, "disk"))
        for child in children:
            click.echo(f"{child.name}\t{child.short_id}\t{child.state}")
        return 0

    return _client_call(call)
