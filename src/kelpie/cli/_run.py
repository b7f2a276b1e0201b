"""``kelpie run``: boot a sandbox, run one command in it, print its output, stop it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import click

from kelpie.vm import ConfigError, ExecOutput, StreamName, VmConfig, VmFactory


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


class _RunCommand(click.Command):
    """Remembers whether ``--`` came before any positional argument (then there is no image)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            opt for p in self.params if isinstance(p, click.Option) and not p.is_flag
            for opt in p.opts
        }
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            i += 2 if args[i] in takes_value else 1
        ctx.meta["kelpie.no_image"] = i < len(args) and args[i] == "--"
        return super().parse_args(ctx, args)


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option("--backend", help="Backend to use (default: KELPIE_BACKEND or auto-select).")
@click.option("--cpus", type=int, default=None, help="Virtual CPUs.")
@click.option("--memory", type=int, default=None, help="Memory in MiB.")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable for the command (repeatable).")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("--timeout", type=float, default=None, help="Kill the command after SECONDS.")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    backend: str | None,
    cpus: int | None,
    memory: int | None,
    env: tuple[str, ...],
    workdir: str | None,
    timeout: float | None,
    args: tuple[str, ...],
) -> int:
    """Boot a sandbox and run a command in it: ``kelpie run [IMAGE] [--] CMD...``.

    Without an image (``kelpie run -- echo hello``) the command runs in the guest kit's
    own userland. The exit code is the command's.
    """
    image: str | None = None
    command = list(args)
    if not ctx.meta.get("kelpie.no_image") and len(command) > 1:
        image, command = command[0], command[1:]
    if not command:
        raise click.UsageError("no command given: kelpie run [IMAGE] [--] CMD...")
    settings: dict[str, object] = {}
    if cpus is not None:
        settings["vcpus"] = cpus
    if memory is not None:
        settings["memory_mib"] = memory
    if image is not None:
        settings["image"] = image
    config = VmConfig(**settings)  # type: ignore[arg-type]
    return asyncio.run(_run(config, backend, command, parse_env(env), workdir, timeout))


async def _run(
    config: VmConfig,
    backend: str | None,
    command: list[str],
    env: dict[str, str],
    workdir: str | None,
    timeout: float | None,
) -> int:
    vm = VmFactory().create(config, backend=backend)
    await vm.start()
    try:
        async with vm.exec_stream(command, env=env, cwd=workdir, timeout=timeout) as process:
            await process.close_stdin()
            async for event in process:
                if isinstance(event, ExecOutput):
                    out = sys.stdout if event.stream is StreamName.STDOUT else sys.stderr
                    out.buffer.write(event.data)
                    out.flush()
            result = await process.wait()
        return result.exit_code
    finally:
        await vm.stop()
