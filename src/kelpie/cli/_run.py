"""``kelpie run``: boot a sandbox, run one command in it, print its output, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Sequence

import click

from kelpie.images import ImageError
from kelpie.images._rootfs_build import BuildProgress, rootfs_ext4
from kelpie.images._store import ImageStore, StoredImage
from kelpie.vm import ConfigError, ExecOutput, StreamName, VmConfig, VmFactory, VmInstance


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
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
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
    """Boot a sandbox and run a command in it: ``kelpie run [IMAGE] [--] [CMD...]``.

    Without an image (``kelpie run -- echo hello``) the command runs in the guest kit's
    own userland. With a stored image (a tag, digest or id) the command runs in the
    image's root filesystem with its environment, working directory and user; without a
    command the image's default (entrypoint + cmd) runs: ``kelpie run IMAGE --`` says so
    explicitly, and a lone argument is an image if the store has one by that name,
    otherwise a command. The exit code is the command's.
    """
    image_text, command = _split_image(list(args), bool(ctx.meta.get("kelpie.no_image")))
    settings: dict[str, object] = {}
    if cpus is not None:
        settings["vcpus"] = cpus
    if memory is not None:
        settings["memory_mib"] = memory
    plan = _Plan(command, parse_env(env), workdir, None)
    held: tuple[ImageStore, str] | None = None
    if image_text is not None:
        store = ImageStore()
        image = store.resolve(image_text)
        settings["root_disk"] = rootfs_ext4(store, image, progress=_report_build)
        settings["image"] = _image_label(image)
        plan = _plan_for_image(image, plan)
        held = (store, image.digest)
    elif not command:
        raise click.UsageError("no command given: kelpie run [IMAGE] [--] CMD...")
    config = VmConfig(**settings)  # type: ignore[arg-type]
    return asyncio.run(_run(config, backend, plan, timeout, held))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to run in the guest, and how."""

    argv: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str | None


def _split_image(args: list[str], no_image: bool) -> tuple[str | None, list[str]]:
    """Separate ``[IMAGE] [--] CMD...``: the first of several arguments is the image.

    ``IMAGE --`` (nothing after the ``--``) runs the image's default command.
    """
    if no_image or not args:
        return None, args
    if len(args) > 1:
        rest = args[2:] if args[1] == "--" else args[1:]
        return args[0], rest
    with contextlib.suppress(ImageError):
        ImageStore().resolve(args[0])
        return args[0], []
    return None, args


def _plan_for_image(image: StoredImage, given: _Plan) -> _Plan:
    """Docker's rules: image command unless overridden, image env under ``-e``, and so on."""
    config = image.config
    return _Plan(
        argv=config.command(given.argv or None),
        env={**config.environment(), **given.env},
        workdir=given.workdir or config.working_dir or None,
        user=config.exec_user(),
    )


def _image_label(image: StoredImage) -> str:
    """How the VM config records its image: ``name@digest`` when tagged."""
    if not image.tags:
        return image.digest
    return f"{image.tags[0].rpartition(':')[0]}@{image.digest}"


def _report_build(step: BuildProgress) -> None:
    if step.stage == "layer" and step.current < step.total:
        click.echo(f"kelpie: unpacking layer {step.current + 1}/{step.total}", err=True)
    elif step.stage == "ext4" and step.current == 0:
        click.echo("kelpie: building the ext4 root disk", err=True)


async def _run(
    config: VmConfig,
    backend: str | None,
    plan: _Plan,
    timeout: float | None,
    held: tuple[ImageStore, str] | None,
) -> int:
    vm = VmFactory().create(config, backend=backend)
    holder = f"vm:{vm.id}"
    if held is not None:
        held[0].retain(held[1], holder)  # the image cannot be pruned while the VM uses it
    try:
        await vm.start()
        try:
            return await _stream(vm, plan, timeout)
        finally:
            await vm.stop()
    finally:
        if held is not None:
            held[0].release(held[1], holder)


async def _stream(vm: VmInstance, plan: _Plan, timeout: float | None) -> int:
    async with vm.exec_stream(
        plan.argv, env=plan.env, cwd=plan.workdir, timeout=timeout, user=plan.user
    ) as process:
        await process.close_stdin()
        async for event in process:
            if isinstance(event, ExecOutput):
                out = sys.stdout if event.stream is StreamName.STDOUT else sys.stderr
                out.buffer.write(event.data)
                out.flush()
        result = await process.wait()
    return result.exit_code
