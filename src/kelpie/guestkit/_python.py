"""The guest's Python: which stdlib files and shared libraries to ship, and their bytecode.

Nothing here guesses: the unpacked Debian interpreter is run on the host (through the
unpacked tree's own dynamic loader and libraries, so the host's Python and libc play no
part), it imports what the agent imports, and whatever lands in `sys.modules` is what the
guest gets. Shared libraries come from the DT_NEEDED entries of the binaries kept. Bytecode
is compiled ahead of time with unchecked-hash `.pyc` files, which stay valid whatever the
file times in the initramfs are, so the guest never compiles or writes bytecode at boot.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from kelpie.guestkit._arch import GuestArch, guest_arch
from kelpie.guestkit._elf import needed_libraries

PYTHON_VERSION = "3.11"
PYTHON_BIN = PurePosixPath("usr/bin/python3.11")
STDLIB = PurePosixPath("usr/lib/python3.11")

#: What the agent needs whatever its sources say, plus the codecs Python may look up.
BASE_IMPORTS = (
    "errno",
    "fcntl",
    "hashlib",
    "json",
    "os",
    "pty",
    "random",
    "select",
    "signal",
    "socket",
    "stat",
    "struct",
    "sys",
    "termios",
    "time",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
)

#: Extension modules deliberately left out, with the reason.
EXCLUDED = {
    # Pulls in libcrypto (4.7 MB, slow to relocate under TCG); hashlib falls back to the
    # interpreter's built-in _sha256/_sha512/_md5/_blake2/_sha3.
    "_hashlib": "needs libcrypto; built-in hash modules are used instead",
    # tarfile (the build's layer op) imports shutil, which tries both: the agent's tars are
    # uncompressed, and the libraries are not in the kit.
    "_lzma": "needs liblzma; the agent writes only uncompressed tars",
    "_bz2": "needs libbz2; the agent writes only uncompressed tars",
}

#: Modules of the agent itself, never looked up in the stdlib: its package (``guest`` in
#: the guest, ``kelpie.guest`` on the host) and the wire protocol.
AGENT_MODULES = frozenset({"guest", "kelpie", "protocol"})

_DISCOVER = """
import sys
required, optional, excluded = eval(sys.argv[1])
for name in excluded:
    sys.modules[name] = None
failed = {}
for name in required + optional:
    try:
        __import__(name)
    except Exception as exc:
        if name in required:
            failed[name] = f"{type(exc).__name__}: {exc}"
files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
print(repr({"files": files, "failed": failed, "version": sys.version.split()[0]}))
"""

_COMPILE = """
import sys, py_compile, importlib.util
for source, shown, compiled in eval(sys.argv[1]):
    py_compile.compile(
        source, compiled or importlib.util.cache_from_source(source), shown, doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
"""

_VERIFY = """
import sys
for name in eval(sys.argv[1]):
    __import__(name)
import hashlib, random
hashlib.sha256(b"kelpie").hexdigest()
random.random()
outside = sorted(
    m.__file__ for m in list(sys.modules.values())
    if getattr(m, "__file__", None) and not m.__file__.startswith(sys.prefix)
)
print(repr(outside))
"""


class PythonKitError(RuntimeError):
    """The guest interpreter could not be run, or an import it needs is missing."""


@dataclasses.dataclass(frozen=True)
class StdlibSelection:
    """Stdlib files (relative to the tree root) the agent's imports load, and the version."""

    files: tuple[PurePosixPath, ...]
    version: str


def resolve_in(root: Path, path: PurePosixPath) -> PurePosixPath:
    """Follow symlinks of the guest path `path` inside the tree `root`, as the guest would."""
    parts = list(path.parts)
    resolved = PurePosixPath()
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = resolved / part
        host = root / candidate
        if host.is_symlink():
            hops += 1
            if hops > 40:
                raise PythonKitError(f"too many symlinks resolving /{path} in {root}")
            target = PurePosixPath(os.readlink(host))
            if target.is_absolute():
                resolved = PurePosixPath()
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        if part == "..":
            resolved = resolved.parent
        elif part != ".":
            resolved = candidate
    return resolved


def find_library(root: Path, soname: str, arch: GuestArch | None = None) -> PurePosixPath:
    """The guest path of library `soname` in the tree, searched like the dynamic loader."""
    for directory in (arch or guest_arch(None)).library_dirs:
        if (root / directory / soname).exists():
            return directory / soname
    raise PythonKitError(f"shared library {soname} is not in any unpacked package")


def library_closure(root: Path, binaries: Iterable[PurePosixPath],
                    arch: GuestArch | None = None) -> list[PurePosixPath]:
    """Guest paths (symlinks included) of every shared library `binaries` need, transitively.

    The dynamic loader itself is included.
    """
    arch = arch or guest_arch(None)
    wanted: list[PurePosixPath] = [arch.loader]
    queue = list(binaries)
    seen: set[str] = set()
    while queue:
        binary = resolve_in(root, queue.pop())
        for soname in needed_libraries(root / binary):
            if soname in seen:
                continue
            seen.add(soname)
            path = find_library(root, soname, arch)
            wanted.append(path)
            queue.append(path)
    return sorted(set(wanted))


def symlink_chain(root: Path, path: PurePosixPath) -> list[PurePosixPath]:
    """`path` and every symlink hop from it to the real file, all as guest paths."""
    chain = [path]
    while (root / chain[-1]).is_symlink():
        target = PurePosixPath(os.readlink(root / chain[-1]))
        if target.is_absolute():
            nxt = target.relative_to("/")
        else:
            nxt = PurePosixPath(os.path.normpath(chain[-1].parent / target))
        if nxt in chain:
            raise PythonKitError(f"symlink loop at /{path} in {root}")
        chain.append(nxt)
    return chain


def _is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports never run in the guest."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` except those inside `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking_block(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def agent_imports(sources: Iterable[Path]) -> tuple[list[str], list[str]]:
    """Modules the agent's sources import at run time: (certainly modules, maybe modules).

    `from a import b` makes `a` certain and `a.b` a maybe: `b` may be an attribute.
    Relative imports, the agent's own modules and imports under `if TYPE_CHECKING:` are
    left out.
    """
    certain: set[str] = set()
    maybe: set[str] = set()
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                certain.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                certain.add(node.module)
                maybe.update(f"{node.module}.{alias.name}" for alias in node.names)
    own = {name for name in certain | maybe if name.split(".")[0] in AGENT_MODULES}
    return sorted(certain - own), sorted(maybe - own - certain)


class GuestPython:
    """Runs the interpreter of an unpacked (or staged) tree on the host, via its own loader
    (under QEMU's user-mode emulator for another architecture)."""

    def __init__(self, root: Path, arch: GuestArch | None = None) -> None:
        self.root = root
        self.arch = arch or guest_arch(None)
        self.loader = root / resolve_in(root, self.arch.loader)
        self.binary = root / PYTHON_BIN
        if not self.loader.exists() or not self.binary.exists():
            raise PythonKitError(f"no Python {PYTHON_VERSION} interpreter unpacked in {root}")

    def run(self, code: str, argument: str) -> str:
        """Run `code` with `-S` and one argument; return its stdout."""
        library_path = ":".join(str(self.root / d) for d in self.arch.library_dirs)
        argv = [*self.arch.runner(), str(self.loader), "--library-path", library_path,
                str(self.binary), "-S"]
        env = {"PYTHONHOME": str(self.root / "usr"), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run(
                [*argv, "-c", code, argument],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
            )
        except OSError as exc:
            raise PythonKitError(
                f"cannot run the guest interpreter {self.binary} on this host ({exc})"
            ) from exc
        if done.returncode != 0:
            raise PythonKitError(
                f"the guest interpreter failed (exit {done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def discover(
        self, required: Sequence[str], optional: Sequence[str], excluded: Iterable[str]
    ) -> StdlibSelection:
        """Import the given modules and report every stdlib file they loaded."""
        arg = repr((list(required), list(optional), sorted(excluded)))
        result = ast.literal_eval(self.run(_DISCOVER, arg))
        if result["failed"]:
            problems = "; ".join(f"{k}: {v}" for k, v in sorted(result["failed"].items()))
            raise PythonKitError(f"the guest Python cannot import what the agent needs: {problems}")
        stdlib = self.root / STDLIB
        files = []
        for name in result["files"]:
            path = Path(name)
            if path.is_relative_to(stdlib):
                files.append(PurePosixPath(path.relative_to(self.root).as_posix()))
        return StdlibSelection(tuple(files), str(result["version"]))

    def compile(self, sources: Mapping[Path, PurePosixPath],
                scripts: Mapping[Path, Path] | None = None) -> None:
        """Write unchecked-hash `.pyc` files for each host source file: a module's in its
        `__pycache__`, where imports look, and a script's (a key of `scripts`) where its
        value says, for the interpreter to run directly (`python3 agent.pyc`).

        Each value of `sources` is the path the file has in the guest, shown in tracebacks.
        """
        scripts = scripts or {}
        triples = [(str(host), f"/{guest}", str(scripts[host]) if host in scripts else None)
                   for host, guest in sorted(sources.items())]
        self.run(_COMPILE, repr(triples))

    def verify(self, modules: Sequence[str]) -> None:
        """Check that this tree alone imports `modules` (run on the staged tree)."""
        outside = ast.literal_eval(self.run(_VERIFY, repr(list(modules))))
        if outside:
            raise PythonKitError(f"the staged Python loaded files from outside its tree: {outside}")
