"""Benchmark block-wise access. Default ``--suite reads``: issue 12's iterator rows, every case once per repeat,
interleaved, each row the median (min..max) of per-repeat ratios (wall time; CPU-time ratio alongside):
the block iterator vs the decode limit (numcodecs blosc decoding the shard files' chunk bytes on 2 threads)
and vs a hand-written tensorstore loop (4 reads in flight), halo 16 vs halo 0 (constant, reflect), for
128^3 and 256^3 blocks, and the torch DataLoader (0 workers) vs the bare sampler. ``--suite scale``:
DataLoader workers, a dask LocalCluster vs. one process, and streaming from a loopback S3 vs. local files.
``--suite layouts``: the block iterator on the stages' shards (256 x 512 x 512) vs the previous 256^3, the same
size of volume, interleaved (issue 12: the layout chosen for ``dvc pull`` must not slow the iterator)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access import BlockGrid, BlockSpec, ChunkCache, EmArray, open_array
from emdata.ngff import UINT8_SHARDS, Geometry, create_image_group, write_block_aligned

HERE = Path(__file__).resolve().parent


def em_like_slab(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Blurred blobs plus noise: compresses roughly like EM (zstd ratio ~1.5-3), unlike zeros or white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 220, [s // 8 + 1 for s in shape]).astype(np.float32)
    up = coarse.repeat(8, 0).repeat(8, 1).repeat(8, 2)[: shape[0], : shape[1], : shape[2]]
    return np.clip(up + rng.normal(0, 10, shape).astype(np.float32), 0, 255).astype(np.uint8)


def build_volume(path: Path, size: int, shards: tuple[int, int, int] = UINT8_SHARDS) -> Path:
    """A ``size``^3 uint8 OME-Zarr with the stages' layout (64^3 chunks, 256 x 512 x 512 shards, blosc zstd);
    a volume left by an earlier run with other shards is rebuilt."""
    marker = path / ".complete"
    if marker.exists() and marker.read_text() == repr(shards):
        return path
    _, arrays = create_image_group(path, name="bench", shape=(size,) * 3, dtype="uint8",
                                   geometry=Geometry((8.0, 8.0, 8.0)), n_levels=1,
                                   chunks=(64, 64, 64), shards=shards)
    class Source:
        def __getitem__(self, sl: tuple[slice, ...]) -> np.ndarray:
            shape = tuple(s.stop - s.start for s in sl)
            return em_like_slab(shape, seed=hash(tuple(s.start for s in sl)) % 2**32)  # type: ignore[arg-type]

    write_block_aligned(arrays[0], Source(), slab=shards)
    marker.write_text(repr(shards))
    return path


def warm_page_cache(path: Path) -> None:
    """Read every file of level 0 once: every method then reads from memory, not a cold disk."""
    for f in (path / "0").rglob("*"):
        if f.is_file():
            f.read_bytes()


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def augment(data: np.ndarray, seed: int) -> np.ndarray:
    """What a training loop does to each sample on the CPU: random flips and transpose, normalise, noise."""
    rng = np.random.default_rng(seed)
    x = data.astype(np.float32)
    for axis in range(3):
        if rng.random() < 0.5:
            x = np.flip(x, axis)
    if rng.random() < 0.5:
        x = x.transpose(0, 2, 1)
    x = (x - x.mean()) / (x.std() + 1e-6)
    return np.ascontiguousarray(x + rng.normal(0, 0.05, x.shape).astype(np.float32))


class AugmentedSamples:
    """A map-style dataset: sample i of a RandomBlockSampler, augmented (module level: picklable)."""

    def __init__(self, sampler: object, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> object:
        import torch

        block = self.sampler.sample(i)["raw"]  # type: ignore[attr-defined]
        return torch.from_numpy(augment(block.data, i))[None]


def gaussian_model(data: np.ndarray) -> np.ndarray:
    """A stand-in for a network on the CPU: a 3-D Gaussian filter (uses the halo)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(data.astype(np.float32), sigma=2.0)


def waiting_model(data: np.ndarray) -> np.ndarray:
    """A model that waits 20 ms per block (a GPU or a remote service) and uses almost no CPU."""
    time.sleep(0.02)
    return data.astype(np.float32)


def per_sample_cost(path: str, n: int, queue: object = None) -> tuple[float, float]:
    """Wall and CPU milliseconds per augmented sample, measured in the calling process."""
    from emdata.access import RandomBlockSampler

    arr = open_array(path, cache=ChunkCache(0))
    ds = AugmentedSamples(RandomBlockSampler({"raw": arr}, 64, seed=0, prefetch=0), n + 1)
    ds[0]
    t, c = time.perf_counter(), time.process_time()
    for i in range(1, n + 1):
        ds[i]
    out = ((time.perf_counter() - t) / n * 1e3, (time.process_time() - c) / n * 1e3)
    if queue is not None:
        queue.put(out)  # type: ignore[attr-defined]
    return out


def scale_suite(args: argparse.Namespace) -> None:
    """DataLoader workers, dask LocalCluster vs. one process, loopback S3 vs. local: ratios side by side."""

    import torch


    path = build_volume(args.out / f"bench_{args.size}.zarr", args.size)
    warm_page_cache(path)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, object]] = []

    def report(name: str, values: list[float], unit: str, note: str = "") -> float:
        m = statistics.median(values)
        print(f"{name:58s} {m:9.1f} {unit:10s} runs {' '.join(f'{v:.1f}' for v in values)}  {note}")
        rows.append({"case": name, "median": m, "unit": unit, "runs": values, "note": note})
        return m

    if "loader" in args.parts:
        loader_part(args, path, report)
    if "dask" in args.parts:
        dask_part(args, path, report)
    if "stream" in args.parts:
        stream_part(args, path, report)
    print(f"\nload average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


Report = Callable[..., float]


def loader_part(args: argparse.Namespace, path: Path, report: Report) -> None:
    from emdata.access import RandomBlockSampler
    from emdata.access.torch import data_loader, safe_start_method, sampler_dataset

    # 1. DataLoader: samples/s with 0, 1, 2 workers. Each sample is a random 64^3 block read with no decoded
    # chunk cache (ChunkCache(0): every sample decodes its chunks) and augmented on the CPU.
    n = args.samples
    arr = open_array(path, cache=ChunkCache(0))
    sampler = RandomBlockSampler({"raw": arr}, 64, seed=0, prefetch=0)
    dataset = AugmentedSamples(sampler, n)
    print(f"\n== DataLoader ({n} samples of 64^3 uint8 per epoch, no chunk cache, augment on CPU; "
          f"workers start with {safe_start_method()}; batch 8; samples/s of the second epoch, persistent workers)")
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    first_epoch: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for w in args.workers:
            loader = data_loader(dataset, batch_size=8, num_workers=w, persistent_workers=w > 0)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            assert sum(b.shape[0] for b in loader) == n
            t1 = time.perf_counter()
            assert sum(b.shape[0] for b in loader) == n
            t2 = time.perf_counter()
            first_epoch[w].append(n / (t1 - t0))
            rates[w].append(n / (t2 - t1))
            del loader
    base = statistics.median(rates[args.workers[0]])
    for w in args.workers:
        report(f"DataLoader, {w} workers, first epoch (incl. worker start)", first_epoch[w], "samples/s")
        m = report(f"DataLoader, {w} workers, steady state", rates[w], "samples/s")
        if w:
            print(f"{'':58s} -> {m / base:.2f}x of {args.workers[0]} workers (target for 2: >= 1.6x)")

    # Is a sample dearer in the main process than in a worker? (It must not be: then the ratios above are
    # the parallelism alone; on a machine shared with other jobs they also include the CPU share that more
    # processes take from the others.)
    import multiprocessing

    ctx = multiprocessing.get_context(safe_start_method())
    costs: dict[str, list[tuple[float, float]]] = {"main process": [], "forkserver worker": []}
    for _ in range(args.repeats):
        costs["main process"].append(per_sample_cost(str(path), 60))
        q = ctx.Queue()
        proc = ctx.Process(target=per_sample_cost, args=(str(path), 60, q))
        proc.start()
        costs["forkserver worker"].append(q.get())
        proc.join()
    for where, v in costs.items():
        report(f"one sample in the {where}: CPU ms (wall ms {statistics.median(w for w, _ in v):.1f})",
               [c for _, c in v], "ms CPU")

    # The same with the library's iterable dataset and no augmentation: the read path alone.
    plain: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for w in args.workers:
            sm = RandomBlockSampler({"raw": arr}, 64, seed=1, prefetch=0, num_samples=n)
            loader = data_loader(sampler_dataset(sm), batch_size=8, num_workers=w, persistent_workers=w > 0)
            list(loader)
            t0 = time.perf_counter()
            got = sum(b["raw"]["data"].shape[0] for b in loader)
            plain[w].append(got / (time.perf_counter() - t0))
            del loader
    base_plain = statistics.median(plain[args.workers[0]])
    for w in args.workers:
        m = report(f"sampler_dataset, read only, {w} workers, steady state", plain[w], "samples/s")
        if w:
            print(f"{'':58s} -> {m / base_plain:.2f}x of {args.workers[0]} workers")



def dask_part(args: argparse.Namespace, path: Path, report: Report) -> None:
    import shutil
    import tempfile

    import distributed

    from emdata.access.dask import map_blocks

    # 2. dask: LocalCluster with 2 worker processes vs. the same tasks in this process.
    spec = BlockSpec(64, halo_voxels=8, border="reflect")
    grid = BlockGrid(open_array(path), spec, prefetch=0)
    tmp = Path(tempfile.mkdtemp(prefix="emdata-bench-"))
    print(f"\n== dask map_blocks: {len(grid)} blocks of 64^3 (+ halo 8), gaussian filter sigma 2 as the model, "
          f"blend none (crop-and-stitch), one task per 256^3 output shard")
    t0 = time.perf_counter()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        start_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {}
        for model in (gaussian_model, waiting_model):
            single, cluster = times.setdefault(f"{model.__name__}, single process", []), times.setdefault(
                f"{model.__name__}, LocalCluster 2 processes", [])
            for r in range(args.repeats):
                res = map_blocks(model, grid, tmp / f"single{r}.zarr", blend="none", overwrite=True)
                single.append(res.seconds)
                res2 = map_blocks(model, grid, tmp / f"cluster{r}.zarr", client=client, blend="none", overwrite=True)
                cluster.append(res2.seconds)
        overlap = BlockGrid(open_array(path), BlockSpec(64, halo_voxels=8, overlap_voxels=16), prefetch=0)
        ovl = map_blocks(gaussian_model, overlap, tmp / "overlap.zarr", client=client, blend="smooth")
    print(f"(cluster start {start_s:.1f} s, not counted)")
    for model in ("gaussian_model", "waiting_model"):
        s = report(f"{model}, single process (client=None)", times[f"{model}, single process"], "s")
        c = report(f"{model}, LocalCluster 2 worker processes", times[f"{model}, LocalCluster 2 processes"], "s")
        print(f"{'':58s} -> cluster speed-up {s / c:.2f}x")
    print(f"{'':58s} blocks computed: blend none {res.blocks_computed}/{res.n_blocks}; smooth with overlap 16: "
          f"{ovl.blocks_computed}/{ovl.n_blocks} ({ovl.blocks_computed / ovl.n_blocks:.2f}x, blocks on shard "
          f"borders are computed by each shard's task)")
    shutil.rmtree(tmp, ignore_errors=True)


def stream_part(args: argparse.Namespace, path: Path, report: Report) -> None:
    # 3. Streaming: all 128^3 blocks through open_array from a loopback S3 (moto) vs. the local files.
    import s3fs

    from emdata.offline import services

    env = {"AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local",
           "AWS_DEFAULT_REGION": "us-east-1"}
    print("\n== streaming: every 128^3 block of the volume (MB/s of voxels delivered)")
    with services.s3(["bench"], env=env) as endpoint:
        opts = {"endpoint_url": endpoint, "key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}
        fs = s3fs.S3FileSystem(**opts)
        fs.put(str(path), "bench/vol.zarr", recursive=True)
        total = args.size**3

        def read_all(a: object) -> int:
            return sum(b.data.nbytes for b in BlockGrid(a, BlockSpec(128)))  # type: ignore[arg-type, misc]

        cases = {
            "local, tensorstore": lambda: open_array(path, cache=ChunkCache()),
            "local, zarr-python": lambda: open_array(path, backend="zarr", cache=ChunkCache()),
            "loopback S3 (moto), emdata remote shard reader + s3fs": lambda: open_array(
                "s3://bench/vol.zarr", storage_options=opts, cache=ChunkCache()),
            "loopback S3 (moto), zarr-python + s3fs": lambda: open_array(
                "s3://bench/vol.zarr", storage_options=opts, backend="zarr", cache=ChunkCache()),
        }
        res_s: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, opener in cases.items():
                a = opener()
                t0 = time.perf_counter()
                assert read_all(a) == total
                res_s[name].append(total / (time.perf_counter() - t0) / 1e6)
        med = {name: report(name, v, "MB/s") for name, v in res_s.items()}
        s3_new, s3_old = med["loopback S3 (moto), emdata remote shard reader + s3fs"], med["loopback S3 (moto), zarr-python + s3fs"]
        print(f"{'':58s} -> S3 / local tensorstore {s3_new / med['local, tensorstore']:.2f}x; "
              f"S3 emdata / S3 zarr-python {s3_new / s3_old:.2f}x")


# -- the "reads" suite: the iterator rows of issue 12 ---------------------------------------------------------
SHARD_INDEX_EMPTY = 2**64 - 1


def shard_chunk_ranges(level0: Path) -> list[tuple[Path, list[tuple[int, int]]]]:
    """Each shard file of a sharded zarr v3 array and the (offset, nbytes) of its stored chunks.

    The index (``index_location`` "end", little-endian uint64 pairs, then a crc32c) is parsed here so that the
    decode limit does no work the voxels don't need; missing chunks (offset = nbytes = 2^64-1) are skipped.
    """
    meta = json.loads((level0 / "zarr.json").read_text())
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["index_location"] == "end", codec
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = codec["configuration"]["chunk_shape"]
    n_chunks = int(np.prod([s // c for s, c in zip(shard, inner, strict=True)]))
    out = []
    for f in sorted(p for p in (level0 / "c").rglob("*") if p.is_file()):
        with f.open("rb") as fh:
            fh.seek(-(n_chunks * 16 + 4), os.SEEK_END)
            index = np.frombuffer(fh.read(n_chunks * 16), "<u8").reshape(-1, 2)
        out.append((f, [(int(o), int(n)) for o, n in index if o != SHARD_INDEX_EMPTY]))
    return out


def decode_limit(level0: Path, chunk_voxels: int, threads: int = 2) -> Callable[[], int]:
    """The least work that yields the voxels: read each shard file, blosc-decode its chunks on ``threads`` threads.

    numcodecs releases the GIL while decoding; each thread decodes into its own reused chunk buffer.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from numcodecs import Blosc, blosc

    blosc.use_threads = False  # one blosc thread per call: the parallelism is the pool's
    codec = Blosc()
    ranges = shard_chunk_ranges(level0)
    local = threading.local()

    def decode(view: memoryview) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(chunk_voxels, np.uint8)
        codec.decode(view, out=buf)
        return buf.nbytes

    def run() -> int:
        n = 0
        with ThreadPoolExecutor(threads) as pool:
            futures = []
            for f, chunks in ranges:
                data = memoryview(f.read_bytes())
                futures += [pool.submit(decode, data[o:o + size]) for o, size in chunks]
            n = sum(fut.result() for fut in futures)
        return n
    return run


def block_starts(size: int, block: int) -> list[tuple[int, int, int]]:
    return [(z, y, x) for z in range(0, size, block) for y in range(0, size, block) for x in range(0, size, block)]


def hand_written(level0: Path, size: int, block: int, in_flight: int = 4) -> Callable[[], int]:
    """The obvious tensorstore loop: open level 0, read the blocks in C order with ``in_flight`` futures."""
    from collections import deque

    def run() -> int:
        import tensorstore as ts

        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(level0.resolve())}},
                        read=True, context=ts.Context()).result()
        pending: deque = deque()
        n = 0
        for z, y, x in block_starts(size, block):
            pending.append(store[z:z + block, y:y + block, x:x + block].read())
            if len(pending) >= in_flight:
                n += pending.popleft().result().nbytes
        while pending:
            n += pending.popleft().result().nbytes
        return n
    return run


def iterate(path: Path, block: int, halo: int, border: str, prefetch: int | None,
            tensorstore_only: bool = False) -> Callable[[], int]:
    def run() -> int:
        arr = open_array(path, cache=ChunkCache())  # a fresh, cold decoded-chunk cache every time
        if tensorstore_only:  # the read path before emdata.shards: every chunk through tensorstore
            import dataclasses

            arr = dataclasses.replace(arr, _direct=None)
        spec = BlockSpec(block, halo_voxels=halo, border=border)  # type: ignore[arg-type]
        grid = BlockGrid(arr, spec) if prefetch is None else BlockGrid(arr, spec, prefetch=prefetch)
        n = 0
        for b in grid:
            n += b.core().nbytes  # the voxels each block owns, not its halo
        return n
    return run


def iterate_warm(arr: EmArray, block: int, halo: int, border: str, prefetch: int | None) -> Callable[[], int]:
    """The iterator over ``arr``, every chunk of which is already decoded in its cache: assembling blocks alone."""
    spec = BlockSpec(block, halo_voxels=halo, border=border)  # type: ignore[arg-type]

    def run() -> int:
        kwargs = {} if prefetch is None else {"prefetch": prefetch}
        grid = BlockGrid(arr, spec, release_chunks=False, **kwargs)  # the chunks stay for the next pass
        grid._keep = True  # aligned halo-0 blocks would otherwise decode again rather than use the cache
        return sum(b.core().nbytes for b in grid)
    return run


LARGE_VARIANTS = {  # name -> (release_chunks, reuse buffers of dropped chunks)
    "dropped behind the pass (default)": (None, True),
    "kept (release_chunks=False)": (False, True),
    "kept, no buffer reuse (the previous cache)": (False, False),
}


def one_pass(args: argparse.Namespace) -> None:
    """One halo pass over the large volume with a cache of half of it, as a fresh process runs it: prints JSON."""
    size = args.large_size
    path = args.out / f"bench_{size}.zarr"
    release, reuse = LARGE_VARIANTS[args.variant]
    cache = ChunkCache(size**3 // 2)
    if not reuse:
        cache._spare_limit = 0  # the cache before buffers were reused: every decode a new array
    grid = BlockGrid(open_array(path, cache=cache), BlockSpec(args.block[0], halo_voxels=args.halo),
                     release_chunks=release)
    t0, c0 = time.perf_counter(), time.process_time()
    n = peak = 0
    for b in grid:
        n += b.core().nbytes
        peak = max(peak, cache.nbytes)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "peak": peak,
                      "bytes": n}))


def large_volume_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """A halo pass over a volume twice the chunk cache (1 GiB against the default 512 MiB's bound), each pass in a
    fresh process as a user's inference run would be (the memory a previous case freed changes the next one's
    page faults): the chunks behind the pass dropped as it goes, their memory reused (the default there), vs kept
    in the LRU cache, with and without reusing evicted chunks' memory. Each case's largest cache content beside."""
    import subprocess
    import sys

    size = args.large_size
    path = build_volume(args.out / f"bench_{size}.zarr", size)
    warm_page_cache(path)
    default = next(iter(LARGE_VARIANTS))
    cases = [(block, 0, default) for block in args.block]
    cases += [(block, args.halo, variant) for block in args.block for variant in LARGE_VARIANTS]
    seconds: dict[tuple[int, int, str], list[float]] = {c: [] for c in cases}
    cpu: dict[tuple[int, int, str], list[float]] = {c: [] for c in cases}
    peaks: dict[tuple[int, int, str], int] = {}
    for _ in range(args.large_repeats):
        for block, halo, variant in cases:
            out = subprocess.run([sys.executable, __file__, "--suite", "pass", "--large-size", str(size), "--block",
                                  str(block), "--halo", str(halo), "--variant", variant, "--out", str(args.out)],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            assert got["bytes"] == size**3, got
            seconds[(block, halo, variant)].append(got["seconds"])
            cpu[(block, halo, variant)].append(got["cpu"])
            peaks[(block, halo, variant)] = max(peaks.get((block, halo, variant), 0), got["peak"])
    print(f"\nhalo {args.halo} over a {size}^3 volume ({size**3 / 2**20:.0f} MiB) with a cache of half of it, each "
          f"pass in a fresh process ({args.large_repeats} repeats, interleaved): median seconds, largest cache "
          f"content")
    for c in cases:
        print(f"  {c[0]}^3 blocks, halo {c[1]}, {c[2]}: {statistics.median(seconds[c]):.2f} s, "
              f"{peaks[c] / 2**20:.0f} MiB")
    rows = []
    for block in args.block:
        new = (block, args.halo, default)
        for variant in list(LARGE_VARIANTS)[1:]:
            old = (block, args.halo, variant)
            rows.append(ratio_row(
                f"{block}^3 blocks, halo {args.halo}, a {size}^3 volume twice the cache: chunks dropped behind the "
                f"pass (default; cache peak {peaks[new] / 2**20:.0f} MiB) vs {variant} (cache peak "
                f"{peaks[old] / 2**20:.0f} MiB), speed", ratios(old, new, seconds), ratios(old, new, cpu),
                str(old), str(new), None, True, "(measured)"))
        h0 = (block, 0, default)
        rows.append(ratio_row(
            f"{block}^3 blocks, a {size}^3 volume twice the cache, fresh process: halo {args.halo} vs halo 0 (time)",
            ratios(new, h0, seconds), ratios(new, h0, cpu), str(new), str(h0), None, False, "(measured)"))
    return rows


def sampler_cases(path: Path, n: int, block: int, batch: int) -> dict[str, Callable[[], int]]:
    """The bare RandomBlockSampler vs the same samples through the torch adapter (DataLoader, 0 workers), its
    batches without a loader, and the per-item path it replaced (torch's DataLoader batching items with collate)."""
    from emdata.access import RandomBlockSampler

    def sampler() -> RandomBlockSampler:
        return RandomBlockSampler({"raw": open_array(path, cache=ChunkCache())}, block, seed=0, num_samples=n)

    def bare() -> int:
        return sum(s["raw"].data.nbytes for s in sampler())

    def loader() -> int:
        from emdata.access.torch import data_loader, sampler_dataset

        return sum(b["raw"]["data"].numel() * b["raw"]["data"].element_size()
                   for b in data_loader(sampler_dataset(sampler()), batch_size=batch, num_workers=0))

    def batches() -> int:
        from emdata.access.torch import sampler_dataset

        return sum(b["raw"]["data"].numel() * b["raw"]["data"].element_size()
                   for b in sampler_dataset(sampler()).batches(batch))

    def per_item() -> int:
        from torch.utils.data import DataLoader

        from emdata.access.torch import collate, sampler_dataset

        return sum(b["raw"]["data"].numel() * b["raw"]["data"].element_size()
                   for b in DataLoader(sampler_dataset(sampler()), batch_size=batch, collate_fn=collate))
    return {"bare sampler": bare, "torch DataLoader, 0 workers": loader, "torch dataset batches, no loader": batches,
            "torch DataLoader batching items, 0 workers": per_item}


def run_interleaved(cases: dict[str, tuple[Callable[[], int], int]], repeats: int,
                    seconds: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """Every case once per repeat, interleaved (machine noise hits every case alike); wall and CPU seconds of
    each run appended to ``seconds``/``cpu``; each run must deliver the bytes its case names."""
    for name in cases:
        seconds.setdefault(name, [])
        cpu.setdefault(name, [])
    for _ in range(repeats):
        for name, (fn, expect) in cases.items():
            c0 = time.process_time()
            t, nbytes = timed(fn)
            cpu[name].append(time.process_time() - c0)
            assert nbytes == expect, (name, nbytes, expect)
            seconds[name].append(t)


def ratios(num: Hashable, den: Hashable, times: Mapping[Any, list[float]]) -> list[float]:
    """Per repeat: case ``num``'s time / case ``den``'s."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def ratio_row(row: str, ratios: list[float], cpu_ratios: list[float], num: str, den: str, target: float | None,
              higher: bool, label: str = "") -> dict[str, object]:
    """Print one row (median (min..max) of per-repeat ratios, the CPU median, the target or ``label`` for a
    measured limit without one) and return it as the JSON row."""
    med, cmed = statistics.median(ratios), statistics.median(cpu_ratios)
    met = None if target is None else (med >= target if higher else med <= target)
    status = (label + "  " if label else "") if target is None else (
        f"target {'>=' if higher else '<='} {target}x {'met' if met else 'NOT met'}  ")
    print(f"{med:5.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) [cpu {cmed:.2f}x]  {status}{row}")
    return {"row": row, "median": med, "min": min(ratios), "max": max(ratios), "per_repeat": ratios,
            "cpu_median": cmed, "cpu_per_repeat": cpu_ratios, "target": target, "higher_is_better": higher,
            "met": met, "numerator": num, "denominator": den, "label": label}


def reads_suite(args: argparse.Namespace) -> None:
    """Issue 12's iterator rows, side by side: every case once per repeat, interleaved; ratios per repeat."""
    assert args.size % 64 == 0, "the volume edge must be a multiple of the 64^3 chunk"
    path = build_volume(args.out / f"bench_{args.size}.zarr", args.size)
    level0 = path / "0"
    total = args.size**3
    warm_page_cache(path)
    n_samples = args.samples_reads
    sample_bytes = n_samples * args.sample_block**3
    # name -> (function, the bytes it must deliver)
    cases: dict[str, tuple[Callable[[], int], int]] = {
        "decode limit (blosc-zstd, 2 threads)": (decode_limit(level0, 64**3), total)}
    for block in args.block:
        cases[f"iterator {block}^3"] = (iterate(path, block, 0, "constant", args.prefetch), total)
        cases[f"hand-written ts loop {block}^3"] = (hand_written(level0, args.size, block), total)
        cases[f"iterator {block}^3 halo {args.halo} constant"] = (
            iterate(path, block, args.halo, "constant", args.prefetch), total)
        cases[f"iterator {block}^3 halo {args.halo} reflect"] = (
            iterate(path, block, args.halo, "reflect", args.prefetch), total)
        if args.tensorstore_path:
            cases[f"iterator {block}^3, tensorstore path"] = (
                iterate(path, block, 0, "constant", args.prefetch, True), total)
            cases[f"iterator {block}^3 halo {args.halo} constant, tensorstore path"] = (
                iterate(path, block, args.halo, "constant", args.prefetch, True), total)
    for name, fn in sampler_cases(path, n_samples, args.sample_block, args.batch).items():
        cases[name] = (fn, sample_bytes)
    for fn, _ in cases.values():  # untimed warm-up: thread pools, imports
        fn()
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    run_interleaved(cases, args.repeats, seconds, cpu)
    if args.halo_floor:
        # After the cases above, not among them: the warm array's decoded chunks (the whole volume, in one cache)
        # slowed the cold cases measurably when they were interleaved (iterator vs hand-written loop 0.83x vs
        # 0.98x). The warm cases run interleaved with each other, as many repeats, and the cache is dropped after.
        warm = open_array(path, cache=ChunkCache())  # 512 MiB: every decoded chunk of the volume fits
        warm_cases: dict[str, tuple[Callable[[], int], int]] = {}
        for block in args.block:
            warm_cases[f"iterator {block}^3 warm"] = (iterate_warm(warm, block, 0, "constant", args.prefetch), total)
            for border in ("constant", "reflect"):
                warm_cases[f"iterator {block}^3 halo {args.halo} {border} warm"] = (
                    iterate_warm(warm, block, args.halo, border, args.prefetch), total)
        for fn, _ in warm_cases.values():  # fills the cache (untimed)
            fn()
        assert warm.cache.nbytes >= total, "every chunk must be in the warm cache"
        cases.update(warm_cases)
        run_interleaved(warm_cases, args.repeats, seconds, cpu)
        del warm, warm_cases

    # (row, numerator case, denominator case, target, higher is better): ratio = numerator time / denominator time
    specs: list[tuple[str, str, str, float, bool]] = []
    for block in args.block:
        specs += [
            (f"block iterator, {block}^3 aligned blocks, vs decoding the same shards' bytes with blosc-zstd on "
             f"both cores (the decode limit)", "decode limit (blosc-zstd, 2 threads)", f"iterator {block}^3", 0.9,
             True),
            (f"block iterator vs the obvious hand-written tensorstore loop over the same {block}^3 blocks "
             f"(4 reads in flight)", f"hand-written ts loop {block}^3", f"iterator {block}^3", 1.0, True),
            (f"halo {args.halo} cost vs halo 0, {block}^3 blocks, constant border",
             f"iterator {block}^3 halo {args.halo} constant", f"iterator {block}^3", 1.2, False),
            (f"halo {args.halo} cost vs halo 0, {block}^3 blocks, reflect border",
             f"iterator {block}^3 halo {args.halo} reflect", f"iterator {block}^3", 1.2, False),
        ]
    if args.tensorstore_path:
        for block in args.block:
            specs += [
                (f"(extra) block iterator {block}^3 vs the same iterator reading every chunk through tensorstore",
                 f"iterator {block}^3, tensorstore path", f"iterator {block}^3", 1.0, True),
                (f"(extra) halo {args.halo} cost vs halo 0, {block}^3 blocks, constant border, tensorstore path",
                 f"iterator {block}^3 halo {args.halo} constant, tensorstore path", f"iterator {block}^3, tensorstore path",
                 1.2, False),
            ]
    specs.append((f"torch adapter, DataLoader with 0 workers (batch {args.batch}), vs the bare sampler "
                  f"({n_samples} random {args.sample_block}^3 samples)", "bare sampler",
                  "torch DataLoader, 0 workers", 0.9, True))
    # Where the adapter's time goes, beside that row: its batches without a loader, and the per-item path it replaced.
    limits = [("the torch adapter's batches (SamplerDataset.batches) without a DataLoader vs the bare sampler "
               "(what making batch tensors costs)", "bare sampler", "torch dataset batches, no loader"),
              ("the per-item path it replaced: torch.utils.data.DataLoader batching the dataset's items with "
               "collate, 0 workers, vs the bare sampler", "bare sampler", "torch DataLoader batching items, 0 workers")]

    print(f"volume {args.size}^3 uint8 ({total / 1e6:.0f} MB), chunks 64^3, shards {'x'.join(map(str, UINT8_SHARDS))}, blosc zstd; "
          f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}; "
          f"{args.repeats} repeats, cases interleaved; load average before/after "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"{'case':44s} {'MB/s median':>11s}  {'MB per CPU-s':>12s}  MB/s per repeat")
    for name, (_, expect) in cases.items():
        rates = [expect / t / 1e6 for t in seconds[name]]
        print(f"{name:44s} {statistics.median(rates):11.0f}  {expect / statistics.median(cpu[name]) / 1e6:12.0f}  "
              f"{' '.join(f'{r:.0f}' for r in rates)}")
    print("\nratios, median (min..max) of per-repeat ratios of wall time (speed ratios: >1 is faster; halo rows: "
          "time ratio); [cpu: the same ratio of CPU seconds]")
    rows = [ratio_row(row, ratios(num, den, seconds), ratios(num, den, cpu), num, den, target, higher)
            for row, num, den, target, higher in specs]
    rows += [ratio_row(row, ratios(num, den, seconds), ratios(num, den, cpu), num, den, None, True,
                       "(measured split)") for row, num, den in limits]
    if args.halo_floor:
        # What the halo would cost if decoding cost it nothing: halo 0's time plus the extra time that assembling
        # the halo blocks takes with every chunk already decoded (both grids' chunks in the cache), per repeat.
        print(f"\nhalo floor, per repeat: 1 + (halo {args.halo} warm - halo 0 warm) / halo 0 cold (time; [cpu]); the "
              f"warm cases ran after the others (repeat k of each paired)")
        for block in args.block:
            for border in ("constant", "reflect"):
                h0, w0 = f"iterator {block}^3", f"iterator {block}^3 warm"
                w16 = f"iterator {block}^3 halo {args.halo} {border} warm"
                floors = [1 + (a - b) / c for a, b, c in zip(seconds[w16], seconds[w0], seconds[h0], strict=True)]
                cfloors = [1 + (a - b) / c for a, b, c in zip(cpu[w16], cpu[w0], cpu[h0], strict=True)]
                row = (f"halo {args.halo} vs halo 0, {block}^3 blocks, {border} border: the floor set by assembling "
                       f"the halo blocks from decoded chunks alone")
                rows.append(ratio_row(row, floors, cfloors, w16, h0, None, False))
    if args.large_size:
        rows += large_volume_rows(args)
    if args.json:
        args.json.write_text(json.dumps({
            "suite": "reads", "size": args.size, "repeats": args.repeats, "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg()[0], "rows": rows,
            "seconds": seconds, "cpu_seconds": cpu}, indent=1))


def layouts_suite(args: argparse.Namespace) -> None:
    """BlockGrid over the same-size volume in the stages' shards vs 256^3 shards: speed new / old per repeat."""
    old, new = "256^3", "x".join(map(str, UINT8_SHARDS))
    vols = {old: build_volume(args.out / f"bench_{args.size}_256.zarr", args.size, (256, 256, 256)),
            new: build_volume(args.out / f"bench_{args.size}.zarr", args.size)}  # the reads suite's volume
    for path in vols.values():
        warm_page_cache(path)
    cases = [(block, halo) for block in args.block for halo in (0, args.halo)]
    times: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(args.repeats):
        for block, halo in cases:
            for name, path in vols.items():
                grid = BlockGrid(open_array(path), BlockSpec(block, halo_voxels=halo))
                t0 = time.perf_counter()
                for b in grid:
                    b.data.nbytes  # noqa: B018
                times.setdefault((block, halo, name), []).append(time.perf_counter() - t0)
    print(f"volume {args.size}^3 uint8, chunks 64^3, {args.repeats} repeats interleaved; speed {new} / {old} shards "
          f"(median, min..max of per-repeat ratios)")
    for block, halo in cases:
        ratios = [a / b for a, b in zip(times[(block, halo, old)], times[(block, halo, new)], strict=True)]
        print(f"- blocks {block}^3, halo {halo}: {statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})")


_SERVE = ("import sys; from pathlib import Path; from emdata.offline.replica.server import ReplicaServer; "
          "s = ReplicaServer(Path(sys.argv[1])); s.faults.latency_s = float(sys.argv[2]); print(s.base_url, flush=True); "
          "s.serve_forever()")


def remote_suite(args: argparse.Namespace) -> None:
    """Reading over the network: the benchmark volume served over HTTP by the replica server (its own process,
    ``--latency`` before every response, loopback), read by the grid and the sampler through emdata's remote shard
    reader (``open_array(url)``) and through zarr-python (``backend="zarr"``, the path before), each against one
    zarr-python read of the whole volume (every shard in one request, all at once: the least a pass can wait)."""
    import subprocess

    from emdata.access import RandomBlockSampler

    path = build_volume(args.out / f"bench_{args.remote_size}.zarr", args.remote_size)
    total = args.remote_size**3
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(path.parent), str(args.latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = f"{proc.stdout.readline().strip()}/{path.name}"
        block, halo, n_samples = args.block[0], args.halo, args.remote_samples

        def whole() -> int:
            arr = open_array(url, backend="zarr", cache=ChunkCache(0))
            return int(np.asarray(arr._store[...]).nbytes)

        def grid(backend: str, h: int) -> Callable[[], int]:
            def run() -> int:
                arr = open_array(url, backend=backend, cache=ChunkCache())  # type: ignore[arg-type]
                return sum(b.core().nbytes for b in BlockGrid(arr, BlockSpec(block, halo_voxels=h)))
            return run

        def samples(backend: str) -> Callable[[], int]:
            def run() -> int:
                arr = open_array(url, backend=backend, cache=ChunkCache())  # type: ignore[arg-type]
                sampler = RandomBlockSampler({"raw": arr}, args.sample_block, seed=0, num_samples=n_samples)
                return sum(s["raw"].data.nbytes for s in sampler)
            return run

        sample_bytes = n_samples * args.sample_block**3
        cases: dict[str, tuple[Callable[[], int], int]] = {"one zarr-python read of the whole volume": (whole, total)}
        for name, backend in (("emdata", "auto"), ("zarr-python", "zarr")):
            cases[f"grid {block}^3, {name}"] = (grid(backend, 0), total)
            cases[f"grid {block}^3 halo {halo}, {name}"] = (grid(backend, halo), total)
            cases[f"{n_samples} random {args.sample_block}^3 samples, {name}"] = (samples(backend), sample_bytes)
        probe = open_array(url)
        assert probe._direct is not None and probe._direct.remote, "the remote shard reader did not take the volume"
        for fn, _ in cases.values():  # untimed warm-up: connections, imports
            fn()
        seconds: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        run_interleaved(cases, args.remote_repeats, seconds, cpu)
    finally:
        proc.kill()
        proc.wait()
    print(f"\n== remote reads: {args.remote_size}^3 uint8 over HTTP (replica server, +{args.latency * 1000:.0f} ms per "
          f"response, loopback), {args.remote_repeats} repeats interleaved; s (min..max)")
    for name, ts in seconds.items():
        print(f"  {name:55s} {statistics.median(ts):6.2f} s ({min(ts):.2f}..{max(ts):.2f})")
    rows = []
    for what in (f"grid {block}^3", f"grid {block}^3 halo {halo}", f"{n_samples} random {args.sample_block}^3 samples"):
        new, old = f"{what}, emdata", f"{what}, zarr-python"
        rows.append(ratio_row(f"remote, {what}: emdata's remote shard reader vs zarr-python (speed)",
                              ratios(old, new, seconds), ratios(old, new, cpu), new, old, None, True, "(measured)"))
    for what in (f"grid {block}^3", f"grid {block}^3 halo {halo}"):
        new, limit = f"{what}, emdata", "one zarr-python read of the whole volume"
        rows.append(ratio_row(f"remote, {what}: emdata vs one read of the whole volume (speed)",
                              ratios(limit, new, seconds), ratios(limit, new, cpu), new, limit, None, True,
                              "(measured limit)"))
    if args.json is not None:
        args.json.write_text(json.dumps({"remote": rows, "seconds": seconds, "cpu": cpu}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=("reads", "scale", "layouts", "large", "pass", "remote"), default="reads",
                        help="reads: issue 12's iterator rows (default; with the large rows); scale: DataLoader "
                             "workers, dask, streaming; layouts: the iterator on the stages' shards vs 256^3; large: "
                             "only the halo pass over a volume twice the cache; pass: one such pass (internal); remote: "
                             "the grid and sampler over HTTP, emdata vs zarr-python")
    parser.add_argument("--samples", type=int, default=400, help="scale suite: samples per DataLoader epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="scale suite: worker counts")
    parser.add_argument("--parts", nargs="+", default=["loader", "dask", "stream"], choices=("loader", "dask", "stream"),
                        help="scale suite: which parts to run")
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic volume (voxels)")
    parser.add_argument("--block", type=int, nargs="+", default=[128, 256], help="reads: block edges (voxels)")
    parser.add_argument("--halo", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=None, help="reads: iterator prefetch (default: the library's)")
    parser.add_argument("--samples-reads", type=int, default=400, help="reads: random samples per sampler run")
    parser.add_argument("--sample-block", type=int, default=64, help="reads: edge of the random samples")
    parser.add_argument("--batch", type=int, default=8, help="reads: DataLoader batch size")
    parser.add_argument("--large-size", type=int, default=1024,
                        help="reads: edge of the volume twice the cache for the halo pass rows (0: skip them)")
    parser.add_argument("--large-repeats", type=int, default=3)
    parser.add_argument("--variant", choices=tuple(LARGE_VARIANTS), default=next(iter(LARGE_VARIANTS)),
                        help="pass (internal, one process per pass of large_volume_rows): the cache's variant")
    parser.add_argument("--no-halo-floor", dest="halo_floor", action="store_false",
                        help="reads: leave out the warm-cache cases (halo assembly alone) and the floor they give")
    parser.add_argument("--tensorstore-path", action="store_true",
                        help="reads: also time the iterator reading every chunk through tensorstore (the old path)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--remote-size", type=int, default=512, help="remote: edge of the volume served over HTTP")
    parser.add_argument("--remote-repeats", type=int, default=5)
    parser.add_argument("--remote-samples", type=int, default=100, help="remote: random samples per sampler run")
    parser.add_argument("--latency", type=float, default=0.02, help="remote: seconds before every response")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.suite == "scale":
        scale_suite(args)
    elif args.suite == "layouts":
        layouts_suite(args)
    elif args.suite == "large":
        large_volume_rows(args)
    elif args.suite == "pass":
        one_pass(args)
    elif args.suite == "remote":
        remote_suite(args)
    else:
        reads_suite(args)


if __name__ == "__main__":
    main()
