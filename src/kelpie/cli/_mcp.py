"""``kelpie mcp``: serve Kelpie sandboxes to AI agents over the Model Context Protocol,
on stdio (the default: the agent starts this command) or streamable HTTP (loopback by
default, a bearer token required)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from kelpie._units import mib
from kelpie.cli._connect import connect


@click.command("mcp")
@click.option("--http", "listen", default=None, metavar="[HOST:]PORT",
              help="Serve streamable HTTP at http://HOST:PORT/mcp (HOST 127.0.0.1 unless "
                   "given) instead of stdio; needs --token-file.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token HTTP clients must send.")
@click.option("--max-sandboxes", type=int, default=4, show_default=True,
              help="Sandboxes the agent may have at once (forks count).")
@click.option("--max-memory", default="2g", show_default=True,
              help="The most memory one sandbox may have.")
@click.option("--memory", "default_memory", default="512m", show_default=True,
              help="Memory of a sandbox when the agent names none.")
@click.option("--image", "images", multiple=True, metavar="PATTERN",
              help="Images and templates the agent may use (shell patterns; default: any).")
@click.option("--network", type=click.Choice(["none", "nat", "policy"]), default="none",
              show_default=True, help="The network of every sandbox the agent makes.")
@click.option("--allow", multiple=True, metavar="RULE",
              help="Egress rule for --network policy (TARGET[:PORT]).")
def mcp(listen: str | None, token_file: Path | None, max_sandboxes: int, max_memory: str,
        default_memory: str, images: tuple[str, ...], network: str,
        allow: tuple[str, ...]) -> int:
    """Serve the Model Context Protocol: tools to create sandboxes, run commands (output
    streamed as progress), read, write and list files, snapshot, fork and remove, acting
    only on the sandboxes made through it, within the limits given here."""
    from kelpie._address import read_token_file
    from kelpie.mcp import McpPolicy, make_server, serve_http, serve_stdio

    try:
        policy = McpPolicy(max_sandboxes=max_sandboxes,
                           max_memory_mib=mib(max_memory, "--max-memory"),
                           default_memory_mib=mib(default_memory, "--memory"),
                           images=images or ("*",), network=network, allow=allow)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    host, port = _listen(listen) if listen else ("", 0)
    if listen and token_file is None:
        raise click.UsageError("--http needs --token-file: HTTP clients must send its token")
    token = read_token_file(token_file) if token_file else ""

    async def main() -> int:
        client = await connect()
        try:
            server = make_server(client, policy)
            if listen:
                await serve_http(server, host, port, token, ready=lambda bound: click.echo(
                    f"kelpie mcp: serving http://{host}:{bound}/mcp", err=True))
            else:
                await serve_stdio(server)
        finally:
            await client.close()
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stderr.flush()


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.UsageError(f"--http {text}: give [HOST:]PORT with PORT 0-65535")
    return host.strip("[]") or "127.0.0.1", int(port)
