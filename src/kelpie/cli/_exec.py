"""``kelpie exec``: its own module, so that running a command imports little (see
:mod:`kelpie.cli._exec_lines`); with ``-i`` or ``-t`` it attaches over the exec WebSocket."""

from __future__ import annotations

from collections.abc import Sequence

import click

from kelpie._exceptions import ConfigError
from kelpie.cli._target import current_target


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``K=V`` strings to a dict; a clear error names each malformed one."""
    env: dict[str, str] = {}
    bad = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            bad.append(f"-e {pair!r}: expected NAME=VALUE")
        else:
            env[name] = value
    if bad:
        raise ConfigError(bad, what="environment")
    return env


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal.")
@click.option("-d", "--detach", is_flag=True,
              help="Leave the command running in the sandbox, its output dropped; prints "
                   "its exec id.")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable (repeatable).")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="User (name or uid) to run as.")
@click.option("--timeout", type=float, default=None, help="Kill the command after SECONDS.")
@click.argument("sandbox")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, detach: bool, env: tuple[str, ...], workdir: str | None,
          user: str | None, timeout: float | None, sandbox: str,
          command: tuple[str, ...]) -> int:
    """Run a command in a running sandbox: ``kelpie exec SANDBOX [--] CMD...``."""
    argv = list(command[1:] if command[0] == "--" else command)
    if not argv:
        raise click.UsageError("no command given: kelpie exec SANDBOX [--] CMD...")
    variables = parse_env(env)
    options = click.get_current_context().find_root().obj
    if not detach and not interactive and not tty:
        from kelpie.cli._exec_lines import end_process, exec_lines

        code = exec_lines(current_target(), sandbox, argv, env=variables, cwd=workdir,
                          user=user, timeout=timeout)
        if code is not None:
            if options.get("end_process"):
                end_process(code)
            return code
        # no daemon yet: the client below starts one
    from kelpie.cli._main import log_to_stderr

    log_to_stderr(options["debug"])  # the group leaves it to exec, for its fast path's sake
    if detach:
        if interactive or tty or timeout is not None:
            raise click.UsageError("-d cannot be combined with -i, -t or --timeout")
        return _detached(sandbox, argv, variables, workdir, user)
    from kelpie.cli._sandbox import _client_call, _exec_attached

    return _client_call(lambda client: _exec_attached(
        client, sandbox, argv, env=variables, cwd=workdir, user=user, timeout=timeout,
        interactive=interactive, tty=tty))


def _detached(sandbox: str, argv: list[str], env: dict[str, str], cwd: str | None,
              user: str | None) -> int:
    from kelpie.cli._sandbox import _client_call
    from kelpie.client import DaemonClient

    async def call(client: DaemonClient) -> int:
        exec_id = await client.exec_detached(sandbox, argv, env=env, cwd=cwd, user=user)
        click.echo(exec_id or "")
        return 0

    return _client_call(call)
