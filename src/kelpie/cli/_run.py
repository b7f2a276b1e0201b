"""``kelpie run`` and ``kelpie create``: a sandbox's shape from Docker's flags."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from kelpie._units import optional_mib
from kelpie.api import Sandbox, SandboxCreate, run_argv
from kelpie.cli._exec import parse_env
from kelpie.cli._sandbox import _client_call, _exec_attached, _progress_printer, network_mode
from kelpie.cli._target import current_target
from kelpie.client import DaemonClient, RemoteError
from kelpie.images import ImageError, ImageNotFound, ImageReference, ImageStore, Platform
from kelpie.vm import GUEST_ARCHES, ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _shape_options(command: F) -> F:
    """The options that shape a sandbox, shared by run and create (as in Docker)."""
    options = [
        click.option("--name", help="Name of the sandbox (default: generated)."),
        click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
                     help="Environment variable for the sandbox (repeatable)."),
        click.option("--env-file", "env_files", multiple=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="Read environment variables from a file: NAME=VALUE lines, "
                          "# comments, a bare NAME takes this shell's value (repeatable; "
                          "-e wins)."),
        click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:GUEST[:ro]",
                     help="Share a host directory (repeatable); ':ro' makes it read-only."),
        click.option("-p", "--publish", "ports", multiple=True, metavar="[IP:]HOST:GUEST",
                     help="Publish a guest port on the host (127.0.0.1 unless IP given)."),
        click.option("--network", type=click.Choice(["none", "nat", "policy"]), default=None,
                     help="Guest networking: none (no NIC), nat (the internet, never the "
                          "host or private networks) or policy (only what --allow names). "
                          "Default: none, or nat when --allow/--deny is given."),
        click.option("--allow", multiple=True, metavar="TARGET[:PORT]",
                     help="Egress rule (repeatable): an address, CIDR, NAME, *.NAME or "
                          "'host' (this host), e.g. --allow pypi.org:443 --allow host:5432."),
        click.option("--deny", multiple=True, metavar="TARGET[:PORT]",
                     help="Egress rule that wins over --allow (repeatable)."),
        click.option("--cpus", type=int, default=None, help="Virtual CPUs."),
        click.option("--memory", default=None, metavar="SIZE",
                     help="Memory: MiB, or with a unit (512m, 2g)."),
        click.option("--disk", default=None, metavar="SIZE",
                     help="Root disk size (with an image): MiB, or with a unit (2g, 10G). "
                          "Default 10g; its free space costs the host nothing until written."),
        click.option("--hostname", default=None, help="The guest's host name."),
        click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE",
                     help="Label the sandbox (repeatable; `ps --filter label=KEY`)."),
        click.option("-u", "--user", default=None,
                     help="User (name or uid) commands run as (default: the image's)."),
        click.option("-w", "--workdir", default=None,
                     help="Working directory of commands (default: the image's)."),
        click.option("--entrypoint", default=None,
                     help="Replace the image's entrypoint (and drop its default command); "
                          "'' clears it."),
        click.option("--restart", default=None, metavar="POLICY",
                     help="Restart the main command when it ends: no (default), "
                          "on-failure[:N] (non-zero exit, at most N times) or always; "
                          "the daemon backs off 0.1 s doubling to 60 s."),
        click.option("--stop-timeout", type=click.FloatRange(0, 3600), default=None,
                     metavar="SECONDS",
                     help="How long a stop waits for the guest to shut down before the "
                          "VM is killed (default: the backend's)."),
        click.option("--sandbox-timeout", type=click.FloatRange(0, 30 * 24 * 3600,
                                                                min_open=True),
                     default=None, metavar="SECONDS",
                     help="Remove the sandbox (or as --on-timeout says) SECONDS after its "
                          "creation, like E2B's sandbox timeout (`kelpie timeout` changes "
                          "it later)."),
        click.option("--on-timeout", type=click.Choice(["remove", "pause", "stop"]),
                     default="remove", show_default=True,
                     help="What happens to the sandbox when --sandbox-timeout passes."),
        click.option("--backend",
                     help="Backend (default: KELPIE_BACKEND or the best for this host)."),
        click.option("--arch", type=click.Choice(list(GUEST_ARCHES)), default=None,
                     help="Guest architecture (default: the host's; another one is "
                          "emulated). The image is taken for that platform."),
        click.option("--pull", type=click.Choice(["missing", "never"]), default="missing",
                     show_default=True, help="Pull an image the local store lacks, or never."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def _body(image: str | None, command: list[str] | None, shape: dict[str, Any], *,
          template: str | None = None, start: bool = True) -> SandboxCreate:
    """The create request from the shape options (the local checks done here, where the
    paths and files named are)."""
    if image is not None and current_target().local and shape["pull"] == "missing":
        _pull_if_missing(image, shape["arch"])
    env = {**read_env_files(shape["env_files"]), **parse_env(shape["env"])}
    labels = _labels(shape["labels"])
    entrypoint = shape["entrypoint"]
    return SandboxCreate(
        image=image, name=shape["name"], cpus=shape["cpus"],
        memory_mib=optional_mib(shape["memory"], "memory"),
        disk_mib=optional_mib(shape["disk"], "disk"), env=env,
        volumes=[_volume(v) for v in shape["volumes"]], ports=list(shape["ports"]),
        network=network_mode(shape["network"], shape["allow"], shape["deny"]),
        allow=list(shape["allow"]), deny=list(shape["deny"]), backend=shape["backend"],
        arch=shape["arch"], hostname=shape["hostname"], labels=labels, user=shape["user"],
        workdir=shape["workdir"],
        entrypoint=None if entrypoint is None else [entrypoint] if entrypoint else [],
        command=command, template=template, start=start, restart=shape["restart"],
        stop_timeout=shape["stop_timeout"], timeout=shape["sandbox_timeout"],
        on_timeout=shape["on_timeout"],
    )


async def _create(client: DaemonClient, body: SandboxCreate, pull: str) -> Sandbox:
    try:
        return await client.create(body, progress=_progress_printer())
    except ImageNotFound:  # a remote daemon lacks the image: it pulls, like docker
        if not (body.image is not None and pull == "missing" and not current_target().local):
            raise
        click.echo(f"kelpie: the daemon is pulling {body.image}", err=True)
        await client.pull_image(body.image)
        return await client.create(body, progress=_progress_printer())


# ---- run --------------------------------------------------------------------------------
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
@click.option("-d", "--detach", is_flag=True,
              help="Leave the sandbox running; the command (or the image's default) runs as "
                   "its main command, its output in `kelpie logs`.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal.")
@click.option("--rm", "remove", is_flag=True, help="Remove the sandbox when the command ends.")
@_shape_options
@click.option("--timeout", type=float, default=None, help="Kill the command after SECONDS.")
@click.option("--template", help="Start by restoring this template (see `kelpie template`).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, /, detach: bool, interactive: bool, tty: bool, remove: bool,
        timeout: float | None, template: str | None, args: tuple[str, ...],
        **shape: Any) -> int:
    """Create a sandbox and run a command in it: ``kelpie run [IMAGE] [--] [CMD...]``.

    Without an image (``kelpie run -- echo hi``) the command runs in the guest kit's own
    userland. With an image (a stored tag, digest or id; a registry reference is pulled
    first) it runs in the image's root filesystem with its environment, working directory
    and user; without a command the image's default runs. The exit code is the command's.
    The sandbox is stopped when the command ends (removed with --rm), or left running
    with -d.
    """
    if detach and (remove or interactive or tty):
        raise click.UsageError("-d cannot be combined with --rm, -i or -t")
    if shape["restart"] not in (None, "no") and not detach:
        raise click.UsageError("--restart restarts a main command: use it with -d (or with "
                               "`kelpie create`)")
    no_image = bool(ctx.meta.get("kelpie.no_image")) or template is not None
    image, command = _split_image(list(args), no_image)
    if image is None and not command and not detach and template is None:
        raise click.UsageError("no command given: kelpie run [IMAGE] [--] CMD...")
    main = (command if command or image is not None else None) if detach else None
    body = _body(image, main, shape, template=template)

    async def call(client: DaemonClient) -> int:
        sandbox = await _create(client, body, shape["pull"])
        if detach:
            click.echo(sandbox.id)
            return 0
        try:
            argv = run_argv(sandbox, command) if sandbox.image or body.entrypoint else command
            return await _exec_attached(
                client, sandbox.id, argv,
                timeout=timeout, interactive=interactive, tty=tty)
        finally:
            with contextlib.suppress(RemoteError):
                if remove:
                    await client.remove(sandbox.id, force=True)
                else:
                    await client.stop(sandbox.id)

    return _client_call(call)


@click.command("create", cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@_shape_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def create(ctx: click.Context, /, args: tuple[str, ...], **shape: Any) -> int:
    """Create a sandbox without starting it: ``kelpie create [IMAGE] [--] [CMD...]``.

    Its root disk is built now; `kelpie start` boots it, with the command (or the image's
    default) as its main command, as `run -d` would. Prints its id.
    """
    no_image = bool(ctx.meta.get("kelpie.no_image"))
    image, command = _split_image(list(args), no_image)
    main = command if command or image is not None else None
    body = _body(image, main, shape, start=False)

    async def call(client: DaemonClient) -> int:
        click.echo((await _create(client, body, shape["pull"])).id)
        return 0

    return _client_call(call)


# ---- the flags' values ------------------------------------------------------------------
def read_env_files(paths: Sequence[Path]) -> dict[str, str]:
    """Docker's ``--env-file``: ``NAME=VALUE`` lines (the value taken as written, no
    quotes removed), ``#`` comments and blank lines skipped, a bare ``NAME`` taking this
    process's value (skipped when it has none). Later files win."""
    env: dict[str, str] = {}
    bad: list[str] = []
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"--env-file {path}: cannot read it: {exc}"],
                              what="environment") from None
        for number, line in enumerate(lines, 1):
            text = line.lstrip()
            if not text or text.startswith("#"):
                continue
            name, sep, value = text.partition("=")
            if not name or any(c.isspace() for c in name):
                bad.append(f"--env-file {path}:{number}: {line!r} is not NAME=VALUE")
            elif sep:
                env[name] = value
            elif name in os.environ:
                env[name] = os.environ[name]
    if bad:
        raise ConfigError(bad, what="environment")
    return env


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key:
            raise ConfigError([f"--label {pair!r}: expected KEY=VALUE (or KEY)"], what="label")
        labels[key] = value
    return labels


def _split_image(args: list[str], no_image: bool) -> tuple[str | None, list[str]]:
    """Separate ``[IMAGE] [--] CMD...``: the first of several arguments is the image.

    A lone argument is an image if the local store has one by that name or it names a
    registry (has a '/' or ':'), otherwise a command.
    """
    if no_image or not args:
        return None, args
    if len(args) > 1:
        rest = args[2:] if args[1] == "--" else args[1:]
        return args[0], rest
    if not current_target().local or any(c in args[0] for c in "/:@"):
        return args[0], []
    with contextlib.suppress(ImageError):
        ImageStore().resolve(args[0])
        return args[0], []
    return None, args


def _pull_if_missing(image: str, arch: str | None = None) -> None:
    """Pull a registry reference the local store lacks for the sandbox's architecture
    (Docker's ``run`` does the same)."""
    store = ImageStore()
    platform = Platform.for_arch(arch) if arch else Platform.host()
    try:
        store.resolve(image, architecture=platform.architecture)
        return
    except ImageError:
        pass
    try:
        reference = ImageReference.parse(image)
    except ImageError:
        return  # not a registry reference: the daemon reports the missing image
    from kelpie.cli._image import pull_reference

    click.echo(f"kelpie: pulling {reference} ({platform})", err=True)
    pull_reference(reference, platform)


def _volume(text: str) -> str:
    """``HOST:GUEST[:ro]`` with HOST checked and made absolute here, where it is typed."""
    host, sep, rest = text.partition(":")
    if not sep or not host or not rest:
        raise ConfigError([f"-v {text!r}: expected HOST:GUEST or HOST:GUEST:ro"],
                          what="volume")
    if current_target().local:
        path = Path(host).expanduser()
        if not path.is_dir():
            raise ConfigError([f"-v {text!r}: host directory {path} does not exist "
                               "or is not a directory"], what="volume")
        host = str(path.resolve())
    return f"{host}:{rest}"


COMMANDS = (run, create)
