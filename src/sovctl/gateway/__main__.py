"""`python -m sovctl.gateway --routes routes.json`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from sovctl.gateway.server import config
from sovctl.runtime.documents import RoutesTable


def main() -> None:
    parser = argparse.ArgumentParser(prog="sovctl.gateway")
    parser.add_argument("--routes", required=True, help="the routing table written by serve")
    args = parser.parse_args()
    server = uvicorn.Server(config(RoutesTable.read(Path(args.routes))))
    server.run()
    if not server.started:
        # As uvicorn.run does: the port could not be bound, or the application not started.
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
