"""``python -m kelpie.dst``: run seeded simulations from the command line."""

from kelpie.dst._cli import main

raise SystemExit(main())
