"""Which teleport mode a pair of hosts supports, decided before anything is paused.

:func:`choose_mode` looks only at the sandbox's record and the two hosts' advertised
:class:`~kelpie.api.HostFacts`: it never touches a VM, so a refusal leaves the sandbox
exactly as it was. ``auto`` picks the best mode the pair supports, in the order live, full,
checkpoint, and says why; an explicit mode the pair cannot do is refused with every reason.
"""

from __future__ import annotations

import dataclasses

from kelpie._exceptions import TeleportRefused
from kelpie.api import BackendFacts, HostFacts, TeleportMode
from kelpie.vm import SnapshotKind, VmConfig

LIVE_CAPABILITY = "live_migration"


@dataclasses.dataclass(frozen=True)
class ModeChoice:
    """The mode a teleport runs in, the reason, and the backend the target runs it with."""

    mode: TeleportMode
    reason: str
    target_backend: str
    target_arch: str = ""
    """The guest architecture the sandbox has on the target (another one than its own only
    in checkpoint mode)."""


def choose_mode(
    requested: TeleportMode, *, backend: str, config: VmConfig, source: HostFacts,
    target: HostFacts, without_volumes: bool = False, guestkit_digest: str | None = None,
    live_ready: bool = True, target_label: str = "the target", arch: str | None = None,
) -> ModeChoice:
    """The mode to teleport a sandbox of ``backend`` with ``config`` from ``source`` to
    ``target`` (see the module docstring); raises :class:`TeleportRefused` naming every
    reason when none fits. ``live_ready``: the sandbox's VM can be migrated live now.
    ``arch``: the guest architecture the sandbox should have there (default: its own when
    the target runs it, else one the target runs: a checkpoint moves across)."""
    if config.mounts and not (without_volumes and requested in (TeleportMode.AUTO,
                                                                 TeleportMode.CHECKPOINT)):
        volumes = ", ".join(f"{m.host_path}:{m.guest_path}" for m in config.mounts)
        raise TeleportRefused([
            f"the sandbox has host volumes ({volumes}), which do not exist on another host; "
            "move it in checkpoint mode without them (--mode checkpoint --without-volumes), "
            "or recreate it there"], target=target_label)
    here = _backend(source, backend)
    there = _backend(target, backend)
    guest = config.arch or source.arch
    wanted = arch or _arch_there(target, guest)
    same = _same_machine_problems(backend, here, there, guest, target, guestkit_digest)
    if wanted != guest:
        same.append(f"the sandbox's guest is {guest} and would be {wanted} there: a memory "
                    f"snapshot resumes only in a guest of its own architecture")
    reasons: dict[TeleportMode, list[str]] = {}
    if config.mounts:
        reasons[TeleportMode.LIVE] = reasons[TeleportMode.FULL] = [
            "host volumes are left behind, which only checkpoint mode allows"]
    else:
        reasons[TeleportMode.LIVE] = same + _missing(here, there, LIVE_CAPABILITY, backend)
        if not live_ready:
            reasons[TeleportMode.LIVE].append("the sandbox's VM cannot be migrated live now")
        reasons[TeleportMode.FULL] = same + _missing(here, there,
                                                     f"snapshot:{SnapshotKind.FULL.value}",
                                                     backend)
    checkpoint_backend = backend if there is not None and there.available and \
        wanted in there.arches else _any_with(
            target, f"snapshot:{SnapshotKind.CHECKPOINT.value}", wanted)
    reasons[TeleportMode.CHECKPOINT] = [] if checkpoint_backend is not None else [
        f"{target_label} has no available backend that restores checkpoints into an "
        f"{wanted} guest"]
    if here is None or f"snapshot:{SnapshotKind.CHECKPOINT.value}" not in here.capabilities:
        reasons[TeleportMode.CHECKPOINT].append(f"backend {backend} cannot take checkpoints")

    order = [TeleportMode.LIVE, TeleportMode.FULL, TeleportMode.CHECKPOINT]
    if requested is not TeleportMode.AUTO:
        if reasons[requested]:
            raise TeleportRefused([f"{requested.value} mode: {r}" for r in reasons[requested]],
                                  target=target_label)
        order = [requested]
    for mode in order:
        if not reasons[mode]:
            chosen_backend = checkpoint_backend if mode is TeleportMode.CHECKPOINT else backend
            assert chosen_backend is not None
            return ModeChoice(mode, _why(mode, requested, reasons), chosen_backend, wanted)
    raise TeleportRefused([f"{m.value} mode: {r}" for m in order for r in reasons[m]],
                          target=target_label)


def _why(mode: TeleportMode, requested: TeleportMode,
         reasons: dict[TeleportMode, list[str]]) -> str:
    if requested is not TeleportMode.AUTO:
        return f"{mode.value} mode was asked for"
    better = [m for m in (TeleportMode.LIVE, TeleportMode.FULL) if m is not mode
              and reasons[m] and _rank(m) < _rank(mode)]
    if not better:
        return f"{mode.value}: the best mode both hosts support"
    why_not = "; ".join(f"not {m.value}: {reasons[m][0]}" for m in better)
    return f"{mode.value} ({why_not})"


def _rank(mode: TeleportMode) -> int:
    return [TeleportMode.LIVE, TeleportMode.FULL, TeleportMode.CHECKPOINT].index(mode)


def _backend(facts: HostFacts, name: str) -> BackendFacts | None:
    return next((b for b in facts.backends if b.name == name), None)


def _any_with(facts: HostFacts, capability: str, arch: str) -> str | None:
    return next((b.name for b in facts.backends
                 if b.available and capability in b.capabilities and arch in b.arches), None)


def _arch_there(target: HostFacts, guest: str) -> str:
    """The guest's own architecture when a backend of the target runs it, else the
    target's own."""
    runs = any(b.available and guest in b.arches for b in target.backends)
    return guest if runs else target.arch


def _missing(here: BackendFacts | None, there: BackendFacts | None, capability: str,
             backend: str) -> list[str]:
    problems = []
    if here is None or capability not in here.capabilities:
        problems.append(f"backend {backend} here cannot do {capability}")
    if there is not None and capability not in there.capabilities:
        problems.append(f"backend {backend} on the target cannot do {capability}")
    return problems


def _same_machine_problems(
    backend: str, here: BackendFacts | None, there: BackendFacts | None, guest: str,
    target: HostFacts, guestkit_digest: str | None,
) -> list[str]:
    """Why a memory snapshot of this sandbox (an ``guest`` guest) could not resume on the
    target (empty: it can)."""
    problems = []
    if there is None or not there.available:
        reason = "not installed" if there is None else there.reason
        problems.append(f"the target cannot run backend {backend} ({reason})")
    elif guest not in there.arches:
        problems.append(f"backend {backend} on the target runs no {guest} guests (only "
                        f"{', '.join(sorted(there.arches)) or 'none'})")
    if here is not None and there is not None and here.version != there.version:
        problems.append(f"backend {backend} is version {here.version} here but "
                        f"{there.version} on the target")
    if here is not None and there is not None:
        accel_here = here.arches.get(guest)
        accel_there = there.arches.get(guest)
        # "" is undecided (proven on the first boot there): the restore checks it then
        if accel_here and accel_there and accel_here != accel_there:
            problems.append(f"the accelerator differs ({accel_here} here, {accel_there} on "
                            "the target)")
    if guestkit_digest is not None and guestkit_digest not in target.guestkits:
        problems.append(f"the target lacks guest kit {guestkit_digest[:12]} the sandbox "
                        "booted with")
    return problems
