"""The process one libkrun VM lives in: ``python -m kelpie.backends.libkrun._child LAUNCH``.

``krun_start_enter`` never returns once the guest runs (the process becomes the VMM and
exits with the guest), so each VM gets a fresh process of its own, started by
``posix_spawn``: never a fork of the threaded parent. It reads the launch description
(:class:`~._launch.Launch`, a JSON file in the VM directory), configures libkrun and
enters the VM. A failed ``krun_*`` call is printed to stderr (the VM directory's
``libkrun.log``) and the process exits with status 2, so the parent's boot error quotes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kelpie._exceptions import KelpieError
from kelpie.backends.libkrun._binding import Libkrun
from kelpie.backends.libkrun._launch import (
    AGENT_PORT,
    KRUN_FS_ROOT_TAG,
    ROOT_TAG,
    SHELL,
    Launch,
)

NO_TSI = 0
"""krun_add_vsock's TSI features: none. TSI would give the guest the host's network,
which Kelpie cannot filter; the VM has no network at all instead."""
WHOLE_SHARE = 0
"""krun_add_virtiofs3's DAX window: none (libkrun's default)."""


def configure(krun: Libkrun, launch: Launch) -> int:
    """A libkrun context set up as ``launch`` says; its id."""
    ctx = krun.call("krun_create_ctx")
    krun.call("krun_set_vm_config", ctx, launch.vcpus, launch.memory_mib)
    # read-only: every VM shares the kit's tree, and a guest is root in its VM
    krun.call("krun_add_virtiofs3", ctx, KRUN_FS_ROOT_TAG.encode(), launch.kit_root.encode(),
              WHOLE_SHARE, True)
    krun.call("krun_add_virtiofs3", ctx, ROOT_TAG.encode(), launch.vm_root.encode(),
              WHOLE_SHARE, False)
    for share in launch.shares:
        krun.call("krun_add_virtiofs3", ctx, share.tag.encode(), share.host_path.encode(),
                  WHOLE_SHARE, share.read_only)
    krun.call("krun_disable_implicit_vsock", ctx)
    krun.call("krun_add_vsock", ctx, NO_TSI)
    # listen=true: libkrun listens on the unix socket and connects to the guest's port
    krun.call("krun_add_vsock_port2", ctx, AGENT_PORT, launch.agent_socket.encode(), True)
    krun.call("krun_set_workdir", ctx, b"/")
    krun.call("krun_set_exec", ctx, SHELL.encode(), Libkrun.strings(launch.exec_args()),
              Libkrun.strings(launch.exec_env()))
    krun.call("krun_set_console_output", ctx, launch.console.encode())
    return ctx


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m kelpie.backends.libkrun._child LAUNCH_JSON (got {argv[1:]})",
              file=sys.stderr)
        return 2
    try:
        launch = Launch.read(Path(argv[1]))
    except (OSError, ValueError, TypeError) as exc:
        print(f"kelpie libkrun: cannot read the launch description {argv[1]}: {exc}",
              file=sys.stderr)
        return 2
    os.environ.update(launch.vmm_env)
    try:
        krun = Libkrun(launch.library)
        ctx = configure(krun, launch)
        print(f"kelpie libkrun: entering the VM (pid {os.getpid()})", file=sys.stderr,
              flush=True)
        result = krun.call("krun_start_enter", ctx)
    except KelpieError as exc:  # KrunError, or BackendUnavailable from loading it
        print(f"kelpie libkrun: {exc}", file=sys.stderr)
        return 2
    print(f"kelpie libkrun: krun_start_enter returned {result} instead of running the VM",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
