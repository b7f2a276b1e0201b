"""Attaching the local terminal to a command running in a sandbox.

Output goes to stdout/stderr as it comes. With ``stdin`` the local input is forwarded
(``loop.add_reader`` for terminals and pipes, a thread for regular files); its end closes
the command's stdin. With ``tty`` the local terminal is put in raw mode (restored however
the command ends), window size changes are forwarded, and Ctrl-C reaches the guest as a
byte on its terminal. Without a terminal, SIGINT and SIGTERM are forwarded as signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
import tty as ttymod
from collections.abc import Iterator

from kelpie.vm import ExecExit, ExecOutput, ExecProcess, ExecTimeout, StreamName

READ_CHUNK = 64 * 1024


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of the local terminal, 24x80 when there is none."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 24, 80
    return size.lines, size.columns


async def attach(process: ExecProcess, *, stdin: bool, tty: bool) -> int:
    """Stream a running command to the local terminal; return its exit code.

    Raises :class:`ExecTimeout` when the command ran past its timeout.
    """
    loop = asyncio.get_running_loop()
    feeder: asyncio.Task[None] | None = None
    with contextlib.ExitStack() as stack:
        if tty and sys.stdin.isatty():
            stack.enter_context(_raw_mode(sys.stdin.fileno()))
            stack.enter_context(_forward_resize(loop, process))
        elif not tty:
            stack.enter_context(_forward_signals(loop, process))
        if stdin:
            feeder = asyncio.create_task(_feed_stdin(process))
        else:
            await process.close_stdin()
        try:
            async for event in process:
                if isinstance(event, ExecOutput):
                    out = sys.stdout if event.stream is StreamName.STDOUT else sys.stderr
                    out.buffer.write(event.data)
                    out.flush()
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
    end = process.exit
    assert isinstance(end, ExecExit)
    if end.warning:
        sys.stderr.write(f"kelpie: warning: {end.warning}\n")
    if end.timed_out:
        raise ExecTimeout(process.request.argv, process.request.timeout or 0.0, b"", b"")
    return end.exit_code


async def _feed_stdin(process: ExecProcess) -> None:
    """Local stdin -> the command, in order; EOF closes the command's stdin."""
    fd = sys.stdin.fileno()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(fd)
        queue.put_nowait(chunk)

    reader: asyncio.Task[None] | None = None
    watched = not stat.S_ISREG(os.fstat(fd).st_mode)  # epoll cannot watch regular files
    if watched:
        os.set_blocking(fd, False)
        try:
            loop.add_reader(fd, readable)
        except PermissionError:  # nor /dev/null and other files without poll support
            os.set_blocking(fd, True)
            watched = False
    if not watched:
        async def read_file() -> None:
            while chunk := await asyncio.to_thread(os.read, fd, READ_CHUNK):
                queue.put_nowait(chunk)
            queue.put_nowait(b"")
        reader = asyncio.create_task(read_file())
    try:
        while chunk := await queue.get():
            await process.write_stdin(chunk)
        await process.close_stdin()
    finally:
        if reader is not None:
            reader.cancel()
        else:
            loop.remove_reader(fd)
            os.set_blocking(fd, True)


@contextlib.contextmanager
def _raw_mode(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    ttymod.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_resize(loop: asyncio.AbstractEventLoop, process: ExecProcess) -> Iterator[None]:
    tasks: set[asyncio.Task[None]] = set()

    def resized() -> None:
        rows, cols = terminal_size()
        task = loop.create_task(process.resize(rows, cols))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGWINCH, resized)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


@contextlib.contextmanager
def _forward_signals(loop: asyncio.AbstractEventLoop, process: ExecProcess) -> Iterator[None]:
    tasks: set[asyncio.Task[None]] = set()

    def forward(signum: int) -> None:
        task = loop.create_task(process.send_signal(signum))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, forward, signum)
            installed.append(signum)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
