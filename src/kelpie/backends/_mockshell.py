"""The mock guest: an in-memory file system and a small, documented shell.

Commands: ``echo [-n]``, ``cat [FILE|-]...``, ``true``, ``false``, ``sleep SECONDS``,
``env``, ``pwd``, ``ls [PATH]``, ``printf FORMAT [ARG]...`` (``%s %d %%``, ``\\n \\t \\\\``),
``mkdir [-p] DIR``, ``rm [-r] [-f] PATH``, ``hostname``, and ``sh -c SCRIPT``. Scripts
support ``;``, ``&&``, ``||``, ``cd DIR``, ``exit N`` and the redirections ``> FILE``,
``>> FILE``, ``< FILE`` and ``>&2``; words are split like POSIX sh (quotes, backslashes), with no
variable expansion, globbing or pipes. Anything else exits 127 with
``sh: NAME: command not found``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import posixpath
import shlex
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kelpie.vm import GuestFileError

DEFAULT_DIRS = ("/", "/bin", "/etc", "/home", "/root", "/tmp", "/var")
Writer = Callable[[str, bytes], Awaitable[None]]


class MockFs:
    """Files (content + mode) and directories (mode) keyed by absolute normalised path."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int]] = {}
        self.dirs: dict[str, int] = {d: 0o755 for d in DEFAULT_DIRS}
        self.dirs["/tmp"] = 0o1777

    @staticmethod
    def resolve(cwd: str, path: str) -> str:
        """An absolute, normalised path (``..`` cannot climb above ``/``)."""
        joined = posixpath.join(cwd, path)
        norm = posixpath.normpath(joined)
        return "/" + norm.lstrip("/") if norm != "/" else "/"

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def read(self, path: str) -> bytes:
        if path in self.dirs:
            raise GuestFileError(path, "EISDIR", "is a directory")
        try:
            return self.files[path][0]
        except KeyError:
            raise GuestFileError(path, "ENOENT", "no such file or directory") from None

    def write(self, path: str, data: bytes, mode: int = 0o644, *, append: bool = False) -> None:
        if path in self.dirs:
            raise GuestFileError(path, "EISDIR", "is a directory")
        parent = posixpath.dirname(path)
        if parent not in self.dirs:
            raise GuestFileError(path, "ENOENT", f"parent directory {parent} does not exist")
        if append and path in self.files:
            old, mode = self.files[path]
            data = old + data
        self.files[path] = (data, mode)

    def mkdir(self, path: str, *, parents: bool, mode: int = 0o755) -> None:
        if path in self.files:
            raise GuestFileError(path, "EEXIST", "a file exists there")
        if path in self.dirs:
            if parents:
                return
            raise GuestFileError(path, "EEXIST", "directory exists")
        parent = posixpath.dirname(path)
        if parent not in self.dirs:
            if not parents:
                raise GuestFileError(path, "ENOENT", f"parent directory {parent} does not exist")
            self.mkdir(parent, parents=True)
        self.dirs[path] = mode

    def list(self, path: str) -> list[str]:
        if path in self.files:
            return [posixpath.basename(path)]
        if path not in self.dirs:
            raise GuestFileError(path, "ENOENT", "no such file or directory")
        prefix = path.rstrip("/") + "/"
        names = {
            p[len(prefix):]
            for p in (*self.files, *self.dirs)
            if p.startswith(prefix) and p != path and "/" not in p[len(prefix):]
        }
        return sorted(names)

    def remove(self, path: str, *, recursive: bool) -> None:
        if path in self.files:
            del self.files[path]
            return
        if path not in self.dirs:
            raise GuestFileError(path, "ENOENT", "no such file or directory")
        if path == "/":
            raise GuestFileError(path, "EBUSY", "cannot remove the root directory")
        children = self.list(path)
        if children and not recursive:
            raise GuestFileError(path, "ENOTEMPTY", "directory not empty")
        prefix = path.rstrip("/") + "/"
        for f in [f for f in self.files if f.startswith(prefix)]:
            del self.files[f]
        for d in [d for d in self.dirs if d.startswith(prefix) or d == path]:
            del self.dirs[d]

    def to_state(self) -> dict[str, Any]:
        return {
            "files": {
                p: [base64.b64encode(data).decode(), mode]
                for p, (data, mode) in sorted(self.files.items())
            },
            "dirs": dict(sorted(self.dirs.items())),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MockFs:
        fs = cls()
        fs.files = {p: (base64.b64decode(v[0]), int(v[1])) for p, v in state["files"].items()}
        fs.dirs = {p: int(m) for p, m in state["dirs"].items()}
        return fs

    def digest(self) -> str:
        encoded = json.dumps(self.to_state(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()


class Stdin:
    """A command's stdin: chunks fed by the host, ``None`` marks EOF."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._eof = False

    def feed(self, data: bytes | None) -> None:
        self._queue.put_nowait(data)

    async def read_all(self) -> bytes:
        chunks = []
        while not self._eof:
            chunk = await self._queue.get()
            if chunk is None:
                self._eof = True
            else:
                chunks.append(chunk)
        return b"".join(chunks)


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Shell:
    """Runs argv or scripts against a :class:`MockFs`, writing output through ``write``."""

    def __init__(
        self,
        fs: MockFs,
        *,
        env: Mapping[str, str],
        cwd: str,
        hostname: str,
        stdin: Stdin,
        write: Writer,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.fs = fs
        self.env = dict(env)
        self.cwd = cwd
        self.hostname = hostname
        self.stdin = stdin
        self._write = write
        self._sleep = sleep

    async def run(self, argv: list[str]) -> int:
        """Run one command; returns its exit status."""
        try:
            return await self._command(argv, self._write)
        except _Exit as exc:
            return exc.code

    async def _command(self, argv: list[str], write: Writer) -> int:
        name = posixpath.basename(argv[0])
        args = argv[1:]
        if name == "sh":
            if len(args) >= 2 and args[0] == "-c":
                return await self._script(args[1], write)
            await write("stderr", b"sh: only 'sh -c SCRIPT' is supported\n")
            return 2
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None or not name.isidentifier():
            await write("stderr", f"sh: {argv[0]}: command not found\n".encode())
            return 127
        code: int = await handler(args, write)
        return code

    # ---- scripts --------------------------------------------------------------------
    async def _script(self, script: str, write: Writer) -> int:
        try:
            lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as exc:
            await write("stderr", f"sh: syntax error: {exc}\n".encode())
            return 2
        status = 0
        connector = ";"
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token in (";", "&&", "||"):
                if command:
                    run = (
                        connector == ";"
                        or (connector == "&&" and status == 0)
                        or (connector == "||" and status != 0)
                    )
                    if run:
                        status = await self._simple(command, write)
                command = []
                connector = token
            else:
                command.append(token)
        return status

    async def _simple(self, words: list[str], write: Writer) -> int:
        argv: list[str] = []
        redirect: tuple[str, str] | None = None
        stdin_file: str | None = None
        i = 0
        while i < len(words):
            word = words[i]
            if word == ">&" and i + 1 < len(words) and words[i + 1] == "2":
                redirect = (">&2", "")
                i += 2
                continue
            if word in (">", ">>", "<"):
                if i + 1 >= len(words):
                    await write("stderr", f"sh: syntax error near {word!r}\n".encode())
                    return 2
                target = self.fs.resolve(self.cwd, words[i + 1])
                if word == "<":
                    stdin_file = target
                else:
                    redirect = (word, target)
                i += 2
                continue
            argv.append(word)
            i += 1
        if not argv:
            return 0
        if argv[0] == "exit":
            raise _Exit(int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 0)
        if argv[0] == "cd":
            return await self._cd(argv[1:], write)
        saved_stdin = self.stdin
        if stdin_file is not None:
            try:
                data = self.fs.read(stdin_file)
            except GuestFileError as exc:
                await write("stderr", f"sh: {stdin_file}: {exc.code}\n".encode())
                return 1
            self.stdin = Stdin()
            self.stdin.feed(data)
            self.stdin.feed(None)
        try:
            if redirect is None:
                return await self._command(argv, write)
            captured: list[bytes] = []

            async def capture(stream: str, data: bytes) -> None:
                if stream == "stdout":
                    captured.append(data)
                else:
                    await write(stream, data)

            op, target = redirect
            if op == ">&2":

                async def to_stderr(stream: str, data: bytes) -> None:
                    await write("stderr", data)

                return await self._command(argv, to_stderr)
            code = await self._command(argv, capture)
            try:
                self.fs.write(target, b"".join(captured), append=op == ">>")
            except GuestFileError as exc:
                await write("stderr", f"sh: {target}: {exc.code}\n".encode())
                return 1
            return code
        finally:
            self.stdin = saved_stdin

    async def _cd(self, args: list[str], write: Writer) -> int:
        target = self.fs.resolve(self.cwd, args[0] if args else self.env.get("HOME", "/"))
        if not self.fs.is_dir(target):
            await write("stderr", f"sh: cd: {target}: No such file or directory\n".encode())
            return 1
        self.cwd = target
        return 0

    # ---- commands -------------------------------------------------------------------
    async def _cmd_echo(self, args: list[str], write: Writer) -> int:
        newline = True
        if args and args[0] == "-n":
            newline, args = False, args[1:]
        await write("stdout", (" ".join(args) + ("\n" if newline else "")).encode())
        return 0

    async def _cmd_printf(self, args: list[str], write: Writer) -> int:
        if not args:
            await write("stderr", b"printf: usage: printf FORMAT [ARGUMENT]...\n")
            return 2
        out, values = _printf(args[0], args[1:])
        await write("stdout", out.encode())
        return 0 if values else 1

    async def _cmd_cat(self, args: list[str], write: Writer) -> int:
        status = 0
        for name in args or ["-"]:
            if name == "-":
                await write("stdout", await self.stdin.read_all())
                continue
            path = self.fs.resolve(self.cwd, name)
            try:
                await write("stdout", self.fs.read(path))
            except GuestFileError as exc:
                await write("stderr", f"cat: {name}: {_strerror(exc.code)}\n".encode())
                status = 1
        return status

    async def _cmd_true(self, args: list[str], write: Writer) -> int:
        return 0

    async def _cmd_false(self, args: list[str], write: Writer) -> int:
        return 1

    async def _cmd_sleep(self, args: list[str], write: Writer) -> int:
        try:
            seconds = float(args[0])
        except (IndexError, ValueError):
            await write("stderr", b"sleep: invalid time interval\n")
            return 1
        await self._sleep(seconds)
        return 0

    async def _cmd_env(self, args: list[str], write: Writer) -> int:
        await write("stdout", "".join(f"{k}={v}\n" for k, v in sorted(self.env.items())).encode())
        return 0

    async def _cmd_pwd(self, args: list[str], write: Writer) -> int:
        await write("stdout", f"{self.cwd}\n".encode())
        return 0

    async def _cmd_hostname(self, args: list[str], write: Writer) -> int:
        await write("stdout", f"{self.hostname}\n".encode())
        return 0

    async def _cmd_ls(self, args: list[str], write: Writer) -> int:
        status = 0
        for name in args or ["."]:
            try:
                entries = self.fs.list(self.fs.resolve(self.cwd, name))
            except GuestFileError:
                await write("stderr", f"ls: cannot access '{name}': No such file or directory\n"
                            .encode())
                status = 2
                continue
            await write("stdout", "".join(f"{e}\n" for e in entries).encode())
        return status

    async def _cmd_mkdir(self, args: list[str], write: Writer) -> int:
        parents = "-p" in args
        status = 0
        for name in (a for a in args if a != "-p"):
            try:
                self.fs.mkdir(self.fs.resolve(self.cwd, name), parents=parents)
            except GuestFileError as exc:
                await write("stderr", f"mkdir: {name}: {_strerror(exc.code)}\n".encode())
                status = 1
        return status

    async def _cmd_rm(self, args: list[str], write: Writer) -> int:
        flags = {a for a in args if a.startswith("-")}
        recursive = bool(flags & {"-r", "-rf", "-fr", "-R"})
        force = bool(flags & {"-f", "-rf", "-fr"})
        status = 0
        for name in (a for a in args if not a.startswith("-")):
            try:
                self.fs.remove(self.fs.resolve(self.cwd, name), recursive=recursive)
            except GuestFileError as exc:
                if force and exc.code == "ENOENT":
                    continue
                await write("stderr", f"rm: {name}: {_strerror(exc.code)}\n".encode())
                status = 1
        return status


def _strerror(code: str) -> str:
    return {
        "ENOENT": "No such file or directory",
        "EISDIR": "Is a directory",
        "EEXIST": "File exists",
        "ENOTEMPTY": "Directory not empty",
    }.get(code, code)


def _printf(fmt: str, args: list[str]) -> tuple[str, bool]:
    """Expand a printf format once; returns the text and whether all %d args were numbers."""
    out: list[str] = []
    values = iter(args)
    ok = True
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        nxt = fmt[i + 1] if i + 1 < len(fmt) else ""
        if ch == "\\" and nxt:
            out.append({"n": "\n", "t": "\t", "\\": "\\", "0": "\0"}.get(nxt, "\\" + nxt))
            i += 2
        elif ch == "%" and nxt:
            if nxt == "%":
                out.append("%")
            elif nxt == "s":
                out.append(next(values, ""))
            elif nxt == "d":
                value = next(values, "0")
                try:
                    out.append(str(int(value)))
                except ValueError:
                    out.append("0")
                    ok = False
            else:
                out.append("%" + nxt)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out), ok
