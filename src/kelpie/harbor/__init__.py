"""A Harbor environment on Kelpie: ``harbor run -e kelpie.harbor:KelpieEnvironment``.

Importing this package needs PyPI ``harbor`` (Python >= 3.12); nothing else in Kelpie
imports it.
"""

from kelpie.harbor._environment import KelpieEnvironment

__all__ = ["KelpieEnvironment"]
