"""Kelpie guest agent: serves the wire protocol of ``protocol.py`` inside the VM.

Run it as::

    python3 -S /kelpie/agent.py --device /dev/vport0p1 [--root /newroot]
    python3 -S agent.py --listen-unix /tmp/agent.sock      # host test mode
    python3 -S agent.py --listen-vsock 1024                 # vsock (Firecracker...)

with ``protocol.py`` next to this file (the guest layout) or one directory up
(the source tree). Standard library only, and only modules that a trimmed
guest interpreter has and imports quickly.

Design
------
* One thread, one ``select.poll`` loop. Nothing in the loop blocks on the
  host channel: outgoing frames queue in memory and are written with
  O_NONBLOCK; child output pipes are not read while more than HIGH_WATER
  bytes wait to go out, so a slow host slows the children down instead of
  growing the agent without bound.
* The agent outlives host connections. On virtio-serial, POLLHUP means "no
  host is connected": the agent stops polling the port, checks again every
  RECHECK_INTERVAL and keeps running execs. In socket modes it accepts the
  next connection (a new connection replaces the current one). Execs of a
  finished session are *detached*: they keep running (their output waits in
  the kernel pipe) until a host attaches to them or they are evicted.
* ``--root DIR``: commands run chrooted into DIR and file operations resolve
  paths inside it (symlinks are followed as if DIR were "/"). The VM is the
  security boundary; the chroot only gives images their own filesystem, so
  the agent itself needs nothing from the image (not even Python).
"""

from __future__ import annotations

# contextlib is outside the guest's import budget: keep try/except/pass.
# ruff: noqa: SIM105
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
import termios
import time

# Not in the import budget above, but free: json imports them already.
from collections import deque
from functools import partial

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, NoReturn

if __package__:  # imported as kelpie.guest.agent (host-side tests, type checking)
    from kelpie import protocol
else:  # run as a script: /kelpie/agent.py in the guest, or from the source tree
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(_HERE, "protocol.py")):
        # Appended, not prepended: the package directory must not shadow stdlib names.
        sys.path.append(os.path.dirname(_HERE))
    import protocol  # type: ignore[import-not-found, no-redef]

FT = protocol.FrameType
ProtocolError = protocol.ProtocolError

#: Stop reading child output while this many bytes wait to go to the host.
HIGH_WATER: Final = 1024 * 1024
#: Stop reading the host channel while this many bytes wait to go out.
OUT_HARD_LIMIT: Final = 8 * HIGH_WATER
#: Stop reading the host channel while this much stdin waits for children.
STDIN_HIGH_WATER: Final = 1024 * 1024
#: After the main process exits, how long to wait for its pipes to reach EOF
#: (background processes may hold them open) before finishing the exec.
DRAIN_GRACE: Final = 0.2
#: Upper bound on the final, non-blocking drain of a finished exec's pipe.
FINAL_DRAIN_LIMIT: Final = 1024 * 1024
#: While no host is connected to the virtio-serial port, check this often.
RECHECK_INTERVAL: Final = 0.1
#: Finished execs kept for a host to collect, beyond which the oldest go.
KEEP_FINISHED_DETACHED: Final = 64
#: Entries per ``list`` message (each entry is at most ~350 bytes of JSON).
LIST_BATCH: Final = 512
MAX_SYMLINKS: Final = 40
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: _IOW('R', 0x03, int[2]): add entropy to the kernel pool and credit it.
RNDADDENTROPY: Final = 0x40085203
#: _IO('R', 0x07): reseed the kernel's CRNG from its input pool now (Linux >= 4.17).
RNDRESEEDCRNG: Final = 0x5207
READ_CHUNK: Final = protocol.DATA_CHUNK
#: Bytes read from the host channel per loop turn at most (one largest frame).
READ_BUDGET: Final = protocol.MAX_FRAME_PAYLOAD + protocol.HEADER_SIZE
FILE_CHUNK: Final = protocol.MAX_FRAME_PAYLOAD


def log(message: str) -> None:
    """Write one diagnostic line to stderr (the console, in the guest)."""
    try:
        sys.stderr.write(f"kelpie-agent[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


class OpError(Exception):
    """A request failed; ``code`` is an errno-style name sent to the host."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_os(cls, exc: OSError, what: str) -> OpError:
        """Describe an OSError as ``what: strerror`` with its errno name."""
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        return cls(code, f"{what}: {exc.strerror or exc}")


# ---------------------------------------------------------------------------
# The image root: path resolution and the user database
# ---------------------------------------------------------------------------


class RootFS:
    """Resolves guest paths to agent paths inside the image root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def host_path(self, parts: list[str]) -> str:
        """Join resolved components below the root."""
        prefix = "" if self.root == "/" else self.root
        return prefix + "/" + "/".join(parts)

    def resolve(self, path: str, follow_last: bool = True) -> str:
        """Map an absolute guest path to an agent path, following symlinks
        as the chroot would (absolute targets and ``..`` stay inside root).

        Missing components are kept verbatim: the caller's operation then
        reports ENOENT (or creates them).
        """
        if not path.startswith("/"):
            raise OpError("EINVAL", f"path must be absolute: {path!r}")
        pending = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        resolved: list[str] = []
        links = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.host_path([*resolved, name])
            if not pending and not follow_last:
                resolved.append(name)
                continue
            try:
                target = os.readlink(candidate)
            except OSError:  # not a symlink, or missing
                resolved.append(name)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OpError("ELOOP", f"too many levels of symbolic links: {path}")
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(target.split("/")))
        return self.host_path(resolved)


class User:
    """Credentials a command runs with."""

    def __init__(self, name: str, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home


#: Parsed user databases by agent path, with the stat identity they were read at.
_DB_CACHE: dict[str, tuple[tuple[int, int, int, int], list[list[str]]]] = {}


def _read_db(rootfs: RootFS, path: str) -> list[list[str]]:
    """Read a colon-separated database (/etc/passwd, /etc/group) of the image.

    Every exec looks its user up: the parsed rows are reused while the file's
    identity (inode, size, mtime, ctime) is unchanged, which costs one stat
    instead of an open, a read and a parse.
    """
    # Below "/" the kernel's own lookup resolves exactly as RootFS.resolve would.
    host = path if rootfs.root == "/" else rootfs.resolve(path)
    try:
        st = os.stat(host)
    except OSError:
        return []
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _DB_CACHE.get(host)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with open(host, encoding="utf-8", errors="replace") as db:
            rows = [line.rstrip("\n").split(":") for line in db if not line.startswith("#")]
    except OSError:
        return []
    _DB_CACHE[host] = (key, rows)
    return rows


def lookup_user(rootfs: RootFS, user: str | int | None) -> User:
    """Resolve a user name or uid against the image's /etc/passwd and /etc/group."""
    if user is None:
        user = os.getuid()
    if isinstance(user, str) and user.isdigit():
        user = int(user)
    for row in _read_db(rootfs, "/etc/passwd"):
        if len(row) < 7 or not row[2].isdigit() or not row[3].isdigit():
            continue
        if row[0] == user or (isinstance(user, int) and int(row[2]) == user):
            name, uid, gid, home = row[0], int(row[2]), int(row[3]), row[5] or "/"
            return User(name, uid, gid, _groups_of(rootfs, name, gid), home)
    if isinstance(user, int):
        return User(str(user), user, user, [user], "/")
    raise OpError("EINVAL", f"no user named {user!r} in the sandbox's /etc/passwd")


def _groups_of(rootfs: RootFS, name: str, gid: int) -> list[int]:
    groups = [gid]
    for row in _read_db(rootfs, "/etc/group"):
        if len(row) >= 4 and row[2].isdigit() and name in row[3].split(","):
            groups.append(int(row[2]))
    return groups


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------


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


class Exec:
    """A command started by the agent, attached to a request or detached."""

    def __init__(self, exec_id: int, pid: int, argv: list[str], pty: bool) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self.argv = argv
        self.pty = pty
        self.stdin_fd: int | None = None
        self.out_fd: int | None = None  # stdout, or the PTY master
        self.err_fd: int | None = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.status: int | None = None  # raw wait status once reaped
        self.timed_out = False
        self.deadline: float | None = None
        self.drain_deadline: float | None = None
        self.request_id: int | None = None
        self.exited_at = 0.0

    def info(self) -> dict[str, Any]:
        """Summary listed in the hello reply."""
        argv = [arg[:256] for arg in self.argv[:16]]
        return {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "argv": argv,
            "pty": self.pty,
            "running": self.status is None,
        }

    def result(self) -> dict[str, Any]:
        """The terminal REPLY message."""
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        return {
            "exec_id": self.exec_id,
            "exit_code": code if code >= 0 else None,
            "signal": -code if code < 0 else None,
            "timed_out": self.timed_out,
        }

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the process group (and the leader, should it have left it).

        Only while the leader is unreaped: after that its pid may be reused.
        """
        if self.status is not None:
            return
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
            try:
                kill(target, signum)
            except OSError:
                pass

    def close_stdin_fd(self) -> None:
        """Give the child EOF on stdin (for a PTY: the VEOF character)."""
        fd, self.stdin_fd = self.stdin_fd, None
        self.stdin_buf.clear()
        if fd is None:
            return
        if self.pty:
            try:
                os.write(fd, bytes([termios.tcgetattr(fd)[6][termios.VEOF][0]]))
            except (OSError, termios.error, IndexError, TypeError):
                pass
        os.close(fd)

    def close_fds(self) -> None:
        """Release every descriptor the agent holds for this exec."""
        self.close_stdin_fd()
        for name in ("out_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _open_stdio(plan: SpawnPlan, want_stdin: bool) -> tuple[list[int], list[int | None]]:
    """Create the child's stdio; return (child fds 0-2, parent fds stdin/out/err)."""
    if plan.pty:
        master, slave = os.openpty()
        return [slave, slave, slave], [os.dup(master) if want_stdin else None, master, None]
    if want_stdin:
        stdin_r, stdin_w = os.pipe()
    else:
        stdin_r, stdin_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    return [stdin_r, out_w, err_w], [stdin_w, out_r, err_r]


def _child_main(plan: SpawnPlan, child_fds: list[int], errpipe: int) -> NoReturn:
    """Runs in the forked child: set up and exec, or report why not."""
    stage = "setup"
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        if plan.pty:
            fcntl.ioctl(child_fds[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(child_fds):
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


#: Signals the agent ignores or handles that a command must start with at default.
CHILD_DEFAULT_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGCHLD)


def spawn(plan: SpawnPlan, exec_id: int, want_stdin: bool, rows: int, cols: int) -> Exec:
    """Start a command in its own session; raise OpError if it cannot start.

    posix_spawn (a vfork-style clone: no copy of the agent's page tables,
    no copy-on-write faults afterwards) is ~3x faster than fork under TCG;
    it is used whenever it can do all the child's setup. A chroot, another
    user or a terminal need code between fork and exec: fork then.
    """
    if plan.root == "/" and plan.user is None and not plan.pty:
        return _posix_spawn(plan, exec_id, want_stdin)
    return _fork_spawn(plan, exec_id, want_stdin, rows, cols)


class _AgentCwd:
    """The agent's own working directory, restored after a spawn in another one."""

    path: str | None = None
    fd: int | None = None

    @classmethod
    def enter(cls, cwd: str) -> bool:
        """chdir to ``cwd`` unless already there; True if ``leave`` must follow."""
        if cls.fd is None:
            cls.fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                cls.path = os.getcwd()
            except OSError:
                cls.path = None
        if cwd == cls.path == "/":  # other directories may be replaced under the same name
            return False
        os.chdir(cwd)
        return True

    @classmethod
    def leave(cls) -> None:
        """Return to the agent's own directory."""
        assert cls.fd is not None
        os.fchdir(cls.fd)


def _posix_spawn(plan: SpawnPlan, exec_id: int, want_stdin: bool) -> Exec:
    """Start a command with posix_spawn in ``plan.cwd`` (the agent is single-threaded:
    it changes its own directory for the spawn and changes back)."""
    child_fds, parent_fds = _open_stdio(plan, want_stdin)
    if min(child_fds) <= 2:  # the agent's own stdio was closed: dup2 order would matter
        for fd in {*child_fds, *parent_fds}:
            if fd is not None:
                os.close(fd)
        return _fork_spawn(plan, exec_id, want_stdin, 24, 80)
    try:
        try:
            moved = _AgentCwd.enter(plan.cwd)
        except OSError as exc:
            raise _spawn_error_os(plan, "chdir", exc) from None
        try:
            pid = _posix_spawn_search(plan, child_fds)
        finally:
            if moved:
                _AgentCwd.leave()
    except BaseException:
        for fd in {*child_fds, *parent_fds}:
            if fd is not None:
                os.close(fd)
        raise
    for fd in set(child_fds):
        os.close(fd)
    ex = Exec(exec_id, pid, plan.argv, plan.pty)
    ex.stdin_fd, ex.out_fd, ex.err_fd = parent_fds
    for fd in parent_fds:
        if fd is not None:
            os.set_blocking(fd, False)
    return ex


def _posix_spawn_search(plan: SpawnPlan, child_fds: list[int]) -> int:
    """posix_spawn ``plan.argv`` searched in the PATH of ``plan.env`` (as exec_search
    does; glibc's posix_spawnp would search the agent's own PATH)."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_fds)]
    argv, env = plan.argv, plan.env
    if "/" in argv[0]:
        candidates = [argv[0]]
    else:
        path = env.get("PATH", DEFAULT_PATH).split(":")
        candidates = [f"{(directory or '.').rstrip('/')}/{argv[0]}" for directory in path]
    failed: dict[str, OSError] = {}
    for candidate in candidates:
        # access() is a cheap way past missing files (no failed spawn, no exception);
        # a candidate it skips is examined again below if nothing can be started.
        if len(candidates) > 1 and not os.access(candidate, os.F_OK):
            continue
        try:
            return os.posix_spawn(
                candidate,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=CHILD_DEFAULT_SIGNALS,
            )
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
        for fd in {*child_fds, *parent_fds, err_r, err_w}:
            if fd is not None:
                os.close(fd)
        raise OpError.from_os(exc, "fork failed") from None
    if pid == 0:
        _child_main(plan, child_fds, err_w)
    os.close(err_w)
    for fd in set(child_fds):
        os.close(fd)
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
    for fd in parent_fds:
        if fd is not None:
            os.set_blocking(fd, False)
    return ex


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


# ---------------------------------------------------------------------------
# File transfers in progress
# ---------------------------------------------------------------------------


class Upload:
    """A write_file in progress: chunks go to a temp file renamed at the end."""

    def __init__(self, request_id: int, path: str, final: str, tmp: str, fd: int) -> None:
        self.request_id = request_id
        self.path = path
        self.final = final
        self.tmp = tmp
        self.fd: int | None = fd
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append a chunk to the temp file."""
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)

    def commit(self) -> None:
        """Make the file durable and move it into place."""
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, self.final)

    def abort(self) -> None:
        """Drop the temp file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class Download:
    """A read_file in progress."""

    def __init__(self, request_id: int, fd: int) -> None:
        self.request_id = request_id
        self.fd = fd
        self.size = 0

    def abort(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def file_type(mode: int) -> str:
    """Name a file type as in protocol.FILE_TYPES."""
    for check, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if check(mode):
            return name
    return "other"


def remove_tree(top: str) -> None:
    """Delete a directory tree without following symlinks (no recursion limit)."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


def read_boot_id() -> str:
    """The kernel's boot id (changes on every boot, not on snapshot restore)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Host channels
# ---------------------------------------------------------------------------


class Channel:
    """Where host connections come from. Subclasses: device and listener."""

    #: The fd of the current connection, or None while no host is connected.
    conn_fd: int | None = None

    def poll_fds(self) -> list[int]:
        """Fds (besides the connection) the loop should poll for POLLIN."""
        return []

    def on_ready(self, fd: int) -> bool:
        """An fd from poll_fds() is readable; return True if a new host connected."""
        return False

    def check(self, now: float) -> bool:
        """Called every loop turn; return True if a new host connected."""
        return False

    def timeout(self, now: float) -> float | None:
        """Seconds until check() wants to run again, or None."""
        return None

    def disconnect(self) -> None:
        """The current host went away (EOF, error or hang-up)."""
        self.conn_fd = None

    def close(self) -> None:
        """Release everything."""


class DeviceChannel(Channel):
    """A virtio-serial port: the fd stays open, the host comes and goes.

    The port reports POLLHUP while no host is connected (and read() returns
    0); it is then left out of the poll set and re-checked periodically.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = self._open(path)
        self.next_check = 0.0

    @staticmethod
    def _open(path: str) -> int:
        logged = 0.0
        while True:
            try:
                return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except FileNotFoundError:
                now = time.monotonic()
                if now - logged > 10:
                    log(f"waiting for {path} to appear")
                    logged = now
                time.sleep(0.05)

    def _host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def check(self, now: float) -> bool:
        if self.conn_fd is not None or now < self.next_check:
            return False
        self.next_check = now + RECHECK_INTERVAL
        if self._host_connected():
            self.conn_fd = self.fd
            return True
        return False

    def timeout(self, now: float) -> float | None:
        if self.conn_fd is not None:
            return None
        return max(0.0, self.next_check - now)

    def disconnect(self) -> None:
        self.conn_fd = None
        self.next_check = time.monotonic() + RECHECK_INTERVAL

    def close(self) -> None:
        os.close(self.fd)


class ListenChannel(Channel):
    """A listening socket (unix or vsock); one host at a time, newest wins."""

    def __init__(self, sock: socket.socket) -> None:
        self.listener = sock
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None

    @classmethod
    def unix(cls, path: str) -> ListenChannel:
        """Listen on a unix socket path (replacing a stale socket file)."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(4)
        return cls(sock)

    @classmethod
    def vsock(cls, port: int) -> ListenChannel:
        """Listen on a vsock port for connections from the host."""
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(4)
        return cls(sock)

    def poll_fds(self) -> list[int]:
        return [self.listener.fileno()]

    def on_ready(self, fd: int) -> bool:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        self.disconnect()
        conn.setblocking(False)
        self.conn = conn
        self.conn_fd = conn.fileno()
        return True

    def disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.conn_fd = None

    def close(self) -> None:
        self.disconnect()
        self.listener.close()


# ---------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------


class Agent:
    """The poll loop: one host session at a time, execs that outlive it."""

    def __init__(self, channel: Channel, root: str = "/", power_off: bool = False) -> None:
        self.channel = channel
        self.rootfs = RootFS(root)
        self.power_off_allowed = power_off
        self.decoder = protocol.FrameDecoder()
        # Reused for every read of the host channel (see read_conn).
        self.read_buf = memoryview(bytearray(READ_BUDGET))
        self.out: deque[bytes] = deque()
        self.out_sent = 0  # bytes of out[0] already written
        self.out_bytes = 0
        self.session_open = False
        self.garbage_reason: str | None = None
        self.requests: dict[int, Exec | Upload | Download] = {}
        self.execs: dict[int, Exec] = {}
        self.by_pid: dict[int, Exec] = {}
        self.next_exec_id = 1
        self.stopping = False
        self.power_off_requested = False
        self.wakeup_r, self.wakeup_w = os.pipe()
        self.handlers: dict[str, Callable[[int, dict[str, Any]], dict[str, Any] | None]] = {
            "hello": self.op_hello,
            "ping": self.op_ping,
            "exec": self.op_exec,
            "attach": self.op_attach,
            "signal": self.op_signal,
            "resize": self.op_resize,
            "cancel": self.op_cancel,
            "read_file": self.op_read_file,
            "write_file": self.op_write_file,
            "stat": self.op_stat,
            "list": self.op_list,
            "mkdir": self.op_mkdir,
            "remove": self.op_remove,
            "resync": self.op_resync,
            "shutdown": self.op_shutdown,
        }

    # -- lifecycle ----------------------------------------------------------

    def install_signals(self) -> None:
        """Wake the poll loop on SIGCHLD; ignore hang-ups of the console."""
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum: int, frame: object) -> None:
        """Stop like a shutdown request without power-off: execs are killed."""
        self.stopping = True

    def run(self) -> None:
        """Serve until a shutdown request."""
        self.install_signals()
        while not self.stopping:
            try:
                self.turn()
            except Exception as exc:  # keep serving: the guest has no other way in
                log(f"internal error: {exc!r}")
                time.sleep(0.01)
        self.finish()

    def finish(self) -> None:
        """After shutdown: deliver the last replies, stop every command."""
        deadline = time.monotonic() + 2.0
        while self.out and self.channel.conn_fd is not None and time.monotonic() < deadline:
            self.flush()
            if self.out and self.channel.conn_fd is not None:
                poller = select.poll()
                poller.register(self.channel.conn_fd, select.POLLOUT)
                poller.poll(50)
        for ex in list(self.execs.values()):
            ex.kill_group()
            ex.close_fds()
        self.channel.close()

    # -- the loop ------------------------------------------------------------

    def turn(self) -> None:
        """One loop iteration: timers, pumps, then poll and dispatch."""
        now = time.monotonic()
        if self.channel.check(now):
            self.on_connect()
        self.reap()
        self.expire_timeouts(now)
        self.finish_execs(now)
        self.pump_downloads()
        self.flush()
        poller = select.poll()
        dispatch: dict[int, Callable[[int], None]] = {}
        self.register(poller, dispatch)
        timeout = self.poll_timeout(time.monotonic())
        for fd, events in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            callback = dispatch.get(fd)
            if callback is not None:
                callback(events)

    def register(self, poller: select.poll, dispatch: dict[int, Callable[[int], None]]) -> None:
        """Fill the poll set for this turn."""

        def add(fd: int, events: int, callback: Callable[[int], None]) -> None:
            poller.register(fd, events)
            dispatch[fd] = callback

        add(self.wakeup_r, select.POLLIN, self.drain_wakeup)
        conn = self.channel.conn_fd
        if conn is not None:  # before the listener: an accept may replace it
            events = 0
            if self.stdin_backlog() < STDIN_HIGH_WATER and self.out_bytes < OUT_HARD_LIMIT:
                events |= select.POLLIN
            if self.out:
                events |= select.POLLOUT
            add(conn, events, partial(self.on_conn_event, conn))
        for fd in self.channel.poll_fds():
            add(fd, select.POLLIN, partial(self.on_channel_ready, fd))
        reading = self.out_bytes < HIGH_WATER
        for ex in self.execs.values():
            if ex.stdin_fd is not None and ex.stdin_buf:
                add(ex.stdin_fd, select.POLLOUT, partial(self.on_stdin_writable, ex))
            if reading and ex.request_id is not None:
                for out_fd, ftype in ((ex.out_fd, FT.STDOUT), (ex.err_fd, FT.STDERR)):
                    if out_fd is not None:
                        add(out_fd, select.POLLIN, partial(self.on_output_readable, ex, ftype))

    def poll_timeout(self, now: float) -> float | None:
        """Seconds until the next timer, 0 if work is pending, None for none."""
        if self.stopping or (self.downloads() and self.out_bytes < HIGH_WATER):
            return 0.0
        timers = [t for t in (self.channel.timeout(now),) if t is not None]
        for ex in self.execs.values():
            if ex.deadline is not None and ex.status is None and not ex.timed_out:
                timers.append(ex.deadline - now)
            if ex.drain_deadline is not None and self.out_bytes < HIGH_WATER:
                timers.append(ex.drain_deadline - now)  # else POLLOUT wakes us first
        return max(0.0, min(timers)) if timers else None

    def on_stdin_writable(self, ex: Exec, events: int) -> None:
        """An exec's stdin pipe has room (or the child closed it)."""
        self.flush_stdin(ex)

    def on_output_readable(self, ex: Exec, ftype: int, events: int) -> None:
        """An exec's stdout/stderr has data or reached its end."""
        self.read_output(ex, ftype)

    def drain_wakeup(self, events: int = 0) -> None:
        """Empty the signal wakeup pipe (reaping happens every turn)."""
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def stdin_backlog(self) -> int:
        """Bytes received from the host still waiting for children to read."""
        return sum(len(ex.stdin_buf) for ex in self.execs.values())

    def downloads(self) -> list[Download]:
        """read_file transfers in progress."""
        return [r for r in self.requests.values() if isinstance(r, Download)]

    # -- the host connection -----------------------------------------------

    def on_channel_ready(self, fd: int, events: int) -> None:
        """The listener has a connection waiting."""
        old = self.channel.conn_fd
        if self.channel.on_ready(fd):
            if old is not None:
                self.on_disconnect("replaced by a new connection")
            self.on_connect()

    def on_connect(self) -> None:
        """A host connected: start from a clean stream."""
        log("host connected")
        self.reset_stream()

    def on_disconnect(self, reason: str) -> None:
        """The host went away: end its session, keep the execs running."""
        log(f"host disconnected ({reason})")
        self.reset_stream()
        self.end_session()

    def reset_stream(self) -> None:
        """Forget partial input and undelivered output of a previous connection."""
        self.decoder.reset()
        self.out.clear()
        self.out_sent = 0
        self.out_bytes = 0
        self.garbage_reason = None

    def on_conn_event(self, fd: int, events: int) -> None:
        """Readable, writable or hung-up host connection."""
        if fd != self.channel.conn_fd:
            return
        if events & select.POLLOUT:
            self.flush()
            if self.channel.conn_fd != fd:
                return  # the write failed and dropped the connection
        if events & (select.POLLIN | select.POLLHUP):
            self.read_conn(events)
        elif events & (select.POLLERR | select.POLLNVAL):
            self.drop_connection("connection error")

    def drop_connection(self, reason: str) -> None:
        """Close the current connection (the device stays open)."""
        self.channel.disconnect()
        self.on_disconnect(reason)

    def read_conn(self, events: int) -> None:
        """Read and dispatch what the host sent.

        A virtio-serial port returns at most one 4 KiB guest buffer per
        read(): read until the channel is empty or READ_BUDGET bytes arrived,
        so one loop turn handles a whole upload frame, not one page of it.
        The buffer is preallocated (os.read would allocate READ_BUDGET bytes
        per call to return a few).
        """
        fd = self.channel.conn_fd
        assert fd is not None
        buf = self.read_buf
        filled = 0
        ended: str | None = None
        while filled < READ_BUDGET:
            try:
                count = os.readv(fd, [buf[filled:]])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                ended = f"read failed: {exc.strerror}"
                break
            if count == 0:
                ended = "end of stream"
                break
            filled += count
        if filled:
            self.decoder.feed(buf[:filled])
            for item in self.decoder.frames():
                self.on_frame(item)
                if self.channel.conn_fd != fd:  # a frame made us drop the connection
                    return
        elif ended is None and events & select.POLLHUP:
            ended = "hang-up"
        if ended is not None:
            self.drop_connection(ended)

    def send(self, frame: bytes) -> None:
        """Queue a frame for the host (dropped when no host is connected)."""
        if self.channel.conn_fd is None:
            return
        self.out.append(frame)
        self.out_bytes += len(frame)
        if len(self.out) == 1:
            self.flush()

    def send_json(self, ftype: int, request_id: int, message: dict[str, Any]) -> None:
        """Queue a JSON frame."""
        try:
            frame = protocol.encode_json(ftype, request_id, message)
        except ValueError as exc:  # an oversized reply: report instead of dying
            frame = protocol.encode_json(
                FT.ERROR, request_id, {"code": "E2BIG", "message": str(exc)}
            )
        self.send(frame)

    def send_error(self, request_id: int, code: str, message: str) -> None:
        """Queue an ERROR frame."""
        self.send_json(FT.ERROR, request_id, {"code": code, "message": message})

    def flush(self) -> None:
        """Write queued frames until the channel would block."""
        fd = self.channel.conn_fd
        while self.out and fd is not None:
            head = self.out[0]
            try:
                written = os.write(fd, memoryview(head)[self.out_sent :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop_connection(f"write failed: {exc.strerror}")
                return
            self.out_sent += written
            self.out_bytes -= written
            if self.out_sent == len(head):
                self.out.popleft()
                self.out_sent = 0

    # -- frames and requests ---------------------------------------------------

    def on_frame(self, item: protocol.Frame | protocol.Garbage) -> None:
        """Dispatch one decoded frame, or report skipped garbage."""
        if isinstance(item, protocol.Garbage):
            # Report each run of corrupt input once, not every read of it.
            if item.reason != self.garbage_reason:
                self.garbage_reason = item.reason
                self.send_error(
                    0, "EPROTO", f"corrupt input ({item.reason}); skipping to the next frame marker"
                )
            return
        self.garbage_reason = None
        if item.ftype == FT.REQUEST:
            self.on_request(item)
        elif item.ftype == FT.STDIN:
            self.on_stdin(item)
        elif item.ftype == FT.FILE_DATA:
            self.on_file_data(item)
        else:
            kind = FT.name(item.ftype)
            self.send_error(
                0, "EPROTO", f"{kind} frame (request {item.request_id}) only flows agent -> host"
            )

    def on_request(self, frame: protocol.Frame) -> None:
        """Validate and run one request; every failure becomes an ERROR frame."""
        rid = frame.request_id
        try:
            if rid == 0:
                raise ProtocolError("request id 0 is reserved for connection-level errors")
            if rid in self.requests:
                raise ProtocolError(f"request id {rid} is already in use", "EBUSY")
            op, fields = protocol.parse_request(frame.json())
            if op != "hello" and not self.session_open:
                raise ProtocolError(f"{op}: send hello first to open a session")
            reply = self.handlers[op](rid, fields)
        except ProtocolError as exc:
            self.send_error(rid, exc.code, exc.message)
        except OpError as exc:
            self.send_error(rid, exc.code, exc.message)
        except OSError as exc:
            err = OpError.from_os(exc, "request failed")
            self.send_error(rid, err.code, err.message)
        except Exception as exc:  # a bug must cost one request, not the agent
            log(f"internal error in request {rid}: {exc!r}")
            self.send_error(rid, "EIO", f"internal agent error: {exc!r}")
        else:
            if reply is not None:
                self.send_json(FT.REPLY, rid, reply)

    def end_session(self) -> None:
        """Close the session's requests; its execs keep running, detached."""
        self.session_open = False
        for req in self.requests.values():
            if isinstance(req, Exec):
                req.request_id = None
                req.drain_deadline = None
            else:
                req.abort()
        self.requests.clear()
        self.evict_finished()

    def evict_finished(self) -> None:
        """Forget the oldest finished detached execs beyond the keep limit."""
        done = [ex for ex in self.execs.values() if ex.status is not None and ex.request_id is None]
        done.sort(key=lambda ex: ex.exited_at)
        for ex in done[: max(0, len(done) - KEEP_FINISHED_DETACHED)]:
            self.forget_exec(ex)

    def forget_exec(self, ex: Exec) -> None:
        """Drop an exec's record and descriptors."""
        ex.close_fds()
        self.execs.pop(ex.exec_id, None)
        self.by_pid.pop(ex.pid, None)
        if ex.request_id is not None:
            self.requests.pop(ex.request_id, None)

    def target_exec(self, target: int) -> Exec:
        """The exec attached to request ``target`` in this session."""
        req = self.requests.get(target)
        if not isinstance(req, Exec):
            raise OpError("ESRCH", f"request {target} is not a running exec of this session")
        return req

    # -- ops: session ------------------------------------------------------------

    def op_hello(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Open a session (ending any previous one) and describe the agent."""
        if f["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                f"host speaks protocol version {f['version']}, this agent speaks version "
                f"{protocol.PROTOCOL_VERSION}: install the agent that ships with the host's "
                "kelpie (protocol.py and guest/agent.py) into the guest image",
                "EPROTONOSUPPORT",
            )
        if self.session_open:
            self.end_session()
        # Frames queued for an earlier session are meaningless now; a frame
        # already partly written must still be completed to keep the framing.
        while len(self.out) > 1:
            self.out_bytes -= len(self.out.pop())
        if self.out and self.out_sent == 0:
            self.out_bytes -= len(self.out.pop())
        self.session_open = True
        return {
            "version": protocol.PROTOCOL_VERSION,
            "agent_pid": os.getpid(),
            "boot_id": read_boot_id(),
            "hostname": socket.gethostname(),
            "root": self.rootfs.root,
            "time_ns": time.time_ns(),
            "execs": [ex.info() for ex in sorted(self.execs.values(), key=lambda e: e.exec_id)],
        }

    def op_ping(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Liveness check."""
        return {"time_ns": time.time_ns()}

    def op_shutdown(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Stop serving; power the VM off if asked and allowed."""
        self.stopping = True
        self.power_off_requested = bool(f["poweroff"]) and self.power_off_allowed
        return {"poweroff": self.power_off_requested}

    def op_resync(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """After a snapshot restore: fix the clock, reseed the RNG, rename the host."""
        reply: dict[str, Any] = {
            "clock_set": False,
            "entropy_bytes": 0,
            "entropy_credited": False,
            "hostname": None,
            "rng_reseeded": False,
        }
        if f["epoch_ns"] is not None:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, f["epoch_ns"])
            except OSError as exc:
                raise OpError.from_os(exc, "cannot set the clock") from None
            reply["clock_set"] = True
        if f["entropy"]:
            data = bytes.fromhex(f["entropy"])
            reply["entropy_credited"] = add_entropy(data)
            reply["entropy_bytes"] = len(data)
            reply["rng_reseeded"] = reseed_rng()
        if f["hostname"] is not None:
            try:
                socket.sethostname(f["hostname"])
            except OSError as exc:
                raise OpError.from_os(exc, "cannot set the hostname") from None
            reply["hostname"] = f["hostname"]
        return reply

    # -- ops: exec -----------------------------------------------------------------

    def op_exec(self, rid: int, f: dict[str, Any]) -> None:
        """Start a command; output and the exit status follow on ``rid``."""
        user = lookup_user(self.rootfs, f["user"])
        env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        if f["pty"]:
            env["TERM"] = "xterm-256color"
        env.update(f["env"])
        switch = f["user"] is not None and user.uid != os.getuid()
        plan = SpawnPlan(
            argv=f["argv"],
            env=env,
            cwd=f["cwd"],
            root=self.rootfs.root,
            user=user if switch else None,
            pty=f["pty"],
        )
        ex = spawn(plan, self.next_exec_id, f["stdin"], f["rows"], f["cols"])
        self.next_exec_id += 1
        if f["timeout"] is not None:
            ex.deadline = time.monotonic() + max(0.0, float(f["timeout"]))
        self.execs[ex.exec_id] = ex
        self.by_pid[ex.pid] = ex
        self.attach(ex, rid)

    def op_attach(self, rid: int, f: dict[str, Any]) -> None:
        """Re-attach to an exec started on an earlier connection."""
        ex = self.execs.get(f["exec_id"])
        if ex is None:
            raise OpError("ESRCH", f"no exec {f['exec_id']} (finished and collected, or never)")
        if ex.request_id is not None:
            raise OpError("EBUSY", f"exec {ex.exec_id} is attached to request {ex.request_id}")
        self.attach(ex, rid)

    def attach(self, ex: Exec, rid: int) -> None:
        """Bind an exec's output and exit status to request ``rid``."""
        ex.request_id = rid
        self.requests[rid] = ex
        self.send_json(FT.EVENT, rid, {"event": "started", "exec_id": ex.exec_id, "pid": ex.pid})
        if ex.status is not None:
            ex.drain_deadline = time.monotonic() + DRAIN_GRACE

    def op_signal(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Send a signal to an exec's process (or its whole process group)."""
        ex = self.target_exec(f["target"])
        if ex.status is not None:
            raise OpError("ESRCH", f"exec {ex.exec_id} has already exited")
        try:
            (os.killpg if f["group"] else os.kill)(ex.pid, f["signum"])
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot send signal {f['signum']}") from None
        return {}

    def op_resize(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Change the window size of an exec's PTY."""
        ex = self.target_exec(f["target"])
        if not ex.pty or ex.out_fd is None:
            raise OpError("EINVAL", f"exec {ex.exec_id} has no terminal to resize")
        set_winsize(ex.out_fd, f["rows"], f["cols"])
        return {}

    def op_cancel(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Abort a file transfer, or kill an exec (its exit status still follows)."""
        req = self.requests.get(f["target"])
        if req is None:
            return {"cancelled": False}
        if isinstance(req, Exec):
            req.kill_group()
        else:
            req.abort()
            del self.requests[req.request_id]
            self.send_error(req.request_id, "ECANCELED", "cancelled by the host")
        return {"cancelled": True}

    def on_stdin(self, frame: protocol.Frame) -> None:
        """Queue stdin for an exec; an empty frame is EOF."""
        ex = self.requests.get(frame.request_id)
        if not isinstance(ex, Exec) or ex.stdin_fd is None or ex.stdin_eof:
            return  # finished, or stdin not requested: drop silently
        if frame.payload:
            ex.stdin_buf += frame.payload
        else:
            ex.stdin_eof = True
        self.flush_stdin(ex)

    def flush_stdin(self, ex: Exec) -> None:
        """Write queued stdin without blocking; close it after EOF."""
        while ex.stdin_fd is not None and ex.stdin_buf:
            try:
                written = os.write(ex.stdin_fd, ex.stdin_buf[:READ_CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EPIPE: the child closed its stdin
                ex.close_stdin_fd()
                return
            del ex.stdin_buf[:written]
        if ex.stdin_eof and ex.stdin_fd is not None:
            ex.close_stdin_fd()

    def read_output(self, ex: Exec, ftype: int) -> None:
        """Forward one chunk of an exec's output, or note its end."""
        fd = ex.out_fd if ftype == FT.STDOUT else ex.err_fd
        if fd is None or ex.request_id is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: every PTY slave is closed
            data = b""
        if data:
            self.send(protocol.encode_frame(ftype, ex.request_id, data))
            return
        os.close(fd)
        if ftype == FT.STDOUT:
            ex.out_fd = None
        else:
            ex.err_fd = None

    def reap(self) -> None:
        """Collect exit statuses of every exited child (and orphans, as PID 1)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self.by_pid.pop(pid, None)
            if ex is None:
                continue
            ex.status = status
            ex.exited_at = time.monotonic()
            if ex.request_id is not None:
                ex.drain_deadline = ex.exited_at + DRAIN_GRACE
            else:
                self.evict_finished()

    def expire_timeouts(self, now: float) -> None:
        """Kill the process group of every exec past its deadline."""
        for ex in self.execs.values():
            expired = ex.deadline is not None and now >= ex.deadline
            if expired and ex.status is None and not ex.timed_out:
                ex.timed_out = True
                ex.kill_group()

    def finish_execs(self, now: float) -> None:
        """Send the exit status of attached execs that exited and are drained."""
        if self.out_bytes >= HIGH_WATER:
            return  # output still to forward; the grace period waits for it
        for ex in list(self.execs.values()):
            if ex.request_id is None or ex.status is None:
                continue
            drained = ex.out_fd is None and ex.err_fd is None
            if not drained and ex.drain_deadline is not None and now >= ex.drain_deadline:
                self.final_drain(ex)
                drained = True
            if drained:
                rid = ex.request_id
                self.send_json(FT.REPLY, rid, ex.result())
                if ex.request_id == rid:  # else the host vanished meanwhile: keep it
                    self.forget_exec(ex)

    def final_drain(self, ex: Exec) -> None:
        """Forward what the exited command left in its pipes, then stop reading.

        Background processes that still hold the pipes get EPIPE/SIGPIPE
        from here on: a command that started a daemon must not hang forever.
        """
        for ftype in (FT.STDOUT, FT.STDERR):
            budget = FINAL_DRAIN_LIMIT
            while budget > 0 and (ex.out_fd if ftype == FT.STDOUT else ex.err_fd) is not None:
                before = self.out_bytes
                self.read_output(ex, ftype)
                if self.out_bytes == before:
                    break  # EAGAIN or EOF
                budget -= self.out_bytes - before
        ex.close_fds()

    # -- ops: files ----------------------------------------------------------------

    def op_read_file(self, rid: int, f: dict[str, Any]) -> None:
        """Start streaming a regular file to the host."""
        path = f["path"]
        try:
            fd = os.open(self.rootfs.resolve(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot open {path}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise OpError("EISDIR", f"cannot read {path}: it is a directory")
            raise OpError("EINVAL", f"cannot read {path}: not a regular file")
        os.set_blocking(fd, True)
        self.requests[rid] = Download(rid, fd)

    def pump_downloads(self) -> None:
        """Send file chunks while the outgoing queue has room."""
        for dl in self.downloads():
            while self.out_bytes < HIGH_WATER and self.channel.conn_fd is not None:
                try:
                    chunk = os.read(dl.fd, FILE_CHUNK)
                except OSError as exc:
                    err = OpError.from_os(exc, "read failed")
                    self.end_download(dl)
                    self.send_error(dl.request_id, err.code, err.message)
                    break
                if not chunk:
                    self.end_download(dl)
                    self.send_json(FT.REPLY, dl.request_id, {"size": dl.size})
                    break
                dl.size += len(chunk)
                self.send(protocol.encode_frame(FT.FILE_DATA, dl.request_id, chunk))

    def end_download(self, dl: Download) -> None:
        """Close a finished or failed download."""
        dl.abort()
        self.requests.pop(dl.request_id, None)

    def op_write_file(self, rid: int, f: dict[str, Any]) -> None:
        """Open a temp file next to the target; FILE_DATA frames follow."""
        path = f["path"]
        final = self.rootfs.resolve(path)
        if os.path.isdir(final):
            raise OpError("EISDIR", f"cannot write {path}: it is a directory")
        parent, name = os.path.split(final)
        tmp = os.path.join(parent, f".{name}.kelpie-{os.urandom(4).hex()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot write {path}") from None
        os.fchmod(fd, f["mode"] & 0o7777)
        self.requests[rid] = Upload(rid, path, final, tmp, fd)

    def on_file_data(self, frame: protocol.Frame) -> None:
        """Append an upload chunk; an empty chunk commits the file."""
        up = self.requests.get(frame.request_id)
        if not isinstance(up, Upload):
            return  # cancelled or failed earlier: drop silently
        try:
            if frame.payload:
                up.write(frame.payload)
                return
            up.commit()
        except OSError as exc:
            up.abort()
            del self.requests[up.request_id]
            err = OpError.from_os(exc, f"cannot write {up.path}")
            self.send_error(up.request_id, err.code, err.message)
            return
        del self.requests[up.request_id]
        self.send_json(FT.REPLY, up.request_id, {"size": up.size})

    def op_stat(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Describe one file."""
        path, follow = f["path"], f["follow_symlinks"]
        host = self.rootfs.resolve(path, follow_last=follow)
        try:
            st = os.stat(host, follow_symlinks=False)
            target = os.readlink(host) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot stat {path}") from None
        info = {
            "type": file_type(st.st_mode),
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "nlink": st.st_nlink,
        }
        if target is not None:
            info["target"] = target
        return info

    def op_list(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """List a directory; long listings arrive in EVENT batches before the REPLY."""
        path = f["path"]
        entries: list[dict[str, Any]] = []
        try:
            with os.scandir(self.rootfs.resolve(path)) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    entries.append(
                        {
                            "name": entry.name,
                            "type": file_type(st.st_mode),
                            "size": st.st_size,
                            "mode": stat.S_IMODE(st.st_mode),
                        }
                    )
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot list {path}") from None
        entries.sort(key=lambda e: str(e["name"]))
        while len(entries) > LIST_BATCH:
            self.send_json(FT.EVENT, rid, {"entries": entries[:LIST_BATCH]})
            del entries[:LIST_BATCH]
        return {"entries": entries}

    def op_mkdir(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Create a directory (and its parents, like ``mkdir -p``)."""
        path, mode = f["path"], f["mode"] & 0o7777
        host = self.rootfs.resolve(path)
        existed = os.path.isdir(host)
        try:
            if f["parents"]:
                os.makedirs(host, mode, exist_ok=True)
            else:
                os.mkdir(host, mode)
            if not existed:
                os.chmod(host, mode)  # the agent's umask must not apply
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot create directory {path}") from None
        return {}

    def op_remove(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Remove a file, symlink or (empty, or with recursive) directory."""
        path = f["path"]
        host = self.rootfs.resolve(path, follow_last=False)
        if host.rstrip("/") in ("", self.rootfs.root.rstrip("/")):
            raise OpError("EBUSY", "refusing to remove the root directory")
        try:
            if not stat.S_ISDIR(os.lstat(host).st_mode):
                os.unlink(host)
            elif f["recursive"]:
                remove_tree(host)
            else:
                os.rmdir(host)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot remove {path}") from None
        return {}


def add_entropy(data: bytes) -> bool:
    """Mix bytes into the kernel RNG; return True if they were also credited."""
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
        try:
            info = struct.pack("ii", len(data) * 8, len(data)) + data
            fcntl.ioctl(fd, RNDADDENTROPY, info)
        except OSError:  # needs CAP_SYS_ADMIN; mixing in is enough
            return False
        return True
    finally:
        os.close(fd)


def reseed_rng() -> bool:
    """Make the kernel's CRNG rekey from its input pool now; True if it did.

    After a snapshot restore every clone holds the same CRNG state, and credited entropy
    alone is only used at the next scheduled reseed (up to a minute later): until then
    clones could read the same /dev/urandom bytes. VMGenID would reseed too, but QEMU's
    microvm machine has no ACPI table for it, so the restore's resync does it instead.
    """
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError:  # needs CAP_SYS_ADMIN and an initialised CRNG
        return False
    finally:
        os.close(fd)
    return True


def power_off() -> None:
    """Power the VM off: sysrq 'o' (works even as PID 1), else poweroff -f."""
    os.sync()
    try:
        with open("/proc/sysrq-trigger", "w", encoding="ascii") as trigger:
            trigger.write("o")
        time.sleep(5)
    except OSError:
        pass
    for argv in (["poweroff", "-f"], ["busybox", "poweroff", "-f"]):
        try:
            os.execvpe(argv[0], argv, {"PATH": DEFAULT_PATH})
        except OSError:
            continue


def ensure_std_fds() -> None:
    """Make sure fds 0-2 are open, so pipes never land on them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


USAGE: Final = """\
usage: agent.py (--device PATH | --listen-unix PATH | --listen-vsock PORT) [--root DIR]

  --device PATH        serve a virtio-serial port (guest mode; shutdown powers off)
  --listen-unix PATH   listen on a unix socket (host test mode)
  --listen-vsock PORT  listen on a vsock port
  --root DIR           run commands chrooted into DIR; file paths resolve inside it
"""


def parse_args(argv: list[str]) -> dict[str, str]:
    """Parse ``--name value`` options (argparse is kept out of the guest)."""
    known = {"--device", "--listen-unix", "--listen-vsock", "--root"}
    options: dict[str, str] = {}
    args = list(argv)
    while args:
        name = args.pop(0)
        if name in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if name not in known or not args:
            raise SystemExit(f"agent.py: bad argument {name!r}\n{USAGE}")
        options[name.lstrip("-")] = args.pop(0)
    modes = [m for m in ("device", "listen-unix", "listen-vsock") if m in options]
    if len(modes) != 1:
        raise SystemExit(
            f"agent.py: give exactly one of --device, --listen-unix, --listen-vsock\n{USAGE}"
        )
    return options


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python3 -S agent.py ...``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    ensure_std_fds()
    os.umask(0o022)
    channel: Channel
    if "device" in options:
        channel = DeviceChannel(options["device"])
    elif "listen-unix" in options:
        channel = ListenChannel.unix(options["listen-unix"])
    else:
        channel = ListenChannel.vsock(int(options["listen-vsock"]))
    agent = Agent(channel, options.get("root", "/"), power_off="device" in options)
    log(f"serving protocol v{protocol.PROTOCOL_VERSION}, root {agent.rootfs.root}")
    try:
        agent.run()
    except KeyboardInterrupt:
        return 130
    if agent.power_off_requested:
        power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
