#!/usr/bin/env python3
"""Write the daemon's OpenAPI document to docs/openapi.json (checked in).

    python scripts/openapi.py            # regenerate docs/openapi.json
    python scripts/openapi.py --check    # exit 1 if docs/openapi.json is out of date
    python scripts/openapi.py --stdout   # print it

The document comes from the daemon's routes and the kelpie.api models; the app is built
over a runtime that is never opened, so this touches no state. tests/test_daemon.py fails
when the checked-in document differs from a fresh one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "openapi.json"


def render() -> str:
    """The OpenAPI document as JSON text: sorted keys, indent 2, one trailing newline."""
    from kelpie.daemon import create_app
    from kelpie.runtime import Runtime

    document = create_app(Runtime()).openapi()  # never opened: reads and writes no state
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DOCUMENT,
                        help="where to write (default: docs/openapi.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="compare with the file instead of writing it; exit 1 if it differs")
    mode.add_argument("--stdout", action="store_true", help="print the document")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `python scripts/openapi.py`",
                  file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
