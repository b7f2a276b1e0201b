"""The ``kelpie`` command. Thin: each command module turns arguments into calls on the core.

The core never imports this package. Exceptions become exit codes in exactly one place
(:func:`main`), with one clear line on stderr (a traceback only with ``--debug``).
"""

from kelpie.cli._main import main, run

__all__ = ["main", "run"]
