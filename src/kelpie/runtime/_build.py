"""``kelpie build``: a Dockerfile made into an image, every ``RUN`` inside a micro-VM.

Each stage keeps its image config (raw JSON: fields Kelpie does not know are kept), its
layers, and a model of its file tree (:class:`FsTree`). Metadata instructions change the
config; ``WORKDIR``, ``COPY`` and ``ADD`` make layers on the host (:mod:`._build_copy`);
``RUN`` runs in a sandbox booted from the stage as it is so far, once per stage (again
only when a ``COPY`` changed the stage since). The guest reports its tree before and
after each ``RUN`` (the agent's ``walk``); what changed is read out of it into the step's
layer, whiteouts for deletions, treated as untrusted as a commit's is: nothing the guest
wrote is mounted on the host, and a later sandbox applies the layer with the same checks
as a pulled one.

Every step has a cache key: its parent's key and everything that decides its result (the
instruction after substitution, the variables a ``RUN`` sees, a ``COPY``'s layer digest).
A step whose key is cached is not run: no VM boots for a build whose every ``RUN`` is
cached, and since each step keeps the time it was first made, the same inputs give the
same image digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kelpie._exceptions import KelpieError
from kelpie.api import BuildEvent, BuildOptions, SandboxCreate
from kelpie.images import (
    Dockerfile,
    DockerfileError,
    ImageNotFound,
    ImageReference,
    ImageStore,
    Instruction,
    Platform,
    Stage,
    StoredImage,
    UnsafeLayer,
    Words,
    arg_pairs,
    check_layer,
    key_values,
    parse_dockerfile,
    pull_image,
    rootfs_dir,
)
from kelpie.runtime._build_copy import (
    BuildContext,
    LayerWriter,
    Owner,
    expand_sources,
    resolve_in_root,
)
from kelpie.runtime._build_tree import FsTree
from kelpie.runtime._commit import host_tree, pack_layer, store_image
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.vm import ExecExit, ExecOutput, VmInstance

BuildProgress = Callable[[BuildEvent], None]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYERS = {"application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER}
DEFAULT_SHELL = ["/bin/sh", "-c"]
OUTPUT_TAIL = 4096
"""Bytes of a failed RUN's output its error quotes."""
PROXY_ARGS = frozenset({"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                        "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                        "all_proxy"})
"""ARGs every Dockerfile may use without declaring them (Docker's predefined ones)."""
EXEC_GRACE = 60.0
"""Seconds past the step timeout after which the host gives up on a guest that does not
even report the timeout (a guest wedged by a fork bomb): the VM is then destroyed."""


class BuildError(KelpieError):
    """A build step failed: which, and why (a RUN's exit code and the end of its output)."""

    def __init__(self, message: str, *, exit_code: int | None = None,
                 output: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.output = output


class BuildCache:
    """Step results by cache key: one small JSON file each, next to the image store."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self._root = store.root / "build-cache"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads((self._root / key).read_text())
        except (OSError, ValueError):
            return None
        layer = entry.get("layer") if isinstance(entry, dict) else None
        if layer is not None and not self._store.blobs.path(layer["digest"]).exists():
            return None  # its layer was pruned: make it again
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        scratch = self._root / f".{key}.{os.getpid()}"
        scratch.write_text(json.dumps(entry, sort_keys=True))
        scratch.replace(self._root / key)


@dataclass
class StageState:
    """A stage being built: what its image is so far."""

    name: str
    config: dict[str, Any]
    """The whole image config document (``config``, ``rootfs``, ``history`` ...)."""
    layers: list[dict[str, Any]]
    tree: FsTree
    key: str
    variables: dict[str, str] = field(default_factory=dict)
    """The stage's ARG values (ENV values are in the config)."""
    cmd_from_base: bool = True
    vm_id: str | None = None
    keep_pids: frozenset[int] = frozenset()
    """The guest's own processes, seen right after its VM booted (the rest are a step's)."""
    mark: int | None = None
    """The guest's mark (see the agent's ``mark``) after the last step run in the stage's
    VM; None when there is no VM or it no longer shows the stage (a COPY since)."""
    created: str = ""

    @property
    def settings(self) -> dict[str, Any]:
        container = self.config.get("config")
        if not isinstance(container, dict):
            container = self.config["config"] = {}
        return container

    def env(self) -> dict[str, str]:
        pairs = (e.partition("=") for e in self.settings.get("Env") or [])
        return {k: v for k, _, v in pairs}


class Builds:
    """Builds images for one runtime (see the module docstring)."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes

    async def build(self, options: BuildOptions, context: Path,
                    progress: BuildProgress | None = None) -> StoredImage:
        """Build the Dockerfile in ``context`` (a directory) as ``options`` say."""
        run = _Build(self._ctx, self._sandboxes, options, context, progress or _ignore)
        try:
            return await run.build()
        finally:
            await run.close()


class _Build:
    """One build: its stages in order, its VMs, its progress."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes, options: BuildOptions,
                 context: Path, progress: BuildProgress) -> None:
        self.ctx, self.sandboxes, self.options = ctx, sandboxes, options
        self.store = ctx.images
        self.cache = BuildCache(self.store)
        self.context = BuildContext(context)
        self.progress = progress
        self.platform = Platform.parse(options.platform) if options.platform else \
            Platform.host()
        self.targets = [ImageReference.parse(t) for t in options.tag]
        self.build_args = _build_args(options.build_arg)
        self.dockerfile = self._read_dockerfile()
        self.done: dict[int, StageState] = {}
        self.vms: list[str] = []
        self.step = 0
        self.steps = 0

    def _read_dockerfile(self) -> Dockerfile:
        path = resolve_in_root(self.context.root, self.options.file)
        if path is None or not path.is_file():
            raise DockerfileError(0, f"no file {self.options.file!r} in the build context "
                                     f"{self.context.root}")
        return parse_dockerfile(path.read_text(errors="replace"))

    async def build(self) -> StoredImage:
        stages = self._needed()
        self.steps = sum(1 + len(self.dockerfile.stages[i].instructions) for i in stages)
        for index in stages:
            self.done[index] = await self._stage(self.dockerfile.stages[index])
        final = self.done[stages[-1]]
        image = await asyncio.to_thread(self._store, final, self.targets[:1])
        for extra in self.targets[1:]:
            await asyncio.to_thread(self._store, final, [extra])
        return image

    async def close(self) -> None:
        for sandbox_id in self.vms:
            with contextlib.suppress(KelpieError):
                await self.sandboxes.remove(sandbox_id, force=True)

    def _needed(self) -> list[int]:
        """The stages the target depends on (by FROM and COPY --from), in order."""
        stages = self.dockerfile.stages
        target = len(stages) - 1
        if self.options.target is not None:
            target = self.dockerfile.stage(self.options.target, len(stages), 0).index
        needed: set[int] = set()
        pending = [target]
        while pending:
            index = pending.pop()
            if index in needed:
                continue
            needed.add(index)
            stage = stages[index]
            refs = [stage.base] + [i.flags["from"] for i in stage.instructions
                                   if "from" in i.flags]
            for ref in refs:
                found = self.dockerfile.find(ref, index)
                if found is not None:
                    pending.append(found.index)
        return sorted(needed)

    # ---- stages ---------------------------------------------------------------------

    async def _stage(self, stage: Stage) -> StageState:
        global_vars = self._global_vars()
        base = Words(self.dockerfile.escape, global_vars).word(stage.base, stage.line)
        label = stage.name or str(stage.index)
        self._step(f"FROM {base}" + (f" AS {stage.name}" if stage.name else ""), label)
        parent = self.dockerfile.find(base, stage.index)
        if parent is not None:
            done = self.done[parent.index]
            state = replace(done, name=label, config=json.loads(json.dumps(done.config)),
                            layers=list(done.layers), tree=FsTree(done.tree.entries().values()),
                            vm_id=None, mark=None, variables=dict(done.variables),
                            cmd_from_base=True)
        elif base == "scratch":
            state = StageState(label, self._scratch_config(), [], FsTree(),
                               _key("scratch", str(self.platform)))
        else:
            image = await self._image(base, stage.line)
            config = json.loads(self.store.blobs.read_bytes(image.manifest.config.digest))
            layers = [{"mediaType": DOCKER_LAYERS.get(d.media_type, d.media_type),
                       "digest": d.digest, "size": d.size} for d in image.manifest.layers]
            tree = await asyncio.to_thread(
                lambda: FsTree(host_tree(rootfs_dir(self.store, image)).values()))
            state = StageState(label, config, layers, tree, _key("FROM", image.digest),
                               created=str(config.get("created") or ""))
        for instruction in stage.instructions:
            await self._instruction(state, instruction)
        await self._drop_vm(state)  # the stage is done: its VM's memory goes back now
        return state

    def _global_vars(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for name, default in self.dockerfile.args:
            words = Words(self.dockerfile.escape, values)
            value = self.build_args.get(name)
            if value is None and default is not None:
                value = words.word(default, 0)
            if value is not None:
                values[name] = value
        return values

    def _scratch_config(self) -> dict[str, Any]:
        return {"architecture": self.platform.architecture, "os": self.platform.os,
                "config": {}, "rootfs": {"type": "layers", "diff_ids": []}, "history": []}

    async def _image(self, reference: str, line: int) -> StoredImage:
        try:
            return self.store.resolve(reference, architecture=self.platform.architecture)
        except ImageNotFound:
            pass
        self._note(f"pulling {reference}")
        try:
            return await pull_image(self.store, reference, platform=self.platform)
        except KelpieError as exc:
            raise DockerfileError(line, f"FROM {reference}: not in the image store, and the "
                                        f"pull failed: {exc}") from None

    # ---- instructions ---------------------------------------------------------------

    async def _instruction(self, state: StageState, ins: Instruction) -> None:
        words = Words(self.dockerfile.escape, {**state.variables, **state.env()})
        line = ins.line
        if ins.name == "ARG":
            self._step(ins.original, state.name)
            global_vars = self._global_vars()
            for name, default in arg_pairs(ins):
                value = self.build_args.get(name)
                if value is None and default is not None:
                    value = words.word(default, line)
                if value is None:
                    value = global_vars.get(name)
                if value is not None:
                    state.variables[name] = value
            state.key = _key(state.key, "ARG", json.dumps(sorted(state.variables.items())))
            return
        if ins.name == "RUN":
            await self._run(state, ins)
        elif ins.name in ("COPY", "ADD"):
            await self._copy(state, ins, words)
        elif ins.name == "WORKDIR":
            await self._workdir(state, ins, words)
        else:
            self._step(ins.original, state.name)
            described = self._metadata(state, ins, words)
            state.key = _key(state.key, described)
            self._history(state, described, None)

    def _metadata(self, state: StageState, ins: Instruction, words: Words) -> str:
        """Apply a config-only instruction; what it set, for the history and the key."""
        settings, line = state.settings, ins.line
        if ins.name in ("ENV", "LABEL"):
            pairs = key_values(ins, words)  # one snapshot of the variables, as Docker's
            if ins.name == "ENV":
                settings["Env"] = [f"{k}={v}" for k, v in {**state.env(), **dict(pairs)}.items()]
            else:
                settings["Labels"] = {**(settings.get("Labels") or {}), **dict(pairs)}
            return f"{ins.name} " + " ".join(f"{k}={v}" for k, v in pairs)
        if ins.name == "USER":
            settings["User"] = words.word(ins.args[0], line)
            return f"USER {settings['User']}"
        if ins.name in ("CMD", "ENTRYPOINT"):
            argv = self._command(state, ins)
            if ins.name == "CMD":
                settings["Cmd"], state.cmd_from_base = argv, False
            else:
                settings["Entrypoint"] = argv
                if state.cmd_from_base:
                    settings.pop("Cmd", None)  # Docker: a new ENTRYPOINT drops an inherited CMD
            return f"{ins.name} {json.dumps(argv)}"
        if ins.name == "SHELL":
            if not ins.json or not ins.args:
                raise DockerfileError(line, 'SHELL takes a JSON array: SHELL ["/bin/bash", '
                                            '"-c"]')
            settings["Shell"] = list(ins.args)
            return f"SHELL {json.dumps(list(ins.args))}"
        if ins.name == "EXPOSE":
            ports = dict(settings.get("ExposedPorts") or {})
            for word in ins.args:
                port = words.word(word, line)
                number, _, proto = port.partition("/")
                if not number.isdigit() or not 0 < int(number) < 65536 or \
                        proto not in ("", "tcp", "udp", "sctp"):
                    raise DockerfileError(line, f"EXPOSE {port!r} is not PORT[/tcp|udp]")
                ports[f"{int(number)}/{proto or 'tcp'}"] = {}
            settings["ExposedPorts"] = ports
            return "EXPOSE " + " ".join(sorted(ports))
        if ins.name == "VOLUME":
            volumes = dict(settings.get("Volumes") or {})
            paths = list(ins.args) if ins.json else \
                [p for w in ins.args for p in words.words(w, line)]
            for path in paths:
                volumes[words.word(path, line) if ins.json else path] = {}
            settings["Volumes"] = volumes
            return "VOLUME " + json.dumps(sorted(volumes))
        if ins.name == "STOPSIGNAL":
            settings["StopSignal"] = words.word(ins.args[0], line)
            return f"STOPSIGNAL {settings['StopSignal']}"
        if ins.name == "MAINTAINER":
            state.config["author"] = words.word(" ".join(ins.args), line)
            return f"MAINTAINER {state.config['author']}"
        raise DockerfileError(line, f"{ins.name} is not supported here")

    def _command(self, state: StageState, ins: Instruction) -> list[str]:
        if ins.json:
            return list(ins.args)
        if not ins.args:
            return []
        return [*(state.settings.get("Shell") or DEFAULT_SHELL), ins.args[0]]

    async def _workdir(self, state: StageState, ins: Instruction, words: Words) -> None:
        self._step(ins.original, state.name)
        current = state.settings.get("WorkingDir") or "/"
        path = posixpath.normpath(posixpath.join(current, words.word(ins.args[0], ins.line)))
        state.settings["WorkingDir"] = path
        if not state.tree.missing_dirs(path):
            state.key = _key(state.key, "WORKDIR", path)
            self._history(state, f"WORKDIR {path}", None)
            return
        await self._layer_step(state, f"WORKDIR {path}",
                               lambda writer: writer.parents(path), Owner())

    async def _copy(self, state: StageState, ins: Instruction, words: Words) -> None:
        self._step(ins.original, state.name)
        line = ins.line
        expanded = [words.word(a, line) for a in ins.args]
        if len(expanded) < 2:
            raise DockerfileError(line, f"{ins.name} takes SOURCE... DEST")
        *sources, dest = expanded
        owner = await self._owner(state, ins, words)
        if any(s.startswith(("http://", "https://", "git@")) for s in sources):
            raise DockerfileError(line, f"{ins.name} from a URL is not supported: download "
                                        "it in a RUN step, or put it in the build context")
        root = self.context.root
        source_context: BuildContext | None = self.context
        source_from = ins.flags.get("from")
        if source_from is not None:
            root = await self._source_root(words.word(source_from, line), line)
            source_context = None
        found = [hit for s in sources
                 for hit in expand_sources(root, s, source_context, line)]
        workdir = state.settings.get("WorkingDir") or "/"
        target = posixpath.join(workdir, dest)
        into_dir = dest.endswith("/") or len(found) > 1 or state.tree.is_dir(target)
        if len(found) > 1 and not dest.endswith("/"):
            raise DockerfileError(line, f"{ins.name} with several sources needs a destination "
                                        f"ending in '/' (got {dest!r})")
        target = posixpath.normpath(target)

        def write(writer: LayerWriter) -> None:
            for rel, host in found:
                if ins.name == "ADD" and host.is_file() and tarfile.is_tarfile(host):
                    writer.unpack(host, target)
                    continue
                to = posixpath.join(target, posixpath.basename(rel)) \
                    if into_dir and not host.is_dir() else target
                writer.copy(host, to, source_context, rel)

        await self._layer_step(state, f"{ins.name} {' '.join(expanded)}", write, owner)

    async def _owner(self, state: StageState, ins: Instruction, words: Words) -> Owner:
        chmod = None
        if "chmod" in ins.flags:
            text = words.word(ins.flags["chmod"], ins.line)
            try:
                chmod = int(text, 8)
            except ValueError:
                chmod = -1
            if not 0 <= chmod <= 0o7777:
                raise DockerfileError(ins.line, f"--chmod={text}: give an octal mode such "
                                                "as 755")
        if "chown" not in ins.flags:
            return Owner(chmod=chmod)
        spec = words.word(ins.flags["chown"], ins.line)
        user, _, group = spec.partition(":")
        uid = await self._id(state, user, "/etc/passwd", ins.line)
        gid = await self._id(state, group, "/etc/group", ins.line) if group else uid
        return Owner(uid, gid, chmod)

    async def _id(self, state: StageState, name: str, table: str, line: int) -> int:
        if name.isdigit():
            return int(name)
        image = await asyncio.to_thread(self._store, state, [])
        root = await asyncio.to_thread(rootfs_dir, self.store, image)
        path = resolve_in_root(root, table)
        text = path.read_text(errors="replace") if path is not None and path.is_file() else ""
        for row in text.splitlines():
            fields = row.split(":")
            if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                return int(fields[2])
        raise DockerfileError(line, f"--chown: no {name!r} in the stage's {table}")

    async def _source_root(self, ref: str, line: int) -> Path:
        """The root directory ``COPY --from`` reads: a built stage's or an image's."""
        stage = self.dockerfile.find(ref, len(self.dockerfile.stages))
        if stage is not None:
            if stage.index not in self.done:
                raise DockerfileError(line, f"COPY --from={ref}: that stage comes later")
            image = await asyncio.to_thread(self._store, self.done[stage.index], [])
        else:
            image = await self._image(ref, line)
        return await asyncio.to_thread(rootfs_dir, self.store, image)

    async def _layer_step(self, state: StageState, described: str,
                          write: Callable[[LayerWriter], None], owner: Owner) -> None:
        """A step whose layer is made on the host: the same files give the same layer."""
        scratch = self.store.build_dir
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="build-") as work:
            path = Path(work) / "layer.tar"

            def make() -> tuple[str, int, str]:
                with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                    write(LayerWriter(tar, state.tree, owner, 0))
                return pack_layer(self.store, path)

            digest, size, diff_id = await asyncio.to_thread(make)
        state.key = _key(state.key, described, diff_id)
        state.mark = None  # the stage's VM, if it has one, lacks this layer now
        cached = self.cache.get(state.key) if not self.options.no_cache else None
        entry = cached or {"created": self._now(),
                           "layer": {"digest": digest, "size": size, "diff_id": diff_id}}
        if cached is None:
            self.cache.put(state.key, entry)
        self._history(state, described, entry)

    async def _run(self, state: StageState, ins: Instruction) -> None:
        self._step(ins.original, state.name)
        settings = state.settings
        if ins.heredoc is not None:
            argv = [*(settings.get("Shell") or DEFAULT_SHELL), ins.heredoc]
        else:
            argv = self._command(state, ins)
        if not argv or not any(a.strip() for a in argv):
            raise DockerfileError(ins.line, "RUN needs a command")
        network = ins.flags.get("network", "default")
        if network not in ("default", "none"):
            raise DockerfileError(ins.line, f"RUN --network={network}: only default and none "
                                            "are allowed (a build never shares the host's)")
        env = dict(state.variables)
        env.update(state.env())  # ENV wins over ARG, as in Docker
        user = settings.get("User") or None
        workdir = settings.get("WorkingDir") or "/"
        described = f"RUN {json.dumps(argv)}"
        state.key = _key(state.key, described, json.dumps(sorted(env.items())), user or "",
                         workdir, network)
        cached = self.cache.get(state.key) if not self.options.no_cache else None
        if cached is not None:
            self._mark_cached()
            await asyncio.to_thread(self._follow_layer, state, cached)
            state.mark = None
            self._history(state, described, cached)
            return
        vm = await self._vm(state, network == "none")
        # Docker's predefined proxy ARGs reach RUN steps undeclared, but not the cache key
        env.update({k: v for k, v in self.build_args.items() if k in PROXY_ARGS})
        ended: ExecExit | None = None
        tail = bytearray()
        try:
            async with asyncio.timeout(self.options.step_timeout + EXEC_GRACE):
                async with vm.exec_stream(argv, env=env, cwd=workdir, user=user,
                                          timeout=self.options.step_timeout,
                                          stdin=b"") as process:
                    async for event in process:
                        if isinstance(event, ExecOutput):
                            tail.extend(event.data)
                            del tail[:-OUTPUT_TAIL]
                            self.progress(BuildEvent(
                                kind="output", text=event.data.decode(errors="replace"),
                                step=self.step, steps=self.steps, stage=state.name))
                        elif isinstance(event, ExecExit):
                            ended = event
        except TimeoutError:
            pass  # reported below, as a step that did not finish
        except KelpieError as exc:  # the guest stopped answering (a fork bomb, a panic)
            raise BuildError(f"Dockerfile line {ins.line}: {ins.original!r}: the build VM "
                             f"stopped answering while it ran ({exc})",
                             output=tail.decode(errors="replace")) from None
        output = tail.decode(errors="replace")
        # a failed step's VM is destroyed with the build; a good one's leftovers are stopped
        if ended is None or ended.timed_out:
            raise BuildError(f"Dockerfile line {ins.line}: {ins.original!r} did not finish "
                             f"within the step timeout of {self.options.step_timeout:g} s "
                             "(kelpie build --step-timeout)", output=output)
        if ended.exit_code != 0:
            why = f" ({ended.warning})" if ended.warning else ""
            raise BuildError(f"Dockerfile line {ins.line}: {ins.original!r} failed with exit "
                             f"code {ended.exit_code}{why}; its output ended with:\n"
                             f"{output}", exit_code=ended.exit_code, output=output)
        if await vm.sweep_processes(state.keep_pids):
            raise BuildError(f"Dockerfile line {ins.line}: {ins.original!r} left processes "
                             "running that would not stop (a fork bomb?)", output=output)
        entry = await self._guest_layer(state, vm, f"RUN at line {ins.line}")
        self.cache.put(state.key, entry)
        self._history(state, described, entry)

    async def _vm(self, state: StageState, no_network: bool) -> VmInstance:
        """The stage's VM, booted from the stage as it is now if it has none that is."""
        if state.vm_id is not None and state.mark is not None:
            return self.ctx.live_vm(self.ctx.info(state.vm_id), "build in")
        await self._drop_vm(state)
        if not state.layers:
            raise BuildError(f"stage {state.name} has no files to run a command in (FROM "
                             "scratch): COPY a userland in first, or start from an image")
        image = await asyncio.to_thread(self._store, state, [])
        self._note(f"booting a VM for stage {state.name}")
        opts = self.options
        request = SandboxCreate.from_fields({
            "image": image.digest, "network": "none" if no_network or opts.network == "none"
            else "nat", "memory_mib": opts.memory_mib, "cpus": opts.cpus,
            "disk_mib": opts.disk_mib, "backend": opts.backend,
            "arch": _machine(self.platform), "labels": {"kelpie.build": "1"}})
        info = await self.sandboxes.create(request, None)
        self.vms.append(info.id)
        state.vm_id = info.id
        vm = self.ctx.live_vm(info, "build in")
        state.keep_pids = frozenset(p.pid for p in (await vm.guest_processes()).processes)
        state.mark = await vm.mark_tree()
        return vm

    async def _drop_vm(self, state: StageState) -> None:
        if state.vm_id is not None:
            await self.sandboxes.remove(state.vm_id, force=True)
            self.vms.remove(state.vm_id)
            state.vm_id, state.mark = None, None

    async def _guest_layer(self, state: StageState, vm: VmInstance, what: str,
                           ) -> dict[str, Any]:
        """The layer of what the last RUN changed: made in the guest, checked here."""
        assert state.mark is not None
        scratch = self.store.build_dir
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="build-") as work:
            path = Path(work) / "layer.tar"
            with path.open("wb") as out:
                state.mark, _ = await vm.layer_since(state.mark, out)
            try:
                await asyncio.to_thread(check_layer, path)
            except UnsafeLayer as exc:
                raise BuildError(f"{what} made a layer Kelpie refuses: {exc}") from None
            with path.open("rb") as data:
                await asyncio.to_thread(state.tree.apply_tar, data)
            digest, size, diff_id = await asyncio.to_thread(pack_layer, self.store, path)
        return {"created": self._now(),
                "layer": {"digest": digest, "size": size, "diff_id": diff_id}}

    def _follow_layer(self, state: StageState, entry: Mapping[str, Any]) -> None:
        with self.store.blobs.path(entry["layer"]["digest"]).open("rb") as blob:
            state.tree.apply_tar(blob)

    # ---- the image ------------------------------------------------------------------

    def _history(self, state: StageState, described: str,
                 entry: Mapping[str, Any] | None) -> None:
        created = (entry or {}).get("created") or state.created or self._epoch()
        state.created = created
        record: dict[str, Any] = {"created": created, "created_by": described,
                                  "comment": "kelpie build"}
        layer = (entry or {}).get("layer")
        if layer is None:
            record["empty_layer"] = True
        else:
            state.layers.append({"mediaType": OCI_LAYER, "digest": layer["digest"],
                                 "size": layer["size"]})
            state.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            state.config["rootfs"].setdefault("diff_ids", []).append(layer["diff_id"])
        state.config.setdefault("history", []).append(record)
        state.config["created"] = created

    def _store(self, state: StageState, tags: list[ImageReference]) -> StoredImage:
        """The stage as it is, stored (untagged unless ``tags``)."""
        config = dict(state.config)
        config["config"] = {k: v for k, v in state.settings.items() if v is not None}
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG}, "layers": state.layers}
        return store_image(self.store, config, manifest, OCI_MANIFEST,
                           tags[0] if tags else None)

    # ---- progress -------------------------------------------------------------------

    def _step(self, text: str, stage: str) -> None:
        self.step += 1
        self.progress(BuildEvent(kind="step", text=text, step=self.step, steps=self.steps,
                                 stage=stage))

    def _mark_cached(self) -> None:
        self.progress(BuildEvent(kind="note", text="CACHED", step=self.step, steps=self.steps,
                                 cached=True))

    def _note(self, text: str) -> None:
        self.progress(BuildEvent(kind="note", text=text, step=self.step, steps=self.steps))

    def _now(self) -> str:
        return datetime.datetime.fromtimestamp(self.ctx.clock(), datetime.UTC).isoformat()

    @staticmethod
    def _epoch() -> str:
        return datetime.datetime.fromtimestamp(0, datetime.UTC).isoformat()


def _build_args(items: list[str]) -> dict[str, str]:
    args = {}
    for item in items:
        key, has_value, value = item.partition("=")
        if not key or not has_value:
            raise DockerfileError(0, f"--build-arg {item!r}: give KEY=VALUE")
        args[key] = value
    return args


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _machine(platform: Platform) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.architecture,
                                                       platform.architecture)


def _ignore(_: BuildEvent) -> None:
    pass


