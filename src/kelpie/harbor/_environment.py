"""Harbor's sandbox interface (``BaseEnvironment``) on Kelpie micro-VMs.

Harbor runs a task's agent and verifier through an environment: start it (from the task's
``docker_image``, else its ``environment/Dockerfile``, built with ``kelpie build``), run
shell commands in it, move files and directories in and out, stop it. Here each
environment is one sandbox of a Kelpie daemon (the local one, started if need be, or the
``daemon`` given with ``--ek daemon=URL``). Transfers run as root, as Harbor expects; a
command that Harbor cancels (its timeouts) is killed in the guest.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

from harbor.environments.base import BaseEnvironment, ExecResult
from harbor.environments.capabilities import EnvironmentCapabilities

from kelpie.api import SandboxCreate
from kelpie.cli._connect import connect
from kelpie.cli._target import Target, target_from
from kelpie.client import DaemonClient, RemoteError
from kelpie.vm import ExecExit, ExecOutput, StreamName

TIMED_OUT = 124
"""The exit code of a command that outlived its timeout (as coreutils' ``timeout``)."""


class KelpieEnvironment(BaseEnvironment):  # type: ignore[misc]  # harbor is untyped here
    """A Harbor environment whose sandbox is a Kelpie micro-VM (see the module docstring).

    Environment kwargs (``--ek``): ``daemon`` (a daemon URL; default the local daemon),
    ``token`` (its bearer token), ``backend`` (default: the host's best)."""

    def __init__(self, *args: Any, daemon: str | None = None, token: str | None = None,
                 backend: str | None = None, **kwargs: Any) -> None:
        self._daemon, self._token, self._backend = daemon, token, backend
        self._client: DaemonClient | None = None
        self._sandbox: str | None = None
        super().__init__(*args, **kwargs)

    @staticmethod
    def type() -> str:
        return "kelpie"

    @property
    def capabilities(self) -> EnvironmentCapabilities:
        # no-network is a VM without a NIC; the logs are copied, not bind-mounted
        return EnvironmentCapabilities(disable_internet=True, mounted=False)

    def _validate_definition(self) -> None:
        if not self.task_env_config.docker_image and \
                not (Path(self.environment_dir) / "Dockerfile").is_file():
            raise ValueError(f"task {self.environment_name}: give [environment] docker_image "
                             f"in task.toml or an environment/Dockerfile")

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self, force_build: bool) -> None:
        client = await self._connect()
        image = await self._image(client, force_build)
        network = "none" if self.network_policy.network_mode == "no-network" else "nat"
        fields: dict[str, Any] = {
            "image": image, "network": network, "backend": self._backend,
            "env": dict(self._startup_env() or {}),
            "labels": {"harbor.session": _label_value(self.session_id)}}
        if self._effective_cpus:
            fields["cpus"] = max(1, int(self._effective_cpus))
        if self._effective_memory_mb:
            fields["memory_mib"] = int(self._effective_memory_mb)
        if self._effective_storage_mb:
            fields["disk_mib"] = int(self._effective_storage_mb)
        created = await client.create(SandboxCreate.from_fields(fields))
        self._sandbox = created.id
        workdir = self.task_env_config.workdir
        if workdir:  # before anything runs there (Docker's WORKDIR exists by then)
            await self._mkdirs([workdir])
        await self.ensure_dirs(self._mount_targets(writable_only=True))
        await self._upload_environment_dir_after_start()

    async def stop(self, delete: bool) -> None:
        if self._client is None:
            return
        try:
            if self._sandbox is not None:
                if delete:
                    await self._client.remove(self._sandbox, force=True)
                else:
                    await self._client.stop(self._sandbox)
        finally:
            await self._client.close()
            self._client, self._sandbox = None, None

    async def _connect(self) -> DaemonClient:
        if self._client is None:
            # $KELPIE_HOST / $KELPIE_TOKEN as for the CLI; the local daemon, started if need be
            target = target_from(self._daemon, None, autostart=True)
            if self._token is not None:
                target = Target(target.host, self._token, target.autostart)
            self._client = await connect(target)
        return self._client

    async def _image(self, client: DaemonClient, force_build: bool) -> str:
        """The task's image in the daemon's store: ``docker_image`` (pulled if missing),
        else the environment's Dockerfile built (its steps cached)."""
        wanted = self.task_env_config.docker_image
        if wanted and not force_build:
            try:
                return (await client.inspect_image(wanted)).digest
            except RemoteError as exc:
                if exc.status != 404:
                    raise
            return (await client.pull_image(wanted)).digest
        tag = f"harbor/{_repository_name(self.environment_name)}:kelpie"
        built = await client.build(self.environment_dir, tag=[tag], no_cache=force_build)
        return built.digest

    # ---- commands -------------------------------------------------------------------

    async def exec(self, command: str, cwd: str | None = None,
                   env: dict[str, str] | None = None, timeout_sec: int | None = None,
                   user: str | int | None = None) -> ExecResult:
        client, sandbox = self._live()
        resolved = self._resolve_user(user)
        out, err = bytearray(), bytearray()
        ended: ExecExit | None = None
        # Leaving the block early (Harbor cancels on its own timeouts) kills the command.
        async with client.exec_stream(
                sandbox, ["/bin/sh", "-c", command], env=self._merge_env(env) or None,
                cwd=cwd or self.task_env_config.workdir or None,
                user=None if resolved is None else str(resolved),
                timeout=timeout_sec or None) as process:
            await process.close_stdin()
            async for event in process:
                if isinstance(event, ExecOutput):
                    (out if event.stream is StreamName.STDOUT else err).extend(event.data)
                elif isinstance(event, ExecExit):
                    ended = event
        code = TIMED_OUT if ended is None or ended.timed_out else ended.exit_code
        return ExecResult(stdout=out.decode(errors="replace"),
                          stderr=err.decode(errors="replace"), return_code=code)

    # ---- files ----------------------------------------------------------------------

    async def upload_file(self, source_path: Path | str, target_path: str) -> None:
        client, sandbox = self._live()
        data, mode = await asyncio.to_thread(_read_host, Path(source_path))
        await self._mkdirs([posixpath.dirname(target_path) or "/"])
        await client.write_file(sandbox, target_path, data, mode=mode)

    async def upload_dir(self, source_dir: Path | str, target_dir: str) -> None:
        client, sandbox = self._live()
        entries = await asyncio.to_thread(_listing, Path(source_dir))
        await self._mkdirs([target_dir, *(posixpath.join(target_dir, rel)
                                          for rel, kind, _ in entries if kind == "dir")])
        for rel, kind, path in entries:
            target = posixpath.join(target_dir, rel)
            if kind == "symlink":
                link = await asyncio.to_thread(path.readlink)
                await self._root(f"ln -sfn {shlex.quote(str(link))} {shlex.quote(target)}")
            elif kind == "file":
                data, mode = await asyncio.to_thread(_read_host, path)
                await client.write_file(sandbox, target, data, mode=mode)

    async def download_file(self, source_path: str, target_path: Path | str) -> None:
        client, sandbox = self._live()
        data = await client.read_file(sandbox, source_path)
        await asyncio.to_thread(_write_host, Path(target_path), data)

    async def download_dir(self, source_dir: str, target_dir: Path | str) -> None:
        client, sandbox = self._live()
        pending = [(source_dir, Path(target_dir))]
        while pending:
            guest, host = pending.pop()
            await asyncio.to_thread(host.mkdir, parents=True, exist_ok=True)
            for entry in await client.list_dir(sandbox, guest):
                if entry.name in (".", ".."):
                    continue
                inner = posixpath.join(guest, entry.name)
                if entry.type == "dir":
                    pending.append((inner, host / entry.name))
                elif entry.type == "file":
                    data = await client.read_file(sandbox, inner)
                    await asyncio.to_thread(_write_host, host / entry.name, data)

    # ---- helpers --------------------------------------------------------------------

    def _live(self) -> tuple[DaemonClient, str]:
        if self._client is None or self._sandbox is None:
            raise RuntimeError(f"environment {self.session_id} is not started")
        return self._client, self._sandbox

    async def _mkdirs(self, paths: list[str]) -> None:
        await self._root("mkdir -p -- " + " ".join(shlex.quote(p) for p in paths))

    async def _root(self, script: str) -> None:
        done = await self.exec(script, cwd="/", user="root")
        if done.return_code != 0:
            raise RuntimeError(f"{script!r} failed in sandbox {self._sandbox} "
                               f"({done.return_code}): {done.stderr}")


def _read_host(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mode & 0o7777


def _write_host(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _listing(top: Path) -> list[tuple[str, str, Path]]:
    """(relative path, dir|file|symlink|other, path) of everything under ``top``, sorted."""
    found = []
    for path in sorted(top.rglob("*")):
        kind = "symlink" if path.is_symlink() else "dir" if path.is_dir() else \
            "file" if path.is_file() else "other"
        found.append((path.relative_to(top).as_posix(), kind, path))
    return found


def _repository_name(name: str) -> str:
    """``name`` as an image repository component (lowercase, ``[a-z0-9._-]``)."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-")
    return cleaned or "task"


def _label_value(text: str) -> str:
    return text[:200]
