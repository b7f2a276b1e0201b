"""The C modules beneath ``signal``, ``functools`` and ``collections``, for the agent's start.

The agent starts on every boot's path, and under TCG every module is slow to import the
first time. The Python halves of these three add ``enum``, ``types``, ``operator``,
``keyword`` and ``reprlib`` (~170 ms of a boot, measured with ``-X importtime``) for
nothing the agent uses: it needs ``signal.signal`` and the signal numbers (plain ints
here, not enum members), ``partial`` and ``deque``, which are these very objects.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections import deque
    from functools import partial
else:
    import _signal as signal
    from _collections import deque
    from _functools import partial

__all__ = ["deque", "partial", "signal"]
