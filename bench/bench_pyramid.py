"""Benchmark OME-Zarr writing: streaming pyramid vs level 0, the mean reduction, zarr-python vs tensorstore."""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import tinybrain
import zarr

from emdata import ngff, pyramid
from emdata.shards import ShardReader, decode_pool, decode_threads

HERE = Path(__file__).resolve().parent

NOTES = """## What the cases are

- *old*: the sequence the sources ran before `ngff.write_image`: zarr-python writes of level 0, a read-back of
  level 0, then the pyramid as a second pass reading level 0 back (float32 mean + `np.rint`).
- *zarr* / *ts*: `ngff.write_image` with the zarr-python or the tensorstore backend: level 0 written shard by
  shard (each shard read back and compared unless *unverified*), the pyramid built from those shards as they
  pass (no second read of level 0), exact integer mean. *level 0* is the same call with `n_levels=1`, so
  *streaming pyramid / level 0* is the extra time the pyramid costs.
- *ts copy*: the obvious tensorstore copy, `store.write(array)` of the whole array into the same sharded zarr3
  layout (same zarr.json: chunks, shards, codec; the same array in memory): no read-back, no pyramid, all of
  tensorstore's threads at once. Both it and `write_image` are timed from an empty folder (creating the
  array's zarr.json included).
- *verified*: once written, each shard's chunks are decoded straight from the shard file (`emdata.shards`:
  the index checked against its crc32c, each chunk read and blosc-decoded; a tensorstore read-back without chunk
  cache where that reader does not apply) and compared voxel for voxel with the array handed to tensorstore: a
  wrong voxel on disk fails the write, naming the box and chunk. Decoding costs 0.5-0.8x the CPU of encoding
  (blosc-zstd, EM-like data), so on a CPU-bound machine a verified write stays near 0.5-0.65x of an unverified
  copy; *unverified* is the same write without that check.
- *ts copy + read-back*: the tensorstore copy, then every chunk decoded from the shard files on disk and
  compared voxel for voxel with the array (`read_back`: the same `emdata.shards` reader and decoding threads as
  the verified write): the like-for-like reference for a *verified* write, whose own check is that same
  read-back done while later shards encode. *decode of the copy*: the read-back without the comparison, the
  decode limit of the written bytes; *bound for a verified write* is the copy's speed over this reference's.
- The voxel sum: `write_image` returns the exact mean of the voxels (the stages' `mean_intensity`); a verified
  write of 8/16-bit voxels sums the chunks as the read-back compares them (decoded, in cache), an unverified
  write needs a pass of its own over each shard. *no voxel sum* stubs that sum out (measurement only) to show
  its cost next to the copy, which computes nothing.
- CPU seconds are the process's user+system time over all threads: on a shared machine they show the work
  done even when the wall time is stretched by other processes.
- Output: both backends write the same zarr.json and the same compressed chunks, and zarr-python reads them
  identically (tests/test_pyramid.py); tensorstore lays the chunks of a shard in C order where zarr-python
  uses Morton order, so shard files differ in byte order only. The zarr backend is byte-identical to the old
  sequence (tests/test_ngff.py). Mean pyramids are identical to the old reduction; labels now use mode
  (tinybrain) instead of striding, binary masks stay nearest.
"""
sys.path.insert(0, str(HERE))
from bench_access import em_like_slab  # noqa: E402

GEOMETRY = ngff.Geometry((8.0, 8.0, 8.0))


def _group(path: Path) -> zarr.Group:
    shutil.rmtree(path, ignore_errors=True)
    return zarr.open_group(str(path), mode="w", zarr_format=3)


Timing = tuple[float, float]  # wall seconds, CPU seconds of the process (all its threads)


def _clock() -> Timing:
    return time.perf_counter(), time.process_time()


def _since(t0: Timing) -> Timing:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def old_sequence(path: Path, data: np.ndarray, chunks: Sequence[int], shards: Sequence[int]) -> tuple[Timing, Timing]:
    """Before write_image: level 0, read back, then the pyramid as a second pass over level 0."""
    arrays = ngff.create_multiscale(_group(path), name="b", shape=data.shape, dtype=data.dtype, geometry=GEOMETRY,
                                    chunks=chunks, shards=shards)
    t0 = _clock()
    ngff.write_block_aligned(arrays[0], data)
    ngff.check_read_back(arrays[0], data, "bench")
    level0 = _since(t0)
    t1 = _clock()
    ngff.write_pyramid(arrays, "mean")
    return level0, _since(t1)


def new_image(path: Path, data: np.ndarray, chunks: Sequence[int], shards: Sequence[int], backend: str,
              n_levels: int | None = None, verify: bool = True) -> Timing:
    group = _group(path)
    t0 = _clock()
    ngff.write_image(group, name="b", source=data, geometry=GEOMETRY, chunks=chunks, shards=shards,
                     what="bench", backend=backend, n_levels=n_levels, verify=verify)  # type: ignore[arg-type]
    return _since(t0)


def ts_copy(path: Path, data: np.ndarray, chunks: Sequence[int], shards: Sequence[int]) -> Timing:
    """The obvious tensorstore copy of the same array into the same sharded zarr3 layout (no verify, no pyramid).

    Timed like ``new_image``: from an empty folder, creating the array (the same zarr.json) included."""
    group = _group(path)
    t0 = _clock()
    arrays = ngff.create_multiscale(group, name="b", shape=data.shape, dtype=data.dtype, geometry=GEOMETRY,
                                    chunks=chunks, shards=shards, n_levels=1)
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / arrays[0].path)}}).result()
    store.write(data).result()
    return _since(t0)


def read_back(path: Path, data: np.ndarray, compare: bool = True) -> None:
    """Decode every chunk of the level-0 array at ``path`` from its shard files and (``compare``) check it voxel
    for voxel against ``data``: the read-back ``write_image`` does (``emdata.shards.ShardReader``: each shard's
    index crc32c-checked, each chunk blosc-decoded, on the decoding threads, one thread's chunks per shard at a
    time), here over a finished copy. ``compare=False``: decoding alone, the decode limit of the written bytes."""
    reader = ShardReader.for_array(path, data.dtype, 0)
    assert reader is not None, f"{path}: not a layout emdata.shards reads"
    chunks, per = reader.chunks_shape, reader.per_shard
    by_shard: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for cidx in itertools.product(*(range(-(-s // c)) for s, c in zip(data.shape, chunks, strict=True))):
        by_shard.setdefault(tuple(i // p for i, p in zip(cidx, per, strict=True)), []).append(cidx)
    n = decode_threads()
    groups = [g for members in by_shard.values() for g in (members[i::n] for i in range(n)) if g]

    def check(members: list[tuple[int, ...]]) -> bool:
        for cidx, got in zip(members, reader.chunks(members, scratch=True), strict=True):
            if compare:
                box = tuple(slice(i * c, min(i * c + c, s)) for i, c, s in zip(cidx, chunks, data.shape, strict=True))
                if not np.array_equal(got[tuple(slice(0, b.stop - b.start) for b in box)], data[box]):
                    return False
        return True

    if not all(decode_pool().map(check, groups)):
        raise AssertionError(f"{path}: the copy does not read back equal")


def ts_copy_read_back(path: Path, data: np.ndarray, chunks: Sequence[int], shards: Sequence[int]) -> Timing:
    """The tensorstore copy, then every chunk read back from disk and compared: like for like with a verified
    ``write_image`` (the same check, done after the copy instead of while it runs)."""
    t0 = _clock()
    ts_copy(path, data, chunks, shards)
    read_back(path / "0", data)
    return _since(t0)


def decode_only(path: Path, data: np.ndarray) -> Timing:
    t0 = _clock()
    read_back(path / "0", data, compare=False)
    return _since(t0)


def without_sum(fn: Callable[[], Timing]) -> Timing:
    """``fn`` with ``ngff._exact_sum`` stubbed out (measurement only: the figures' ``mean`` is then wrong): what
    the exact voxel sum behind ``write_image``'s ``mean`` costs an unverified write, which has no read-back pass
    to compute it in."""
    real = ngff._exact_sum
    ngff._exact_sum = lambda data: 0.0  # type: ignore[assignment]
    try:
        return fn()
    finally:
        ngff._exact_sum = real


def pairwise_sum(block: np.ndarray) -> np.ndarray:
    """The reference: a uint16 pairwise sum of each 2x2x2 cell (no rounding, no division)."""
    s = block[0::2].astype(np.uint16) + block[1::2]
    s = s[:, 0::2] + s[:, 1::2]
    return s[:, :, 0::2] + s[:, :, 1::2]


def timeit(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return min(best)


def peak_memory(tmp: Path, size: int, shards: Sequence[int], backend: str, trace: bool = True) -> tuple[int, int]:
    """tracemalloc peak (numpy buffers included) of write_image from a generated Blocks source, and its figure."""
    def read(boxes: Sequence[ngff.Box]) -> Any:
        for box in boxes:
            yield em_like_slab(tuple(b.stop - b.start for b in box), seed=box[0].start)  # type: ignore[arg-type]

    source = ngff.Blocks((size, size, size), np.dtype(np.uint8), read)
    if trace:
        tracemalloc.start()
    figures = ngff.write_image(_group(tmp / f"mem{size}.zarr"), name="m", source=source, geometry=GEOMETRY,
                               chunks=(64, 64, 64), shards=shards, what="mem",
                               backend=backend)  # type: ignore[arg-type]
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    tracemalloc.stop()
    return peak, int(figures["pyramid_peak_bytes"])


def peak_rss(tmp: Path, size: int, shards: Sequence[int], backend: str) -> tuple[float, float]:
    """Max RSS (MB) of a fresh process writing a generated size^3 image, and of one that only imports."""
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into a child across fork and exec.
    code = ("import sys; sys.path.insert(0, {here!r}); from pathlib import Path; import bench_pyramid as b; "
            "{body}; print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])")
    body = f"b.peak_memory(Path({str(tmp)!r}), {size}, {tuple(shards)!r}, {backend!r}, trace=False)"
    out = []
    for b in (body, "None"):
        res = subprocess.run([sys.executable, "-c", code.format(here=str(HERE), body=b)], capture_output=True,
                             text=True, check=True)
        out.append(int(res.stdout.split()[-1]) / 1024)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic uint8 volume (voxels)")
    parser.add_argument("--shards", nargs="+", default=["256x512x512", "256", "128"],
                        help="shard shapes to test: an edge (cubic) or z x y x x; default: the stages' uint8 "
                             "shards (ngff.UINT8_SHARDS), 256^3 and 128^3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_pyramid.md")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pyramid_", dir=args.tmp))
    data = em_like_slab((args.size,) * 3, seed=0)
    chunks = (64, 64, 64)
    command = "python bench/bench_pyramid.py " + " ".join(sys.argv[1:])
    lines = [f"# OME-Zarr writing: pyramid, reduction, backends ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"Command: `{command.strip()}`. Machine: {platform.machine()}, {os.cpu_count()} cores "
             f"({platform.node()}), Python {platform.python_version()}, zarr {zarr.__version__}, tensorstore "
             f"{importlib.metadata.version('tensorstore')}. Volume: {args.size}^3 uint8 EM-like, chunks 64^3, blosc zstd 3. "
             f"Cases interleaved, {args.repeats} repeats; ratios are medians of per-repeat ratios (min..max).", ""]

    def ratio_row(name: str, values: list[float], target: str) -> str:
        return (f"| {name} | {statistics.median(values):.2f}x ({min(values):.2f}..{max(values):.2f}) | {target} |")

    for shard in args.shards:
        shards = tuple(int(v) for v in shard.split("x")) if "x" in shard else (int(shard),) * 3
        cases: dict[str, list[Timing]] = {k: [] for k in (
            "old level 0 (+read-back)", "old pyramid (2nd pass)", "zarr level 0", "zarr image+pyramid",
            "ts level 0", "ts image+pyramid", "ts level 0 unverified", "ts image+pyramid unverified", "ts copy",
            "ts copy + read-back", "decode of the copy", "ts level 0 unverified, no voxel sum")}
        for _ in range(args.repeats):
            l0, pyr = old_sequence(tmp / "old.zarr", data, chunks, shards)
            cases["old level 0 (+read-back)"].append(l0)
            cases["old pyramid (2nd pass)"].append(pyr)
            cases["zarr level 0"].append(new_image(tmp / "z0.zarr", data, chunks, shards, "zarr", n_levels=1))
            cases["zarr image+pyramid"].append(new_image(tmp / "z.zarr", data, chunks, shards, "zarr"))
            cases["ts level 0"].append(new_image(tmp / "t0.zarr", data, chunks, shards, "tensorstore", n_levels=1))
            cases["ts image+pyramid"].append(new_image(tmp / "t.zarr", data, chunks, shards, "tensorstore"))
            cases["ts level 0 unverified"].append(new_image(tmp / "u0.zarr", data, chunks, shards, "tensorstore",
                                                            n_levels=1, verify=False))
            cases["ts image+pyramid unverified"].append(new_image(tmp / "u.zarr", data, chunks, shards, "tensorstore",
                                                                  verify=False))
            cases["ts copy"].append(ts_copy(tmp / "c.zarr", data, chunks, shards))
            cases["ts copy + read-back"].append(ts_copy_read_back(tmp / "cr.zarr", data, chunks, shards))
            cases["decode of the copy"].append(decode_only(tmp / "cr.zarr", data))
            cases["ts level 0 unverified, no voxel sum"].append(without_sum(
                lambda: new_image(tmp / "n0.zarr", data, chunks, shards, "tensorstore", n_levels=1, verify=False)))
        mb = data.nbytes / 1e6
        lines += [f"## Shards {shard if 'x' in shard else shard + '^3'}", "", "| case | median wall s | level-0 MB/s (wall) | median CPU s |",
                  "|---|---:|---:|---:|"]
        for k, v in cases.items():
            wall, cpu = statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)
            lines.append(f"| {k} | {wall:.2f} | {mb / wall:.0f} | {cpu:.2f} |")
        lines += ["", "| ratio (per repeat; wall time, and CPU time) | wall: median (min..max) | CPU: median "
                  "(min..max) | target |", "|---|---|---|---|"]

        def row(name: str, f: Callable[[Callable[[str], np.ndarray]], np.ndarray], target: str) -> str:
            cells = []
            for i in (0, 1):
                v = list(f(lambda k: np.array([t[i] for t in cases[k]])))  # noqa: B023
                cells.append(f"{statistics.median(v):.2f}x ({min(v):.2f}..{max(v):.2f})")
            return f"| {name} | {cells[0]} | {cells[1]} | {target} |"

        lines += [
            row("old: pyramid (2nd pass) / level 0", lambda r: r("old pyramid (2nd pass)") /
                r("old level 0 (+read-back)"), "<= 0.5x"),
            row("zarr-python backend: streaming pyramid / level 0",
                lambda r: (r("zarr image+pyramid") - r("zarr level 0")) / r("zarr level 0"), "<= 0.5x"),
            row("tensorstore backend: streaming pyramid / level 0",
                lambda r: (r("ts image+pyramid") - r("ts level 0")) / r("ts level 0"), "<= 0.5x"),
            row("old level 0 (zarr-python, read back after) speed vs tensorstore copy",
                lambda r: r("ts copy") / r("old level 0 (+read-back)"), ">= 0.95x"),
            row("write_image level 0, zarr-python backend, verified: speed vs tensorstore copy",
                lambda r: r("ts copy") / r("zarr level 0"), ">= 0.95x"),
            row("write_image level 0, tensorstore backend, verified: speed vs tensorstore copy",
                lambda r: r("ts copy") / r("ts level 0"), ">= 0.95x"),
            row("write_image level 0, tensorstore backend, verified: speed vs tensorstore copy + read-back and "
                "compare (like for like)", lambda r: r("ts copy + read-back") / r("ts level 0"), ">= 0.95x"),
            row("bound for a verified write: tensorstore copy + read-back and compare, speed vs tensorstore copy",
                lambda r: r("ts copy") / r("ts copy + read-back"), "(ceiling of the verified rows)"),
            row("decode limit: decoding the written chunks (both cores), time / tensorstore copy time",
                lambda r: r("decode of the copy") / r("ts copy"), "(the read-back's own cost)"),
            row("write_image level 0, tensorstore backend, unverified: speed vs tensorstore copy",
                lambda r: r("ts copy") / r("ts level 0 unverified"), ">= 0.95x"),
            row("write_image level 0, tensorstore backend, unverified, voxel sum stubbed out (what the sum costs): "
                "speed vs tensorstore copy", lambda r: r("ts copy") / r("ts level 0 unverified, no voxel sum"),
                "(measurement only)"),
            row("write_image image+pyramid, tensorstore, verified: speed vs tensorstore copy",
                lambda r: r("ts copy") / r("ts image+pyramid"), "(end to end >= 0.6x)"),
            row("write_image image+pyramid, tensorstore, unverified: speed vs tensorstore copy",
                lambda r: r("ts copy") / r("ts image+pyramid unverified"), "(end to end >= 0.6x)"),
            ""]
        print("\n".join(lines[-32:]), flush=True)

    block = data[:256, :256, :256].copy()
    reductions = {
        "uint16 pairwise sum (reference)": lambda: pairwise_sum(block),
        "pyramid.mean (pairwise sum + round half to even)": lambda: pyramid.mean(block, (2, 2, 2)),
        "old float32 mean + np.rint": lambda: pyramid._mean_float32(block, (2, 2, 2)),
        "tinybrain averaging (truncates: not identical)": lambda: tinybrain.downsample_with_averaging(block.T, (2, 2, 2)),
    }
    red: dict[str, list[float]] = {k: [] for k in reductions}
    for _ in range(args.repeats):
        for k, fn in reductions.items():
            red[k].append(timeit(fn))
    same = np.array_equal(pyramid.mean(block, (2, 2, 2)), pyramid._mean_float32(block, (2, 2, 2)))
    ref = np.array(red["uint16 pairwise sum (reference)"])
    lines += ["## Mean reduction of one 256^3 uint8 block (2x2x2)", "",
              "| reduction | best s | vs uint16 pairwise sum |", "|---|---:|---|"]
    lines += [f"| {k} | {min(v):.4f} | {ratio_row('', list(np.array(v) / ref), '').split('|')[2].strip()} |"
              for k, v in red.items()]
    lines += ["", f"pyramid.mean output identical to the old float32 mean + np.rint: {same}. Target: within 1.5x "
              "of the pairwise sum.", ""]
    # The stages' 256 x 512 x 512 uint8 shard: pyramid.mean (z-slabs through per-thread scratch) vs the previous
    # code's one pass over the block (64 + 32 + 16 MiB of uint16, fresh pages every call), interleaved. This
    # process keeps glibc's default malloc settings, not the stages'.
    stage_shard = np.concatenate([block, block[:, ::-1]], axis=1)
    stage_shard = np.ascontiguousarray(np.concatenate([stage_shard, stage_shard[:, :, ::-1]], axis=2))

    def one_pass() -> np.ndarray:
        """The previous code's pyramid.mean (c8e0a51..72419d8): the whole block, a new array per halving."""
        acc: np.ndarray = stage_shard
        for axis in range(3):
            acc = np.add(acc[(slice(None),) * axis + (slice(0, None, 2),)],
                         acc[(slice(None),) * axis + (slice(1, None, 2),)], dtype=np.uint16)
        odd = np.right_shift(acc, 3)
        odd &= 1
        acc += odd
        acc += 3
        acc >>= 3
        return acc.astype(np.uint8)

    slab_s: dict[str, list[float]] = {"z-slabs": [], "one pass": []}
    for _ in range(args.repeats):
        slab_s["z-slabs"].append(timeit(lambda: pyramid.mean(stage_shard, (2, 2, 2))))
        slab_s["one pass"].append(timeit(one_pass))
    assert np.array_equal(pyramid.mean(stage_shard, (2, 2, 2)), one_pass())
    lines += [f"pyramid.mean of one {'x'.join(map(str, stage_shard.shape))} uint8 block (at the default --size, the stages' 256 x 512 x 512 shard): z-slabs "
              f"{min(slab_s['z-slabs']):.4f} s vs the previous code's one pass {min(slab_s['one pass']):.4f} s, "
              f"{ratio_row('', list(np.array(slab_s['one pass']) / np.array(slab_s['z-slabs'])), '').split('|')[2].strip()}"
              f" faster; the same voxels.", ""]
    seg = np.random.default_rng(0).integers(0, 50, (256, 256, 256)).astype(np.uint64)
    lines += [f"Mode (tinybrain) of one 256^3 uint64 block: {timeit(lambda: pyramid.mode(seg, (2, 2, 2))):.3f} s; "
              f"nearest: {timeit(lambda: pyramid.nearest(seg, (2, 2, 2))):.3f} s.", ""]

    lines += ["## Peak memory of write_image (generated source: the volume is never in memory)", "",
              "Peak RSS (VmHWM) of a fresh process writing a generated image with 256^3 shards, minus that of a "
              "process that only imports the same modules; tracemalloc peak (numpy buffers; tensorstore backend) "
              "and the pyramid's own unfinished-shard buffers.", "",
              "| volume | RSS MB, tensorstore backend | RSS MB, zarr-python backend | tracemalloc peak MB | "
              "pyramid buffers peak MB |", "|---|---:|---:|---:|---:|"]
    for size in args.memory_sizes:
        rss_ts, base = peak_rss(tmp, size, ngff.DEFAULT_SHARDS, "tensorstore")
        rss_zarr, _ = peak_rss(tmp, size, ngff.DEFAULT_SHARDS, "zarr")
        peak, buffers = peak_memory(tmp, size, ngff.DEFAULT_SHARDS, "tensorstore")
        lines.append(f"| {size}^3 ({size**3 / 1e6:.0f} MB) | {rss_ts - base:.0f} | {rss_zarr - base:.0f} | "
                     f"{peak / 1e6:.0f} | {buffers / 1e6:.0f} |")
    lines.append("")
    lines.append(NOTES)
    print("\n".join(lines[-30:]))
    args.out.write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
