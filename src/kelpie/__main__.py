"""``python -m kelpie``: the same as the ``kelpie`` command."""

from kelpie.cli import run

run()
