"""Restart policies for main commands, with Docker's names and meaning."""

from __future__ import annotations

import dataclasses
import enum

from kelpie.vm import ConfigError

FIRST_DELAY_SECONDS = 0.1
MAX_DELAY_SECONDS = 60.0
STEADY_SECONDS = 10.0
"""A main command that ran this long before it ended starts its back-off afresh."""


class RestartMode(enum.StrEnum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """When the runtime starts a sandbox's main command again after it ends.

    ``no``: never. ``on-failure[:N]``: when it exits non-zero, at most ``N`` times
    (unbounded without ``N``). ``always``: whenever it ends. A VM that crashes ends its
    main command as a failure: the sandbox boots again (both modes). A stop by
    the user is never followed by a restart. Between restarts the runtime waits 0.1 s,
    doubling each time up to a minute, so a crash loop costs little; a command that ran
    for ten seconds or more starts that back-off again (Docker's rule).
    """

    mode: RestartMode = RestartMode.NO
    max_retries: int | None = None

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        """``no``, ``always``, ``on-failure`` or ``on-failure:N`` (N >= 0)."""
        name, sep, count = text.partition(":")
        try:
            mode = RestartMode(name)
        except ValueError:
            mode = None
        if mode is None or (sep and mode is not RestartMode.ON_FAILURE):
            raise ConfigError([f"restart policy {text!r} is not known; allowed: no, always, "
                               "on-failure, on-failure:N"], what="restart policy")
        if not sep:
            return cls(mode)
        if not count.isdigit() or int(count) > 1_000_000:
            raise ConfigError([f"restart policy {text!r}: N must be a whole number from 0 to "
                               "1000000"], what="restart policy")
        return cls(mode, int(count))

    def __str__(self) -> str:
        if self.max_retries is None:
            return self.mode.value
        return f"{self.mode.value}:{self.max_retries}"

    def should_restart(self, exit_code: int | None, restarts: int) -> bool:
        """Whether a main command that ended with ``exit_code`` (None: unknown) after
        ``restarts`` restarts is started again. Never when its end is unknown (its output
        could not be followed): it may still be running."""
        if self.mode is RestartMode.NO or exit_code is None:
            return False
        if self.mode is RestartMode.ON_FAILURE and exit_code == 0:
            return False
        return self.max_retries is None or restarts < self.max_retries

    def restarts_after_crash(self, restarts: int) -> bool:
        """Whether a sandbox whose VM crashed (its main command's end: a failure) after
        ``restarts`` restarts boots again."""
        return self.mode is not RestartMode.NO and \
            (self.max_retries is None or restarts < self.max_retries)

    @staticmethod
    def delay(previous: float | None, ran_for: float) -> float:
        """The wait before the next restart, given the last wait (None: none yet) and how
        long the command ran."""
        if previous is None or ran_for >= STEADY_SECONDS:
            return FIRST_DELAY_SECONDS
        return min(previous * 2, MAX_DELAY_SECONDS)
