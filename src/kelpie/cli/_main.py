"""Entry point: the command group and the one exception-to-exit-code wrapper."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

import click

from kelpie._version import __version__
from kelpie.cli import _backend, _dst, _guestkit, _image, _run
from kelpie.vm import BackendUnavailable, ConfigError, ExecError, ExecTimeout, KelpieError

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kelpie")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Kelpie: run untrusted code in hardware-isolated micro-VMs."""
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kelpie: %(message)s"))
    logger = logging.getLogger("kelpie")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


cli.add_command(_run.run)
cli.add_command(_backend.backend)
cli.add_command(_dst.dst)
cli.add_command(_guestkit.guestkit)
cli.add_command(_image.image)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that reached the top."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        result = cli.main(args=args, prog_name="kelpie", standalone_mode=False)
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
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        first, *rest = message.splitlines()
        click.echo(f"kelpie: error: {first}", err=True)
        for line in rest:
            click.echo(f"  {line.strip()}", err=True)
        return exit_code_for(exc)
    return int(result or 0)
