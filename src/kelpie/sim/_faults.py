"""Named faults and the injector that decides, from the seeded RNG, when each one fires.

A fault spec names a fault, a probability, an optional operation filter, "after N" (the
first N eligible checks never fire) and "at most N times". Specs parse from text, e.g.
``exec_fail:p=0.2:ops=exec|write_file:after=3:max=2`` (keys optional, comma-separated).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable

from kelpie._exceptions import ConfigError
from kelpie.sim._rng import SimRng


class Fault(enum.StrEnum):
    """Every fault the simulator can inject."""

    BOOT_FAIL = "boot_fail"
    CRASH = "crash"
    PAUSE_FAIL = "pause_fail"
    RESUME_FAIL = "resume_fail"
    EXEC_FAIL = "exec_fail"
    EXEC_TIMEOUT = "exec_timeout"
    SNAPSHOT_CREATE_FAIL = "snapshot_create_fail"
    SNAPSHOT_TOO_LARGE = "snapshot_too_large"
    SNAPSHOT_CORRUPTION = "snapshot_corruption"
    SNAPSHOT_TRUNCATION = "snapshot_truncation"
    RESTORE_FAIL = "restore_fail"
    STORAGE_WRITE_FAIL = "storage_write_fail"
    STORAGE_PARTIAL_WRITE = "storage_partial_write"
    CRASH_BEFORE_WRITE = "crash_before_write"
    CRASH_AFTER_WRITE = "crash_after_write"
    NETWORK_DROP = "network_drop"
    NETWORK_DELAY = "network_delay"
    NETWORK_PARTITION = "network_partition"


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """When one fault may fire."""

    fault: Fault
    probability: float = 0.05
    operations: frozenset[str] | None = None
    after: int = 0
    max_times: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.probability <= 1.0:
            problems.append(f"{self.fault}: probability {self.probability} is not in 0..1")
        if self.after < 0:
            problems.append(f"{self.fault}: after={self.after} must be >= 0")
        if self.max_times is not None and self.max_times < 0:
            problems.append(f"{self.fault}: max={self.max_times} must be >= 0")
        if problems:
            raise ConfigError(problems, what="fault spec")

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``name[:p=0.1][:ops=a|b][:after=N][:max=N]``."""
        name, *options = text.strip().split(":")
        try:
            fault = Fault(name)
        except ValueError:
            allowed = ", ".join(f.value for f in Fault)
            raise ConfigError([f"unknown fault {name!r}; known faults: {allowed}"],
                              what="fault spec") from None
        values: dict[str, object] = {}
        for option in options:
            key, sep, value = option.partition("=")
            try:
                if key == "p" and sep:
                    values["probability"] = float(value)
                elif key == "ops" and sep:
                    values["operations"] = frozenset(v for v in value.split("|") if v)
                elif key == "after" and sep:
                    values["after"] = int(value)
                elif key == "max" and sep:
                    values["max_times"] = int(value)
                else:
                    raise ValueError(f"unknown option {option!r}")
            except ValueError as exc:
                raise ConfigError(
                    [f"{text!r}: {exc}; options are p=FLOAT, ops=a|b, after=N, max=N"],
                    what="fault spec",
                ) from None
        return cls(fault, **values)  # type: ignore[arg-type]


def parse_fault_specs(text: str, *, default_probability: float = 0.05) -> list[FaultSpec]:
    """Parse comma-separated specs; ``all`` means every fault at ``default_probability``."""
    specs: list[FaultSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            specs += [FaultSpec(f, default_probability) for f in Fault]
        else:
            specs.append(FaultSpec.parse(part))
    return specs


FireObserver = Callable[[Fault, str], None]


class FaultInjector:
    """Decides whether a fault fires at a check point. Deterministic given its RNG."""

    def __init__(
        self, rng: SimRng, specs: Iterable[FaultSpec] = (), *, on_fire: FireObserver | None = None
    ) -> None:
        self._rng = rng
        self._specs: dict[Fault, FaultSpec] = {s.fault: s for s in specs}
        self._checks: dict[Fault, int] = {}
        self.fired: dict[Fault, int] = {}
        self._on_fire = on_fire

    @property
    def specs(self) -> list[FaultSpec]:
        return list(self._specs.values())

    def enabled(self, fault: Fault) -> bool:
        """Whether ``fault`` is configured at all."""
        return fault in self._specs

    def check(self, fault: Fault, operation: str) -> bool:
        """Whether ``fault`` fires now, at ``operation``. Counts toward after/max limits."""
        spec = self._specs.get(fault)
        if spec is None:
            return False
        if spec.operations is not None and operation not in spec.operations:
            return False
        seen = self._checks.get(fault, 0)
        self._checks[fault] = seen + 1
        if seen < spec.after:
            return False
        if spec.max_times is not None and self.fired.get(fault, 0) >= spec.max_times:
            return False
        if not self._rng.chance(spec.probability):
            return False
        self.fired[fault] = self.fired.get(fault, 0) + 1
        if self._on_fire is not None:
            self._on_fire(fault, operation)
        return True


NO_FAULTS = FaultInjector(SimRng(0))
"""An injector with no specs: never fires. The default outside simulations."""
