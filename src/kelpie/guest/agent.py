"""Start the Kelpie guest agent, which serves the wire protocol of ``protocol.py`` in the VM.

Run it as::

    python3 -E -S /kelpie/guest/agent.pyc --device /dev/vport0p1 [--root /newroot]
    python3 -S src/kelpie/guest/agent.py --listen-unix /tmp/agent.sock    # host test mode
    python3 -S agent.py --listen-vsock 1024                               # vsock (Firecracker...)

The guest holds a copy of the source tree's layout: this package as ``/kelpie/guest/``
beside ``/kelpie/protocol.py``. Run as a script, this file imports its directory as the
top-level package ``guest`` and the protocol as ``protocol``, so neither Kelpie's host
package nor anything outside the standard library is needed; the package's modules are
the same files the host imports as ``kelpie.guest``. In the guest, init runs this script's
bytecode, ``agent.pyc`` beside it (compiled when the kit is built): no parsing or compiling
at boot, where TCG would translate Python's parser and compiler for that one use. See the
package docstring for the design.
"""

import os
import sys

if __name__ == "__main__":
    _HERE = os.path.dirname(os.path.abspath(__file__))
    # The package directory itself must not be on sys.path (its modules are no top-level
    # names); its parent is appended, not prepended, so it cannot shadow stdlib names.
    if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
        del sys.path[0]
    sys.path.append(os.path.dirname(_HERE))
    from guest import main  # type: ignore[import-not-found]

    sys.exit(main())
