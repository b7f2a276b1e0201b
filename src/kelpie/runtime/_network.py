"""Changing where a sandbox may connect: its network mode and egress rules, while it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kelpie.runtime._arguments import label
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._info import SandboxInfo
from kelpie.vm import (
    ConfigError,
    EgressPolicy,
    NetworkChangeable,
    NetworkMode,
    VmState,
)


async def change_egress(ctx: RuntimeContext, ref: str, *, allow: Sequence[str],
                        deny: Sequence[str], network: str | None = None) -> SandboxInfo:
    """Replace the sandbox's egress rules (and, between ``nat`` and ``policy``, its mode);
    a running sandbox obeys them from its next packet, a stopped one from its next start."""
    info = ctx.find(ref)
    ctx.check_not_held(info, "change the network of")
    current = info.config.network
    mode = current if network is None else NetworkMode(network)
    if (mode is NetworkMode.NONE) != (current is NetworkMode.NONE):
        raise ConfigError([f"sandbox {label(info)} has network {current.value}: a sandbox's "
                           "NIC is fixed when it is created, so only nat and policy can be "
                           f"switched (not to or from none); asked for {mode.value}"],
                          what="network change")
    config = info.config.evolve(network=mode, egress=EgressPolicy.parse(allow, deny))
    if config == info.config:
        return info  # nothing changes
    async with ctx.lock_for(info.id):
        vm = ctx.vms.get(info.id)
        if vm is not None and vm.state in (VmState.RUNNING, VmState.PAUSED):
            if not isinstance(vm, NetworkChangeable):
                raise ConfigError([f"backend {info.backend} cannot change the network of a "
                                   f"running sandbox ({label(info)}); stop it first, or use "
                                   "a backend that enforces egress rules"],
                                  what="network change")
            await vm.change_network(config)
        ctx.db.set_config(dataclasses.replace(info, config=config), ctx.clock())
    return ctx.info(info.id)
