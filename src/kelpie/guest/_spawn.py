"""Starting commands: posix_spawn where it can do the setup, fork + exec where not."""

from __future__ import annotations

# contextlib is outside the guest's import budget: keep try/except/pass.
# ruff: noqa: SIM105
import errno
import fcntl
import os
import struct
import termios

from ._common import DEFAULT_PATH, OpError, log
from ._exec import Exec
from ._lean import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import ClassVar, Final, NoReturn

    from ._rootfs import User


class SpawnPlan:
    """Everything the forked child needs before it calls exec."""

    def __init__(
        self,
        *,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        root: str,
        user: User | None,
        pty: bool,
    ) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.root = root
        self.user = user
        self.pty = pty


class OutputPipes:
    """Pipes for commands' stdout and stderr, made ahead: the agent makes the next
    command's while it has nothing else to do (``prepare``), so that an exec request finds
    them ready (two system calls less between a request and its command's start). New,
    empty and close-on-exec like any other."""

    spare: ClassVar[list[tuple[int, int]]] = []

    @classmethod
    def take(cls) -> tuple[int, int]:
        """A pipe: (read end, non-blocking; write end)."""
        return cls.spare.pop() if cls.spare else cls.make()

    @classmethod
    def prepare(cls) -> None:
        """Have the pipes of the next command ready (if descriptors are short, its exec
        request will say so)."""
        try:
            while len(cls.spare) < 2:
                cls.spare.append(cls.make())
        except OSError:
            pass

    @staticmethod
    def make() -> tuple[int, int]:
        """A new pipe, its read end (the agent's) non-blocking."""
        read_end, write_end = os.pipe()
        try:
            _set_nonblocking(read_end)
        except OSError:
            _close_fds((read_end, write_end))
            raise
        return read_end, write_end


#: The stdin of a command that has none: the agent's own, /dev/null (``_main`` makes it so;
#: the agent never reads it). Inherited, it needs no descriptor moved into place: a dup2
#: less in the child and two resource-limit queries less in glibc's posix_spawn, which
#: checks every descriptor it is given to move.
NULL_STDIN: Final = 0


def _open_stdio(plan: SpawnPlan, want_stdin: bool) -> tuple[list[int], list[int | None]]:
    """Create the child's stdio; return (child fds 0-2, parent fds stdin/out/err: the
    agent's ends, non-blocking). Close the child's with _close_fds."""
    made: list[int] = []
    try:
        if plan.pty:
            made += os.openpty()
            master, slave = made
            _set_nonblocking(master)  # and its dup: they share the flags
            return [slave, slave, slave], [os.dup(master) if want_stdin else None, master, None]
        stdin_r, stdin_w = NULL_STDIN, None
        if want_stdin:
            made += os.pipe()
            stdin_r, stdin_w = made
            _set_nonblocking(stdin_w)
        made += OutputPipes.take()
        made += OutputPipes.take()
    except OSError:
        _close_fds(made)
        raise
    out_r, out_w, err_r, err_w = made[-4:]
    return [stdin_r, out_w, err_w], [stdin_w, out_r, err_r]


def _close_fds(fds: Iterable[int | None]) -> None:
    """Close the agent's copies of a command's descriptors (each once; the agent's own
    stdin stays open)."""
    for fd in set(fds):
        if fd is not None and fd != NULL_STDIN:
            os.close(fd)


def _child_main(plan: SpawnPlan, child_fds: list[int], errpipe: int) -> NoReturn:
    """Runs in the forked child: set up and exec, or report why not."""
    stage = "setup"
    try:
        signal.set_wakeup_fd(-1)
        for signum in CHILD_DEFAULT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        if plan.pty:
            fcntl.ioctl(child_fds[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(child_fds):
            if fd != target:
                os.dup2(fd, target)
        if plan.root != "/":
            stage = "chroot"
            os.chroot(plan.root)
            os.chdir("/")
        if plan.user is not None:
            stage = "user"
            os.setgroups(plan.user.groups)
            os.setgid(plan.user.gid)
            os.setuid(plan.user.uid)
        stage = "chdir"
        os.chdir(plan.cwd)
        stage = "exec"
        exec_search(plan.argv, plan.env)
    except BaseException as exc:
        code = getattr(exc, "errno", None) or 0
        detail = getattr(exc, "strerror", None) or str(exc)
        try:
            os.write(errpipe, f"{stage}\0{code}\0{detail}".encode(errors="replace")[:4096])
        finally:
            os._exit(127)
    os._exit(127)  # not reached: execvpe either replaces us or raises


def exec_search(argv: list[str], env: dict[str, str]) -> NoReturn:
    """execvpe without imports: after chroot/setuid the stdlib may be unreachable
    (``os.execvpe`` imports ``warnings`` lazily)."""
    if "/" in argv[0]:
        os.execve(argv[0], argv, env)
    first_error: OSError | None = None
    for directory in env.get("PATH", DEFAULT_PATH).split(":"):
        try:
            os.execve(os.path.join(directory or ".", argv[0]), argv, env)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last_error: OSError = exc
        except OSError as exc:  # e.g. EACCES: remember it, as a shell would
            if first_error is None:
                first_error = exc
    raise first_error or last_error


def _spawn_error(plan: SpawnPlan, report: bytes) -> OpError:
    """Turn the child's error report into an OpError for the host."""
    stage, _, rest = report.decode(errors="replace").partition("\0")
    num, _, detail = rest.partition("\0")
    code = errno.errorcode.get(int(num) if num.isdigit() else 0, "EIO")
    user = plan.user.name if plan.user else ""
    what = {
        "exec": f"cannot execute {plan.argv[0]!r}",
        "chdir": f"cannot change directory to {plan.cwd!r}",
        "user": f"cannot switch to user {user!r}",
        "chroot": f"cannot chroot into {plan.root!r}",
    }.get(stage, "cannot start the command")
    return OpError(code, f"{what}: {detail}")


#: Signals the agent ignores, which a command must start with at default (an ignored
#: signal stays ignored across exec; a handled one, like the agent's SIGTERM, does not).
#: SIGXFSZ: Python ignores it; SIGINT and SIGQUIT: init starts the agent in the
#: background, where the shell ignores them. Each costs the child a sigaction.
CHILD_DEFAULT_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP,
                                signal.SIGINT, signal.SIGQUIT)


def spawn(plan: SpawnPlan, exec_id: int, want_stdin: bool, rows: int, cols: int) -> Exec:
    """Start a command in its own session; raise OpError if it cannot start.

    posix_spawn (a vfork-style clone: no copy of the agent's page tables,
    no copy-on-write faults afterwards) is ~3x faster than fork under TCG;
    it is used whenever it can do all the child's setup, the agent taking the
    command's root and directory for the moment of the spawn. Another user or
    a terminal need code between fork and exec: fork then.
    """
    if plan.user is None and not plan.pty:
        return _posix_spawn(plan, exec_id, want_stdin)
    return _fork_spawn(plan, exec_id, want_stdin, rows, cols)


class _AgentPlace:
    """The agent's own root and working directory, held open so that they can be taken
    back after a spawn in a command's (fds: a chroot cannot be undone by path).

    Each system call costs ~15 us under TCG: the ones that change nothing (a command
    run in the agent's own directory, or the way back to a directory that is the root
    the agent has just taken back) are left out.
    """

    root_fd: int | None = None
    cwd_fd: int | None = None
    cwd = ""

    @classmethod
    def take(cls, plan: SpawnPlan) -> None:
        """Make ``plan.root`` the agent's root and ``plan.cwd`` its directory; on an error
        (an OpError for the command) the agent's own are back."""
        if cls.cwd_fd is None:
            cls.cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            cls.root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            cls.cwd = os.getcwd()
        stage = "chroot"
        try:
            if plan.root != "/":
                os.chroot(plan.root)  # the directory stays outside it: chdir below
            elif plan.cwd == cls.cwd:
                return
            stage = "chdir"
            os.chdir(plan.cwd)
        except OSError as exc:
            cls.give_back(plan)
            raise _spawn_error_os(plan, stage, exc) from None

    @classmethod
    def give_back(cls, plan: SpawnPlan) -> None:
        """The agent's own root and directory again."""
        assert cls.root_fd is not None and cls.cwd_fd is not None
        try:
            if plan.root != "/":
                os.fchdir(cls.root_fd)
                os.chroot(".")
                if cls.cwd == "/":
                    return  # the directory is the root just taken back
            elif plan.cwd == cls.cwd:
                return
            os.fchdir(cls.cwd_fd)
        except OSError as exc:  # never serve on from a command's root: init restarts us
            log(f"cannot return to the agent's own root and directory: {exc}; exiting")
            os._exit(70)


def _posix_spawn(plan: SpawnPlan, exec_id: int, want_stdin: bool) -> Exec:
    """Start a command with posix_spawn in ``plan.root`` and ``plan.cwd`` (the agent is
    single-threaded: it takes them for the spawn and then takes its own back)."""
    child_fds, parent_fds = _open_stdio(plan, want_stdin)
    stdin_r, out_w, err_w = child_fds
    if min(out_w, err_w) <= 2 or 0 < stdin_r <= 2:
        # the agent's own stdio was closed and a pipe took its place: dup2 order matters
        _close_fds([*child_fds, *parent_fds])
        return _fork_spawn(plan, exec_id, want_stdin, 24, 80)
    try:
        _AgentPlace.take(plan)
        try:
            pid = _posix_spawn_search(plan, child_fds)
        finally:
            _AgentPlace.give_back(plan)
    except BaseException:
        _close_fds([*child_fds, *parent_fds])
        raise
    _close_fds(child_fds)
    ex = Exec(exec_id, pid, plan.argv, plan.pty)
    ex.stdin_fd, ex.out_fd, ex.err_fd = parent_fds
    return ex


def _posix_spawn_search(plan: SpawnPlan, child_fds: list[int]) -> int:
    """posix_spawn ``plan.argv`` searched in the PATH of ``plan.env``, as exec_search
    does.

    The search is ours, not glibc's posix_spawnp: that one tries execve in every PATH
    directory until one works, and each failed execve sets up a new address space and
    copies the arguments and environment into it first (~0.7 ms more per spawn under
    TCG for a command in /bin, against ~0.1 ms for an access() per directory here).
    """
    actions = [(os.POSIX_SPAWN_DUP2, fd, target)
               for target, fd in enumerate(child_fds) if fd != target]
    argv, env = plan.argv, plan.env
    if "/" in argv[0]:
        candidates = [argv[0]]
    else:
        path = env.get("PATH", DEFAULT_PATH).split(":")
        candidates = [f"{(directory or '.').rstrip('/')}/{argv[0]}" for directory in path]
    failed: dict[str, OSError] = {}
    for candidate in candidates:
        # access() is a cheap way past missing files (no failed spawn, no exception);
        # a candidate it skips is examined again below if nothing can be started. With
        # the effective ids, as execve checks (the real ones cost the kernel a copy of
        # the process's credentials per call).
        if len(candidates) > 1 and not os.access(candidate, os.F_OK, effective_ids=True):
            continue
        try:
            return os.posix_spawn(candidate, argv, env, file_actions=actions, setsid=True,
                                  setsigmask=(), setsigdef=CHILD_DEFAULT_SIGNALS)
        except OSError as exc:
            failed[candidate] = exc
    errors = [failed.get(candidate) or _missing_reason(candidate) for candidate in candidates]
    # As a shell: the first error that is not "missing" (e.g. EACCES), else the last.
    missing = (FileNotFoundError, NotADirectoryError)
    error = next((e for e in errors if not isinstance(e, missing)), errors[-1])
    raise _spawn_error_os(plan, "exec", error)


def _missing_reason(path: str) -> OSError:
    """Why access() found no file at ``path`` (ENOENT, ENOTDIR, EACCES...)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))  # appeared meanwhile


def _spawn_error_os(plan: SpawnPlan, stage: str, exc: OSError) -> OpError:
    """An OSError of a spawn stage as the OpError the fork path would report."""
    detail = exc.strerror or str(exc)
    report = f"{stage}\0{exc.errno or 0}\0{detail}".encode(errors="replace")
    return _spawn_error(plan, report)


def _fork_spawn(plan: SpawnPlan, exec_id: int, want_stdin: bool, rows: int, cols: int) -> Exec:
    """Fork and exec a command in its own session; raise OpError if it cannot start."""
    child_fds, parent_fds = _open_stdio(plan, want_stdin)
    if plan.pty:
        set_winsize(child_fds[0], rows, cols)
    err_r, err_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        _close_fds([*child_fds, *parent_fds, err_r, err_w])
        raise OpError.from_os(exc, "fork failed") from None
    if pid == 0:
        _child_main(plan, child_fds, err_w)
    os.close(err_w)
    _close_fds(child_fds)
    report = _read_to_eof(err_r)
    os.close(err_r)
    ex = Exec(exec_id, pid, plan.argv, plan.pty)
    ex.stdin_fd, ex.out_fd, ex.err_fd = parent_fds
    if report:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        ex.close_fds()
        raise _spawn_error(plan, report)
    return ex


def _set_nonblocking(fd: int) -> None:
    """O_NONBLOCK on one of the agent's ends of a command's stdio: set outright, where
    os.set_blocking reads the flags first (a new pipe or PTY has none that F_SETFL keeps)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)


def _read_to_eof(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size (the kernel sends SIGWINCH to its group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
