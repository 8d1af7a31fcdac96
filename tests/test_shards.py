"""The direct shard reader (emdata.shards): the same voxels as zarr-python and tensorstore, or no reader."""

from __future__ import annotations

import dataclasses
import multiprocessing

import numpy as np
import pytest
import zarr
from access_fixtures import em_like, make_volume
from zarr.codecs import BloscCodec, GzipCodec

from emdata.access import BlockGrid, BlockSpec, Box, ChunkCache, open_array
from emdata.shards import CorruptShardError, ShardReader


def _in_padded(padded, pad, box):
    """``box`` of an array that ``padded`` holds with ``pad`` voxels added on every side."""
    return padded[tuple(slice(a + pad, z + pad) for a, z in zip(box.start, box.stop, strict=True))]


def _ome(path, arr_kwargs, data, region=(slice(None),) * 3):
    """A one-level OME-Zarr image whose level 0 is created with ``arr_kwargs``; ``data[region]`` is written."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    arr = root.create_array("0", shape=data.shape, dtype=data.dtype, **arr_kwargs)
    arr[region] = data[region]
    return path


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint64", "float32"])
def test_direct_reads_equal_zarr_python(tmp_path, dtype):
    # An edge that is no multiple of the chunk or shard: partial chunks and shards at the far side.
    data = (em_like((37, 45, 29), seed=3).astype(dtype) * (257 if dtype == "uint16" else 1))
    path = make_volume(tmp_path / "v.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    arr = open_array(path, cache=ChunkCache(0))
    assert arr._direct is not None and arr.backend == "tensorstore"
    reference = zarr.open_array(str(path / "0"), mode="r")[...]
    np.testing.assert_array_equal(arr.read(arr.bounds), reference)
    rng = np.random.default_rng(0)
    for _ in range(20):
        start = [int(rng.integers(0, s)) for s in data.shape]
        stop = [int(rng.integers(a + 1, s + 1)) for a, s in zip(start, data.shape, strict=True)]
        box = Box(tuple(start), tuple(stop))
        got = arr.read(box)
        assert got.dtype == reference.dtype
        np.testing.assert_array_equal(got, reference[box.slices])
        np.testing.assert_array_equal(got, dataclasses.replace(arr, _direct=None).read(box))


def test_missing_chunks_and_shards_read_as_fill_value(tmp_path):
    data = np.full((32, 32, 32), 700, np.uint16)
    region = (slice(3, 9), slice(20, 30), slice(1, 5))  # one shard of eight gets data; the others are never written
    path = _ome(tmp_path / "m.zarr", {"chunks": (8, 8, 8), "shards": (16, 16, 16), "fill_value": 5,
                                      "compressors": [BloscCodec(cname="zstd", clevel=3)]}, data, region)
    arr = open_array(path, cache=ChunkCache())
    assert arr._direct is not None
    expected = zarr.open_array(str(path / "0"), mode="r")[...]
    assert (expected == 5).any() and (expected == 700).sum() == 6 * 10 * 4
    np.testing.assert_array_equal(arr.read(arr.bounds), expected)
    assert len([p for p in (path / "0" / "c").rglob("*") if p.is_file()]) == 1  # the others are missing


def test_other_codecs_are_read_by_tensorstore(tmp_path):
    data = em_like((16, 16, 16))
    path = _ome(tmp_path / "g.zarr", {"chunks": (8, 8, 8), "shards": (16, 16, 16), "compressors": [GzipCodec()]},
                data)
    arr = open_array(path)
    assert arr._direct is None and arr.backend == "tensorstore"
    np.testing.assert_array_equal(arr.read(arr.bounds), data)
    unsharded = _ome(tmp_path / "u.zarr", {"chunks": (8, 8, 8)}, data)
    assert open_array(unsharded)._direct is None
    assert open_array(path, backend="zarr")._direct is None  # an explicit zarr backend stays zarr-python


def test_corrupt_shard_index_is_refused(tmp_path):
    path = make_volume(tmp_path / "c.zarr", em_like((16, 16, 16)), n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    (shard,) = [p for p in (path / "0" / "c").rglob("*") if p.is_file()]
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: its crc32c no longer matches
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="crc32c"):
        open_array(path, cache=ChunkCache(0)).read(Box((0, 0, 0), (4, 4, 4)))
    shard.write_bytes(bytes(raw[:-30]))  # truncated
    with pytest.raises(CorruptShardError):
        ShardReader.for_array(path / "0", np.dtype("uint8"), 0).chunk((0, 0, 0))


def _replace_chunk(shard, n_chunks, k, frame):
    """Rewrite a shard file (index at the end) so that chunk ``k`` is ``frame``, with a valid index checksum."""
    import google_crc32c

    raw = shard.read_bytes()
    body, index = raw[:-(n_chunks * 16 + 4)], np.frombuffer(raw[-(n_chunks * 16 + 4):-4], "<u8").reshape(-1, 2).copy()
    index[k] = (len(body), len(frame))
    packed = index.tobytes()
    shard.write_bytes(body + frame + packed + google_crc32c.value(packed).to_bytes(4, "little"))


@pytest.mark.parametrize("bad", ["smaller chunk", "truncated frame", "not blosc"])
def test_a_chunk_whose_blosc_frame_does_not_fit_is_refused(tmp_path, bad):
    """A frame of fewer voxels would decode into part of the buffer (the rest: another chunk's voxels)."""
    from numcodecs import Blosc

    data = em_like((16, 16, 16), seed=2)
    path = make_volume(tmp_path / "b.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    (shard,) = [p for p in (path / "0" / "c").rglob("*") if p.is_file()]
    good = Blosc(cname="zstd", clevel=3).encode(np.ascontiguousarray(data[:8, :8, :8]))
    frame = {"smaller chunk": Blosc(cname="zstd", clevel=3).encode(np.zeros(8 * 8 * 4, np.uint8)),
             "truncated frame": good[:-3], "not blosc": b"\x00" * 8}[bad]
    _replace_chunk(shard, 8, 1, frame)  # chunk (0, 0, 1)
    arr = open_array(path, cache=ChunkCache(0))
    np.testing.assert_array_equal(arr.read(Box((0, 0, 0), (8, 8, 8))), data[:8, :8, :8])  # chunk 0 is fine
    with pytest.raises(CorruptShardError, match=r"chunk \(0, 0, 1\) at \d+\+\d+: its blosc header says"):
        arr.read(Box((0, 0, 0), (8, 8, 16)))  # chunk 0 decodes into the scratch buffer first, then chunk 1


@pytest.mark.parametrize("border", ["constant", "reflect"])
@pytest.mark.parametrize("block,halo", [(16, 0), (16, 5), (12, 8)])
def test_iterator_blocks_equal_numpy_slicing(tmp_path, border, block, halo):
    data = em_like((40, 36, 44), seed=7)
    path = make_volume(tmp_path / "i.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    pad = halo + block
    kwargs = {"constant_values": 3} if border == "constant" else {}
    padded = np.pad(data, pad, mode=border, **kwargs)  # type: ignore[call-overload]
    spec = BlockSpec(block, halo_voxels=halo, border=border, constant_value=3)  # type: ignore[arg-type]
    grid = BlockGrid(open_array(path), spec)
    assert grid.array._direct is not None
    n = 0
    for b in grid:
        expected = _in_padded(padded, pad, b.read_box)
        np.testing.assert_array_equal(b.data, expected)
        n += 1
    assert n == len(grid)


def _read_in_child(path: str, conn: object) -> None:
    arr = open_array(path, cache=ChunkCache(0))
    conn.send((arr._direct is not None, int(arr.read(arr.bounds).astype(np.int64).sum())))  # type: ignore[attr-defined]


def test_forked_child_reads_directly(tmp_path):
    data = em_like((32, 32, 32))
    path = make_volume(tmp_path / "f.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    arr = open_array(path, cache=ChunkCache(0))
    assert int(arr.read(arr.bounds).astype(np.int64).sum()) == int(data.astype(np.int64).sum())  # pool running
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(str(path), child))
    proc.start()
    assert parent.poll(60), "the forked child did not answer: its decoding pool hangs"
    direct, total = parent.recv()
    proc.join(10)
    assert direct and total == int(data.astype(np.int64).sum())


def test_cache_load_many_loads_each_chunk_once_across_threads():
    import threading
    import time

    cache = ChunkCache(2**20)
    loaded: list[int] = []
    lock = threading.Lock()

    def load(keys):
        def run(positions):
            for p in positions:
                time.sleep(0.01)  # long enough for the other thread to ask for the same chunk meanwhile
                with lock:
                    loaded.append(keys[p])
                yield np.full(4, keys[p])
        return run

    results = {}

    def worker(name, keys):
        results[name] = cache.load_many(keys, load(keys))

    threads = [threading.Thread(target=worker, args=(n, k)) for n, k in (("a", [1, 2, 3, 4]), ("b", [4, 3, 5, 1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(loaded) == [1, 2, 3, 4, 5]  # each once, though both threads wanted 1, 3 and 4
    assert [int(r[0]) for r in results["a"]] == [1, 2, 3, 4] and [int(r[0]) for r in results["b"]] == [4, 3, 5, 1]

    def broken(positions):
        raise OSError("disk gone")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="disk gone"):
        cache.load_many([9], broken)
    assert cache.load_many([9], lambda positions: iter([np.zeros(4)]))[0].sum() == 0  # not stuck as loading


def test_aligned_grid_without_halo_does_not_fill_the_cache(tmp_path):
    data = em_like((32, 32, 32), seed=2)
    path = make_volume(tmp_path / "k.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    cache = ChunkCache(64 * 2**20)
    grid = BlockGrid(open_array(path, cache=cache), BlockSpec(16))
    assert not grid.blocks_share_chunks
    for b in grid:
        np.testing.assert_array_equal(b.data, data[b.read_box.slices])
    assert cache.nbytes == 0 and grid.array._direct.chunk_reads == 4**3  # each chunk decoded once, not kept
    shared = BlockGrid(open_array(path, cache=cache), BlockSpec(16, halo_voxels=2))
    assert shared.blocks_share_chunks and BlockGrid(grid.array, BlockSpec(12)).blocks_share_chunks
    assert BlockGrid(grid.array, BlockSpec(16, border="drop")).blocks_share_chunks
    list(shared)
    # Each chunk decoded once and kept: the volume fits in the cache, so the next pass decodes nothing.
    assert cache.nbytes == 32**3 and shared.array._direct.chunk_reads == 4**3
    list(shared)
    assert shared.array._direct.chunk_reads == 4**3
    # It does not fit (or release_chunks=True): each chunk is dropped once the pass is past its last block.
    padded = np.pad(data, 2)
    for small, release in ((ChunkCache(32**3 - 1), None), (ChunkCache(64 * 2**20), True)):
        grid = BlockGrid(open_array(path, cache=small), BlockSpec(16, halo_voxels=2), prefetch=0,
                         release_chunks=release)
        for b in grid:
            np.testing.assert_array_equal(b.data, _in_padded(padded, 2, b.read_box))
            assert small.nbytes <= 32**3 * 3 // 4  # the chunks still ahead: never the whole volume
        assert small.nbytes == 0 and grid.array._direct.chunk_reads == 4**3
    # Some blocks, in increasing order (a resumed or sharded pass): as many chunk reads as keeping them all.
    some, reads = [1, 2, 5, 6, 7], []
    for release in (True, False):
        grid = BlockGrid(open_array(path, cache=ChunkCache()), BlockSpec(16, halo_voxels=2), prefetch=2,
                         release_chunks=release)
        blocks = list(grid.iter_blocks(some))
        assert [b.index for b in blocks] == [grid.block_at(i).index for i in some]
        for b in blocks:
            np.testing.assert_array_equal(b.data, _in_padded(padded, 2, b.read_box))
        reads.append(grid.array._direct.chunk_reads)
        assert (grid.array.cache.nbytes == 0) == release
    assert reads[0] == reads[1] < 4**3  # each chunk of those blocks decoded once (none dropped too early)
    # Any iterable of flat or (z, y, x) indices; a bad one is refused before any block is read.
    grid = BlockGrid(open_array(path, cache=ChunkCache()), BlockSpec(16, halo_voxels=2), release_chunks=True)
    assert [b.index for b in grid.iter_blocks(i for i in (0, (0, 1, 1), -1))] == [(0, 0, 0), (0, 1, 1), (1, 1, 1)]
    assert grid.array.cache.nbytes == 0
    before = grid.array._direct.chunk_reads
    with pytest.raises(IndexError, match="block index 8 out of range"):
        next(grid.iter_blocks([0, 8]))
    assert grid.array._direct.chunk_reads == before


def test_buffer_of_a_dropped_chunk_is_reused_only_when_no_view_of_it_is_left():
    cache = ChunkCache(2**16)  # sets aside up to 8 KiB: two 4 KiB buffers
    buf = cache.buffer(4096)
    cache.put("a", buf.view(np.uint16).reshape(8, 16, 16))
    held = cache.get("a")[2:5]  # a reader still copying from the chunk
    del buf
    cache.release(["a", "not cached"])
    assert cache.get("a") is None and cache.nbytes == 0
    fresh = cache.buffer(4096)
    assert not np.shares_memory(fresh, held)  # not handed out while a view of it lives
    del held
    address = fresh.ctypes.data
    cache.put("b", fresh.reshape(16, 16, 16))
    del fresh
    cache.release(["b"])
    again = cache.buffer(4096)
    assert again.ctypes.data == address and again.flags.writeable and again.shape == (4096,)
    assert cache.buffer(512).nbytes == 512  # another size: a new array

    # Evicted chunks' buffers serve the next decodes too; arrays the cache did not hand out are not reused.
    addresses = []
    for n in range(16):
        chunk = cache.buffer(4096)
        addresses.append(chunk.ctypes.data)
        cache.put(("c", n), chunk.reshape(16, 16, 16))
    del chunk
    first = addresses[0]
    cache.put(("c", 16), np.zeros((16, 16, 16), np.uint8))  # evicts ("c", 0), the least recently used
    assert cache.get(("c", 0)) is None and cache.buffer(4096).ctypes.data == first
    cache.release([("c", 16)])
    assert cache._spare_bytes == 0


def test_a_halo_pass_read_through_zarr_python_drops_its_chunks_too(tmp_path):
    # Remote data (a DVC remote, s3://) is read through zarr-python into the same LRU: a pass over a volume that
    # does not fit holds the chunks ahead of it, not the cache's bound, and decodes each chunk once.
    data = em_like((32, 32, 32), seed=3)
    path = make_volume(tmp_path / "z.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    padded = np.pad(data, 2, mode="reflect")
    for release, cache in ((None, ChunkCache(32**3 - 1)), (True, ChunkCache())):
        array = open_array(path, backend="zarr", cache=cache)
        assert array._direct is None and array.chunks_in_lru
        grid = BlockGrid(array, BlockSpec(16, halo_voxels=2, border="reflect"), prefetch=0, release_chunks=release)
        for b in grid:
            np.testing.assert_array_equal(b.data, _in_padded(padded, 2, b.read_box))
            assert cache.nbytes <= 32**3 * 3 // 4
        assert cache.nbytes == 0 and cache.misses == 4**3
    kept = ChunkCache()
    list(BlockGrid(open_array(path, backend="zarr", cache=kept), BlockSpec(16, halo_voxels=2)))
    assert kept.nbytes == 32**3 and kept.misses == 4**3  # it fits: kept for the next pass, as before


def test_halo_blocks_stay_exact_while_released_and_evicted_chunks_are_reused(tmp_path):
    import threading

    data = em_like((48, 40, 56), seed=11)
    path = make_volume(tmp_path / "r.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    cache = ChunkCache(48 * 8**3)  # 48 chunks: smaller than a pass's working set, so chunks are also evicted
    array = open_array(path, cache=cache)
    padded = np.pad(data, 32, mode="reflect")
    errors: list[str] = []

    def check(spec, prefetch):
        for b in BlockGrid(array, spec, prefetch=prefetch):
            expected = _in_padded(padded, 32, b.read_box)
            if not np.array_equal(b.data, expected):
                errors.append(f"{spec} block {b.index}")

    def random_reads(seed):
        rng = np.random.default_rng(seed)
        for _ in range(60):
            start = [int(rng.integers(0, s - 12)) for s in data.shape]
            box = Box(tuple(start), tuple(a + 12 for a in start))
            if not np.array_equal(array.read(box), data[box.slices]):
                errors.append(f"read {box}")

    jobs = [threading.Thread(target=check, args=(BlockSpec(16, halo_voxels=4, border="reflect"), 4)),
            threading.Thread(target=check, args=(BlockSpec(12, halo_voxels=8, border="reflect"), 2)),
            threading.Thread(target=random_reads, args=(1,)), threading.Thread(target=random_reads, args=(2,))]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert not errors, errors[:5]
    assert cache.reused > 0 and cache.nbytes <= 48 * 8**3 and cache._spare_bytes <= cache.total_bytes // 8


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_shard_files_stay_open_within_a_bound_and_close_with_the_reader(tmp_path, monkeypatch):
    import gc
    import threading

    import emdata.shards as shards

    monkeypatch.setattr(shards, "_MAX_OPEN_FILES", 3)
    data = em_like((48, 48, 48), seed=5)
    path = make_volume(tmp_path / "f.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))  # 27 shards
    before = _open_fds()
    arr = open_array(path, cache=ChunkCache(0))
    reader = arr._direct
    assert reader is not None
    errors: list[BaseException] = []

    def read_all(seed: int, arr=arr, reader=reader) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):  # boxes across shards, from 4 threads at once: descriptors evicted while in use
                start = [int(rng.integers(0, 32)) for _ in range(3)]
                box = Box(tuple(start), tuple(a + 8 + int(rng.integers(0, 9)) for a in start))
                np.testing.assert_array_equal(arr.read(box), data[box.slices])
                assert len(reader._files) <= 3 + 4  # the bound, plus at most one in use per thread
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=read_all, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_array_equal(arr.read(arr.bounds), data)
    assert len(reader._files) <= 3 and all(users == 0 for _, users in reader._files.values())
    assert _open_fds() - before <= 3
    del arr, reader, read_all, threads
    gc.collect()
    assert _open_fds() <= before  # the reader's descriptors are closed with it


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_direct_block_iteration(tmp_path, prefetch):
    """Aligned blocks decoded straight into them on the decoding threads (several groups per block, padded edge
    blocks read in turn, cached chunks copied from the cache): the voxels of numpy slicing, in order; a damaged
    chunk fails the iteration naming it; leaving early and iterating again is fine."""
    data = em_like((40, 64, 64), seed=5)
    path = make_volume(tmp_path / "d.zarr", data, n_levels=1, chunks=(8, 8, 8), shards=(16, 32, 32))
    padded = np.pad(data, [(0, 24), (0, 0), (0, 0)], constant_values=9)
    cache = ChunkCache(64 * 2**20)
    arr = open_array(path, cache=cache)
    arr.read(Box((0, 0, 0), (8, 8, 8)))  # one chunk now cached: the direct iteration copies it from the cache
    assert arr._direct.chunk_reads == 1
    grid = BlockGrid(arr, BlockSpec(16, border="constant", constant_value=9), prefetch=prefetch)
    assert grid._direct_blocks and grid.prefetch == prefetch
    assert not BlockGrid(arr, BlockSpec(32))._direct_blocks  # 64 chunks: through reading threads
    blocks = list(grid)
    assert [b.index for b in blocks] == [b.index for b in grid.blocks()]
    for b in blocks:  # 8 chunks per inner block, in groups; the z = 32 blocks reach past the array
        np.testing.assert_array_equal(b.data, padded[b.read_box.slices])
    assert arr._direct.chunk_reads == 1 + 5 * 8 * 8 - 1  # every other chunk decoded once, the cached one not
    for _ in zip(range(2), grid):  # leave early, then iterate again
        pass
    assert sum(b.data.size for b in grid) == 3 * 4 * 4 * 16**3
    (shard,) = [p for p in (path / "0" / "c").rglob("*") if p.is_file() and p.parts[-3:] == ("0", "1", "1")]
    _replace_chunk(shard, 2 * 4 * 4, 5, b"\x00" * 8)  # chunk (0, 5, 5), in block (0, 2, 2)
    with pytest.raises(CorruptShardError, match=r"chunk \(0, 5, 5\)"):
        list(BlockGrid(open_array(path, cache=ChunkCache(0)), BlockSpec(16), prefetch=prefetch))
