"""Host-side networking of sandboxes: where untrusted guests may connect, enforced where they
cannot reach.

Each sandbox with a NIC gets its own network namespace (:class:`SandboxNetns`): the VMM's
user-mode network stack runs inside it, so every connection the guest makes is made there,
and the namespace's nftables rules (:func:`render_rules`) decide which may leave: never the
host nor private networks in ``nat``, only what the egress rules allow in ``policy``. A
helper process per sandbox (``python -m kelpie.hostnet``) runs its DNS forwarder (answers
only allowed names, pins their addresses) and relays its published ports.
:class:`SandboxNetwork` is what a backend uses.
"""

from kelpie.hostnet._dns import DnsForwarder, upstream_servers
from kelpie.hostnet._netns import HostNetworkError, SandboxNetns, host_addresses
from kelpie.hostnet._nft import NameSets, name_sets
from kelpie.hostnet._nft import render as render_rules
from kelpie.hostnet._sandbox import SandboxNetwork

__all__ = [
    "DnsForwarder",
    "HostNetworkError",
    "NameSets",
    "SandboxNetns",
    "SandboxNetwork",
    "host_addresses",
    "name_sets",
    "render_rules",
    "upstream_servers",
]
