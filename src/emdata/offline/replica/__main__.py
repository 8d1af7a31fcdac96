"""Command line: ``python -m emdata.offline.replica serve [--port 0] [--profile full|small] [--sources epfl,...]``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from emdata.catalog import DATASETS
from emdata.offline.replica import PROFILES, build_replica, replica_providers
from emdata.offline.replica.server import ReplicaServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emdata.offline.replica", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "build"):
        p = sub.add_parser(name)
        p.add_argument("--profile", choices=PROFILES, default="full")
        p.add_argument("--sources", default=",".join(DATASETS), help=f"comma-separated, from {sorted(DATASETS)}")
        p.add_argument("--root", type=Path, default=None, help="cache folder for generated files")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=0, help="0 picks a free port")
            p.add_argument("--latency", type=float, default=0.0, help="seconds added to every response")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    sources = [s for s in args.sources.split(",") if s]
    tree = build_replica(args.profile, sources, args.root)
    if args.command == "build":
        print(tree, flush=True)
        return 0
    server = ReplicaServer(tree, host=args.host, port=args.port,
                           providers=replica_providers(tree, args.profile, sources))
    server.faults.latency_s = args.latency
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # The first line of stdout is the base URL: scripts read it to learn the port.
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
