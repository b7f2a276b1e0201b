"""Signals as people name them (``TERM``, ``SIGTERM``, ``15``), with the guest's numbers:
Linux's, whatever the host (macOS numbers some differently)."""

from __future__ import annotations

from kelpie._exceptions import ConfigError

LINUX_SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8,
    "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15,
    "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22,
    "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29,
    "PWR": 30, "SYS": 31,
}
MAX_SIGNAL = 64  # SIGRTMAX on Linux


def signal_number(value: int | str) -> int:
    """The Linux number of ``value``: a number from 1 to 64, or a name with or without
    ``SIG`` in any case. ConfigError names what is allowed."""
    text = str(value).strip()
    if text.isdigit():
        number = int(text)
    else:
        name = text.upper().removeprefix("SIG")
        number = LINUX_SIGNALS.get(name, 0)
    if not 1 <= number <= MAX_SIGNAL:
        raise ConfigError([f"signal {value!r} is not known: give a number from 1 to "
                           f"{MAX_SIGNAL} or a name such as TERM, SIGINT, HUP, KILL, USR1"],
                          what="signal")
    return number
