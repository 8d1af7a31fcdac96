"""Benchmark block-wise reads: iterator vs. tensorstore whole-array read vs. zarr-python block slicing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from emdata.access import BlockGrid, BlockSpec, ChunkCache, open_array
from emdata.ngff import Geometry, create_image_group, write_block_aligned

HERE = Path(__file__).resolve().parent


def em_like_slab(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Blurred blobs plus noise: compresses roughly like EM (zstd ratio ~1.5-3), unlike zeros or white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 220, [s // 8 + 1 for s in shape]).astype(np.float32)
    up = coarse.repeat(8, 0).repeat(8, 1).repeat(8, 2)[: shape[0], : shape[1], : shape[2]]
    return np.clip(up + rng.normal(0, 10, shape).astype(np.float32), 0, 255).astype(np.uint8)


def build_volume(path: Path, size: int) -> Path:
    """A ``size``^3 uint8 OME-Zarr with the production layout (64^3 chunks, 256^3 shards, blosc zstd)."""
    marker = path / ".complete"
    if marker.exists():
        return path
    _, arrays = create_image_group(path, name="bench", shape=(size,) * 3, dtype="uint8",
                                   geometry=Geometry((8.0, 8.0, 8.0)), n_levels=1,
                                   chunks=(64, 64, 64), shards=(256, 256, 256))
    slab = 256

    class Source:
        def __getitem__(self, sl: tuple[slice, ...]) -> np.ndarray:
            shape = tuple(s.stop - s.start for s in sl)
            return em_like_slab(shape, seed=hash(tuple(s.start for s in sl)) % 2**32)  # type: ignore[arg-type]

    write_block_aligned(arrays[0], Source(), slab=(slab, slab, slab))
    marker.write_text("ok\n")
    return path


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic volume (voxels)")
    parser.add_argument("--block", type=int, nargs="+", default=[256, 128], help="block edges to test (voxels)")
    parser.add_argument("--halo", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    path = build_volume(args.out / f"bench_{args.size}.zarr", args.size)
    level0 = path / "0"
    total = args.size**3
    # Warm the OS page cache so that every method reads from memory, not from a cold disk.
    for f in level0.rglob("*"):
        if f.is_file():
            f.read_bytes()

    def ts_whole() -> int:
        arr = open_array(path, cache=ChunkCache())  # a fresh, cold decoded-chunk cache every time
        return arr.read(arr.bounds).nbytes

    def ts_plain() -> int:
        import tensorstore as ts

        # Tensorstore used directly, the textbook way: no decoded-chunk cache, one read() of everything.
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(level0.resolve())}},
                        read=True, context=context).result()
        return store.read().result().nbytes

    def iterate(block: int, halo: int, border: str = "constant") -> Callable[[], int]:
        def run() -> int:
            arr = open_array(path, cache=ChunkCache())
            spec = BlockSpec(block, halo_voxels=halo, border=border)  # type: ignore[arg-type]
            n = 0
            for b in BlockGrid(arr, spec, prefetch=args.prefetch):
                n += b.core().nbytes  # throughput counts the voxels each block owns, not its halo
            return n
        return run

    def zarr_blocks(block: int) -> Callable[[], int]:
        def run() -> int:
            z = zarr.open_array(str(level0), mode="r")
            n = 0
            for b in BlockGrid(open_array(path, cache=ChunkCache(0)), BlockSpec(block)).blocks():
                n += np.asarray(z[b.block_box.slices]).nbytes
            return n
        return run

    # (name, kind, block, function); kinds: whole, plain (no halo), halo, zarr.
    cases: list[tuple[str, str, int, Callable[[], int]]] = [
        ("tensorstore whole array, ts.read", "whole", 0, ts_plain),
        ("tensorstore whole array, EmArray", "whole", 0, ts_whole),
    ]
    for block in args.block:
        cases += [
            (f"iterator {block}^3, halo 0", "plain", block, iterate(block, 0)),
            (f"iterator {block}^3, halo {args.halo}", "halo", block, iterate(block, args.halo)),
            (f"iterator {block}^3, halo {args.halo} reflect", "halo", block, iterate(block, args.halo, "reflect")),
            (f"zarr-python slicing {block}^3", "zarr", block, zarr_blocks(block)),
        ]
    ts_whole(), ts_plain()  # untimed warm-up: thread pools, imports
    load_before = os.getloadavg()[0]
    results: dict[str, list[float]] = {name: [] for name, *_ in cases}
    for _ in range(args.repeats):
        for name, _, _, fn in cases:  # interleaved so that machine noise hits every method alike
            seconds, nbytes = timed(fn)
            assert nbytes == total, (name, nbytes, total)
            results[name].append(total / seconds / 1e6)
    median = {name: statistics.median(v) for name, v in results.items()}
    whole = max(median[name] for name, kind, *_ in cases if kind == "whole")  # the better of the two
    plain = {block: median[name] for name, kind, block, _ in cases if kind == "plain"}

    print(f"volume {args.size}^3 uint8 ({total / 1e6:.0f} MB), chunks 64^3, shards 256^3, blosc zstd; "
          f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}; "
          f"prefetch {args.prefetch}; median of {args.repeats} runs (MB/s of array voxels delivered); "
          f"load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"{'method':34s} {'MB/s':>7s}  {'runs':18s} comparison")
    rows = []
    for name, kind, block, _ in cases:
        m = median[name]
        note = {
            "whole": "the practical limit (the faster whole-array read)" if m == whole else "",
            "plain": f"{m / whole:.2f}x whole-array rate (target >= 0.8x)",
            "halo": f"costs {plain.get(block, m) / m:.2f}x the time of halo 0 (target <= 1.3x)",
            "zarr": f"iterator is {plain.get(block, m) / m:.2f}x faster (target >= 2x)",
        }[kind]
        runs = " ".join(f"{v:.0f}" for v in results[name])
        print(f"{name:34s} {m:7.0f}  {runs:18s} {note}")
        rows.append({"method": name, "median_mb_s": m, "runs_mb_s": results[name], "note": note})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
