"""``kelpie dashboard``: a one-time link to the daemon's dashboard."""

from __future__ import annotations

import asyncio
import webbrowser

import click

from kelpie.cli._connect import connect


@click.command("dashboard")
@click.option("--open", "open_browser", is_flag=True, help="Open it in the browser too.")
def dashboard(open_browser: bool) -> int:
    """Print a link to the dashboard holding a one-time login token (good for 5 minutes,
    once). A daemon on its unix socket only opens a loopback listener for it; one with a
    TCP listener serves it there (where its token also logs in)."""
    async def ask() -> str:
        client = await connect()
        async with client:
            return (await client.dashboard_login()).url

    url = asyncio.run(ask())
    click.echo(url)
    if open_browser:
        webbrowser.open(url)
    return 0
