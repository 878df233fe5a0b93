"""`python -m sovctl.gateway --routes routes.json`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from sovctl.gateway.app import create_app
from sovctl.runtime.documents import RoutesTable


def main() -> None:
    parser = argparse.ArgumentParser(prog="sovctl.gateway")
    parser.add_argument("--routes", required=True, help="the routing table written by serve")
    args = parser.parse_args()
    table = RoutesTable.read(Path(args.routes))
    app = create_app(table)
    # Named, not "auto": without uvloop and httptools the gateway would silently be slower.
    # No proxy headers: clients reach the gateway directly, and it never uses their address.
    uvicorn.run(app, host=table.host, port=table.port, loop="uvloop", http="httptools",
                lifespan="on", proxy_headers=False, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
