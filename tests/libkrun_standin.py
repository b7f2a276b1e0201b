"""A stand-in libkrun, compiled from C here, and the behaviour suite's recipe for it.

The stand-in exports every function the binding declares. Each call is appended as a JSON
line (``{"fn": NAME, "args": [...]}``) to the file ``$KELPIE_STANDIN_CALLS`` names, and
the function ``$KELPIE_STANDIN_FAIL`` names returns ``-EINVAL``. ``krun_start_enter`` stays
the VMM process, as libkrun does: it forks the guest, the REAL guest agent run on the host
by ``fake_guest.py`` (its own namespaces, dying with the VMM), listening on the unix socket
given to ``krun_add_vsock_port2`` with its commands chrooted into the directory shared as
``kelpie-root`` (where the real guest's init script mounts it for the agent's ``--root``),
with its output on the console file; it then exits with the guest's status. The argv of
that agent is ``$KELPIE_STANDIN_AGENT`` (one argument a line, ``@LISTEN@`` and ``@ROOT@``
replaced).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fake_guest import agent_argv, scratch_root
from kelpie.backends.libkrun import CAPABILITIES
from kelpie.backends.libkrun._vm import LibkrunVm
from kelpie.vm import BackendSpec, ProbeResult, VmInstance

SOURCE = r"""
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/wait.h>

static char vm_root[4096], agent_socket[4096], console_path[4096];

static void put_string(FILE *out, const char *s) {
    fputc('"', out);
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(out, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(out, "\\u%04x", *s);
        else fputc(*s, out);
    }
    fputc('"', out);
}

/* Record the call NAME with FORMAT's arguments: i integer, s string, v string array. */
static int32_t record(const char *name, const char *format, ...) {
    const char *path = getenv("KELPIE_STANDIN_CALLS");
    if (path) {
        FILE *out = fopen(path, "a");
        if (out) {
            __builtin_va_list args;
            __builtin_va_start(args, format);
            fprintf(out, "{\"fn\": \"%s\", \"args\": [", name);
            for (const char *f = format; *f; f++) {
                if (f != format) fputs(", ", out);
                if (*f == 'i') fprintf(out, "%lld", __builtin_va_arg(args, long long));
                else if (*f == 's') put_string(out, __builtin_va_arg(args, const char *));
                else {
                    const char *const *v = __builtin_va_arg(args, const char *const *);
                    fputc('[', out);
                    for (int n = 0; v && v[n]; n++) {
                        if (n) fputs(", ", out);
                        put_string(out, v[n]);
                    }
                    fputc(']', out);
                }
            }
            fputs("]}\n", out);
            __builtin_va_end(args);
            fclose(out);
        }
    }
    const char *fail = getenv("KELPIE_STANDIN_FAIL");
    return fail && strcmp(fail, name) == 0 ? -EINVAL : 0;
}

#define L(x) ((long long)(x))
int32_t krun_set_log_level(uint32_t level) { return record(__func__, "i", L(level)); }
int32_t krun_create_ctx(void) { int32_t r = record(__func__, ""); return r ? r : 1; }
int32_t krun_free_ctx(uint32_t ctx) { return record(__func__, "i", L(ctx)); }
int32_t krun_set_vm_config(uint32_t ctx, uint8_t vcpus, uint32_t mib) {
    return record(__func__, "iii", L(ctx), L(vcpus), L(mib)); }
int32_t krun_set_root(uint32_t ctx, const char *path) {
    return record(__func__, "is", L(ctx), path); }
int32_t krun_add_virtiofs(uint32_t ctx, const char *tag, const char *path) {
    return record(__func__, "iss", L(ctx), tag, path); }
int32_t krun_add_virtiofs3(uint32_t ctx, const char *tag, const char *path, uint64_t shm,
                           bool read_only) {
    if (strcmp(tag, "kelpie-root") == 0) snprintf(vm_root, sizeof vm_root, "%s", path);
    return record(__func__, "issii", L(ctx), tag, path, L(shm), L(read_only)); }
int32_t krun_disable_implicit_vsock(uint32_t ctx) { return record(__func__, "i", L(ctx)); }
int32_t krun_add_vsock(uint32_t ctx, uint32_t tsi) {
    return record(__func__, "ii", L(ctx), L(tsi)); }
int32_t krun_add_vsock_port2(uint32_t ctx, uint32_t port, const char *path, bool listen) {
    if (listen) snprintf(agent_socket, sizeof agent_socket, "%s", path);
    return record(__func__, "iisi", L(ctx), L(port), path, L(listen)); }
int32_t krun_set_workdir(uint32_t ctx, const char *path) {
    return record(__func__, "is", L(ctx), path); }
int32_t krun_set_exec(uint32_t ctx, const char *path, const char *const argv[],
                      const char *const envp[]) {
    return record(__func__, "isvv", L(ctx), path, argv, envp); }
int32_t krun_set_env(uint32_t ctx, const char *const envp[]) {
    return record(__func__, "iv", L(ctx), envp); }
int32_t krun_set_console_output(uint32_t ctx, const char *path) {
    snprintf(console_path, sizeof console_path, "%s", path);
    return record(__func__, "is", L(ctx), path); }
int32_t krun_get_shutdown_eventfd(uint32_t ctx) { return record(__func__, "i", L(ctx)); }

static char *replace(const char *line) {
    const char *value = strcmp(line, "@LISTEN@") == 0 ? agent_socket
                      : strcmp(line, "@ROOT@") == 0 ? vm_root : line;
    return strdup(value);
}

int32_t krun_start_enter(uint32_t ctx) {
    int32_t r = record(__func__, "i", L(ctx));
    if (r) return r;
    const char *spec = getenv("KELPIE_STANDIN_AGENT");
    if (!spec || !*vm_root || !*agent_socket) return -EINVAL;
    char *copy = strdup(spec), *argv[64];
    int argc = 0;
    for (char *line = strtok(copy, "\n"); line && argc < 63; line = strtok(NULL, "\n"))
        argv[argc++] = replace(line);
    argv[argc] = NULL;
    pid_t guest = fork();
    if (guest == 0) {
        int console = open(*console_path ? console_path : "/dev/null",
                           O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (console >= 0) { dup2(console, 1); dup2(console, 2); }
        execv(argv[0], argv);
        _exit(127);
    }
    int status = 0;
    while (waitpid(guest, &status, 0) < 0 && errno == EINTR) {}
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}
"""


def build_standin(where: Path) -> Path:
    """The stand-in library, compiled once into ``where``; skips the test without ``cc``."""
    library = where / "libkrun-standin.so"
    if library.exists():
        return library
    source = where / "libkrun_standin.c"
    source.write_text(SOURCE)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source)],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler to build a stand-in libkrun: {exc}")
    return library


def standin_env(calls: Path | None = None, fail: str | None = None) -> dict[str, str]:
    """The stand-in's settings, for ``LibkrunVm(vmm_env=...)``."""
    argv = agent_argv(Path("@LISTEN@"), Path("@ROOT@"), None)
    env = {"KELPIE_STANDIN_AGENT": "\n".join(argv)}
    if calls is not None:
        env["KELPIE_STANDIN_CALLS"] = str(calls)
    if fail is not None:
        env["KELPIE_STANDIN_FAIL"] = fail
    return env


def read_calls(calls: Path) -> list[dict[str, Any]]:
    """The calls the stand-in recorded, in order."""
    return [json.loads(line) for line in calls.read_text().splitlines()]


class StandinLibkrunVm(LibkrunVm):
    """A LibkrunVm named for the suite, so it is told apart from the real backend."""

    backend_name = "libkrun-standin"


LIBKRUN_STANDIN_SPEC = BackendSpec(
    name="libkrun-standin",
    description="LibkrunVm on a stand-in libkrun running the real agent on the host",
    capabilities=CAPABILITIES,
    probe=lambda: ProbeResult(True, "a test double, available where cc and busybox are"),
    create=StandinLibkrunVm,
    real=False,
)


if TYPE_CHECKING:
    from backend_fixtures import BackendUnderTest


def libkrun_standin(spec: BackendSpec, request: pytest.FixtureRequest,
                    where: Path) -> BackendUnderTest:
    """The behaviour suite's recipe: VMs on the stand-in, rooted in a busybox directory."""
    library = build_standin(where)
    root = scratch_root(where / "guest")
    kit = where / "kit"  # the stand-in never reads the kit's tree
    kit.mkdir(exist_ok=True)

    def options() -> dict[str, Any]:
        return {"library": str(library), "kit_root": kit, "vmm_env": standin_env()}

    def place(vm: VmInstance) -> None:
        vm.workdir = where / vm.id  # type: ignore[attr-defined]  # socket paths stay short

    async def kill(vm: VmInstance) -> str:
        pid = vm.pid  # type: ignore[attr-defined]
        assert pid is not None, "the VM has no libkrun process to kill"
        os.kill(pid, signal.SIGKILL)
        return f"status -{signal.SIGKILL}"

    from backend_fixtures import BackendUnderTest  # not at the top: it imports this module

    return BackendUnderTest(spec, config={"root_disk": root}, options=options, kill=kill,
                            place=place)
