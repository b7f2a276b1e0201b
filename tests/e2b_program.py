"""A program written only against E2B's documented Python SDK (e2b 2.63.0), run by
tests/test_e2b.py in a venv of its own against a Kelpie daemon's E2B listener. It is
pointed there by E2B's own settings (E2B_API_KEY, E2B_API_URL/E2B_SANDBOX_URL or
E2B_DOMAIN); it prints one line per step and exits non-zero at the first wrong result."""

from __future__ import annotations

import asyncio
import io
import sys
import time

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
)


def step(name: str, ok: bool, detail: object = "") -> None:
    print(f"{'ok' if ok else 'FAILED'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        sys.exit(1)


def eventually(what: str, check: object, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    step(what, False, f"not within {seconds:g} s")


def listed() -> dict[str, object]:
    """The running and paused sandboxes, by id (one page: the test makes few)."""
    return {s.sandbox_id: s for s in Sandbox.list().next_items()}


def commands(sbx: Sandbox) -> None:
    r = sbx.commands.run('echo "$GREETING from $(whoami) in $(pwd)"')
    step("run with the sandbox's env", r.stdout == "hello from user in /home/user\n", r.stdout)
    r = sbx.commands.run("echo $X; pwd", envs={"X": "ex"}, cwd="/tmp")
    step("run with env and cwd", r.stdout == "ex\n/tmp\n", r.stdout)
    r = sbx.commands.run("whoami", user="root")
    step("run as root", r.stdout == "root\n", r.stdout)
    seen: list[str] = []
    r = sbx.commands.run("for i in 1 2 3; do echo line $i; done; echo oops >&2",
                         on_stdout=seen.append, on_stderr=seen.append)
    step("streaming callbacks", "".join(seen).count("line") == 3 and "oops\n" in seen, seen)
    try:
        sbx.commands.run("echo partial; exit 3")
        step("non-zero exit raises", False)
    except CommandExitException as exc:
        step("non-zero exit raises", exc.exit_code == 3 and exc.stdout == "partial\n",
             exc.exit_code)
    handle = sbx.commands.run("sleep 600", background=True)
    listed = [p.pid for p in sbx.commands.list()]
    step("background command listed", handle.pid in listed, listed)
    step("kill a background command", handle.kill() is True)
    try:
        result = handle.wait()
        step("killed command ends", result.exit_code != 0, result)
    except CommandExitException as exc:
        step("killed command ends", exc.exit_code != 0, exc.exit_code)
    step("a killed command is gone", handle.pid not in [p.pid for p in sbx.commands.list()])
    step("kill of an unknown pid", sbx.commands.kill(999_999) is False)
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"echo pty-$((6*7)) $(stty size)\nexit\n")
    screen: list[bytes] = []
    terminal.wait(on_pty=screen.append)
    text = b"".join(screen).decode(errors="replace")
    step("a terminal (pty)", "pty-42 30 100" in text, text[-200:])


def files(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/hello.txt", "hello kelpie")
    step("write (relative to home)", info.path == "/home/user/notes/hello.txt", info)
    step("read", sbx.files.read("/home/user/notes/hello.txt") == "hello kelpie")
    owner = sbx.commands.run("stat -c %U /home/user/notes/hello.txt").stdout.strip()
    step("a written file is the user's", owner == "user", owner)
    sbx.files.write("/tmp/stream.bin", io.BytesIO(b"streamed\x00bytes"))  # octet-stream
    step("upload a stream", bytes(sbx.files.read("/tmp/stream.bin", format="bytes"))
         == b"streamed\x00bytes")
    blob = bytes(range(256)) * 64
    sbx.files.write_files([{"path": "/tmp/a.bin", "data": blob},
                           {"path": "/tmp/b.txt", "data": "bee"}])
    step("upload several (multipart)", bytes(sbx.files.read("/tmp/a.bin", format="bytes"))
         == blob and sbx.files.read("/tmp/b.txt") == "bee")
    names = sorted(e.name for e in sbx.files.list("/home/user/notes"))
    step("list", names == ["hello.txt"], names)
    step("make_dir", sbx.files.make_dir("/home/user/made") is True)
    step("make_dir again", sbx.files.make_dir("/home/user/made") is False)
    moved = sbx.files.rename("/home/user/notes/hello.txt", "/home/user/made/hi.txt")
    step("rename", moved.path == "/home/user/made/hi.txt", moved)
    step("exists", sbx.files.exists("/home/user/made/hi.txt")
         and not sbx.files.exists("/home/user/notes/hello.txt"))
    stat = sbx.files.get_info("/home/user/made/hi.txt")
    step("get_info", stat.size == len("hello kelpie") and stat.type.value == "file", stat)
    sbx.files.remove("/home/user/made")
    step("remove", not sbx.files.exists("/home/user/made"))
    try:
        sbx.files.read("/nope")
        step("read a missing file", False)
    except NotFoundException:
        step("read a missing file", True)

    sbx.files.make_dir("/home/user/watched")
    watcher = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/new.txt", "x")
    events: list[object] = []

    def created() -> bool:
        events.extend(watcher.get_new_events())
        return any(e.name == "new.txt" and e.type.value == "create" for e in events)
    eventually("watch sees a new file", created, 30)
    step("watch sees a new file", True)
    watcher.stop()


def pause_and_resume(sbx: Sandbox) -> None:
    sbx.commands.run("sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 3000'", background=True)
    eventually("the keeper started", lambda: sbx.files.exists("/tmp/keeper.pid"))
    sbx.commands.run("echo in-memory > /dev/shm/state || true")
    step("pause", sbx.pause() is True)
    state = Sandbox.get_info(sbx.sandbox_id).state.value
    step("paused in its info", state == "paused", state)
    resumed = Sandbox.connect(sbx.sandbox_id)
    pid = resumed.files.read("/tmp/keeper.pid").strip()
    alive = resumed.commands.run(f"kill -0 {pid} && echo alive").stdout
    step("resumed with its processes (memory intact)", alive == "alive\n", alive)


def timeouts() -> None:
    short = Sandbox.create(timeout=300)
    napper = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause"})
    short.set_timeout(2)
    napper.set_timeout(2)
    eventually("the timed-out sandbox goes",
               lambda: short.sandbox_id not in listed())
    step("a sandbox past its timeout is gone", not short.is_running())
    eventually("the auto-pausing sandbox pauses",
               lambda: Sandbox.get_info(napper.sandbox_id).state.value == "paused")
    step("a sandbox with on_timeout pause is paused at its timeout", True)
    step("kill a paused sandbox", napper.kill() is True)


async def async_sdk(sandbox_id: str) -> None:
    sbx = await AsyncSandbox.connect(sandbox_id)
    r = await sbx.commands.run("echo async")
    step("async run", r.stdout == "async\n", r.stdout)
    await sbx.files.make_dir("/home/user/awatch")
    seen: list[str] = []
    handle = await sbx.files.watch_dir("/home/user/awatch", on_event=lambda e: seen.append(
        f"{e.type.value}:{e.name}"))
    await sbx.files.write("/home/user/awatch/f.txt", "y")
    for _ in range(150):
        if "create:f.txt" in seen:
            break
        await asyncio.sleep(0.2)
    await handle.stop()
    step("async watch_dir stream", "create:f.txt" in seen, seen)


def main() -> None:
    try:
        Sandbox.create(api_key="not-the-token")
        step("a wrong API key is refused", False)
    except AuthenticationException as exc:
        step("a wrong API key is refused", "401" in str(exc), exc)
    try:
        Sandbox.get_info("0123456789ab")
        step("an unknown sandbox is not found", False)
    except NotFoundException as exc:
        step("an unknown sandbox is not found", True, exc)

    sbx = Sandbox.create(metadata={"purpose": "kelpie-test"}, envs={"GREETING": "hello"},
                         timeout=600)
    found = listed()
    step("created and listed", sbx.sandbox_id in found
         and found[sbx.sandbox_id].metadata.get("purpose") == "kelpie-test", found)
    step("is_running", sbx.is_running())
    if "--quick" in sys.argv:  # the connection settings only: one command, one file
        step("run", sbx.commands.run("echo quick").stdout == "quick\n")
        sbx.files.write("/tmp/q.txt", "q")
        step("files", sbx.files.read("/tmp/q.txt") == "q")
        step("kill", sbx.kill() is True)
        print("all done", flush=True)
        return
    commands(sbx)
    files(sbx)
    asyncio.run(async_sdk(sbx.sandbox_id))
    pause_and_resume(sbx)
    timeouts()
    step("kill", sbx.kill() is True)
    try:
        Sandbox.get_info(sbx.sandbox_id)
        step("a killed sandbox is gone", False)
    except (NotFoundException, SandboxException) as exc:
        step("a killed sandbox is gone", "not found" in str(exc).lower(), exc)
    print("all done", flush=True)


if __name__ == "__main__":
    main()
