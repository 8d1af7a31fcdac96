"""Download engine settings measured against the replica with WAN latency and a per-connection cap, vs aria2c.

Every case fetches the same files from one replica server (its own process) that adds ``--latency`` to every
response and caps each connection at ``--mbps`` (one TCP stream over a long link does not fill the pipe):
a "large" set of files like IDR's and EPFL's (40-256 MB) and a "many" set of small files. Cases: the engine
with its current defaults, with the previous defaults, on a grid of workers x range workers x part size, and
``aria2c -x8 -s8`` on the same URLs. Transfers use pinned sha256 (``Download(..., sha256=...)``), so each file
crosses the network once; the first download of a file nothing verifies (fetched twice, two copies must agree)
is measured as its own case. Cases are interleaved within each repeat; ratios are per repeat (median, min..max).

    .venv/bin/python bench/bench_download.py [--quick] [--latency 0.03] [--mbps 20] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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

PREVIOUS = {"workers": 4, "range_workers": 4, "range_threshold_mb": 256.0, "range_part_mb": 64.0}
ENGINE_KEYS = ("workers", "range_workers", "range_threshold_mb", "range_part_mb")


def label(config: dict[str, Any]) -> str:
    return (f"{config['workers']} workers, {config['range_workers']} ranges x {config['range_part_mb']:g} MiB "
            f"from {config['range_threshold_mb']:g} MB")


def make_files(folder: Path, sizes_mb: list[float], prefix: str) -> list[tuple[str, str]]:
    """Random files (incompressible) under ``folder``; (live URL, sha256) of each."""
    rng = np.random.default_rng(len(sizes_mb))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, mb in enumerate(sizes_mb):
        data = rng.integers(0, 256, int(mb * 1e6), np.uint8).tobytes()
        (folder / f"{prefix}_{i:03d}.bin").write_bytes(data)
        out.append((f"https://example.org/bench/{prefix}_{i:03d}.bin", hashlib.sha256(data).hexdigest()))
    return out


def run_engine(mirror: str, files: list[tuple[str, str]], dest: Path, config: dict[str, Any],
               pinned: bool = True) -> float:
    downloader = Downloader(DownloadConfig(**config), mirror=mirror, progress=False)
    items = [Download(u, dest / Path(u).name, sha256=sha if pinned else None) for u, sha in files]
    began = time.perf_counter()
    results = downloader.download_all(items)
    seconds = time.perf_counter() - began
    for item, result in zip(items, results, strict=True):
        if result.sha256 != dict(files)[item.url] or sha256_of(item.dest) != dict(files)[item.url]:
            raise AssertionError(f"{item.dest}: wrong bytes ({label(config)}, pinned={pinned})")
    fresh(dest)
    return seconds


def fresh(dest: Path) -> None:
    """Every case is a first download: nothing of an earlier case (partials, parts lists) stays in ``dest``."""
    shutil.rmtree(dest)
    dest.mkdir()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def run_aria2c(mirror: str, files: list[tuple[str, str]], dest: Path, args: list[str]) -> float:
    listing = dest / "urls.txt"
    listing.write_text("".join(f"{mirror}/{u.split('://', 1)[1]}\n" for u, _ in files))
    began = time.perf_counter()
    subprocess.run(["aria2c", *args, "-q", "--allow-overwrite=true", "--auto-file-renaming=false",
                    "--file-allocation=none", "-d", str(dest), "-i", str(listing)], check=True)
    seconds = time.perf_counter() - began
    for u, sha in files:
        if sha256_of(dest / Path(u).name) != sha:
            raise AssertionError(f"aria2c: {dest / Path(u).name} has the wrong bytes")
    fresh(dest)
    return seconds


def grid(quick: bool) -> list[dict[str, Any]]:
    if quick:  # small files: a low threshold and small parts so that the ranges are exercised
        return [{"workers": 8, "range_workers": 8, "range_threshold_mb": 4.0, "range_part_mb": 2.0}]
    combos = [(8, r, p) for r in (8, 16) for p in (8.0, 16.0, 32.0)] + [(8, 4, 16.0), (8, 16, 4.0), (4, 16, 8.0),
                                                                      (16, 8, 16.0), (16, 16, 8.0)]
    return [{"workers": w, "range_workers": r, "range_threshold_mb": 32.0, "range_part_mb": p} for w, r, p in combos]


def summarise(times: dict[str, list[float]], reference: str) -> dict[str, Any]:
    """Median seconds per case and per-repeat ratios against ``reference`` (time / reference time)."""
    out = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[reference], strict=True)]
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small files, one repeat, two configurations")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every response")
    parser.add_argument("--mbps", type=float, default=20.0, help="per-connection cap, MB/s")
    parser.add_argument("--large-mb", default="40,96,256", help="sizes of the large files (IDR/EPFL-like), MB")
    parser.add_argument("--many", type=int, default=24, help="number of small files (2 MB each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    large_mb = [float(s) for s in args.large_mb.split(",")]
    if args.quick:
        large_mb, args.many, args.repeats = [6.0, 12.0], 6, 1
    defaults = {k: getattr(DownloadConfig(), k) for k in ENGINE_KEYS}
    configs = {"defaults (" + label(defaults) + ")": defaults}
    if defaults != PREVIOUS:
        configs["previous defaults (" + label(PREVIOUS) + ")"] = PREVIOUS
    for config in grid(args.quick):
        configs.setdefault(label(config), config)
    aria = shutil.which("aria2c")

    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        root, dest = Path(tmp) / "served", Path(tmp) / "dest"
        dest.mkdir()
        sets = {"large": make_files(root / "example.org" / "bench", large_mb, "large"),
                "many": make_files(root / "example.org" / "bench", [2.0] * args.many, "small")}
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(args.latency), str(args.mbps * 1e6)],
                                stdout=subprocess.PIPE, text=True)
        times: dict[str, dict[str, list[float]]] = {s: {} for s in sets}
        try:
            assert proc.stdout is not None
            mirror = proc.stdout.readline().strip()
            for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every case alike
                for set_name, files in sets.items():
                    for name, config in configs.items():
                        times[set_name].setdefault(name, []).append(run_engine(mirror, files, dest, config))
                    if aria:
                        times[set_name].setdefault("aria2c -x8 -s8", []).append(
                            run_aria2c(mirror, files, dest, ["-x8", "-s8"]))
                times["large"].setdefault("defaults, first download (unpinned: fetched twice)", []).append(
                    run_engine(mirror, sets["large"], dest, defaults, pinned=False))
        finally:
            proc.terminate()
            proc.wait()

    result: dict[str, Any] = {"latency_s": args.latency, "mbps_per_connection": args.mbps, "repeats": args.repeats,
                              "large_mb": large_mb, "many": f"{args.many} x 2 MB", "defaults": defaults,
                              "aria2c": aria is not None, "sets": {}}
    default_name = next(iter(configs))
    for set_name, per_case in times.items():
        engine_cases = [n for n in per_case if n in configs]
        best = min(engine_cases, key=lambda n: statistics.median(per_case[n]))
        stats = summarise(per_case, best)
        total_mb = sum(large_mb) if set_name == "large" else 2.0 * args.many
        result["sets"][set_name] = {"best": best, "best_config": configs[best], "total_mb": total_mb,
                                    "cases": stats}
        if aria:
            result["sets"][set_name]["default_vs_aria2c"] = summarise(per_case, "aria2c -x8 -s8")[default_name]
            result["sets"][set_name]["best_vs_aria2c"] = summarise(per_case, "aria2c -x8 -s8")[best]
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"replica: +{result['latency_s'] * 1000:.0f} ms per response, {result['mbps_per_connection']:g} MB/s "
             f"per connection; large set {result['large_mb']} MB, many set {result['many']}; "
             f"median of {result['repeats']} (min..max of per-repeat ratios)", ""]
    for set_name, s in result["sets"].items():
        lines += [f"**{set_name} files** ({s['total_mb']:g} MB; time / best engine case `{s['best']}`)", "",
                  "| case | seconds | MB/s | x best |", "|---|---:|---:|---:|"]
        for name, c in sorted(s["cases"].items(), key=lambda kv: kv[1]["median_s"]):
            lines.append(f"| {name} | {c['median_s']:.2f} | {s['total_mb'] / c['median_s']:.0f} | "
                         f"{c['ratio']:.2f} ({c['ratio_min']:.2f}..{c['ratio_max']:.2f}) |")
        if "default_vs_aria2c" in s:
            d, b = s["default_vs_aria2c"], s["best_vs_aria2c"]
            lines.append(f"\ndefaults / aria2c time: {d['ratio']:.2f} ({d['ratio_min']:.2f}..{d['ratio_max']:.2f}); "
                         f"best engine case / aria2c: {b['ratio']:.2f} ({b['ratio_min']:.2f}..{b['ratio_max']:.2f})")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
