"""Generate (``--write``) or verify (``--check``) the OpenAPI document in docs/.

The document comes from the code: the app is built over a throw-away store.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

import trio

from volumed.api import Service, create_app, openapi_document
from volumed.export_manager import ExportManager
from volumed.store import VolumeStore


def generate() -> str:
    """The API's OpenAPI document as text."""
    with tempfile.TemporaryDirectory(prefix="boxvol-openapi-") as home:
        store = VolumeStore.open(home)
        try:

            def exports(writer: trio.CapacityLimiter) -> ExportManager:
                return ExportManager(store, home, writer)

            return openapi_document(create_app(Service(store, [], exports)))
        finally:
            store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Write or check the document; exit 1 if the checked-in one is stale."""
    parser = argparse.ArgumentParser(prog="python -m volumed.openapi")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="FILE")
    mode.add_argument("--check", metavar="FILE")
    args = parser.parse_args(argv)
    document = generate()
    if args.write:
        with open(args.write, "w") as out:
            out.write(document)
        return 0
    with open(args.check) as existing:
        if existing.read() != document:
            sys.stderr.write(f"{args.check} is stale: regenerate it with 'make openapi'\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
