"""Entry point: the command group and the one exception-to-exit-code wrapper."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from kelpie._exceptions import (
    BackendUnavailable,
    ConfigError,
    ExecError,
    ExecTimeout,
    KelpieError,
)
from kelpie._version import __version__
from kelpie.cli._target import target_from

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_KELPIE_ERROR = 125
EXIT_CANNOT_EXEC = 126
EXIT_INTERRUPTED = 130

# Most specific first: the first matching class decides the code.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ExecTimeout, EXIT_TIMEOUT),
    (ExecError, EXIT_CANNOT_EXEC),
    (ConfigError, EXIT_USAGE),
    (BackendUnavailable, EXIT_KELPIE_ERROR),
    (KelpieError, EXIT_KELPIE_ERROR),
)


# Each command's module is imported only when the command runs (or help lists it), so a
# command pays for its own imports only.
COMMANDS = {
    "run": "_run:run", "create": "_run:create", "exec": "_exec:exec_", "ps": "_sandbox:ps",
    "inspect": "_sandbox:inspect", "logs": "_sandbox:logs", "start": "_sandbox:start",
    "stop": "_sandbox:stop", "kill": "_sandbox:kill", "pause": "_sandbox:pause",
    "resume": "_sandbox:resume", "rm": "_sandbox:rm", "cp": "_sandbox:cp",
    "snapshot": "_snapshot:snapshot", "restore": "_snapshot:restore",
    "template": "_snapshot:template", "daemon": "_daemon:daemon", "image": "_image:image",
    "backend": "_backend:backend", "dst": "_dst:dst", "guestkit": "_guestkit:guestkit",
    "teleport": "_teleport:teleport", "network": "_network:network", "fork": "_fork:fork",
    "wait": "_sandbox:wait", "rename": "_sandbox:rename", "port": "_sandbox:port",
    "events": "_monitor:events", "stats": "_monitor:stats", "top": "_monitor:top",
    "attach": "_monitor:attach", "commit": "_sandbox:commit", "build": "_build:build",
    "mcp": "_mcp:mcp", "fleet": "_fleet:fleet", "dashboard": "_dashboard:dashboard",
    "timeout": "_network:timeout",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command: click.Command = getattr(importlib.import_module(f"kelpie.cli.{module}"), attr)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kelpie")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--host", envvar="KELPIE_HOST", metavar="URL",
              help="Daemon to talk to: unix:///PATH or http(s)://HOST:PORT "
                   "(default: the local daemon's socket).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with the bearer token for a TCP daemon (else KELPIE_TOKEN).")
@click.option("--no-autostart", is_flag=True,
              help="Do not start the local daemon when none runs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, host: str | None, token_file: Path | None,
        no_autostart: bool) -> None:
    """Kelpie: run untrusted code in hardware-isolated micro-VMs.

    Sandbox commands talk to the Kelpie daemon, starting a local one in the background
    when none runs (see `kelpie daemon`).
    """
    ctx.ensure_object(dict).update(debug=debug,
                                   target=target_from(host, token_file, not no_autostart))
    if ctx.invoked_subcommand != "exec":  # exec does it off its fast path, which logs nothing
        log_to_stderr(debug)


def log_to_stderr(debug: bool) -> None:
    """Kelpie's log records go to stderr as ``kelpie: MESSAGE`` (debug ones with --debug)."""
    import logging  # here, not at the top: 6 ms that `--version` and `exec` do without

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kelpie: %(message)s"))
    logger = logging.getLogger("kelpie")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)



def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that reached the top (a daemon's error arrives as
    its class, see :func:`kelpie.client.remote_error`)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _is_validation_error(exc: BaseException) -> bool:
    # pydantic is imported only by commands that build request models: not for --version.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(exc, pydantic.ValidationError)


def run() -> NoReturn:
    """The ``kelpie`` console script (and ``python -m kelpie``): :func:`main` on our
    arguments, then exit with its code."""
    sys.exit(main(end_process=True))


def main(argv: Sequence[str] | None = None, *, end_process: bool = False) -> int:
    """Run the CLI; returns the process exit code.

    ``end_process``: a command that is done may end the process itself, skipping the
    interpreter's teardown (see :func:`kelpie.cli._exec_lines.end_process`); for the
    console script only, never for a caller that goes on."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        result = cli.main(args=args, prog_name="kelpie", standalone_mode=False,
                          obj={"end_process": end_process})
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("kelpie: aborted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        if _is_validation_error(exc):  # a request model refused the input before sending it
            click.echo("kelpie: error: invalid input:", err=True)
            for error in exc.errors():  # type: ignore[attr-defined]
                where = ".".join(str(p) for p in error["loc"])
                click.echo(f"  - {where}: {error['msg']}", err=True)
            return EXIT_USAGE
        message = str(exc) or type(exc).__name__
        first, *rest = message.splitlines()
        click.echo(f"kelpie: error: {first}", err=True)
        for line in rest:
            click.echo(f"  {line.strip()}", err=True)
        return exit_code_for(exc)
    return int(result or 0)
