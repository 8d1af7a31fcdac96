"""Benchmark of the download engine against the replica with added latency and a per-connection rate cap.

Compares, in one run and side by side: many small files fetched one after another vs. ``workers`` at a
time, and one large file as a single stream vs. parallel byte ranges. The server runs in its own process
with ``latency_s`` added to every response and ``bandwidth_bps`` per connection (a WAN-like link where
one TCP stream does not fill the pipe).

    .venv/bin/python bench/bench_download.py [--latency 0.05] [--mbps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emdata.acquire.download import Download, Downloader
from emdata.acquire.params import DownloadConfig

SERVER = """
import sys
from emdata.offline.replica.server import ReplicaServer
server = ReplicaServer(sys.argv[1])
server.faults.latency_s = float(sys.argv[2])
server.faults.bandwidth_bps = float(sys.argv[3])
print(server.base_url, flush=True)
server.serve_forever()
"""


def make_tree(root: Path, n_small: int, small_mb: float, large_mb: int) -> tuple[list[str], str]:
    rng = np.random.default_rng(0)
    folder = root / "example.org" / "bench"
    folder.mkdir(parents=True)
    small = []
    for i in range(n_small):
        (folder / f"small_{i:03d}.bin").write_bytes(rng.integers(0, 256, int(small_mb * 2**20), np.uint8).tobytes())
        small.append(f"https://example.org/bench/small_{i:03d}.bin")
    (folder / "large.bin").write_bytes(rng.integers(0, 256, large_mb * 2**20, np.uint8).tobytes())
    return small, "https://example.org/bench/large.bin"


def timed(mirror: str, urls: list[str], dest: Path, **config: float) -> float:
    downloader = Downloader(DownloadConfig(**config), mirror=mirror, progress=False)  # type: ignore[arg-type]
    items = [Download(u, dest / Path(u).name) for u in urls]
    began = time.perf_counter()
    downloader.download_all(items)
    seconds = time.perf_counter() - began
    for item in items:
        item.dest.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every response")
    parser.add_argument("--mbps", type=float, default=40.0, help="per-connection cap, MB/s")
    parser.add_argument("--small", type=int, default=24, help="number of small files")
    parser.add_argument("--small-mb", type=float, default=2.0)
    parser.add_argument("--large-mb", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, dest = Path(tmp) / "served", Path(tmp) / "dest"
        dest.mkdir()
        small, large = make_tree(root, args.small, args.small_mb, args.large_mb)
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(args.latency), str(args.mbps * 1e6)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            mirror = proc.stdout.readline().strip()
            off = {"range_threshold_mb": 1e6}
            cases = {
                "many files, sequential": (small, {"workers": 1, **off}),
                f"many files, {args.workers} workers": (small, {"workers": args.workers, **off}),
                "large file, one stream": ([large], {"workers": 1, **off}),
                f"large file, {args.workers} ranges": ([large], {"workers": 1, "range_workers": args.workers,
                                                                 "range_threshold_mb": 1, "range_part_mb": 16}),
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every case alike
                for name, (urls, config) in cases.items():
                    times[name].append(timed(mirror, urls, dest, **config))
        finally:
            proc.terminate()
            proc.wait()

    small_mb = args.small * args.small_mb
    sizes = {k: (small_mb if k.startswith("many") else args.large_mb) for k in cases}
    print(f"replica: +{args.latency * 1000:.0f} ms per response, {args.mbps:.0f} MB/s per connection; "
          f"median of {args.repeats}")
    print(f"{'case':32s} {'seconds':>8s} {'MB/s':>8s}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in cases:
        print(f"{name:32s} {med[name]:8.2f} {sizes[name] * 1.048576 / med[name]:8.1f}")
    names = list(cases)
    print(f"ratio many files parallel/sequential: {med[names[0]] / med[names[1]]:.2f}x")
    print(f"ratio large file ranges/one stream:   {med[names[2]] / med[names[3]]:.2f}x")


if __name__ == "__main__":
    main()
