"""The Python SDK: :class:`AsyncSandbox` and its blocking twin :class:`Sandbox`.

A sandbox is created in-process by default: a :class:`~kelpie.runtime.Runtime` private to
this process (and event loop) owns it, with its records under
``<state dir>/sdk/<pid>-<n>`` and images from the shared image store. With
``daemon="unix:///..."`` or ``daemon="http://host:port"`` (plus ``token``) the sandbox
lives in that daemon instead and outlives this process. Either way the SDK speaks the
sandbox service (:class:`kelpie.service.SandboxService`), so both behave alike, errors
included (``except SandboxNotFound`` works against a daemon too).

Use them as context managers: leaving the block kills and removes the sandbox. A sandbox
that is never cleaned up keeps its VM running (VMs are detached from the process).

::

    with Sandbox.create(image="kelpie/demo", memory=256) as box:
        print(box.exec(["echo", "hi"]).stdout)
        box.files.mkdir("/tmp/out")
        box.files.write("/tmp/out/x", b"data")
        for chunk in box.files.read_stream("/tmp/out/x"):
            ...
"""

from kelpie.sdk._async import AsyncFiles, AsyncSandbox
from kelpie.sdk._sync import Files, Process, Sandbox

__all__ = [
    "AsyncFiles",
    "AsyncSandbox",
    "Files",
    "Process",
    "Sandbox",
]
