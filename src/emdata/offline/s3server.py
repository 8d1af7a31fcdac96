"""A local S3 endpoint for the DVC remote (moto's server) on loopback: ``python -m emdata.offline.s3server``.

Prints its endpoint URL as the first line of stdout, creates the buckets named on the command line, and
serves until interrupted. Moto keeps objects in memory: it is for the demo and the tests only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emdata.offline.s3server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("buckets", nargs="*")
    args = parser.parse_args(argv)

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto accepts any credentials; these dummies never leave loopback.
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="emdata-local", aws_secret_access_key="emdata-local")
    for bucket in args.buckets:
        s3.create_bucket(Bucket=bucket)
    print(endpoint, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
