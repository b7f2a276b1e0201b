"""``python -m kelpie.hostnet VM_DIR``: the network helper of one sandbox."""

import sys

from kelpie.hostnet._helper import main

sys.exit(main())
