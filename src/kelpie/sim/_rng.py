"""SimRng: the one source of randomness in a simulation, forkable into named streams."""

from __future__ import annotations

import hashlib
import random
from collections.abc import MutableSequence, Sequence
from typing import TypeVar

T = TypeVar("T")


class SimRng:
    """A seeded RNG. ``fork(label)`` derives an independent stream, so adding draws in one
    component does not shift the numbers another component sees."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._random = random.Random(seed)

    def fork(self, label: str) -> SimRng:
        """An independent RNG derived from this seed and ``label``."""
        digest = hashlib.sha256(f"{self.seed}:{label}".encode()).digest()
        return SimRng(int.from_bytes(digest[:8], "big"))

    def random(self) -> float:
        """A float in [0, 1)."""
        return self._random.random()

    def chance(self, probability: float) -> bool:
        """True with the given probability."""
        return self._random.random() < probability

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return self._random.randint(low, high)

    def uniform(self, low: float, high: float) -> float:
        """A float in [low, high]."""
        return self._random.uniform(low, high)

    def choice(self, items: Sequence[T]) -> T:
        """One item of a non-empty sequence."""
        return items[self._random.randrange(len(items))]

    def shuffle(self, items: MutableSequence[T]) -> None:
        """Shuffle in place."""
        self._random.shuffle(items)

    def randbytes(self, n: int) -> bytes:
        """``n`` random bytes."""
        return self._random.randbytes(n)
